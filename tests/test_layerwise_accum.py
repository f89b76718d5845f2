"""Layer-wise mode with gradient accumulation (``grad_accum``), accumulated in the compact space.

The reference throughout is the ordinary optimizer over the same micro-batches: ``zero_grad``,
K backward passes accumulating ``.grad``, one ``step``.
"""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from helpers import TinyNet, batch, grad_bytes_alive
from torch import nn

import adarank
from adarank.layerwise import ConsumedGrad, layerwise
from adarank.quant import quantize_linears
from adarank.state import projectors

K = 3

# name -> (factory, param_groups options or None for all parameters, INT8 weights)
CONFIGS = {
    # Adaptive rank (η = 0.7 changes the ranks between refreshes), tracking every 2 steps,
    # a staleness test every 5, moments rotated, decay.
    "adarank": (
        lambda g: adarank.AdaRankAdamW(g, lr=1e-2, weight_decay=0.1),
        dict(backend="exact", update_gap=3, track_every=2, check_every=5, max_rank=8, eta=0.7),
        False,
    ),
    "adarank-single-tensor": (
        lambda g: adarank.AdaRankAdamW(g, lr=1e-2, foreach=False),
        dict(backend="exact", update_gap=4, track_every=0, check_every=3, max_rank=8, eta=0.9),
        False,
    ),
    "galore": (lambda g: adarank.GaLoreAdamW(g, lr=1e-2), dict(rank=3, update_proj_gap=3), False),
    # INT4 projectors and the lazy layer-adaptive gap.
    "qgalore": (
        lambda g: adarank.QGaLoreAdamW(g, lr=1e-2, proj_group_size=16),
        dict(rank=3, update_proj_gap=2),
        False,
    ),
    # INT8 weights; rounding to nearest, as the stochastic stream is seeded by the
    # parameter's index, which differs between one optimizer and per-parameter ones.
    "qgalore-int8": (
        lambda g: adarank.QGaLoreAdamW(g, lr=1e-2, proj_group_size=16, stochastic_rounding=False),
        dict(rank=3, update_proj_gap=2),
        True,
    ),
    "torch-adamw": (lambda g: torch.optim.AdamW(g, lr=1e-2), None, False),
}


def build(name: str):
    factory, options, int8 = CONFIGS[name]
    torch.manual_seed(0)
    model = TinyNet()
    if int8:
        quantize_linears(model, group_size=16)
    twin = copy.deepcopy(model)

    def groups(m: nn.Module):
        return None if options is None else adarank.param_groups(m, **options)

    return model, twin, factory, groups


def micro_loss(model: nn.Module, index: int, k: int = K) -> torch.Tensor:
    x, y = batch(index)
    return (model(x) - y).square().mean() / k


def ordinary_iteration(model, opt, it: int, k: int = K) -> None:
    opt.zero_grad()
    for j in range(k):
        micro_loss(model, it * K + j, k).backward()
    opt.step()


