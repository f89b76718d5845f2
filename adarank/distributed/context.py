"""``ShardContext``: the row operations (``rows.RowOps``) of an FSDP2 parameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..rows import LOCAL, RowOps, all_finite
from ..subspace import subspace_overlap
from .comm import all_reduce_, row_shard_info, sharded_all_finite
from .linalg import (
    sharded_align_signs,
    sharded_captured_fraction,
    sharded_fro_sq,
    sharded_matmul_tn,
    sharded_project,
    sharded_projection_norms,
    sharded_randomized_svd,
    sharded_subspace_overlap,
    sharded_track_subspace,
)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None  # type: ignore[assignment, misc]

__all__ = [
    "ShardContext",
    "UNSHARDED",
    "check_sharded_backend",
    "finite_flags",
    "is_dtensor",
    "local_tensor",
]


# ------------------------------------------------------- per-parameter context


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False without distributed)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor, ``t`` itself otherwise.

    Under ``torch.no_grad`` (as in ``Optimizer.step``) the block is the
    DTensor's own local tensor, so in-place updates of it update the DTensor.
    """
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


@dataclass(frozen=True)
class ShardContext:
    """``rows.RowOps`` of a parameter whose rows are split across ranks (FSDP2).

    ``AdaRankAdamW`` takes one per parameter per step (``ShardContext.of(p)``; a plain
    tensor gets ``rows.LOCAL``, the single-process operations, also reachable here as
    ``UNSHARDED``). Operands named "rows" are split by rows like the parameter: the
    gradient G (m×n), a left projector P (m×r), right-side moments (m×r), G's residual
    S; the others (Q, a left projection R = PᵀG, left moments) are replicated. Each
    method works on this rank's rows and all-reduces small matrices over ``group`` (the
    ``sharded_*`` functions of this module); results are replicated where the
    unsharded result is a small matrix or a number, so decisions taken from them agree
    on every rank. Batches hold one matrix.

    Attributes:
        group: process group of the shard dimension.
        layout: ``(row_offset, total_rows)`` of this rank's block.
        mesh, placements: the parameter's device mesh and placements, for
            storing row-sharded state as DTensors (``wrap_rows``).
    """

    group: dist.ProcessGroup | None
    layout: tuple[int, int]
    mesh: Any = None
    placements: tuple[Any, ...] = ()

    sharded = True

    @classmethod
    def of(cls, p: torch.Tensor) -> RowOps:
        """The row operations of parameter ``p`` (``UNSHARDED`` for a plain tensor)."""
        if not is_dtensor(p):
            return UNSHARDED
        group, layout = row_shard_info(p)
        return cls(group, layout, p.device_mesh, tuple(p.placements))  # type: ignore[attr-defined]

    def rows(self, G: torch.Tensor) -> int:
        return self.layout[1]

    def wrap_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Row-sharded state as a DTensor of the parameter's mesh and placements
        (global rows m), so ``torch.distributed.checkpoint`` writes each rank's rows."""
        shape = (self.layout[1], *t.shape[1:])
        return DTensor.from_local(
            t,
            self.mesh,
            self.placements,
            run_check=False,
            shape=torch.Size(shape),
            stride=_contiguous_stride(shape),
        )

    def fro_sq(self, G: torch.Tensor) -> float:
        """``‖G‖_F²`` (replicated)."""
        return float(sharded_fro_sq(G, self.group))

    def fro_norms(self, Gs: torch.Tensor) -> torch.Tensor:
        squares = torch.stack([G.to(torch.float64).square().sum() for G in Gs])
        return all_reduce_(squares, self.group, "fro_sq").sqrt()

    def norm(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        if not rows:
            return torch.linalg.vector_norm(x)
        total = x.to(torch.float32).square().sum().reshape(1)
        return all_reduce_(total, self.group, "norm")[0].sqrt()

    def projection_norms(
        self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sharded_projection_norms(R, G, R_sharded=R_rows, group=self.group)

    def captured_fraction(self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool) -> torch.Tensor:
        return sharded_captured_fraction(R, G, R_sharded=R_rows, group=self.group)

    def dot_rows(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return all_reduce_(torch.dot(a, b).reshape(1).contiguous(), self.group, "dot")[0]

    def matmul_tn(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return sharded_matmul_tn(A, B, self.group)

    def project(
        self, G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None
    ) -> torch.Tensor:
        return sharded_project(G, P, Q, self.group)

    def truncated_svd(
        self,
        G: torch.Tensor,
        k: int,
        backend: str,
        *,
        seed: int,
        oversample: int,
        power_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U``'s rows of this rank, replicated S, Vh. Only the randomized ``"torch"``
        backend runs on row blocks: ``"exact"`` and ``"fbpca"`` need the full matrix,
        which no rank holds (``ValueError``)."""
        check_sharded_backend(backend)
        return sharded_randomized_svd(
            G,
            k,
            oversample=oversample,
            power_iters=power_iters,
            seed=seed,
            group=self.group,
            layout=self.layout,
        )

    def truncated_svd_batched(
        self,
        Gs: torch.Tensor,
        k: int,
        backend: str,
        *,
        seeds: Sequence[int],
        oversample: int,
        power_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if Gs.shape[0] != 1:
            raise ValueError("ShardContext.truncated_svd_batched: a batch of one matrix")
        U, S, Vh = self.truncated_svd(
            Gs[0], k, backend, seed=seeds[0], oversample=oversample, power_iters=power_iters
        )
        return U[None], S[None], Vh[None]

    def align_rows(self, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        return sharded_align_signs(new, old, self.group)

    def overlap(self, old: torch.Tensor | None, new: torch.Tensor | None, *, rows: bool) -> float:
        if rows:
            return sharded_subspace_overlap(old, new, self.group)
        return subspace_overlap(old, new)

    def overlap_rows(self, old: torch.Tensor | None, new: torch.Tensor | None) -> float:
        return sharded_subspace_overlap(old, new, self.group)

    def track(
        self, G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return sharded_track_subspace(G, P, Q, self.group)


UNSHARDED = LOCAL


def check_sharded_backend(backend: str) -> None:
    """Refuse an SVD backend that needs the full gradient matrix (FSDP2)."""
    if backend != "torch":
        raise ValueError(
            f"backend={backend!r} needs the full gradient matrix, which no rank holds under "
            "FSDP2 (parameters are DTensors sharded on dim 0); use backend='torch', the "
            "randomized SVD that runs on row shards"
        )


def finite_flags(tensors_local: Sequence[torch.Tensor], contexts: Sequence[RowOps]) -> list[bool]:
    """For each gradient, whether it is finite (on every rank holding part of it).

    Unsharded tensors are tested locally (one host synchronisation); sharded
    ones with ``sharded_all_finite``, one all-reduce per process group (in
    order of first appearance, the same on every rank), so a NaN in one rank's
    shard makes every rank skip that parameter.
    """
    flags: list[bool] = [True] * len(tensors_local)
    plain = [i for i, c in enumerate(contexts) if not c.sharded]
    for i, ok in zip(plain, all_finite([tensors_local[i] for i in plain]), strict=True):
        flags[i] = ok
    groups: list[Any] = []
    for c in contexts:
        if isinstance(c, ShardContext) and not any(c.group is g for g in groups):
            groups.append(c.group)
    for g in groups:
        members = [
            i for i, c in enumerate(contexts) if isinstance(c, ShardContext) and c.group is g
        ]
        found = sharded_all_finite([tensors_local[i] for i in members], g)
        for i, ok in zip(members, found, strict=True):
            flags[i] = ok
    return flags
