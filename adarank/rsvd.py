"""Truncated SVD backends: randomized (torch, fbpca) and exact.

Every backend answers the same question: the top-``k`` singular triplets of a
matrix ``G`` (m×n), returned as float32 torch tensors ``U`` (m×k), ``S`` (k,),
``Vh`` (k×n) on ``G``'s device, ``S`` in descending order.

The randomized backends follow Halko, Martinsson & Tropp (2011), "Finding
structure with randomness", Algorithms 4.3/4.4 and 5.1: sketch ``Y = G Ω`` with a
Gaussian ``Ω`` of ``k + oversample`` columns, ``power_iters`` rounds of subspace
iteration re-orthonormalised by QR, ``Q = orth(Y)``, then the small SVD of
``Qᵀ G``. Singular values from a sketch are lower bounds of the true ones, so
energy computed from them never overstates what a rank captures.

Reproducibility: the Gaussian test matrix is drawn from a generator seeded by
``seed``; the same seed, shape and device give the same sketch. The fbpca
backend seeds numpy's global generator and restores its previous state
afterwards, so callers' numpy streams are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "BACKENDS",
    "Backend",
    "SketchLayout",
    "exact_svd",
    "fbpca_svd",
    "mix_seed",
    "range_finder_svd",
    "randomized_svd",
    "randomized_svd_batched",
    "truncated_svd",
    "truncated_svd_batched",
]

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser per part).

    Used to derive a sketch's seed from (base seed, parameter index, refresh
    count), so a resumed run draws exactly the sketch the uninterrupted run drew.
    """
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _gaussian(rows: int, cols: int, seed: int | None, device: torch.device) -> torch.Tensor:
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    return torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def randomized_svd(
    G: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD of ``G`` by a seeded randomized range finder, in float32.

    Args:
        G: matrix (m×n), any floating dtype, any device; computed in float32.
        k: number of triplets wanted, ``1 <= k``; clamped to ``min(m, n)``.
        oversample: extra sketch columns ``p`` (sketch width ``l = k + p``).
        power_iters: subspace-iteration rounds ``q``; each multiplies the gap
            between kept and discarded singular values by ``(σ_k+1/σ_k)^{2}``.
        seed: seed of the Gaussian test matrix; ``None`` uses torch's global RNG.

    Returns:
        ``(U, S, Vh)``: float32 on ``G``'s device, shapes (m×k), (k,), (k×n).
        ``U`` and ``Vh`` rows are orthonormal to float32 rounding.

    The sketch is taken on the longer side, so the QR factorisations are of
    ``max(m, n)×l`` panels and the small SVD is of an ``l×min(m, n)`` matrix.
    """
    if G.ndim != 2:
        raise ValueError(f"randomized_svd: G must be 2-D, got shape {tuple(G.shape)}")
    if k < 1:
        raise ValueError(f"randomized_svd: k must be >= 1, got {k}")
    if oversample < 0 or power_iters < 0:
        raise ValueError("randomized_svd: oversample and power_iters must be >= 0")
    U, S, Vh = randomized_svd_batched(
        G[None], k, seeds=[seed], oversample=oversample, power_iters=power_iters
    )
    return U[0], S[0], Vh[0]


def fbpca_svd(
    G: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD through ``fbpca.pca`` (CPU, float64 internally).

    ``raw=True`` is essential: with ``raw=False`` fbpca centres the columns and
    returns the SVD of a different matrix. fbpca draws from numpy's global
    generator, which is seeded here and restored afterwards. Results are cast
    to float32 and moved back to ``G``'s device.
    """
    import fbpca  # local: an optional reference backend, and slow to import

    if G.ndim != 2:
        raise ValueError(f"fbpca_svd: G must be 2-D, got shape {tuple(G.shape)}")
    k = max(1, min(k, min(G.shape)))
    width = min(k + oversample, min(G.shape))
    A = G.detach().to("cpu", torch.float64).numpy()
    saved = np.random.get_state()
    try:
        if seed is not None:
            np.random.seed(seed % (2**32))
        U, s, Vh = fbpca.pca(A, k=k, raw=True, n_iter=power_iters, l=width)
    finally:
        np.random.set_state(saved)
    dev = G.device

    def back(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(dev, torch.float32)

    return back(U), back(s), back(Vh)


def exact_svd(
    G: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` of the full ``torch.linalg.svd`` of float32 ``G`` (GaLore's choice).

    ``oversample``, ``power_iters`` and ``seed`` are accepted and ignored, so all
    backends share one signature. A stack (b×m×n) gives stacked results.
    """
    del oversample, power_iters, seed
    U, S, Vh = torch.linalg.svd(G.to(torch.float32), full_matrices=False)
    k = max(1, min(k, S.shape[-1]))
    return U[..., :k], S[..., :k], Vh[..., :k, :]


class Backend(Protocol):
    """A truncated-SVD backend: the top-``k`` triplets ``(U, S, Vh)`` of ``G`` (m×n) as
    float32 tensors on G's device, S descending. Registered by name in ``BACKENDS``; a
    param group stores the name (``backend``), so checkpoints stay ``weights_only``."""

    def __call__(
        self,
        G: torch.Tensor,
        k: int,
        *,
        oversample: int = 8,
        power_iters: int = 2,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


BACKENDS: dict[str, Backend] = {
    "torch": randomized_svd,
    "fbpca": fbpca_svd,
    "exact": exact_svd,
}


def randomized_svd_batched(
    G: torch.Tensor,
    k: int,
    *,
    seeds: Sequence[int | None],
    oversample: int = 8,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``randomized_svd`` of a stack of same-shape matrices in one set of batched kernels.

    Args:
        G: (b×m×n), any floating dtype; computed in float32.
        k: triplets wanted per matrix (clamped to ``min(m, n)``).
        seeds: ``b`` seeds, one per matrix: matrix ``i`` is sketched with the
            Gaussian ``randomized_svd(G[i], k, seed=seeds[i])`` draws (that call
            is this function on a stack of one), so the result equals the
            one-matrix calls up to floating-point rounding (batched GEMMs may
            sum in another order).
        oversample, power_iters: as ``randomized_svd``.

    Returns:
        ``(U, S, Vh)``: float32 on ``G``'s device, (b×m×k), (b×k), (b×k×n).

    One launch per operation for the whole stack instead of one per matrix,
    which is what makes a refresh of many small matrices cheap on a GPU.
    """
    if G.ndim != 3:
        raise ValueError(f"randomized_svd_batched: G must be 3-D (b×m×n), got {tuple(G.shape)}")
    if len(seeds) != G.shape[0]:
        raise ValueError(
            f"randomized_svd_batched: got {len(seeds)} seeds for {G.shape[0]} matrices"
        )
    if k < 1:
        raise ValueError(f"randomized_svd_batched: k must be >= 1, got {k}")
    if oversample < 0 or power_iters < 0:
        raise ValueError("randomized_svd_batched: oversample and power_iters must be >= 0")
    A = G.to(torch.float32)
    _, m, n = A.shape
    transposed = m < n
    if transposed:
        A = A.transpose(1, 2)
        m, n = n, m
    k = min(k, n)
    width = min(k + oversample, n)
    omega = torch.stack([_gaussian(n, width, seed, A.device) for seed in seeds])
    U, S, Vh = range_finder_svd(A, omega, k, power_iters, _WHOLE)
    if transposed:
        return Vh.transpose(1, 2).contiguous(), S, U.transpose(1, 2).contiguous()
    return U, S, Vh


class SketchLayout(Protocol):
    """Where the operands of ``range_finder_svd`` live. ``A`` (…×m×n) is the matrix in its
    tall orientation, ``X`` a panel on its column side (…×n×l), ``Y`` on its row side
    (…×m×l); a layout may keep either side split across processes."""

    def times(self, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``A X`` (row side)."""
        ...

    def times_t(self, A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ Y`` (column side)."""
        ...

    def orth_rows(self, Y: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis of a row-side panel."""
        ...

    def orth_cols(self, X: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis of a column-side panel."""
        ...

    def small_svd(
        self, Q: torch.Tensor, A: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``k`` SVD of ``A`` restricted to the range of the row-side basis ``Q``:
        of ``B = Qᵀ A``, with ``U = Q U_B``."""
        ...


class _Whole:
    """``SketchLayout`` of matrices this process holds whole (stacks: batched kernels)."""

    def times(self, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return torch.bmm(A, X)

    def times_t(self, A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return torch.bmm(A.transpose(1, 2), Y)

    def orth_rows(self, Y: torch.Tensor) -> torch.Tensor:
        return _orth(Y)

    def orth_cols(self, X: torch.Tensor) -> torch.Tensor:
        return _orth(X)

    def small_svd(
        self, Q: torch.Tensor, A: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = torch.bmm(Q.transpose(1, 2), A)  # b × width × n
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        return torch.bmm(Q, Ub[..., :k]), S[..., :k], Vh[..., :k, :]


_WHOLE = _Whole()


def range_finder_svd(
    A: torch.Tensor, omega: torch.Tensor, k: int, power_iters: int, layout: SketchLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The randomized range finder with subspace iteration (HMT 2011, Algorithms 4.4 and
    5.1), written once for every layout: ``Q = orth(A Ω)``; ``power_iters`` times
    ``Q = orth(A orth(Aᵀ Q))``; then the SVD of ``Qᵀ A``. ``A`` is tall (m ≥ n) and
    float32, ``Ω`` its n×l Gaussian test matrix; returns ``(U, S, Vh)`` of rank ``k``.
    ``layout`` says how each product and orthonormalisation is computed: whole here
    (``randomized_svd_batched``), on row shards in ``distributed.sharded_randomized_svd``."""
    Q = layout.orth_rows(layout.times(A, omega))
    for _ in range(power_iters):
        Z = layout.orth_cols(layout.times_t(A, Q))
        Q = layout.orth_rows(layout.times(A, Z))
    return layout.small_svd(Q, A, k)


def truncated_svd_batched(
    G: torch.Tensor,
    k: int,
    backend: str = "torch",
    *,
    seeds: Sequence[int | None],
    oversample: int = 8,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``truncated_svd`` of each matrix of a stack ``G`` (b×m×n): ``(U, S, Vh)`` of shapes
    (b×m×k), (b×k), (b×k×n). ``torch`` runs ``randomized_svd_batched``, ``exact`` one
    batched ``torch.linalg.svd``; ``fbpca`` (numpy, one matrix at a time) loops."""
    if backend == "torch":
        return randomized_svd_batched(
            G, k, seeds=seeds, oversample=oversample, power_iters=power_iters
        )
    if backend == "exact":
        return exact_svd(G, k)  # torch.linalg.svd takes stacks as they are
    parts = [
        truncated_svd(g, k, backend, seed=seed, oversample=oversample, power_iters=power_iters)
        for g, seed in zip(G, seeds, strict=True)
    ]
    return tuple(torch.stack(xs) for xs in zip(*parts, strict=True))  # type: ignore[return-value]


def truncated_svd(
    G: torch.Tensor,
    k: int,
    backend: str = "torch",
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch to a registered backend by name (``"torch"``, ``"fbpca"``, ``"exact"``)."""
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"backend={backend!r} is not known; choose one of {sorted(BACKENDS)}"
        ) from None
    return fn(G, k, oversample=oversample, power_iters=power_iters, seed=seed)
