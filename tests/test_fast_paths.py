"""The multi-tensor fast paths (``foreach=True``: batched refresh SVDs, foreach compact Adam,
one-GEMM weight updates) against the one-matrix path they replace, and staggered refreshes.

Tolerances: float32 results agree to 1e-5 relative (a batched GEMM or ``addmm`` may round in
another order than the one-matrix kernels; after 24 Adam steps the differences stay at a few
ulps of the weights); bf16 weights to 2 bf16 ulps (``addmm`` rounds the update once, the
one-matrix path twice).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import low_rank_plus_noise
from torch import nn

import adarank
from adarank import refresh as refresh_module
from adarank import rows as rows_module
from adarank.functional import apply_lowrank_update_, apply_update_
from adarank.rsvd import (
    randomized_svd,
    randomized_svd_batched,
    truncated_svd,
    truncated_svd_batched,
)


class ShapesNet(nn.Module):
    """Matrices of several shapes: two of one square shape (batched together), a tall and a
    wide one, a 4-D convolution kernel (8×36 as a matrix), biases."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16, dtype=dtype)
        self.b = nn.Linear(16, 16, dtype=dtype)
        self.up = nn.Linear(16, 40, dtype=dtype)
        self.down = nn.Linear(40, 16, dtype=dtype)
        self.conv = nn.Conv2d(4, 8, 3, dtype=dtype)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.down(torch.relu(self.up(h))), self.conv(image).mean((2, 3))


