"""Randomized SVD backends against a float64 exact SVD on matrices of known spectrum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adarank.rsvd import exact_svd, fbpca_svd, mix_seed, randomized_svd, truncated_svd


def known_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """G = U diag(σ) Vᵀ in float64 with Haar-random orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return (U * sigma.to(torch.float64)) @ V.T


def sin_theta(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal-angle sine between the column spans of A and B (float64)."""
    A = torch.linalg.qr(A.to(torch.float64)).Q
    B = torch.linalg.qr(B.to(torch.float64)).Q
    cosines = torch.linalg.svdvals(A.T @ B)
    return float(torch.sqrt(torch.clamp(1 - cosines.min() ** 2, min=0.0)))


SHAPES = [(96, 160), (160, 96), (128, 128)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "fbpca"])
def test_fast_decay_matches_exact_svd(shape, backend):
    # σ_i = 0.5^i: the gap after k is huge, so values and subspaces are exact to fp32.
    m, n = shape
    k = 10
    sigma = 0.5 ** torch.arange(min(m, n), dtype=torch.float64)
    G = known_spectrum(m, n, sigma)
    U, S, Vh = truncated_svd(G.float(), k, backend, seed=3)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    U_ref, S_ref, Vh_ref = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(S.double(), S_ref[:k], rtol=1e-4, atol=1e-6)
    assert sin_theta(U[:, :4], U_ref[:, :4]) < 1e-3
    assert sin_theta(Vh[:4].T, Vh_ref[:4].T) < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_slow_decay_error_near_optimal(shape):
    # σ_i = 1/(i+1): no gap. Eckart–Young's optimum is σ_{k+1}; with p=8, q=2 the
    # randomized error stays within a small factor of it (HMT 2011, Thm 10.6/Cor 10.10).
    m, n = shape
    k = 12
    sigma = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    G = known_spectrum(m, n, sigma, seed=1)
    U, S, Vh = randomized_svd(G.float(), k, seed=5)
    residual = G - (U.double() * S.double()) @ Vh.double()
    spectral_error = float(torch.linalg.matrix_norm(residual, ord=2))
    assert spectral_error <= 1.5 * float(sigma[k])
    # Sketch singular values are lower bounds of the true ones (Ritz values).
    assert torch.all(S.double() <= sigma[:k] * (1 + 1e-5))


def test_singular_vectors_orthonormal():
    G = torch.randn(200, 70)
    U, _, Vh = randomized_svd(G, 20, seed=0)
    eye = torch.eye(20)
    torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-5, rtol=0)


def test_same_seed_same_sketch_other_seed_other_sketch():
    G = torch.randn(64, 300)
    a = randomized_svd(G, 8, power_iters=0, seed=11)
    b = randomized_svd(G, 8, power_iters=0, seed=11)
    c = randomized_svd(G, 8, power_iters=0, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_fbpca_restores_numpy_global_state():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    fbpca_svd(torch.randn(40, 30), 5, seed=9)
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_fbpca_and_torch_backends_agree():
    sigma = torch.cat([torch.tensor([10.0, 8, 6, 5, 4]), 0.01 * torch.ones(59)]).double()
    G = known_spectrum(64, 120, sigma, seed=2).float()
    U_t, S_t, _ = randomized_svd(G, 5, seed=1)
    U_f, S_f, _ = fbpca_svd(G, 5, seed=1)
    torch.testing.assert_close(S_t, S_f, rtol=1e-4, atol=1e-5)
    assert sin_theta(U_t, U_f) < 1e-3


def test_exact_backend_is_truncated_full_svd():
    G = torch.randn(30, 50, dtype=torch.float64)
    U, S, Vh = exact_svd(G, 7)
    S_ref = torch.linalg.svdvals(G)
    torch.testing.assert_close(S.double(), S_ref[:7], rtol=1e-5, atol=1e-6)
    assert U.shape == (30, 7) and Vh.shape == (7, 50)


def test_rank_larger_than_matrix_is_clamped():
    U, S, Vh = randomized_svd(torch.randn(6, 40), 50, seed=0)
    assert U.shape == (6, 6) and S.shape == (6,) and Vh.shape == (6, 40)


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend='svd'"):
        truncated_svd(torch.randn(4, 4), 2, "svd")


def test_mix_seed_is_deterministic_and_spreads():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    seeds = {mix_seed(0, i, j) for i in range(20) for j in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**63 for s in seeds)


def test_bf16_input_computed_in_float32():
    sigma = 0.5 ** torch.arange(50, dtype=torch.float64)
    G = known_spectrum(50, 80, sigma).to(torch.bfloat16)
    U, S, Vh = randomized_svd(G, 4, seed=0)
    assert S.dtype == U.dtype == torch.float32
    ref = torch.linalg.svdvals(G.double())[:4]  # the bf16 matrix's own spectrum
    assert math.isclose(float(S[0]), float(ref[0]), rel_tol=1e-5)
