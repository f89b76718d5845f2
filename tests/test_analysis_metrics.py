"""analysis.metrics against exact values on constructed spectra and numpy/scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from adarank.analysis import metrics
from adarank.analysis.layer_types import layer_type

# Float64 throughout; results built from float32 inputs agree to float32 rounding.
RTOL64 = 1e-12
RTOL32 = 1e-6


def _matrix_with_spectrum(s: np.ndarray, m: int, n: int, seed: int = 0) -> np.ndarray:
    """m×n matrix U diag(s) Vᵀ with Haar-random orthonormal U, V (scipy's ortho_group)."""
    U = scipy.stats.ortho_group.rvs(m, random_state=seed)[:, : len(s)]
    V = scipy.stats.ortho_group.rvs(n, random_state=seed + 1)[:, : len(s)]
    return (U * s) @ V.T


@pytest.mark.parametrize("k", [1, 3, 10, 64])
def test_flat_spectrum_has_every_rank_equal_to_its_length(k):
    s = np.full(k, 0.7)
    assert metrics.stable_rank(s) == pytest.approx(k, rel=RTOL64)
    assert metrics.effective_rank(s) == pytest.approx(k, rel=RTOL64)
    for eta in (0.5, 0.9, 0.95, 0.99, 1.0):
        # Σ_{i≤j} σ² = j/k of the energy: the threshold is hit exactly at j = ceil(η k), a tie
        # that must count as reached despite rounding.
        assert metrics.energy_rank(s, eta) == math.ceil(round(eta * k, 9))


def test_stable_rank_exact_values():
    assert metrics.stable_rank([3.0, 4.0]) == pytest.approx(25 / 16, rel=RTOL64)
    assert metrics.stable_rank([4.0, 3.0, 0.0]) == pytest.approx(25 / 16, rel=RTOL64)
    assert metrics.stable_rank([2.0, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(2.0, rel=RTOL64)


def test_effective_rank_matches_scipy_entropy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = np.sort(rng.gamma(0.5, size=40))[::-1]
        expected = math.exp(scipy.stats.entropy(s / s.sum()))
        assert metrics.effective_rank(s) == pytest.approx(expected, rel=RTOL64)


def test_effective_rank_of_two_point_spectrum():
    # p = (3/4, 1/4): H = -(3/4 log 3/4 + 1/4 log 1/4).
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert metrics.effective_rank([3.0, 1.0, 0.0]) == pytest.approx(expected, rel=RTOL64)


def test_energy_rank_of_geometric_spectrum():
    # σ_i² = 4^{-i}: the top j hold (1 - 4^{-j}) / (1 - 4^{-n}) of the energy.
    n = 12
    s = 2.0 ** -np.arange(n)
    energy = np.cumsum(s**2) / np.sum(s**2)
    for eta in (0.5, 0.75, 0.9, 0.99, 0.999):
        expected = int(np.argmax(energy >= eta)) + 1
        assert metrics.energy_rank(s, eta) == expected
    assert metrics.energy_rank(s, 0.75) == 1  # 0.75/(1 - 4^-12) > 0.75: the first value suffices
    assert metrics.energy_rank(s, 0.9) == 2  # 0.9375 after two


def test_energy_rank_ignores_input_order():
    s = np.array([0.1, 3.0, 1.0, 2.0])
    assert metrics.energy_rank(s, 0.9) == metrics.energy_rank(np.sort(s)[::-1], 0.9) == 2


def test_energy_rank_with_total_energy_of_a_truncated_spectrum():
    top = np.array([3.0, 2.0, 1.0])  # 14 of a total 20
    assert metrics.energy_rank(top, 0.5, total_energy=20.0) == 2  # 13 ≥ 10
    assert metrics.energy_rank(top, 0.7, total_energy=20.0) == 3  # 14 ≥ 14, a tie
    assert metrics.energy_rank(top, 0.9, total_energy=20.0) is None  # beyond the values given


def test_zero_spectrum_has_rank_zero():
    zero = np.zeros(5)
    assert metrics.stable_rank(zero) == 0.0
    assert metrics.effective_rank(zero) == 0.0
    assert metrics.energy_rank(zero, 0.9) == 0
    assert metrics.stable_rank([]) == 0.0


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(1)
    s = np.sort(rng.exponential(size=30))[::-1].astype(np.float32)
    t = torch.from_numpy(s.copy())
    assert metrics.stable_rank(t) == pytest.approx(metrics.stable_rank(s), rel=RTOL32)
    assert metrics.effective_rank(t) == pytest.approx(metrics.effective_rank(s), rel=RTOL32)
    assert metrics.energy_rank(t, 0.95) == metrics.energy_rank(s, 0.95)
    assert metrics.energy_rank(t.to(torch.bfloat16), 0.5) is not None


def test_matrix_measures_match_constructed_spectrum_and_scipy():
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    G = _matrix_with_spectrum(s, 20, 12)
    np.testing.assert_allclose(metrics.singular_values(G)[: len(s)], s, rtol=1e-12)
    np.testing.assert_allclose(metrics.singular_values(G), scipy.linalg.svdvals(G), atol=1e-12)
    fro, spectral = np.linalg.norm(G, "fro"), np.linalg.norm(G, 2)
    assert metrics.matrix_stable_rank(G) == pytest.approx(fro**2 / spectral**2, rel=1e-12)
    assert metrics.matrix_stable_rank(G) == pytest.approx(np.sum(s**2) / 25, rel=1e-12)
    p = s / s.sum()
    assert metrics.matrix_effective_rank(G) == pytest.approx(
        math.exp(-np.sum(p * np.log(p))),
        rel=1e-9,  # zero singular values of G at 1e-15 level
    )
    # Σσ² = 39.3125; partial sums 25, 34, 38, 39: η = 0.8 (31.45) -> 2, 0.9 (35.38) -> 3,
    # 0.97 (38.13) -> 4.
    assert metrics.matrix_energy_rank(G, 0.8) == 2
    assert metrics.matrix_energy_rank(G, 0.9) == 3
    assert metrics.matrix_energy_rank(G, 0.97) == 4
    assert metrics.matrix_energy_rank(torch.from_numpy(G), 0.97) == 4


def test_spectrum_measures_take_a_matrix_too():
    s = np.array([4.0, 2.0, 1.0])
    G = _matrix_with_spectrum(s, 7, 5, seed=3)
    assert metrics.stable_rank(G) == pytest.approx(21 / 16, rel=1e-12)
    assert metrics.stable_rank(torch.from_numpy(G).float()) == pytest.approx(21 / 16, rel=1e-6)
    p = s / s.sum()
    assert metrics.effective_rank(G) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)
    assert metrics.energy_rank(G, 0.9) == 2  # 16, 20 of 21: η·21 = 18.9


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.energy_rank([1.0, 2.0], 0.0),
        lambda: metrics.energy_rank([1.0, 2.0], 1.5),
        lambda: metrics.stable_rank([1.0, -2.0]),
        lambda: metrics.effective_rank([1.0, float("nan")]),
        lambda: metrics.stable_rank(np.ones((2, 2, 2))),
        lambda: metrics.effective_rank(np.array([[1.0, np.inf], [0.0, 1.0]])),
        lambda: metrics.singular_values(np.ones(3)),
        lambda: metrics.energy_rank([1.0], 0.5, total_energy=-1.0),
    ],
)
def test_invalid_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.3.self_attn.q_proj.weight", "q"),
        ("model.layers.3.self_attn.k_proj.weight", "k"),
        ("model.layers.3.self_attn.v_proj.weight", "v"),
        ("model.layers.3.self_attn.o_proj.weight", "o"),
        ("model.layers.3.mlp.gate_proj.weight", "gate"),
        ("model.layers.3.mlp.up_proj.weight", "up"),
        ("model.layers.3.mlp.down_proj.weight", "down"),
        ("transformer.h.0.attn.c_attn.weight", "qkv"),
        ("transformer.h.0.attn.c_proj.weight", "o"),
        ("transformer.h.0.mlp.c_fc.weight", "up"),
        ("transformer.h.0.mlp.c_proj.weight", "down"),
        ("encoder.layer.1.attention.self.query.weight", "q"),
        ("encoder.layer.1.attention.output.dense.weight", "o"),
        ("encoder.layer.1.intermediate.dense.weight", "up"),
        ("encoder.layer.1.output.dense.weight", "down"),
        ("layers.0.attention.wq.weight", "q"),
        ("layers.0.attention.wo.weight", "o"),
        ("layers.0.feed_forward.w1.weight", "gate"),
        ("layers.0.feed_forward.w2.weight", "down"),
        ("layers.0.feed_forward.w3.weight", "up"),
        ("encoder.block.0.layer.0.SelfAttention.o.weight", "o"),
        ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "down"),
        ("blocks.2.attn.in_proj_weight", "qkv"),
        ("blocks.2.attn.out_proj.weight", "o"),
        ("blocks.7.ff.lin1.weight", "up"),
        ("net.2.weight", "net"),
        ("features.conv3.weight", "conv3"),
        ("0.weight", "other"),
    ],
)
def test_layer_type_recognises_common_model_families(name, expected):
    assert layer_type(name) == expected
