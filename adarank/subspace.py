"""Subspace tracking between refreshes and moment transfer on a subspace change.

Projectors have orthonormal columns: ``P`` (m×r) on the left, ``Q`` (n×r) on
the right (see ``projector.py``). When a subspace changes from ``P_old`` to
``P_new`` the Adam moments live in old coordinates; ``C = P_newᵀ P_old``
(r_new×r_old, rectangular when the rank changes) maps them across.
"""

from __future__ import annotations

import torch

__all__ = [
    "MOMENT_POLICIES",
    "align_signs",
    "subspace_overlap",
    "track_subspace",
    "transfer_moments",
]

MOMENT_POLICIES = ("keep", "reset", "rotate")


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def align_signs(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """Flip columns of ``new`` whose leading-column overlap with ``old`` is negative.

    An SVD or QR fixes each basis vector only up to sign; aligning signs keeps
    coordinates comparable across refreshes, which matters for the ``keep``
    policy and makes ``C`` close to the identity when the subspace barely moved.
    """
    if old is None:
        return new
    k = min(new.shape[1], old.shape[1])
    dots = (new[:, :k] * old[:, :k]).sum(0)
    signs = torch.where(dots < 0, -1.0, 1.0).to(new.dtype)
    out = new.clone()
    out[:, :k] *= signs
    return out


def subspace_overlap(old: torch.Tensor | None, new: torch.Tensor | None) -> float:
    """Mean squared cosine of the principal angles, ``‖newᵀ old‖_F² / min(r_old, r_new)``.

    1 when one subspace contains the other, ``≈ r/d`` for random subspaces of
    dimension r in R^d, 0 when orthogonal. ``nan`` when either is missing.
    """
    if old is None or new is None:
        return float("nan")
    C = new.T @ old
    return float(C.square().sum() / min(old.shape[1], new.shape[1]))


def track_subspace(
    G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One warm-started block power step towards G's dominant subspaces.

    ``P ← orth(G Gᵀ P)`` and ``Q ← orth(Gᵀ G Q)`` (subspace iteration, as in
    LDAdam and Dion): four thin matmuls and a QR of an m×r panel, no SVD. The
    rank is unchanged; signs are aligned to the previous basis.
    """
    P_new = None if P is None else align_signs(_orth(G @ (G.T @ P)), P)
    Q_new = None if Q is None else align_signs(_orth(G.T @ (G @ Q)), Q)
    return P_new, Q_new


def _transfer(
    x: torch.Tensor, C_left: torch.Tensor | None, C_right: torch.Tensor | None
) -> torch.Tensor:
    if C_left is not None:
        x = C_left @ x
    if C_right is not None:
        x = x @ C_right.T
    return x


def transfer_moments(
    M: torch.Tensor,
    V: torch.Tensor,
    C_left: torch.Tensor | None,
    C_right: torch.Tensor | None,
    policy: str,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Carry Adam moments into new subspace coordinates.

    Args:
        M, V: first and second moments in old coordinates (r_old×n, m×r_old or
            r_old×r_old, matching the sides in use).
        C_left: ``P_newᵀ P_old`` (r_new×r_old) or None; C_right: ``Q_newᵀ Q_old``.
        policy: ``"keep"`` (reuse as is, GaLore's choice; when the shape changes
            it falls back to ``"reset"``), ``"reset"`` (zeros), or ``"rotate"``
            (LDAdam's projection-aware transfer, arXiv 2410.16103 §3):
            ``M ← C M``, ``V ← (C∘C)(V − M²) + (C M)²``, clamped at 0. A plain
            ``V ← C V`` can go negative and is not offered.

    Returns:
        ``(M_new, V_new, was_reset)``; ``was_reset`` tells the caller to restart
        bias correction, since zeroed moments are biased like fresh ones.
    """
    if policy not in MOMENT_POLICIES:
        raise ValueError(f"moments={policy!r} is not known; choose one of {MOMENT_POLICIES}")
    new_shape = list(M.shape)
    if C_left is not None:
        new_shape[0] = C_left.shape[0]
    if C_right is not None:
        new_shape[1] = C_right.shape[0]
    if policy == "keep" and list(M.shape) == new_shape:
        return M, V, False
    if policy in ("keep", "reset"):
        return M.new_zeros(new_shape), V.new_zeros(new_shape), True
    M_new = _transfer(M, C_left, C_right)
    variance = V - M.square()
    sq = lambda C: None if C is None else C.square()  # noqa: E731
    V_new = _transfer(variance, sq(C_left), sq(C_right)) + M_new.square()
    return M_new, V_new.clamp_(min=0.0), False
