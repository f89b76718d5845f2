"""Projection of a gradient onto a low-rank subspace, and back.

Notation (DESIGN §3): weight W and gradient G are m×n. A *left* projector is
``P`` (m×r, orthonormal columns): ``R = Pᵀ G`` (r×n), back-projection ``P N``.
A *right* projector is ``Q`` (n×r): ``R = G Q`` (m×r), back-projection ``N Qᵀ``.
``both`` uses P and Q: ``R = Pᵀ G Q`` (r×r), back ``P N Qᵀ``.

Which side is used follows GaLore's ``proj_type`` (arXiv 2403.03507, reference
``GaLoreProjector``):

- ``std``: right when m ≥ n, else left: the projector spans the *smaller*
  dimension (``min(m, n)×r``, the cheaper SVD factor) and the compact state is
  ``r×max(m, n)``; square matrices take the right side, as in the reference.
- ``reverse_std``: the opposite of ``std``.
- ``left`` / ``right``: always that side. ``full``: both sides.

Projectors are stored with orthonormal *columns* (P: m×r, Q: n×r) whatever the
side, so one convention serves the moment transfer and the accounting.
"""

from __future__ import annotations

import torch

__all__ = ["PROJ_TYPES", "project", "project_back", "projector_from_svd", "side_for"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def side_for(shape: tuple[int, int], proj_type: str) -> str:
    """``"left"``, ``"right"`` or ``"both"`` for a matrix of ``shape`` under ``proj_type``."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    if proj_type == "full":
        return "both"
    raise ValueError(f"proj_type={proj_type!r} is not known; choose one of {PROJ_TYPES}")


def projector_from_svd(
    U: torch.Tensor, Vh: torch.Tensor, rank: int, side: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(P, Q)`` from a truncated SVD ``G ≈ U S Vh``: P = U[:, :r], Q = Vh[:r]ᵀ."""
    P = U[:, :rank].contiguous() if side in ("left", "both") else None
    Q = Vh[:rank].T.contiguous() if side in ("right", "both") else None
    return P, Q


def project(G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None) -> torch.Tensor:
    """Compact gradient ``R``: ``Pᵀ G``, ``G Q`` or ``Pᵀ G Q``."""
    R = G
    if P is not None:
        R = P.T @ R
    if Q is not None:
        R = R @ Q
    return R


def project_back(N: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None) -> torch.Tensor:
    """Full-size update from a compact one: ``P N``, ``N Qᵀ`` or ``P N Qᵀ``."""
    out = N
    if P is not None:
        out = P @ out
    if Q is not None:
        out = out @ Q.T
    return out