def layerwise_iteration(model, lw, it: int, k: int = K, partial: bool = False) -> None:
    for j in range(k):
        micro_loss(model, it * K + j, k).backward()
    lw.step(partial=partial)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accumulated_layerwise_gives_the_parameters_of_ordinary_accumulation(name):
    # Tolerance: |Δ| ≤ 1e-5 + 1e-5·|w| after 15 iterations (seen: ≤ 1e-6). Full gradients
    # are accumulated in autograd's order, so steps on them are bit-identical; a compact
    # step sums the micro-batches' PᵀG_k instead of projecting ΣG_k, a float32 rounding
    # difference of ~1e-7 that later gradients carry along. Per moment policy: AdaRankAdamW
    # aligns the signs of a new basis and rotates its moments, so a refresh on slightly
    # different weights gives the same subspace to rounding. GaLoreAdamW and QGaLoreAdamW keep
    # their moments and do not align signs: should rounding flip a singular vector's sign (or
    # an INT4 code of a projector) at a refresh, the two runs would differ by O(lr) from there
    # on, equal only up to that sign. It does not happen in these runs, and the projectors are
    # compared too, so a flip would show as such.
    model, twin, factory, groups = build(name)
    lw = layerwise(model, factory, groups=groups(model), grad_accum=K)
    opt = factory(twin.parameters() if groups(twin) is None else groups(twin))
    compact_iterations, full_iterations, ranks = 0, 0, set()
    for it in range(15):
        layerwise_iteration(model, lw, it)
        ordinary_iteration(twin, opt, it)
        compact_iterations += lw.grad_norm("compact") > 0
        full_iterations += lw.grad_norm("compact") == 0
        if hasattr(opt, "ranks"):
            assert lw.ranks() == opt.ranks(), it
            ranks.add(tuple(opt.ranks().values()))
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            if q.ndim >= 2 and hasattr(opt, "ranks"):  # the subspaces, dequantised
                theirs = projectors(opt.state[q])
                for mine, other in zip(projectors(lw.optimizers[n].state[p]), theirs, strict=True):
                    assert (mine is None) == (other is None), n
                    if mine is not None:
                        torch.testing.assert_close(mine, other, rtol=0, atol=1e-4, msg=n)
            torch.testing.assert_close(p.float(), q.float(), rtol=1e-5, atol=1e-5, msg=n)
            assert p.grad is None
    if CONFIGS[name][1] is None:  # no projection: every step on full gradients
        assert compact_iterations == 0
    else:
        assert compact_iterations >= 4 and full_iterations >= 4
    if name == "adarank":
        assert len(ranks) >= 3  # the rank rule changed its choice across refreshes


def test_compact_accumulator_is_the_projection_of_the_summed_gradient():
    # Against float64: Σ_k PᵀG_k (float32, as accumulated) vs Pᵀ(Σ_k G_k) in float64;
    # relative error ≤ 1e-5.
    torch.manual_seed(0)
    model = TinyNet()
    opt = adarank.GaLoreAdamW(adarank.param_groups(model, rank=3, update_proj_gap=50), lr=1e-2)
    ordinary_iteration(model, opt, 0)  # the first step sets the subspaces
    W = model.up.weight
    assert opt.gradient_request(W) == "compact"
    P = opt.state[W]["proj_left"] if "proj_left" in opt.state[W] else None
    grads, compact = [], torch.zeros(())
    for j in range(K):
        opt.zero_grad()
        micro_loss(model, 10 + j).backward()
        grads.append(W.grad.detach().clone())
        compact = compact + opt.project_gradient(W, W.grad)
    G = torch.stack(grads).double().sum(0)
    if P is not None:
        expected = P.double().T @ G
    else:
        expected = G @ opt.state[W]["proj_right"].double()
    assert compact.shape == opt.state[W]["exp_avg"].shape
    assert float((compact.double() - expected).norm() / expected.norm()) <= 1e-5


def test_gradient_memory_between_refreshes_is_the_compact_accumulators():
    # Six Linear(64, 64) under GaLore rank 4. Sampled in a post-accumulate-grad hook of
    # every parameter registered before layerwise's (so it runs while the new gradient is
    # alive): live .grad bytes plus the accumulators'. At the first iteration (a refresh)
    # every parameter has a full accumulator, plus the one live gradient; between
    # refreshes each matrix holds 4×64 floats and each bias its full gradient.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    params = list(model.parameters())
    peak, handle = [0], []

    def sample(_: torch.Tensor) -> None:
        peak[0] = max(peak[0], grad_bytes_alive(params) + handle[0].accumulator_bytes()["total"])

    for p in params:
        p.register_post_accumulate_grad_hook(sample)
    lw = layerwise(
        model,
        lambda g: adarank.GaLoreAdamW(g, lr=1e-3),
        groups=adarank.param_groups(model, rank=4, update_proj_gap=100),
        grad_accum=K,
    )
    handle.append(lw)
    x = torch.randn(8, 64)
    per_iteration = []
    for _ in range(3):
        peak[0] = 0
        for _ in range(K):
            (model(x).square().mean() / K).backward()
        lw.step()
        per_iteration.append(peak[0])
    weight, bias, compact = 64 * 64 * 4, 64 * 4, 4 * 64 * 4
    assert per_iteration[0] == 6 * weight + 6 * bias + weight
    assert per_iteration[1] == per_iteration[2] == 6 * compact + 6 * bias + weight
    assert grad_bytes_alive(params) == 0 and lw.accumulator_bytes()["total"] == 0


