"""Layer-wise mode: same parameters as the normal step, less gradient memory, refusals."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import TinyNet, batch, grad_bytes_alive, train
from torch import nn

import adarank
from adarank.layerwise import ConsumedGrad, layerwise
from adarank.quant import Int8Linear, is_int8_weight, quantize_linears, requantize_

# Each factory builds an optimizer from param groups; "groups" the groups to split.
CONFIGS = {
    "galore-exact": (lambda g: adarank.GaLoreAdamW(g, lr=1e-2), dict(rank=3, update_proj_gap=3)),
    "adarank-exact-rotate": (
        lambda g: adarank.AdaRankAdamW(g, lr=1e-2, weight_decay=0.1),
        dict(backend="exact", update_gap=4, track_every=2, check_every=3, max_rank=5, eta=0.8),
    ),
    "torch-adamw": (lambda g: torch.optim.AdamW(g, lr=1e-2), None),
}


def build(name: str, seed: int = 0):
    factory, options = CONFIGS[name]
    torch.manual_seed(seed)
    model = TinyNet()
    groups = None if options is None else adarank.param_groups(model, **options)
    return model, factory, groups


def train_layerwise(model: nn.Module, lw, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(step)
        loss = (model(x) - y).square().mean()
        loss.backward()
        lw.step()
        losses.append(float(loss.detach()))
    return losses


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layerwise_gives_the_parameters_of_the_normal_step(name):
    # Tolerance: exact equality. Every parameter sees the same gradient (autograd
    # computes a node's input gradients before the hook of its weight runs) and
    # the same per-parameter arithmetic, so no rounding difference arises.
    model, factory, groups = build(name)
    twin, _, twin_groups = build(name)
    opt = factory(twin.parameters() if twin_groups is None else twin_groups)
    lw = layerwise(model, factory, groups=groups)
    losses_lw = train_layerwise(model, lw, range(8))
    losses = train(twin, opt, range(8))
    assert losses_lw == losses
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
        assert p.grad is None
    if hasattr(opt, "ranks"):
        assert lw.ranks() == opt.ranks() and len(lw.ranks()) == 2
        assert lw.state_bytes() == opt.state_bytes()


def test_layerwise_peak_gradient_memory_drops():
    # What is measured: the bytes of all `.grad` tensors alive, sampled in a
    # post-accumulate-grad hook of every parameter (registered before
    # layerwise's, so it runs before the gradient is freed) and after backward.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    params = list(model.parameters())
    peak = [0]

    def sample(_: torch.Tensor) -> None:
        peak[0] = max(peak[0], grad_bytes_alive(params))

    for p in params:
        p.register_post_accumulate_grad_hook(sample)
    x = torch.randn(8, 64)
    model(x).square().mean().backward()
    normal_peak = max(peak[0], grad_bytes_alive(params))
    for p in params:
        p.grad = None

    peak[0] = 0
    lw = layerwise(
        model, lambda g: adarank.GaLoreAdamW(g, lr=1e-3), groups=adarank.param_groups(model, rank=4)
    )
    model(x).square().mean().backward()
    lw.step()
    layerwise_peak = max(peak[0], grad_bytes_alive(params))
    total = sum(p.numel() * 4 for p in params)
    largest = max(p.numel() * 4 for p in params)
    assert normal_peak == total == 6 * (64 * 64 + 64) * 4
    assert layerwise_peak == largest == 64 * 64 * 4
    assert grad_bytes_alive(params) == 0


def test_second_backward_before_step_is_refused():
    model, factory, groups = build("galore-exact")
    layerwise(model, factory, groups=groups)
    x, y = batch(0)
    (model(x) - y).square().mean().backward()
    with pytest.raises(RuntimeError, match="second gradient before LayerwiseOptimizer.step"):
        (model(x) - y).square().mean().backward()


def test_clipping_is_refused():
    model, factory, groups = build("galore-exact")
    lw = layerwise(model, factory, groups=groups)
    with pytest.raises(RuntimeError, match="does not support gradient clipping"):
        lw.clip_grad_norm_(1.0)


def _backward_layerwise(name: str = "galore-exact"):
    model, factory, groups = build(name)
    lw = layerwise(model, factory, groups=groups)
    x, y = batch(0)
    (model(x) - y).square().mean().backward()
    return model, lw


@pytest.mark.parametrize("foreach", [None, False])
def test_standard_clip_grad_norm_raises_instead_of_clipping_nothing(foreach):
    model, lw = _backward_layerwise()
    with pytest.raises(RuntimeError, match="clip_grad_norm_.*cannot work in layer-wise mode"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach)
    with pytest.raises(RuntimeError, match="cannot work in layer-wise mode"):
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)


def test_grad_scaler_unscale_raises_in_layerwise_mode():
    model, lw = _backward_layerwise()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # initialises the scale, as scaler.scale(loss) does
    with pytest.raises(RuntimeError, match="cannot work in layer-wise mode"):
        scaler.unscale_(lw)


def test_consumed_marker_holds_no_memory_and_names_the_parameter():
    model, lw = _backward_layerwise()
    for name, p in model.named_parameters():
        assert isinstance(p.grad, ConsumedGrad) and p.grad.param_name == name
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
        with pytest.raises(RuntimeError, match="invalid python storage"):
            p.grad.untyped_storage().data_ptr()  # a wrapper with no data behind it
        assert name in repr(p.grad)
    lw.step()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("clear", ["zero_grad", "model.zero_grad", "remove", "step"])
def test_markers_are_cleared_and_training_continues(clear):
    model, lw = _backward_layerwise()
    {
        "step": lw.step,
        "zero_grad": lw.zero_grad,
        "model.zero_grad": model.zero_grad,
        "remove": lw.remove,
    }[clear]()
    assert all(p.grad is None for p in model.parameters())
    if clear != "remove":
        lw.step()  # the end of the iteration, still required
    x, y = batch(1)
    (model(x) - y).square().mean().backward()  # no marker met while accumulating
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["galore-exact", "adarank-exact-rotate"])
def test_checkpoint_resume_is_bit_identical(name):
    model, factory, groups = build(name)
    lw = layerwise(model, factory, groups=groups)
    train_layerwise(model, lw, range(5))
    saved = roundtrip({"model": model.state_dict(), "opt": lw.state_dict()})
    train_layerwise(model, lw, range(5, 9))

    twin, _, twin_groups = build(name, seed=1)
    twin.load_state_dict(saved["model"])
    resumed = layerwise(twin, factory, groups=twin_groups)
    resumed.load_state_dict(saved["opt"])
    assert resumed.steps == 5
    train_layerwise(twin, resumed, range(5, 9))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.ranks() == lw.ranks()


def test_load_state_dict_names_mismatched_parameters():
    model, factory, groups = build("galore-exact")
    lw = layerwise(model, factory, groups=groups)
    state = lw.state_dict()
    state["optimizers"]["ghost.weight"] = state["optimizers"].pop("up.weight")
    with pytest.raises(ValueError, match=r"missing \['up.weight'\], unexpected \['ghost.weight'\]"):
        lw.load_state_dict(state)


def test_set_lr_reaches_every_parameter():
    model, factory, groups = build("galore-exact")
    twin, _, twin_groups = build("galore-exact")
    lw = layerwise(model, factory, groups=groups)
    opt = factory(twin_groups)
    for step in range(4):
        lr = 1e-2 * (step + 1)
        lw.set_lr(lr)
        for g in opt.param_groups:
            g["lr"] = lr
        train_layerwise(model, lw, range(step, step + 1))
        train(twin, opt, range(step, step + 1))
    assert all(g["lr"] == 4e-2 for g in lw.param_groups)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="lr=-1"):
        lw.set_lr(-1)


def test_remove_detaches_the_hooks():
    model, factory, groups = build("galore-exact")
    lw = layerwise(model, factory, groups=groups)
    lw.remove()
    x, y = batch(0)
    for _ in range(2):  # accumulation works again
        (model(x) - y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_groups_are_refused():
    model, factory, _ = build("galore-exact")
    with pytest.raises(ValueError, match="listed twice"):
        layerwise(model, factory, groups=[{"params": [model.up.weight, model.up.weight]}])
    model.norm.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="norm.weight does not require grad"):
        layerwise(model, factory, groups=[{"params": [model.norm.weight]}])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        layerwise(model, factory, groups=[{"params": [nn.Parameter(torch.zeros(2))]}])


class Int8SGD(torch.optim.Optimizer):
    """Test-only SGD that knows Int8Linear weights (nearest rounding: deterministic)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if is_int8_weight(p):
                    requantize_(p, p.dequantized() - group["lr"] * p.grad, stochastic=False)
                else:
                    p.add_(p.grad, alpha=-group["lr"])


def test_layerwise_steps_int8_linear_weights_like_the_normal_step():
    torch.manual_seed(0)
    model = TinyNet()
    assert quantize_linears(model, group_size=16) == ["up", "down"]
    twin = copy.deepcopy(model)
    lw = layerwise(model, lambda g: Int8SGD(g, lr=0.1))
    assert set(lw.optimizers) == {n for n, _ in model.named_parameters()}
    opt = Int8SGD(twin.parameters(), lr=0.1)
    train_layerwise(model, lw, range(4))
    train(twin, opt, range(4))
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert isinstance(model.up, Int8Linear) and model.up.weight.grad is None
    x, y = batch(0)
    (model(x) - y).square().mean().backward()
    with pytest.raises(RuntimeError, match="second gradient"):
        (model(x) - y).square().mean().backward()