def loss_at(model: ShapesNet, step: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(24, 16, generator=gen).to(dtype)
    image = torch.randn(24, 4, 6, 6, generator=gen).to(dtype)
    y = torch.randn(24, 16, generator=gen)
    z = torch.randn(24, 8, generator=gen)
    h, c = model(x, image)
    return (h.float() - y).square().mean() + (c.float() - z).square().mean()


def groups(model: nn.Module, **options) -> list[dict]:
    """Every matrix parameter, the convolution kernel included, in the low-rank group."""
    params = list(model.parameters())
    return [
        dict(params=[p for p in params if p.ndim >= 2], **options),
        dict(params=[p for p in params if p.ndim < 2], lowrank=False),
    ]


def run(
    cls,
    options: dict,
    foreach: bool,
    steps: int = 24,
    dtype=torch.float32,
    int8=False,
    init_dtype=torch.float32,
):
    """Train ``ShapesNet`` (initial weights rounded to ``init_dtype``, held in ``dtype``)."""
    torch.manual_seed(0)
    model = ShapesNet().to(init_dtype).to(dtype)
    if int8:
        adarank.quantize_linears(model)
    opt = cls(groups(model, **options), lr=1e-2, foreach=foreach, weight_decay=0.05)
    for step in range(steps):
        opt.zero_grad()
        loss_at(model, step, dtype).backward()
        opt.step()
    return model, opt


CONFIGS = {
    "adarank": (adarank.AdaRankAdamW, dict(update_gap=6, max_rank=6)),
    "adarank-stale-events": (
        adarank.AdaRankAdamW,
        dict(update_gap=50, refresh_below=0.97, check_every=2, track_every=3, max_rank=6),
    ),
    "adarank-exact-full-keep": (
        adarank.AdaRankAdamW,
        dict(
            update_gap=5,
            backend="exact",
            proj_type="full",
            moments="keep",
            rank_rule="fixed",
            max_rank=3,
        ),
    ),
    "adarank-left-reset": (
        adarank.AdaRankAdamW,
        dict(update_gap=5, proj_type="left", moments="reset", eta=0.8),
    ),
    "adarank-right-hysteresis": (
        adarank.AdaRankAdamW,
        dict(update_gap=4, proj_type="right", rank_hysteresis=2),
    ),
    "adarank-fbpca": (adarank.AdaRankAdamW, dict(update_gap=5, backend="fbpca", max_rank=4)),
    "adarank-residual": (adarank.AdaRankAdamW, dict(update_gap=5, residual=True, max_rank=2)),
    "adarank-int4": (adarank.AdaRankAdamW, dict(update_gap=4, proj_bits=4, proj_group_size=8)),
    "adarank-stagger": (adarank.AdaRankAdamW, dict(update_gap=6, stagger=3)),
    "galore": (adarank.GaLoreAdamW, dict(rank=4, update_proj_gap=5)),
    "qgalore": (
        adarank.QGaLoreAdamW,
        dict(rank=4, update_proj_gap=2, queue_size=2, quant_group_size=16),
    ),
}


def assert_optimizers_agree(model_a, opt_a, model_b, opt_b, rtol, atol):
    assert opt_a.ranks() == opt_b.ranks()
    assert opt_a.refresh_counts() == opt_b.refresh_counts()
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)
    for key in ("captured_energy", "subspace_overlaps"):
        a, b = getattr(opt_a, key)(), getattr(opt_b, key)()
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] == pytest.approx(b[name], abs=1e-4, nan_ok=True), (key, name)
    assert opt_a.state_bytes() == opt_b.state_bytes()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_foreach_path_matches_one_matrix_path(name):
    cls, options = CONFIGS[name]
    fast = run(cls, options, foreach=True)
    plain = run(cls, options, foreach=False)
    assert sum(fast[1].refresh_counts().values()) > len(fast[1].ranks())  # refreshes happened
    assert_optimizers_agree(*fast, *plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adarank", "galore", "adarank-exact-full-keep"])
def test_foreach_path_is_as_accurate_as_one_matrix_path_for_bf16_weights(name):
    """bf16 weights: an update of about one bf16 ulp per step makes the two paths' rounding
    differences grow along the run, so they are compared by their distance to a float32 run
    from the same (bf16-rounded) start. The one-GEMM update rounds once where the one-matrix
    path rounds twice: it must be at least as close, matrix by matrix (10% slack)."""
    cls, options = CONFIGS[name]
    reference, _ = run(cls, options, foreach=False, init_dtype=torch.bfloat16)
    fast, fast_opt = run(cls, options, foreach=True, dtype=torch.bfloat16)
    plain, plain_opt = run(cls, options, foreach=False, dtype=torch.bfloat16)
    assert fast_opt.ranks() == plain_opt.ranks()

    def distance(a, b):
        return float((a.float() - b).detach().norm() / b.detach().norm())

    for (name_, ref), f, p in zip(
        reference.named_parameters(), fast.parameters(), plain.parameters(), strict=True
    ):
        assert f.dtype == p.dtype == torch.bfloat16
        if ref.ndim >= 2:
            assert distance(f, ref) <= 1.1 * distance(p, ref) + 1e-4, name_
            assert distance(f, ref) < 0.05, name_


def test_foreach_path_matches_one_matrix_path_for_int8_weights():
    """INT8 weights with stochastic rounding: both paths draw the same rounding noise, so the
    integer codes may differ only where float rounding moved a value across a rounding
    threshold: at most one quantisation step, in a small fraction of the entries."""
    cls, options = CONFIGS["qgalore"]
    fast, _ = run(cls, options, foreach=True, int8=True)
    plain, _ = run(cls, options, foreach=False, int8=True)
    for a, b in zip(fast.modules(), plain.modules(), strict=True):
        if isinstance(a, adarank.Int8Linear):
            diff = (a.weight.codes.to(torch.int32) - b.weight.codes.to(torch.int32)).abs()
            assert int(diff.max()) <= 1
            assert float((diff > 0).float().mean()) < 0.01


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_batched_rsvd_equals_one_matrix_calls(shape):
    G = torch.stack([low_rank_plus_noise(*shape, rank=5, noise=0.05, seed=s) for s in range(3)])
    seeds = [11, 12, 13]
    U, S, Vh = randomized_svd_batched(G, 6, seeds=seeds, oversample=4, power_iters=1)
    assert U.shape == (3, shape[0], 6) and S.shape == (3, 6) and Vh.shape == (3, 6, shape[1])
    for i, seed in enumerate(seeds):
        u, s, vh = randomized_svd(G[i], 6, seed=seed, oversample=4, power_iters=1)
        torch.testing.assert_close(S[i], s, rtol=1e-5, atol=1e-5)
        # Same sketch, so the same signs: the vectors themselves agree.
        torch.testing.assert_close(U[i], u, rtol=0, atol=1e-4)
        torch.testing.assert_close(Vh[i], vh, rtol=0, atol=1e-4)
        # And both against a float64 reference: the leading 5 singular values of a rank-5
        # signal with small noise are found to 1e-3 relative.
        exact = np.linalg.svd(G[i].double().numpy(), compute_uv=False)[:5]
        np.testing.assert_allclose(S[i, :5].double().numpy(), exact, rtol=1e-3)


@pytest.mark.parametrize("backend", ["exact", "fbpca"])
def test_truncated_svd_batched_backends_equal_one_matrix_calls(backend):
    G = torch.stack([low_rank_plus_noise(30, 20, rank=4, noise=0.1, seed=s) for s in range(2)])
    U, S, Vh = truncated_svd_batched(G, 4, backend, seeds=[1, 2])
    for i, seed in enumerate((1, 2)):
        u, s, vh = truncated_svd(G[i], 4, backend, seed=seed)
        torch.testing.assert_close(S[i], s, rtol=1e-5, atol=1e-5)
        # Compare the subspaces (an SVD fixes a vector only up to sign).
        torch.testing.assert_close(U[i] @ U[i].T, u @ u.T, rtol=0, atol=1e-4)
        torch.testing.assert_close(Vh[i].T @ Vh[i], vh.T @ vh, rtol=0, atol=1e-4)


def test_batched_rsvd_rejects_bad_input():
    G = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="seeds"):
        randomized_svd_batched(G, 2, seeds=[0])
    with pytest.raises(ValueError, match="3-D"):
        randomized_svd_batched(G[0], 2, seeds=[0])
    with pytest.raises(ValueError, match="k must be"):
        randomized_svd_batched(G, 0, seeds=[0, 1])