def test_stagger_spreads_full_accumulation_over_iterations():
    # Eight matrices, gap 4, stagger 4: after the first iteration at most a quarter of the
    # matrices need their full gradient on any iteration; without stagger all at once.
    def full_matrices(stagger: int) -> list[int]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(8)])
        lw = layerwise(
            model,
            lambda g: adarank.AdaRankAdamW(g, lr=1e-3),
            groups=adarank.param_groups(
                model, update_gap=4, stagger=stagger, track_every=0, check_every=0, max_rank=4
            ),
            grad_accum=2,
        )
        x = torch.randn(4, 16)
        counts = []
        for _ in range(9):
            (model(x).square().mean() / 2).backward()
            counts.append(lw.accumulator_bytes()["full"] // (16 * 16 * 4))
            (model(x).square().mean() / 2).backward()
            lw.step()
        return counts

    staggered, plain = full_matrices(4), full_matrices(0)
    assert staggered[0] == plain[0] == 8
    assert max(staggered[1:]) == 2 and sum(c > 0 for c in staggered[1:]) >= 4
    assert max(plain[1:]) == 8


def test_step_after_fewer_backward_passes_is_refused_or_partial():
    model, twin, factory, groups = build("galore")
    lw = layerwise(model, factory, groups=groups(model), grad_accum=K)
    micro_loss(model, 0).backward()
    with pytest.raises(RuntimeError, match=r"after 1 backward pass.*grad_accum=3.*partial=True"):
        lw.step()
    # partial=True: a shorter accumulation, equal to ordinary accumulation of the same two.
    micro_loss(model, 1).backward()
    lw.step(partial=True)
    opt = factory(groups(twin))
    opt.zero_grad()
    micro_loss(twin, 0).backward()
    micro_loss(twin, 1).backward()
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # the first step is on full gradients: bit-identical


def test_parameter_unused_by_some_micro_batches_steps_on_its_sum():
    # A head used by the first micro-batch only: ordinary accumulation steps it on that
    # gradient; layer-wise does so in step(), as it never reaches K gradients.
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(12, 12)
            self.head = nn.Linear(12, 6)

        def forward(self, x: torch.Tensor, use_head: bool) -> torch.Tensor:
            h = torch.tanh(self.body(x))
            return self.head(h) if use_head else h[:, :6]

    torch.manual_seed(0)
    model = TwoHeads()
    twin = copy.deepcopy(model)
    lw = layerwise(model, lambda g: torch.optim.AdamW(g, lr=1e-2), grad_accum=K)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for it in range(3):
        for target, lwopt in ((model, lw), (twin, opt)):
            if lwopt is opt:
                opt.zero_grad()
            for j in range(K):
                x, y = batch(it * K + j)
                ((target(x, j == 0) - y).square().mean() / K).backward()
            lwopt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_more_backward_passes_than_grad_accum_before_step_are_refused():
    model, _, factory, groups = build("galore")
    layerwise(model, factory, groups=groups(model), grad_accum=2)
    micro_loss(model, 0).backward()
    micro_loss(model, 1).backward()  # the 2nd: steps every parameter
    with pytest.raises(RuntimeError, match="second gradient before LayerwiseOptimizer.step"):
        micro_loss(model, 2).backward()


@pytest.mark.parametrize("when", ["between micro-batches", "after the step"])
def test_clipping_is_refused_on_every_path(when):
    model, _, factory, groups = build("galore")
    lw = layerwise(model, factory, groups=groups(model), grad_accum=K)
    layerwise_iteration(model, lw, 0)  # a first iteration: compact ones follow
    micro_loss(model, 5).backward()
    if when == "after the step":
        micro_loss(model, 6).backward()
        micro_loss(model, 7).backward()
    stepped = when == "after the step"
    assert all(
        isinstance(p.grad, ConsumedGrad) and p.grad.stepped == stepped for p in model.parameters()
    )
    message = "accumulator" if not stepped else "used by its optimizer step"
    with pytest.raises(RuntimeError, match=message):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match="does not support gradient clipping"):
        lw.clip_grad_norm_(1.0)


