"""Communication for the row-sharded optimizer: counted all-reduces, shard layouts of
FSDP2 parameters, and the all-reduced finiteness test."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "CommStats",
    "all_reduce_",
    "record_comm",
    "row_shard_info",
    "shard_layout",
    "sharded_all_finite",
    "world_size",
]


# ------------------------------------------------------------- communication


@dataclass
class CommStats:
    """Payload counted by ``record_comm``: calls, total bytes, bytes by label."""

    calls: int = 0
    bytes: int = 0
    by_label: dict[str, int] = field(default_factory=dict)


_RECORDERS: list[CommStats] = []


@contextmanager
def record_comm() -> Iterator[CommStats]:
    """Count the all-reduce payload of everything run inside the block.

    Example::

        with record_comm() as stats:
            sharded_randomized_svd(G_local, 32, seed=0)
        print(stats.bytes, stats.by_label)

    Recorders nest; each sees every reduction issued while it is open.
    """
    stats = CommStats()
    _RECORDERS.append(stats)
    try:
        yield stats
    finally:
        _RECORDERS.remove(stats)


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Members of ``group``; 1 when ``torch.distributed`` is absent or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_(
    t: torch.Tensor, group: dist.ProcessGroup | None = None, label: str = "other"
) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place and return it; its payload is recorded.

    ``t`` must be contiguous. On one process nothing is sent, but the payload is
    still counted (see the module docstring).
    """
    nbytes = t.numel() * t.element_size()
    for stats in _RECORDERS:
        stats.calls += 1
        stats.bytes += nbytes
        stats.by_label[label] = stats.by_label.get(label, 0) + nbytes
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def shard_layout(
    rows_local: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> tuple[int, int]:
    """``(row_offset, total_rows)`` of this rank's block in a dim-0-sharded matrix.

    Blocks are assumed in rank order (FSDP2's ``torch.chunk`` layout and any
    other contiguous split). One all-reduce of ``world_size`` int64 values.
    ``device`` must suit the backend (CPU for gloo, the rank's GPU for NCCL).
    """
    size = world_size(group)
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    me = dist.get_rank(group) if size > 1 else 0
    counts[me] = rows_local
    all_reduce_(counts, group, "layout")
    per_rank = counts.tolist()
    return sum(per_rank[:me]), sum(per_rank)


def row_shard_info(
    p: torch.Tensor,
) -> tuple[dist.ProcessGroup | None, tuple[int, int]]:
    """``(group, (row_offset, total_rows))`` of a parameter sharded on dim 0.

    For an FSDP2 DTensor: the process group of the mesh dimension whose
    placement is ``Shard(0)`` (other mesh dimensions must be ``Replicate``, as
    in HSDP, where replicas hold equal shards), and this rank's block by
    FSDP2's ``torch.chunk`` rule (blocks of ``ceil(m/W)`` rows, the last ones
    shorter or empty), checked against the local shape. For a plain tensor:
    ``(None, (0, m))``, a group of one. No communication.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    rows = p.shape[0]
    if not isinstance(p, DTensor):
        return None, (0, rows)
    dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard) and pl.dim == 0]
    others_replicated = all(
        isinstance(pl, Replicate) for i, pl in enumerate(p.placements) if i not in dims
    )
    if len(dims) != 1 or not others_replicated:
        raise ValueError(
            f"row_shard_info: expected one Shard(0) placement and Replicate "
            f"elsewhere, got {p.placements}"
        )
    mesh = p.device_mesh
    size, me = mesh.size(dims[0]), mesh.get_local_rank(dims[0])
    block = -(-rows // size)
    offset = min(me * block, rows)
    local_rows = p.to_local().shape[0]
    if local_rows != min(block, rows - offset):
        raise ValueError(
            f"row_shard_info: local block of {local_rows} rows does not follow "
            f"torch.chunk's layout of {rows} rows over {size} ranks"
        )
    return mesh.get_group(dims[0]), (offset, rows)


def sharded_all_finite(
    tensors_local: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[bool]:
    """For each tensor, whether it is finite on *every* rank (one all-reduce).

    Under FSDP2 a NaN may sit in one rank's shard only; deciding to skip a step
    from the local shard would let ranks take different branches (and issue
    different collectives). The per-tensor count of non-finite shards is summed.
    """
    if not tensors_local:
        return []
    device = tensors_local[0].device
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors_local]).to(
        device=device, dtype=torch.float32
    )
    all_reduce_(bad, group, "finite")
    return [flag == 0.0 for flag in bad.tolist()]
