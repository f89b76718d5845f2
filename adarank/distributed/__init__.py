"""Row-sharded numerical primitives for adarank under ``torch.distributed`` (DESIGN §9).

Under DDP nothing here is needed: every rank holds the same averaged gradient,
and ``AdaRankAdamW`` draws its sketches from ``(seed, parameter index, refresh
count)``, so every rank computes the same projectors, ranks and moments.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter, and so its
gradient ``G`` (m×n), is a DTensor sharded on dim 0: each rank holds a
contiguous block of rows ``G_local`` (``m_local×n``; blocks may be unequal and
even empty). The functions here compute what ``rsvd.py``, ``projector.py`` and
``subspace.py`` compute on the full matrix, from the local block alone, and
combine ranks with ``all_reduce`` of small matrices (l×n, n×l, l×l or r×n):
no rank ever holds the full gradient. Each is a pure function of its local
inputs plus the collectives, and runs unchanged on one process (the
collectives are skipped when the group has a single member, or when
``torch.distributed`` is not initialised).

Conventions:

- Collective: every rank of ``group`` must call each function, in the same
  order (``None`` is the default group; ``row_shard_info`` gives an FSDP2
  parameter's group and row layout).
- "sharded" outputs are this rank's rows of the full result; "replicated"
  outputs are bitwise identical on every rank: they come out of an all-reduce
  (which delivers the same bits to every member) or from deterministic local
  work on such values. Decisions taken from them (ranks, refreshes, skips)
  therefore cannot diverge across ranks.
- Everything is computed in float32, like ``rsvd.randomized_svd``; Gram matrices
  and their Cholesky factors in float64 (see ``sharded_qr``).

Communication is counted: every reduction goes through ``all_reduce_``, which
adds its payload (the bytes of the tensor reduced, as a rank hands it to the
collective) to each active ``record_comm()`` recorder. Payloads are counted
even when the group has one member and the call is skipped, so the volume of an
algorithm can be measured in a single process. ``randomized_svd_comm_bytes``
gives the same number in closed form.

``ShardContext`` packages these per parameter for ``AdaRankAdamW``: built once
per step from the parameter (``ShardContext.of``), it holds the shard group and
row layout, and its methods (``fro_sq``, ``project``, ``truncated_svd``,
``matmul_tn``, ``track``, ...) are the single-process computations, bit for bit,
when the parameter is a plain tensor (``UNSHARDED``). ``finite_flags`` decides
the skip of a non-finite gradient identically on every rank.

Checkpoints: ``save_checkpoint`` / ``load_checkpoint`` wrap
``torch.distributed.checkpoint`` for a model and an adarank optimizer whose
state shapes follow the ranks chosen at run time.
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .comm import (
    CommStats,
    all_reduce_,
    record_comm,
    row_shard_info,
    shard_layout,
    sharded_all_finite,
    world_size,
)
from .context import (
    UNSHARDED,
    ShardContext,
    check_sharded_backend,
    finite_flags,
    is_dtensor,
    local_tensor,
)
from .linalg import (
    gram_comm_bytes,
    randomized_svd_comm_bytes,
    sharded_align_signs,
    sharded_captured_fraction,
    sharded_fro_sq,
    sharded_matmul_tn,
    sharded_orth,
    sharded_project,
    sharded_projection_norms,
    sharded_qr,
    sharded_randomized_svd,
    sharded_subspace_overlap,
    sharded_track_subspace,
)

__all__ = [
    "UNSHARDED",
    "CommStats",
    "ShardContext",
    "all_reduce_",
    "check_sharded_backend",
    "finite_flags",
    "gram_comm_bytes",
    "is_dtensor",
    "load_checkpoint",
    "local_tensor",
    "randomized_svd_comm_bytes",
    "record_comm",
    "row_shard_info",
    "save_checkpoint",
    "shard_layout",
    "sharded_align_signs",
    "sharded_all_finite",
    "sharded_captured_fraction",
    "sharded_fro_sq",
    "sharded_matmul_tn",
    "sharded_orth",
    "sharded_project",
    "sharded_projection_norms",
    "sharded_qr",
    "sharded_randomized_svd",
    "sharded_subspace_overlap",
    "sharded_track_subspace",
    "world_size",
]