def test_grad_norm_is_the_norm_of_what_the_steps_used():
    # Against the ordinary optimizer's accumulated gradients, in float64: the full part is
    # ‖ΣG‖ over the parameters stepped on full gradients, the compact part ‖Pᵀ ΣG‖ over the
    # matrices stepped on compact ones (projectors read before the twin's step). rtol 1e-5.
    model, twin, factory, groups = build("galore")
    lw = layerwise(model, factory, groups=groups(model), grad_accum=K)
    opt = factory(groups(twin))
    assert lw.grad_norm() != lw.grad_norm()  # nan before any iteration
    for it in range(3):
        opt.zero_grad()
        for j in range(K):
            micro_loss(twin, it * K + j).backward()
        full_sq, compact_sq = 0.0, 0.0
        for q in twin.parameters():
            G = q.grad.double().flatten(1) if q.ndim >= 2 else q.grad.double()
            if q.ndim >= 2 and opt.gradient_request(q) == "compact":
                st = opt.state[q]
                R = (
                    st["proj_left"].double().T @ G
                    if "proj_left" in st
                    else G @ st["proj_right"].double()
                )
                compact_sq += float(R.square().sum())
            else:
                full_sq += float(G.square().sum())
        opt.step()
        layerwise_iteration(model, lw, it)
        assert lw.grad_norm("full") == pytest.approx(full_sq**0.5, rel=1e-5)
        assert lw.grad_norm("compact") == pytest.approx(compact_sq**0.5, rel=1e-5)
        assert lw.grad_norm() == pytest.approx((full_sq + compact_sq) ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="part must be"):
        lw.grad_norm("residual")


def test_param_step_hook_iterations_accumulate_the_full_gradient():
    # Gap 50: without the hook every iteration after the first would be compact.
    torch.manual_seed(0)
    model = TinyNet()
    lw = layerwise(
        model,
        lambda g: adarank.GaLoreAdamW(g, lr=1e-2),
        groups=adarank.param_groups(model, rank=3, update_proj_gap=50),
        grad_accum=K,
    )
    seen: list[tuple[int, str, tuple[int, ...]]] = []

    def hook(name: str, p: torch.Tensor, _opt) -> None:
        assert type(p.grad) is torch.Tensor and p.grad.shape == p.shape
        seen.append((lw.steps, name, tuple(p.grad.shape)))

    lw.register_param_step_hook(hook, every=2)
    compact = []
    for it in range(5):
        layerwise_iteration(model, lw, it)
        compact.append(lw.grad_norm("compact") > 0)
    assert sorted({s for s, _, _ in seen}) == [0, 2, 4]
    assert len(seen) == 3 * len(list(model.parameters()))
    assert compact == [False, True, False, True, False]
    with pytest.raises(ValueError, match="every"):
        lw.register_param_step_hook(hook, every=0)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["adarank", "qgalore"])