@pytest.mark.parametrize("side", ["left", "right", "both"])
@pytest.mark.parametrize("convention", ["torch", "galore"])
def test_one_gemm_update_equals_full_size_update(side, convention):
    gen = torch.Generator().manual_seed(3)
    m, n, r = 12, 9, 3
    P = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q if side != "right" else None
    Q = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q if side != "left" else None
    N = torch.randn(r if P is not None else m, r if Q is not None else n, generator=gen)
    W = torch.randn(m, n, generator=gen)
    expected = W.double().clone()
    full = N.double()
    if P is not None:
        full = P.double() @ full
    if Q is not None:
        full = full @ Q.double().T
    apply_update_(expected, full * 0.25, lr=0.1, weight_decay=0.2, convention=convention)
    apply_lowrank_update_(W, N, P, Q, lr=0.1, weight_decay=0.2, scale=0.25, convention=convention)
    torch.testing.assert_close(W.double(), expected, rtol=1e-6, atol=1e-6)


def test_one_gemm_update_of_a_non_contiguous_weight():
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(9, 12, generator=gen).T  # 12×9, not contiguous
    P = torch.linalg.qr(torch.randn(12, 2, generator=gen)).Q
    N = torch.randn(2, 9, generator=gen)
    expected = W.clone()
    apply_update_(expected, (P @ N) * 0.5, 0.1, 0.0, "torch")
    apply_lowrank_update_(W, N, P, None, lr=0.1, weight_decay=0.0, scale=0.5, convention="torch")
    torch.testing.assert_close(W, expected, rtol=1e-6, atol=1e-6)


