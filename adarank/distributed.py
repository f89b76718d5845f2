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

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .rows import LOCAL, RowOps, all_finite
from .rsvd import _gaussian, mix_seed
from .subspace import align_signs, subspace_overlap

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None  # type: ignore[assignment, misc]

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

# Relative singular-value floor of the rank-deficient fallback in ``sharded_qr``:
# float32 data resolves directions down to about u32·σ₁ ≈ 6e-8·σ₁; below 1e-6·σ₁
# a direction is treated as absent and replaced.
_RANK_TOL = 1e-6
# Accept CholeskyQR2's result when the second Gram is this close to I (its
# Cholesky factor's diagonal ratio bounds κ of the first-pass Q; the second pass
# then leaves an orthogonality error of about u32·κ², here < 1e-5).
_SECOND_PASS_KAPPA = 10.0
# Seed of the random completion in the rank-deficient fallback.
_COMPLETION_SEED = 0x5EED


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
    rows_local: int, group: dist.ProcessGroup | None = None,
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
    counts = counts.tolist()
    return sum(counts[:me]), sum(counts)


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
    others_replicated = all(isinstance(pl, Replicate) for i, pl in enumerate(p.placements)
                            if i not in dims)
    if len(dims) != 1 or not others_replicated:
        raise ValueError(f"row_shard_info: expected one Shard(0) placement and Replicate "
                         f"elsewhere, got {p.placements}")
    mesh = p.device_mesh
    size, me = mesh.size(dims[0]), mesh.get_local_rank(dims[0])
    block = -(-rows // size)
    offset = min(me * block, rows)
    local_rows = p.to_local().shape[0]
    if local_rows != min(block, rows - offset):
        raise ValueError(f"row_shard_info: local block of {local_rows} rows does not follow "
                         f"torch.chunk's layout of {rows} rows over {size} ranks")
    return mesh.get_group(dims[0]), (offset, rows)


def sharded_matmul_tn(
    A_local: torch.Tensor, B_local: torch.Tensor, group: dist.ProcessGroup | None = None,
    label: str = "matmul_tn",
) -> torch.Tensor:
    """``Aᵀ B`` for row-sharded ``A`` (m×a) and ``B`` (m×b) with the same row blocks.

    Replicated a×b result: ``all_reduce(A_localᵀ B_local)``. A block of zero rows
    contributes zeros. Used for ``R = Pᵀ G`` (left projection), ``Gᵀ Q`` (power
    iterations) and ``C = P_newᵀ P_old`` (moment transfer).
    """
    out = (A_local.to(torch.float32).T @ B_local.to(torch.float32)).contiguous()
    return all_reduce_(out, group, label)


def sharded_fro_sq(G_local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``‖G‖_F²`` of a row-sharded matrix as a replicated 0-d float32 tensor.

    The exact denominator of the energy rank rule (DESIGN §3.2); one all-reduce
    of 4 bytes.
    """
    total = G_local.to(torch.float32).square().sum().reshape(1)
    return all_reduce_(total, group, "fro_sq")[0]


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
        device=device, dtype=torch.float32)
    all_reduce_(bad, group, "finite")
    return [flag == 0.0 for flag in bad.tolist()]


# -------------------------------------------------------- orthonormalisation


def _gram(X: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, int]:
    """``(XᵀX, total rows)`` in float64 for row-sharded X: one all-reduce of the
    upper triangle (the Gram is symmetric) with the local row count appended."""
    cols = X.shape[1]
    X64 = X.to(torch.float64)
    local = X64.T @ X64
    iu = torch.triu_indices(cols, cols, device=X.device)
    packed = torch.cat([local[iu[0], iu[1]], local.new_tensor([float(X.shape[0])])])
    all_reduce_(packed, group, "gram")
    gram = local.new_empty(cols, cols)
    gram[iu[0], iu[1]] = packed[:-1]
    gram[iu[1], iu[0]] = packed[:-1]
    return gram, int(packed[-1].item())


def _solve_right(X: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``X L⁻ᵀ``: the Q of ``X = Q Lᵀ`` (float32 data, float64 factor)."""
    return torch.linalg.solve_triangular(L.T.to(X.dtype), X, upper=True, left=False)


def _cholesky_qr2(
    X: torch.Tensor, group: dist.ProcessGroup | None, gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """CholeskyQR2 (Fukaya et al. 2014) with float64 Grams; ``None`` when X is too
    ill-conditioned for it (a failed Cholesky, or a first-pass Q still far from
    orthonormal). The verdict is taken from all-reduced (replicated) Grams, so
    every rank takes the same branch. ``gram``: XᵀX when already reduced."""
    if gram is None:
        gram, _ = _gram(X, group)
    L1, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    Q1 = _solve_right(X, L1)
    gram2, _ = _gram(Q1, group)
    L2, info = torch.linalg.cholesky_ex(gram2)
    diag = L2.diagonal()
    if int(info) != 0 or float(diag.max() / diag.min()) > _SECOND_PASS_KAPPA:
        return None
    return _solve_right(Q1, L2), (L1 @ L2).T.to(torch.float32)


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if world_size(group) > 1 else 0


def _fallback_qr(
    X: torch.Tensor, group: dist.ProcessGroup | None, gram: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of a numerically rank-deficient X (κ ≳ 1e7, or exactly
    deficient, e.g. a zero gradient).

    The directions of X with singular value above ``_RANK_TOL·σ₁`` (from the
    eigendecomposition of the replicated Gram) are orthonormalised; the missing
    columns are filled by random vectors, drawn per rank from
    ``(_COMPLETION_SEED, group rank)``, made orthogonal to them and to each other.
    Householder QR fills them with rounding noise or unit vectors instead: both
    are valid completions, orthogonal to X's range, so neither is "the" answer.
    Returns ``(Q, R)`` with ``R = Qᵀ X`` (one more all-reduce) so ``X = Q R``.
    """
    cols = X.shape[1]
    lam, V = torch.linalg.eigh(gram)  # ascending
    lam_max = float(lam[-1])
    keep = (lam > lam_max * _RANK_TOL**2) if lam_max > 0 else torch.zeros_like(lam, dtype=bool)
    kept = int(keep.sum())
    parts = []
    if kept:
        scale = (V[:, keep] / lam[keep].sqrt()).flip(1)  # largest directions first
        good = _cholesky_qr2(X @ scale.to(X.dtype), group)
        if good is None:  # cannot happen for a basis whose κ is at most 1/_RANK_TOL
            raise FloatingPointError("sharded_qr: orthonormalising the kept directions failed")
        parts.append(good[0])
    missing = cols - kept
    if missing:
        gen = torch.Generator(device=X.device)
        gen.manual_seed(mix_seed(_COMPLETION_SEED, _rank(group), rows, cols))
        W = torch.randn(X.shape[0], missing, generator=gen, device=X.device, dtype=X.dtype)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            for basis in parts:
                W = W - basis @ sharded_matmul_tn(basis, W, group, "fallback")
        filled = _cholesky_qr2(W, group)
        if filled is None:
            raise FloatingPointError("sharded_qr: completing a rank-deficient basis failed")
        parts.append(filled[0])
    Q = torch.cat(parts, dim=1)
    return Q, sharded_matmul_tn(Q, X, group, "fallback")


def sharded_qr(
    Y_local: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a row-sharded tall matrix: ``Y = Q R``, Q sharded like Y, R replicated.

    Args:
        Y_local: this rank's rows (m_local×l) of Y (m×l); requires ``m >= l``
            over all ranks (checked; ``ValueError`` otherwise).
        group: process group (``None``: default).

    Returns:
        ``(Q_local, R)``: float32, ``Q_local`` (m_local×l) this rank's rows of Q
        with orthonormal columns, ``R`` (l×l) replicated.

    Method: CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014): the
    Gram ``YᵀY`` is all-reduced (its upper triangle, in float64: the l×l
    payload a float32 Gram would have), factored by Cholesky ``YᵀY = L Lᵀ``,
    ``Q₁ = Y L⁻ᵀ`` by a triangular solve, and the same once more on Q₁. Two
    all-reduces of l(l+1)/2 float64. The float64 Gram keeps the method exact
    for κ(Y) up to ~1e7 (a float32 Gram fails from ~4e3, which a sketch of a
    decaying gradient spectrum easily reaches). Then ``R`` is upper triangular
    with a positive diagonal, and Q equals Householder QR's Q up to the sign of
    each column.

    Rank deficiency (κ beyond ~1e7, exactly dependent columns, a zero matrix):
    detected from the replicated Grams (every rank takes the same branch), and
    handled by ``_fallback_qr``: Q spans Y's numerical range and is completed by
    random orthonormal columns, R = QᵀY is then not triangular. Costs two to
    five more all-reduces of at most l×l, none in the common case.
    """
    if Y_local.ndim != 2:
        raise ValueError(f"sharded_qr: Y must be 2-D, got shape {tuple(Y_local.shape)}")
    X = Y_local.to(torch.float32)
    gram, rows = _gram(X, group)
    if rows < X.shape[1]:
        raise ValueError(f"sharded_qr: needs at least as many rows as columns, "
                         f"got {rows}×{X.shape[1]} over all ranks")
    result = _cholesky_qr2(X, group, gram)
    if result is not None:
        return result
    return _fallback_qr(X, group, gram, rows)


def sharded_orth(Y_local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Orthonormal basis (this rank's rows) of a row-sharded tall matrix; see ``sharded_qr``."""
    return sharded_qr(Y_local, group)[0]


def _orth_local(Y: torch.Tensor) -> torch.Tensor:
    # Replicated panels are orthonormalised exactly as rsvd.py does (Householder),
    # so the sharded and the unsharded runs share every replicated intermediate.
    return torch.linalg.qr(Y, mode="reduced").Q


# --------------------------------------------------------- randomized SVD


def sharded_randomized_svd(
    G_local: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int,
    group: dist.ProcessGroup | None = None,
    layout: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD of a row-sharded ``G`` (m×n), the algorithm of ``rsvd.randomized_svd``.

    Args:
        G_local: this rank's contiguous block of rows (m_local×n, m_local may be 0).
        k: triplets wanted, ``>= 1``; clamped to ``min(m, n)``.
        oversample, power_iters: ``p`` and ``q`` as in ``randomized_svd``.
        seed: seed of the Gaussian test matrix Ω, required: every rank draws the
            same Ω from it (torch's global RNG differs across ranks).
        group: process group (``None``: default).
        layout: ``(row_offset, total_rows)`` of the block when known (e.g. from
            the DTensor); otherwise found by ``shard_layout`` (one tiny all-reduce).

    Returns:
        ``(U_local, S, Vh)`` float32: this rank's rows of U (m_local×k), and the
        replicated S (k,) and Vh (k×n). On the gathered matrix with the same
        seed they agree with ``randomized_svd`` to float32 rounding, up to the
        sign of each singular pair (an SVD fixes a pair only up to sign, and
        CholeskyQR's Q differs from Householder's by column signs).

    Like ``randomized_svd`` the range finder works on the tall orientation:

    - m ≥ n (rows sharded on the long side): Ω n×l replicated, ``Y = G Ω``
      row-sharded, orthonormalised by ``sharded_qr``; each power iteration
      ``Z = orth(all_reduce(G_localᵀ Q_local))`` (n×l, replicated, Householder),
      ``Q = sharded_orth(G_local Z)``; then ``B = all_reduce(Q_localᵀ G_local)``
      (l×n) and its SVD, replicated; ``U_local = Q_local U_B``.
    - m < n (rows sharded on the short side; the range finder runs on Gᵀ, whose
      columns are sharded): Ω m×l, this rank uses its rows of Ω;
      ``Y = all_reduce(G_localᵀ Ω_local)`` (n×l) orthonormalised locally (Householder); each
      power iteration ``Z = sharded_orth(G_local Q)``, ``Y = all_reduce(G_localᵀ Z)``;
      finally ``Bᵀ = G Q`` (m×l, row-sharded) = Q₂R₂ by ``sharded_qr`` and the
      SVD of the replicated R₂ gives ``U_local = Q₂ V_R`` and ``Vh = (Q U_R)ᵀ``.

    Communication (float32 unless said): (q+1) all-reduces of n×l, 2(q+1)
    Grams of l(l+1)/2+1 float64, see ``randomized_svd_comm_bytes``; no rank
    holds more than an l×n or n×l panel besides its own rows of G.
    """
    if G_local.ndim != 2:
        raise ValueError(f"sharded_randomized_svd: G must be 2-D, got shape "
                         f"{tuple(G_local.shape)}")
    if k < 1:
        raise ValueError(f"sharded_randomized_svd: k must be >= 1, got {k}")
    if oversample < 0 or power_iters < 0:
        raise ValueError("sharded_randomized_svd: oversample and power_iters must be >= 0")
    if seed is None:
        raise ValueError("sharded_randomized_svd: seed is required, so every rank draws "
                         "the same sketch")
    A = G_local.to(torch.float32)
    m_local, n = A.shape
    offset, m = layout if layout is not None else shard_layout(m_local, group, A.device)
    if m >= n:
        k = min(k, n)
        width = min(k + oversample, n)
        omega = _gaussian(n, width, seed, A.device)
        Q = sharded_orth(A @ omega, group)
        for _ in range(power_iters):
            Z = _orth_local(sharded_matmul_tn(A, Q, group, "panel"))
            Q = sharded_orth(A @ Z, group)
        B = sharded_matmul_tn(Q, A, group, "panel")  # width × n
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        return Q @ Ub[:, :k], S[:k], Vh[:k]
    k = min(k, m)
    width = min(k + oversample, m)
    omega = _gaussian(m, width, seed, A.device)[offset:offset + m_local]
    Q = _orth_local(sharded_matmul_tn(A, omega, group, "panel"))  # n × width
    for _ in range(power_iters):
        Z = sharded_orth(A @ Q, group)
        Q = _orth_local(sharded_matmul_tn(A, Z, group, "panel"))
    Q2, R2 = sharded_qr(A @ Q, group)  # Bᵀ = G Q = Q₂ R₂, B = R₂ᵀ Q₂ᵀ
    Ur, S, Vrh = torch.linalg.svd(R2.T, full_matrices=False)
    return Q2 @ Vrh[:k].T, S[:k], (Q @ Ur[:, :k]).T.contiguous()


def gram_comm_bytes(width: int) -> int:
    """Payload of one Gram all-reduce in ``sharded_qr``: upper triangle + row count, float64."""
    return 8 * (width * (width + 1) // 2 + 1)


def randomized_svd_comm_bytes(
    m: int, n: int, k: int, *, oversample: int = 8, power_iters: int = 2, world: int = 1,
    layout_known: bool = True,
) -> int:
    """Bytes ``sharded_randomized_svd`` all-reduces per rank for an m×n matrix sharded on rows.

    ``l = min(k + p, min(m, n))``. Either orientation all-reduces (q+1) panels of
    ``n×l`` float32 (n: the unsharded side) and orthonormalises (q+1) row-sharded
    panels, each by CholeskyQR2 with two Grams (``gram_comm_bytes``):
    ``4·n·l·(q+1) + 2·(q+1)·gram_comm_bytes(l)``, plus ``8·world`` for the shard
    layout when it is not passed. The rank-deficient fallback of ``sharded_qr``
    (rare) is not included.
    """
    k = max(1, min(k, m, n))
    width = min(k + oversample, min(m, n))
    total = 4 * n * width * (power_iters + 1) + 2 * (power_iters + 1) * gram_comm_bytes(width)
    return total + (0 if layout_known else 8 * world)


# ------------------------------------------------- projection and tracking


def sharded_project(
    G_local: torch.Tensor, P_local: torch.Tensor | None, Q: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Compact gradient of a row-sharded G: ``R = PᵀG``, ``GQ`` or ``PᵀGQ``.

    ``P`` (m×r) is row-sharded like G (``P_local``: its m_local rows); ``Q`` (n×r)
    is replicated. Left and both: ``all_reduce(P_localᵀ G_local)`` (r×n), a
    replicated R. Right: ``G_local Q``, this rank's rows of R, no communication.
    """
    G = G_local.to(torch.float32)
    if P_local is None:
        return G if Q is None else G @ Q
    R = sharded_matmul_tn(P_local, G, group, "project")
    return R if Q is None else R @ Q


def sharded_projection_norms(
    R: torch.Tensor, G_local: torch.Tensor, *, R_sharded: bool,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖R‖_F, ‖G‖_F)`` replicated (0-d float32), one all-reduce of 2 floats.

    ``R_sharded``: True when R holds this rank's rows (right projection), False
    when it is replicated (left or both; then only ‖G‖² is summed over ranks).
    What the staleness test (``refresh_below``, ``converge_tol``) reads.
    """
    r_sq = R.to(torch.float32).square().sum()
    local = torch.stack([r_sq if R_sharded else torch.zeros_like(r_sq),
                         G_local.to(torch.float32).square().sum()])
    all_reduce_(local, group, "norms")
    return (local[0] if R_sharded else r_sq).sqrt(), local[1].sqrt()


def sharded_captured_fraction(
    R: torch.Tensor, G_local: torch.Tensor, *, R_sharded: bool,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``‖R‖_F / ‖G‖_F`` replicated (0-d float32); ``0`` when G is zero (no ``nan``).
    See ``sharded_projection_norms``."""
    r_norm, g_norm = sharded_projection_norms(R, G_local, R_sharded=R_sharded, group=group)
    return r_norm / g_norm.clamp_min(torch.finfo(torch.float32).tiny)


def sharded_subspace_overlap(
    old_local: torch.Tensor | None, new_local: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> float:
    """``subspace.subspace_overlap`` for row-sharded bases: ``‖newᵀ old‖_F² / min(r)``
    with ``newᵀ old`` all-reduced (r_new×r_old). ``nan`` when either is missing."""
    if old_local is None or new_local is None:
        return float("nan")
    C = sharded_matmul_tn(new_local, old_local, group, "overlap")
    return float(C.square().sum() / min(old_local.shape[1], new_local.shape[1]))


def sharded_align_signs(
    new_local: torch.Tensor, old_local: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``subspace.align_signs`` for row-sharded bases: the column dots are all-reduced
    (r floats) so every rank flips the same columns."""
    if old_local is None:
        return new_local
    k = min(new_local.shape[1], old_local.shape[1])
    dots = (new_local[:, :k] * old_local[:, :k]).sum(0).contiguous()
    all_reduce_(dots, group, "signs")
    signs = torch.where(dots < 0, -1.0, 1.0).to(new_local.dtype)
    out = new_local.clone()
    out[:, :k] *= signs
    return out


def sharded_track_subspace(
    G_local: torch.Tensor, P_local: torch.Tensor | None, Q: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``subspace.track_subspace`` for a row-sharded G: one block power step.

    Left (P row-sharded): ``GᵀP = all_reduce(G_localᵀ P_local)`` (n×r), then
    ``P ← sharded_orth(G_local (GᵀP))``, signs aligned with ``sharded_align_signs``.
    Right (Q replicated): ``Gᵀ(GQ) = all_reduce(G_localᵀ (G_local Q))`` (n×r),
    Householder QR and sign alignment locally, replicated.
    """
    G = G_local.to(torch.float32)
    P_new = Q_new = None
    if P_local is not None:
        GtP = sharded_matmul_tn(G, P_local, group, "track")
        P_new = sharded_align_signs(sharded_orth(G @ GtP, group), P_local, group)
    if Q is not None:
        GtGQ = sharded_matmul_tn(G, G @ Q, group, "track")
        Q_new = align_signs(_orth_local(GtGQ), Q)
    return P_new, Q_new


# ------------------------------------------------------- per-parameter context


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False without distributed)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor, ``t`` itself otherwise.

    Under ``torch.no_grad`` (as in ``Optimizer.step``) the block is the
    DTensor's own local tensor, so in-place updates of it update the DTensor.
    """
    return t.to_local() if is_dtensor(t) else t


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
        return cls(group, layout, p.device_mesh, tuple(p.placements))

    def rows(self, G: torch.Tensor) -> int:
        return self.layout[1]

    def wrap_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Row-sharded state as a DTensor of the parameter's mesh and placements
        (global rows m), so ``torch.distributed.checkpoint`` writes each rank's rows."""
        shape = (self.layout[1], *t.shape[1:])
        return DTensor.from_local(t, self.mesh, self.placements, run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_stride(shape))

    def fro_sq(self, G: torch.Tensor) -> float:
        """``‖G‖_F²`` (replicated)."""
        return float(sharded_fro_sq(G, self.group))

    def fro_norms(self, Gs: torch.Tensor) -> torch.Tensor:
        return torch.stack([sharded_fro_sq(G, self.group).sqrt() for G in Gs])

    def norm(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        if not rows:
            return torch.linalg.vector_norm(x)
        total = x.to(torch.float32).square().sum().reshape(1)
        return all_reduce_(total, self.group, "norm")[0].sqrt()

    def projection_norms(
        self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sharded_projection_norms(R, G, R_sharded=R_rows, group=self.group)

    def captured_fraction(self, R: torch.Tensor, G: torch.Tensor, *, R_rows: bool
                          ) -> torch.Tensor:
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
        self, G: torch.Tensor, k: int, backend: str, *, seed: int, oversample: int,
        power_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U``'s rows of this rank, replicated S, Vh. Only the randomized ``"torch"``
        backend runs on row blocks: ``"exact"`` and ``"fbpca"`` need the full matrix,
        which no rank holds (``ValueError``)."""
        check_sharded_backend(backend)
        return sharded_randomized_svd(G, k, oversample=oversample, power_iters=power_iters,
                                      seed=seed, group=self.group, layout=self.layout)

    def truncated_svd_batched(
        self, Gs: torch.Tensor, k: int, backend: str, *, seeds: Sequence[int],
        oversample: int, power_iters: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if Gs.shape[0] != 1:
            raise ValueError("ShardContext.truncated_svd_batched: a batch of one matrix")
        U, S, Vh = self.truncated_svd(Gs[0], k, backend, seed=seeds[0], oversample=oversample,
                                      power_iters=power_iters)
        return U[None], S[None], Vh[None]

    def align_rows(self, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        return sharded_align_signs(new, old, self.group)

    def overlap(self, old: torch.Tensor | None, new: torch.Tensor | None, *, rows: bool
                ) -> float:
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


def finite_flags(
    tensors_local: Sequence[torch.Tensor], contexts: Sequence[RowOps]
) -> list[bool]:
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
        members = [i for i, c in enumerate(contexts)
                   if isinstance(c, ShardContext) and c.group is g]
        found = sharded_all_finite([tensors_local[i] for i in members], g)
        for i, ok in zip(members, found, strict=True):
            flags[i] = ok
    return flags


# --------------------------------------------------------------- checkpoints


def save_checkpoint(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Save ``model`` and ``optimizer`` with ``torch.distributed.checkpoint`` (DCP).

    Every rank calls it. The state dicts come from DCP's own helpers
    (``get_state_dict``: parameter-name keys, DDP's ``module.`` prefix dropped,
    FSDP2 DTensors kept sharded) and are stored as ``{"model": ..., "optim":
    ...}``. Plain (non-DTensor) tensors are treated by DCP as replicated and
    written once: right for DDP, where every rank holds the same state, and for
    the replicated state of FSDP2 (right projectors, left-side moments,
    counters); ``AdaRankAdamW`` keeps its row-sharded state (left projectors,
    right-side moments, plain AdamW moments) as ``Shard(0)`` DTensors, so each
    rank writes its rows. Quantised left projectors under FSDP2 are refused
    (``ValueError``): they are per-rank data, not shards of one tensor.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # Decided from the group's setting, the same on every rank (an empty shard
    # holds an empty float32 P), so no rank is left waiting in DCP's collectives.
    for group in optimizer.param_groups:
        quantised = group.get("proj_bits", 32) < 32
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if not (quantised and is_dtensor(p)
                    and ("proj_left" in st or "proj_left_codes" in st)):
                continue
            raise ValueError(
                "save_checkpoint: a row-sharded (FSDP2) left projector stored quantised "
                "(proj_bits < 32) is per-rank data (its quantisation groups restart at the "
                "shard boundary), which DCP cannot write as shards; use proj_bits=32 under "
                "FSDP2 to checkpoint"
            )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_id)


def _set_path(root: dict[str, Any], path: Sequence[str | int], value: Any) -> None:
    node: Any = root
    for key, following in zip(path[:-1], path[1:], strict=True):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = empty
        else:
            node.setdefault(key, empty)
        node = node[key]
    if isinstance(node, list):
        while len(node) <= path[-1]:
            node.append(None)
    node[path[-1]] = value


def _get_path(root: Any, path: Sequence[str | int]) -> Any:
    for key in path:
        try:
            root = root[key]
        except (KeyError, IndexError, TypeError):
            return None
    return root


def load_checkpoint(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load a ``save_checkpoint`` checkpoint (a directory) into ``model`` and ``optimizer``.

    Every rank calls it. DCP loads into tensors of the right shapes, but the
    shapes of adarank's state follow the rank each layer chose (a projector is
    m×r), which a fresh optimizer cannot know; so the optimizer's template is
    built from the checkpoint's metadata: one empty tensor per saved tensor, of
    its saved shape and dtype (a DTensor on the current state's mesh and
    placements where the current state holds a DTensor under that key), and a
    placeholder for each saved number or string. The result goes through
    ``set_state_dict``, i.e. the optimizer's own ``load_state_dict``, so a
    checkpoint of another model still fails with its clear error.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import empty as dtensor_empty

    # Also initialises an empty optimizer's state (DCP runs one step at lr = 0).
    model_sd, current = get_state_dict(model, optimizer)
    metadata = dcp.FileSystemReader(os.fspath(checkpoint_id)).read_metadata()
    optim_sd: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        path = metadata.planner_data[key]
        if path[0] != "optim":
            continue
        value: Any = None
        if isinstance(meta, TensorStorageMetadata):
            like = _get_path(current, path[1:])
            dtype = meta.properties.dtype
            if isinstance(like, DTensor):
                value = dtensor_empty(*meta.size, dtype=dtype, device_mesh=like.device_mesh,
                                      placements=like.placements)
            else:
                value = torch.empty(meta.size, dtype=dtype)
        _set_path(optim_sd, path[1:], value)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
