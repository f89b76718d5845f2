"""Subspace tracking between refreshes and moment transfer on a subspace change.

Projectors have orthonormal columns: ``P`` (m×r) on the left, ``Q`` (n×r) on
the right (see ``projector.py``). When a subspace changes from ``P_old`` to
``P_new`` the Adam moments live in old coordinates; ``C = P_newᵀ P_old``
(r_new×r_old, rectangular when the rank changes) maps them across.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = [
    "MOMENT_POLICIES",
    "WHOLE",
    "RowReduce",
    "align_signs",
    "subspace_overlap",
    "subspace_overlap_tensor",
    "track_subspace",
    "transfer_moments",
]

MOMENT_POLICIES = ("keep", "reset", "rotate")


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


class RowReduce(Protocol):
    """The three operations on *row* operands (G, P) that tracking, sign alignment and
    overlap need; under FSDP2 each process holds some rows (``distributed.ShardContext``).
    ``WHOLE``: one process holds every row."""

    def matmul_tn(self, A: torch.Tensor, B: torch.Tensor, label: str = ...) -> torch.Tensor:
        """``AᵀB`` of two row operands (whole on every process)."""
        ...

    def orth(self, Y: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis of a tall row operand, rows as ``Y``'s."""
        ...

    def sum_rows(self, x: torch.Tensor, label: str = ...) -> torch.Tensor:
        """``x`` (a contiguous partial result over this process's rows) summed over rows."""
        ...


class _Whole:
    def matmul_tn(self, A: torch.Tensor, B: torch.Tensor, label: str = "") -> torch.Tensor:
        return A.T @ B

    def orth(self, Y: torch.Tensor) -> torch.Tensor:
        return _orth(Y)

    def sum_rows(self, x: torch.Tensor, label: str = "") -> torch.Tensor:
        return x


WHOLE: RowReduce = _Whole()


def align_signs(
    new: torch.Tensor, old: torch.Tensor | None, rows: RowReduce = WHOLE
) -> torch.Tensor:
    """Flip columns of ``new`` whose leading-column overlap with ``old`` is negative.

    An SVD or QR fixes each basis vector only up to sign; aligning signs keeps
    coordinates comparable across refreshes, which matters for the ``keep``
    policy and makes ``C`` close to the identity when the subspace barely moved.
    ``rows``: how the bases' rows are held (the column dots are summed over them).
    """
    if old is None:
        return new
    k = min(new.shape[1], old.shape[1])
    dots = rows.sum_rows((new[:, :k] * old[:, :k]).sum(0).contiguous(), "signs")
    signs = torch.where(dots < 0, -1.0, 1.0).to(new.dtype)
    out = new.clone()
    out[:, :k] *= signs
    return out


def subspace_overlap(
    old: torch.Tensor | None, new: torch.Tensor | None, rows: RowReduce = WHOLE
) -> float:
    """Mean squared cosine of the principal angles, ``‖newᵀ old‖_F² / min(r_old, r_new)``.

    1 when one subspace contains the other, ``≈ r/d`` for random subspaces of
    dimension r in R^d, 0 when orthogonal. ``nan`` when either is missing.
    """
    return float(subspace_overlap_tensor(old, new, rows))


def subspace_overlap_tensor(
    old: torch.Tensor | None, new: torch.Tensor | None, rows: RowReduce = WHOLE
) -> torch.Tensor:
    """``subspace_overlap`` as a 0-d float32 tensor on the bases' device (no host
    synchronisation); a CPU ``nan`` when either is missing."""
    if old is None or new is None:
        return torch.tensor(float("nan"))
    C = rows.matmul_tn(new, old, "overlap")
    return C.square().sum() / min(old.shape[1], new.shape[1])