def test_refresh_runs_one_batched_svd_per_shape(monkeypatch):
    calls = []
    real = rows_module.truncated_svd_batched

    def counting(G, k, backend, **kwargs):
        calls.append((tuple(G.shape), k))
        return real(G, k, backend, **kwargs)

    monkeypatch.setattr(rows_module, "truncated_svd_batched", counting)
    model = ShapesNet()
    opt = adarank.GaLoreAdamW(groups(model, rank=4), lr=1e-2)
    loss_at(model, 0, torch.float32).backward()
    opt.step()
    # a and b (16×16) together; up (40×16), down (16×40) and conv (8×36) alone.
    assert sorted(calls) == sorted(
        [((2, 16, 16), 4), ((1, 40, 16), 4), ((1, 16, 40), 4), ((1, 8, 36), 4)]
    )


def test_refresh_batches_are_capped_in_bytes(monkeypatch):
    """A cap of one 16×16 float32 matrix splits the pair into two batches, same result."""
    cls, options = CONFIGS["adarank"]
    reference = run(cls, options, foreach=True, steps=8)
    monkeypatch.setattr(refresh_module, "REFRESH_BATCH_BYTES", 16 * 16 * 4)
    sizes = []
    real = rows_module.truncated_svd_batched
    monkeypatch.setattr(
        rows_module,
        "truncated_svd_batched",
        lambda G, *a, **k: sizes.append(G.shape[0]) or real(G, *a, **k),
    )
    capped = run(cls, options, foreach=True, steps=8)
    assert sizes and max(sizes) == 1
    assert_optimizers_agree(*reference, *capped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_stagger_spreads_scheduled_refreshes_over_the_gap(foreach):
    """stagger=k puts the matrices, in order, into k phases T/k steps apart: every matrix
    still refreshes once per T steps, and the refresh steps take k distinct values."""
    gap, k, steps = 6, 3, 13
    model = ShapesNet()
    matrices = [name for name, p in model.named_parameters() if p.ndim >= 2]
    opt = adarank.AdaRankAdamW(
        groups(model, update_gap=gap, stagger=k, check_every=0), foreach=foreach
    )
    refreshed_at: dict[str, list[int]] = {str(i): [] for i in range(len(matrices))}
    before = dict.fromkeys(refreshed_at, 0)
    for step in range(steps):
        opt.zero_grad()
        loss_at(model, step, torch.float32).backward()
        opt.step()
        for name, count in opt.refresh_counts().items():
            if count > before[name]:
                refreshed_at[name].append(step)
            before[name] = count
    # Unnamed groups: the optimizer names matrices by their index, which here is their order.
    expected_phase = {str(i): (i * k // len(matrices)) * gap // k for i in range(len(matrices))}
    for name, steps_seen in refreshed_at.items():
        first = gap - expected_phase[name]  # the shortened first period
        assert steps_seen == [0, first, first + gap], name
    later = {s for seen in refreshed_at.values() for s in seen if s > 0}
    assert len({s % gap for s in later}) == k


def test_stagger_of_one_or_zero_changes_nothing():
    cls, options = CONFIGS["adarank"]
    plain = run(cls, options, foreach=True, steps=10)
    for k in (0, 1):
        staggered = run(cls, dict(options, stagger=k), foreach=True, steps=10)
        for p, q in zip(plain[0].parameters(), staggered[0].parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(stagger=-1), "stagger"),
        (dict(stagger=1.5), "stagger"),
        (dict(foreach="yes"), "foreach"),
    ],
)
def test_bad_fast_path_options_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        adarank.AdaRankAdamW([nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_overlap_needs_no_host_synchronisation_and_matches_the_float():
    model = ShapesNet()
    opt = adarank.AdaRankAdamW(groups(model, update_gap=2))
    for step in range(3):
        opt.zero_grad()
        loss_at(model, step, torch.float32).backward()
        opt.step()
    overlaps = opt.subspace_overlaps()
    assert all(0.0 <= v <= 1.0 + 1e-5 and not math.isnan(v) for v in overlaps.values())
    state = opt.state[model.a.weight]
    assert isinstance(state["overlap"], torch.Tensor) and state["overlap"].ndim == 0