def test_checkpoint_mid_accumulation_is_refused_and_after_step_resumes_bit_identically(name):
    model, _, factory, groups = build(name)
    lw = layerwise(model, factory, groups=groups(model), grad_accum=K)
    for it in range(4):
        layerwise_iteration(model, lw, it)
    saved = roundtrip({"model": model.state_dict(), "lw": lw.state_dict()})
    micro_loss(model, 99).backward()
    with pytest.raises(RuntimeError, match="middle of a gradient accumulation"):
        lw.state_dict()
    lw.zero_grad()  # discards the started accumulation
    for it in range(4, 9):
        layerwise_iteration(model, lw, it)

    resumed, _, _, _ = build(name)
    resumed.load_state_dict(saved["model"])
    lw2 = layerwise(resumed, factory, groups=groups(resumed), grad_accum=K)
    lw2.load_state_dict(saved["lw"])
    for it in range(4, 9):
        layerwise_iteration(resumed, lw2, it)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert lw.steps == lw2.steps == 9


def test_bad_arguments_are_refused():
    model, _, factory, groups = build("galore")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="grad_accum"):
            layerwise(model, factory, groups=groups(model), grad_accum=bad)
    with pytest.raises(ValueError, match="state_budget"):
        layerwise(model, lambda g: adarank.AdaRankAdamW(g, state_budget="1MiB"))


def test_optimizer_refuses_a_compact_gradient_where_the_step_needs_the_full_one():
    torch.manual_seed(0)
    model = TinyNet()
    opt = adarank.GaLoreAdamW(adarank.param_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    W = model.up.weight
    assert opt.gradient_request(W) == "full"  # the first step refreshes
    assert opt.gradient_request(model.up.bias) == "full"
    with pytest.raises(ValueError, match="needs its full gradient"):
        opt.project_gradient(W, torch.zeros_like(W))
    ordinary_iteration(model, opt, 0)
    assert opt.gradient_request(W) == "compact"
    R = opt.project_gradient(W, torch.ones_like(W))
    opt.zero_grad()
    with pytest.raises(ValueError, match="float32 R of shape"):
        opt.step(compact_grads={W: R[:1]})
    with pytest.raises(ValueError, match="shape"):
        opt.project_gradient(W, torch.ones(3, 3))
    before = W.detach().clone()
    opt.step(compact_grads={W: R})
    assert not torch.equal(before, W)
    assert opt.gradient_request(W) == "full"  # gap 2: the next step refreshes
    with pytest.raises(ValueError, match="gradient_request"):
        opt.step(compact_grads={W: R})
    # A non-finite compact gradient is skipped like a non-finite full one.
    ordinary_iteration(model, opt, 1)
    before = W.detach().clone()
    opt.zero_grad()
    opt.step(compact_grads={W: torch.full_like(R, float("nan"))})
    assert torch.equal(before, W) and opt.nonfinite_skips()
    assert torch.isfinite(opt.state[W]["exp_avg"]).all()


def test_layerwise_accum_example_trains_the_decoder(tmp_path):
    # The README's example at tiny settings: it runs, the loss is finite, every iteration
    # after the first accumulates compactly (gap 50) and validation perplexity falls.
    data = pytest.importorskip("experiments.data")
    try:
        data.corpus_dir()
    except data.CorpusNotFoundError:
        pytest.skip(f"corpus not installed; run: {data.INSTALL_COMMAND}")
    from experiments import layerwise_accum

    cache = tmp_path / "cache"
    data.prepare(data.DataConfig(vocab_size=512, max_works=6), cache)
    result = layerwise_accum.main(
        [
            "--model", "tiny", "--max-works", "6", "--vocab-size", "512",
            "--data-cache", str(cache), "--steps", "6", "--batch-size", "4", "--seq-len", "32",
            "--eval-windows", "8", "--warmup-steps", "1", "--rank", "8",
            "--no-progress", "--out", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert lines[0]["grad_norm_compact"] == 0 and all(r["grad_norm_compact"] > 0 for r in lines[1:])
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in lines)
    assert result["val_ppl_after"] < result["val_ppl_before"]
    assert result["grad_accum"] == 4 and 0 < result["mean_rank"] <= 8
