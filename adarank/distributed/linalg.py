"""Sharded linear algebra: what ``rsvd.py``, ``projector.py`` and ``subspace.py`` compute on
a whole matrix, from this rank's block of rows (CholeskyQR2 with float64 Grams for the
orthonormalisations, all-reduces of small matrices for the rest). The randomized SVD,
tracking, sign alignment and overlap are the one-process algorithms run on a sharded
layout (``rsvd.range_finder_svd``, ``subspace.RowReduce``), not copies of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..rsvd import _gaussian, mix_seed, range_finder_svd
from ..subspace import align_signs, subspace_overlap, track_subspace
from .comm import all_reduce_, shard_layout, world_size

__all__ = [
    "gram_comm_bytes",
    "randomized_svd_comm_bytes",
    "sharded_align_signs",
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


def sharded_matmul_tn(
    A_local: torch.Tensor,
    B_local: torch.Tensor,
    group: dist.ProcessGroup | None = None,
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
    X: torch.Tensor,
    group: dist.ProcessGroup | None,
    gram: torch.Tensor | None = None,
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
    if lam_max > 0:
        keep = lam > lam_max * _RANK_TOL**2
    else:
        keep = torch.zeros_like(lam, dtype=torch.bool)
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
        raise ValueError(
            f"sharded_qr: needs at least as many rows as columns, "
            f"got {rows}×{X.shape[1]} over all ranks"
        )
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
        raise ValueError(f"sharded_randomized_svd: G must be 2-D, got shape {tuple(G_local.shape)}")
    if k < 1:
        raise ValueError(f"sharded_randomized_svd: k must be >= 1, got {k}")
    if oversample < 0 or power_iters < 0:
        raise ValueError("sharded_randomized_svd: oversample and power_iters must be >= 0")
    if seed is None:
        raise ValueError(
            "sharded_randomized_svd: seed is required, so every rank draws the same sketch"
        )
    A = G_local.to(torch.float32)
    m_local, n = A.shape
    offset, m = layout if layout is not None else shard_layout(m_local, group, A.device)
    if m >= n:
        k = min(k, n)
        width = min(k + oversample, n)
        omega = _gaussian(n, width, seed, A.device)
        return range_finder_svd(A, omega, k, power_iters, _TallRows(group))
    k = min(k, m)
    width = min(k + oversample, m)
    omega = _gaussian(m, width, seed, A.device)[offset : offset + m_local]
    U, S, Vh = range_finder_svd(A, omega, k, power_iters, _WideRows(group))
    return Vh.T, S, U.T.contiguous()


@dataclass(frozen=True)
class _TallRows:
    """``rsvd.SketchLayout`` of a tall G (m ≥ n) whose rows (the row side) are sharded."""

    group: dist.ProcessGroup | None

    def times(self, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return A @ X

    def times_t(self, A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return sharded_matmul_tn(A, Y, self.group, "panel")

    def orth_rows(self, Y: torch.Tensor) -> torch.Tensor:
        return sharded_orth(Y, self.group)

    def orth_cols(self, X: torch.Tensor) -> torch.Tensor:
        return _orth_local(X)

    def small_svd(
        self, Q: torch.Tensor, A: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = sharded_matmul_tn(Q, A, self.group, "panel")  # width × n, replicated
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        return Q @ Ub[:, :k], S[:k], Vh[:k]


@dataclass(frozen=True)
class _WideRows:
    """``rsvd.SketchLayout`` of a wide G (m < n) with rows sharded: the range finder runs
    on the tall Gᵀ, whose *column* side is sharded. ``A`` is this rank's block of G."""

    group: dist.ProcessGroup | None

    def times(self, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return sharded_matmul_tn(A, X, self.group, "panel")  # Gᵀ X, replicated

    def times_t(self, A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return A @ Y  # G Y: this rank's rows

    def orth_rows(self, Y: torch.Tensor) -> torch.Tensor:
        return _orth_local(Y)

    def orth_cols(self, X: torch.Tensor) -> torch.Tensor:
        return sharded_orth(X, self.group)

    def small_svd(
        self, Q: torch.Tensor, A: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Qᵀ Gᵀ = (G Q)ᵀ has sharded columns: G Q = Q₂R₂ (row-sharded), and the SVD of the
        # replicated R₂ᵀ = U_R S V_Rᵀ gives Qᵀ Gᵀ = U_R S (Q₂ V_R)ᵀ.
        Q2, R2 = sharded_qr(A @ Q, self.group)
        Ur, S, Vrh = torch.linalg.svd(R2.T, full_matrices=False)
        return Q @ Ur[:, :k], S[:k], (Q2 @ Vrh[:k].T).T


def gram_comm_bytes(width: int) -> int:
    """Payload of one Gram all-reduce in ``sharded_qr``: upper triangle + row count, float64."""
    return 8 * (width * (width + 1) // 2 + 1)


def randomized_svd_comm_bytes(
    m: int,
    n: int,
    k: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    world: int = 1,
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
    G_local: torch.Tensor,
    P_local: torch.Tensor | None,
    Q: torch.Tensor | None,
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
    R: torch.Tensor,
    G_local: torch.Tensor,
    *,
    R_sharded: bool,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖R‖_F, ‖G‖_F)`` replicated (0-d float32), one all-reduce of 2 floats.

    ``R_sharded``: True when R holds this rank's rows (right projection), False
    when it is replicated (left or both; then only ‖G‖² is summed over ranks).
    What the staleness test (``refresh_below``, ``converge_tol``) reads.
    """
    r_sq = R.to(torch.float32).square().sum()
    local = torch.stack(
        [r_sq if R_sharded else torch.zeros_like(r_sq), G_local.to(torch.float32).square().sum()]
    )
    all_reduce_(local, group, "norms")
    return (local[0] if R_sharded else r_sq).sqrt(), local[1].sqrt()


def sharded_captured_fraction(
    R: torch.Tensor,
    G_local: torch.Tensor,
    *,
    R_sharded: bool,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``‖R‖_F / ‖G‖_F`` replicated (0-d float32); ``0`` when G is zero (no ``nan``).
    See ``sharded_projection_norms``."""
    r_norm, g_norm = sharded_projection_norms(R, G_local, R_sharded=R_sharded, group=group)
    return r_norm / g_norm.clamp_min(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class _Rows:
    """``subspace.RowReduce`` over the row shards of ``group``."""

    group: dist.ProcessGroup | None

    def matmul_tn(self, A: torch.Tensor, B: torch.Tensor, label: str = "matmul_tn") -> torch.Tensor:
        return sharded_matmul_tn(A, B, self.group, label)

    def orth(self, Y: torch.Tensor) -> torch.Tensor:
        return sharded_orth(Y, self.group)

    def sum_rows(self, x: torch.Tensor, label: str = "other") -> torch.Tensor:
        return all_reduce_(x, self.group, label)


def sharded_subspace_overlap(
    old_local: torch.Tensor | None,
    new_local: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> float:
    """``subspace.subspace_overlap`` for row-sharded bases: ``‖newᵀ old‖_F² / min(r)``
    with ``newᵀ old`` all-reduced (r_new×r_old). ``nan`` when either is missing."""
    return subspace_overlap(old_local, new_local, _Rows(group))


def sharded_align_signs(
    new_local: torch.Tensor,
    old_local: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``subspace.align_signs`` for row-sharded bases: the column dots are all-reduced
    (r floats) so every rank flips the same columns."""
    return align_signs(new_local, old_local, _Rows(group))


def sharded_track_subspace(
    G_local: torch.Tensor,
    P_local: torch.Tensor | None,
    Q: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``subspace.track_subspace`` for a row-sharded G: one block power step.

    Left (P row-sharded): ``GᵀP = all_reduce(G_localᵀ P_local)`` (n×r), then
    ``P ← sharded_orth(G_local (GᵀP))``, signs aligned with all-reduced dots.
    Right (Q replicated): ``Gᵀ(GQ) = all_reduce(G_localᵀ (G_local Q))`` (n×r),
    Householder QR and sign alignment locally, replicated.
    """
    return track_subspace(G_local.to(torch.float32), P_local, Q, _Rows(group))