def track_subspace(
    G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None, rows: RowReduce = WHOLE
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One warm-started block power step towards G's dominant subspaces.

    ``P ← orth(G Gᵀ P)`` and ``Q ← orth(Gᵀ G Q)`` (subspace iteration, as in
    LDAdam and Dion): four thin matmuls and a QR of an m×r panel, no SVD. The
    rank is unchanged; signs are aligned to the previous basis. ``rows``: how G's
    and P's rows are held (Q is whole everywhere).
    """
    P_new = Q_new = None
    if P is not None:
        P_new = align_signs(rows.orth(G @ rows.matmul_tn(G, P, "track")), P, rows)
    if Q is not None:
        Q_new = align_signs(_orth(rows.matmul_tn(G, G @ Q, "track")), Q)
    return P_new, Q_new


def _transfer(
    x: torch.Tensor, C_left: torch.Tensor | None, C_right: torch.Tensor | None
) -> torch.Tensor:
    if C_left is not None:
        x = C_left @ x
    if C_right is not None:
        x = x @ C_right.T
    return x


def _square(C: torch.Tensor | None) -> torch.Tensor | None:
    return None if C is None else C.square()


def transfer_moments(
    M: torch.Tensor,
    V: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    C_left: torch.Tensor | None,
    C_right: torch.Tensor | None,
    policy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry Adam moments and their accumulated weights into new coordinates.

    Args:
        M, V: raw first and second moments in old coordinates (r_old×n, m×r_old
            or r_old×r_old, matching the sides in use).
        W1, W2: accumulated weights of M and V (Adam's ``1 − βᵗ``), one per
            compact coordinate: shape (r, 1) on the left side, (1, r) on the
            right, (r, r) on both; the bias-corrected moments are M/W1, V/W2.
        C_left: ``P_newᵀ P_old`` (r_new×r_old) or None; C_right: ``Q_newᵀ Q_old``.
        policy: ``"keep"`` (reuse as is, GaLore's choice; when the shape changes
            it falls back to ``"reset"``), ``"reset"`` (zeros, fresh history), or
            ``"rotate"``: LDAdam's projection-aware transfer (arXiv 2410.16103)
            applied to the bias-corrected estimates M̂ = M/W1, V̂ = V/W2:
            ``M̂ ← C M̂``, ``V̂ ← (C∘C)(V̂ − M̂²) + (C M̂)²`` clamped at 0 (a plain
            ``C V`` can go negative and is not offered).

    Under ``rotate`` each new coordinate keeps the share of history it inherits,
    ``W ← (C∘C) W``: a basis vector inside the old subspace (row of C of unit
    norm) keeps its full history, one orthogonal to it starts afresh with W = 0,
    so its first update is Adam's first step, not a step inflated by
    ``(1−β₁)/√(1−β₂) ≈ 3.2`` that raw moments with a global bias correction give.

    Returns:
        ``(M_new, V_new, W1_new, W2_new)``.
    """
    if policy not in MOMENT_POLICIES:
        raise ValueError(f"moments={policy!r} is not known; choose one of {MOMENT_POLICIES}")
    new_shape = list(M.shape)
    new_weight_shape = list(W1.shape)
    if C_left is not None:
        new_shape[0] = new_weight_shape[0] = C_left.shape[0]
    if C_right is not None:
        new_shape[1] = new_weight_shape[1] = C_right.shape[0]
    if policy == "keep" and list(M.shape) == new_shape:
        return M, V, W1, W2
    if policy in ("keep", "reset"):
        zeros = M.new_zeros(new_shape)
        weights = W1.new_zeros(new_weight_shape)
        return zeros, zeros.clone(), weights, weights.clone()
    tiny = torch.finfo(M.dtype).tiny
    M_hat = M / W1.clamp_min(tiny)
    V_hat = V / W2.clamp_min(tiny)
    M_hat_new = _transfer(M_hat, C_left, C_right)
    V_hat_new = _transfer(V_hat - M_hat.square(), _square(C_left), _square(C_right))
    V_hat_new = (V_hat_new + M_hat_new.square()).clamp_(min=0.0)
    W1_new = _transfer(W1, _square(C_left), _square(C_right)).clamp_(0.0, 1.0)
    W2_new = _transfer(W2, _square(C_left), _square(C_right)).clamp_(0.0, 1.0)
    return M_hat_new * W1_new, V_hat_new * W2_new, W1_new, W2_new
