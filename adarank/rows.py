"""The operations on a matrix's rows that the optimizer needs, behind one small protocol.

The refresh, tracking and the staleness test touch whole matrices through ``RowOps``: a
gradient ``G`` (m×n), a left projector ``P`` (m×r) and right-side moments (m×r) are
*row* operands, which under FSDP2 each rank holds only in part; everything else (``Q``,
a left projection ``PᵀG``, left-side moments) is whole on every process.

- ``LocalRows`` (the instance ``LOCAL``): one process, or DDP, where every rank holds the
  whole averaged gradient. Each method is the plain computation of ``projector.py``,
  ``subspace.py`` and ``rsvd.py``; nothing is communicated. This is all a reader of the
  single-process path needs.
- ``distributed.ShardContext``: a DTensor sharded on dim 0; the same methods on this
  rank's rows, combining ranks with all-reduces of small matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .projector import project
from .rsvd import truncated_svd, truncated_svd_batched
from .subspace import align_signs, subspace_overlap, subspace_overlap_tensor, track_subspace

__all__ = ["LOCAL", "LocalRows", "RowOps", "all_finite", "local_tensor"]

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor, ``t`` itself otherwise (found without importing
    ``torch.distributed``). Under ``torch.no_grad`` the block is the DTensor's own local
    tensor, so in-place updates of it update the DTensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def all_finite(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """For each tensor, whether every element is finite; one host synchronisation.

    A sum is finite iff every element is, unless finite elements overflow it: one cheap
    reduction per tensor (an ``isfinite().all()`` pass per tensor cost more than a whole
    AdamW step), with the rare alarm confirmed exactly."""
    if not tensors:
        return []
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    return [
        ok or bool(torch.isfinite(t).all())
        for t, ok in zip(tensors, torch.isfinite(sums).tolist(), strict=True)
    ]


class RowOps(Protocol):
    """What the optimizer computes on one matrix (or a stack of same-shape matrices)."""

    @property
    def sharded(self) -> bool:
        """Whether rows are split across processes (then batches hold one matrix)."""
        ...

    def rows(self, G: torch.Tensor) -> int:
        """Rows m of the whole matrix whose block (or whole) is ``G``."""
        ...

    def wrap_rows(self, t: torch.Tensor) -> torch.Tensor:
        """State with the parameter's rows, in the form to store it."""
        ...

    def norm(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        """``‖x‖_F`` (0-d); ``rows``: x is split by rows like G."""
        ...

    def projection_norms(
        self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(‖R‖_F, ‖G‖_F)`` as 0-d tensors; ``R_rows``: R = GQ has G's rows."""
        ...

    def captured_fraction(self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool) -> torch.Tensor:
        """``‖R‖_F / ‖G‖_F`` (0-d, 0 for a zero G)."""
        ...

    def dot_rows(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``aᵀb`` of two row vectors (0-d)."""
        ...

    def matmul_tn(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``AᵀB`` of two row operands, e.g. ``C = P_newᵀ P_old``."""
        ...

    def project(
        self, G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None
    ) -> torch.Tensor:
        """Compact gradient ``R``: ``PᵀG``, ``GQ`` or ``PᵀGQ``."""
        ...

    def fro_norms(self, Gs: torch.Tensor) -> torch.Tensor:
        """``‖G_i‖_F`` of a stack (b×m×n) as a (b,) float64 tensor (float64, so neither a
        tiny nor a huge G under- or overflows its squares: the rank is scale-invariant)."""
        ...

    def truncated_svd_batched(
        self,
        Gs: torch.Tensor,
        k: int,
        backend: str,
        *,
        seeds: Sequence[int],
        oversample: int,
        power_iters: int,
    ) -> SVD:
        """Top-``k`` SVD of each matrix of a stack (b×m×n)."""
        ...

    def align_rows(self, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        """``subspace.align_signs`` for a row basis (P)."""
        ...

    def overlap(
        self, old: torch.Tensor | None, new: torch.Tensor | None, *, rows: bool
    ) -> torch.Tensor | float:
        """``subspace.subspace_overlap`` of two bases; ``rows``: they are left projectors."""
        ...

    def track(
        self, G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``subspace.track_subspace``: one block power step."""
        ...


class LocalRows:
    """``RowOps`` of a matrix held whole by this process: the plain computations."""

    sharded = False

    def rows(self, G: torch.Tensor) -> int:
        return G.shape[0]

    def wrap_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def fro_sq(self, G: torch.Tensor) -> float:
        """``‖G‖_F²`` as a float."""
        return float(torch.linalg.vector_norm(G, dtype=torch.float32)) ** 2

    def norm(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        del rows  # one process holds all of x
        return torch.linalg.vector_norm(x)

    def projection_norms(
        self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        del R_rows
        return torch.linalg.vector_norm(R), torch.linalg.vector_norm(G)

    def captured_fraction(self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool) -> torch.Tensor:
        del R_rows
        tiny = torch.finfo(torch.float32).tiny
        return torch.linalg.vector_norm(R) / torch.linalg.vector_norm(G).clamp_min(tiny)

    def dot_rows(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.dot(a, b)

    def matmul_tn(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return A.T @ B

    def project(
        self, G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None
    ) -> torch.Tensor:
        return project(G, P, Q)

    def fro_norms(self, Gs: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(Gs, dim=(1, 2), dtype=torch.float64)

    def truncated_svd_batched(
        self,
        Gs: torch.Tensor,
        k: int,
        backend: str,
        *,
        seeds: Sequence[int],
        oversample: int,
        power_iters: int,
    ) -> SVD:
        return truncated_svd_batched(
            Gs, k, backend, seeds=seeds, oversample=oversample, power_iters=power_iters
        )

    def align_rows(self, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        return align_signs(new, old)

    def overlap(
        self, old: torch.Tensor | None, new: torch.Tensor | None, *, rows: bool
    ) -> torch.Tensor | float:
        del rows
        return subspace_overlap_tensor(old, new)  # 0-d: no host synchronisation

    def overlap_rows(self, old: torch.Tensor | None, new: torch.Tensor | None) -> float:
        """``subspace.subspace_overlap`` as a float."""
        return subspace_overlap(old, new)

    def track(
        self, G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return track_subspace(G, P, Q)

    def truncated_svd(
        self,
        G: torch.Tensor,
        k: int,
        backend: str,
        *,
        seed: int,
        oversample: int,
        power_iters: int,
    ) -> SVD:
        """``rsvd.truncated_svd`` of one matrix."""
        return truncated_svd(
            G, k, backend, seed=seed, oversample=oversample, power_iters=power_iters
        )


LOCAL = LocalRows()
