"""INT4 packing, group-wise quantisation, stochastic rounding and INT8 linear layers.

Numerical tests compare against float64 references. Float32 evaluation of
``zero + scale·q`` adds a few ulps of the group's largest magnitude to the exact
bound, so bounds carry a slack of ``8·2⁻²³·max|x|`` per group.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adarank.quant import (
    Int8Linear,
    Int8Weight,
    dequantize,
    flatten_qtensor,
    is_int8_weight,
    pack_int4,
    qtensor_nbytes,
    quantize,
    quantize_linears,
    stochastic_round,
    unflatten_qtensor,
    unpack_int4,
)

EPS32 = torch.finfo(torch.float32).eps


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def varied(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian values with magnitudes spread over 1e-3 … 1e3 and some all-positive
    stretches (groups that do not contain 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.exp(3 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(1e-3, 1e3)
    flat = x.reshape(-1)
    flat[: flat.numel() // 3] = flat[: flat.numel() // 3].abs() + 5.0
    return x.to(torch.float32)


def per_group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row-major groups as rows of a float64 matrix, padded with NaN."""
    flat = x.reshape(-1).to(torch.float64)
    pad = -flat.numel() % group_size
    return torch.cat([flat, flat.new_full((pad,), float("nan"))]).view(-1, group_size)


# ------------------------------------------------------------------ packing


def test_pack_unpack_is_exact_on_every_byte_value():
    every_byte = torch.arange(256, dtype=torch.uint8)
    codes = unpack_int4(every_byte, 512)
    assert codes.dtype == torch.uint8 and int(codes.max()) == 15
    assert torch.equal(pack_int4(codes), every_byte)
    # Byte i = low | high << 4, element 2i in the low nibble.
    assert torch.equal(codes[0::2], every_byte & 15) and torch.equal(codes[1::2], every_byte >> 4)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4)])
def test_pack_roundtrip_any_shape_and_odd_length(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(q.numel() / 2)
    assert torch.equal(unpack_int4(packed, q.numel()), q.reshape(-1))


def test_pack_refuses_wide_codes_and_other_dtypes():
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pack_int4(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="numel=5"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 5)


# ------------------------------------------------------------- quantisation


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [1, 7, 64, 256])
@pytest.mark.parametrize("shape", [(5,), (256,), (300, 5), (64, 33), (3, 4, 5)])
def test_quantize_error_within_half_scale_per_group(shape, group_size, bits):
    x = varied(shape, seed=7 * group_size + bits + len(shape))
    q = quantize(x, bits, group_size)
    x_hat = dequantize(q)
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape
    err = per_group(x_hat - x.double(), group_size).abs()  # float64 error
    ref = per_group(x, group_size)
    scale = q["scale"].double()
    slack = 8 * EPS32 * ref.abs().nan_to_num(0.0).amax(1)
    assert bool((err.nan_to_num(0.0) <= (scale / 2 + slack)[:, None]).all())
    # The exact scale is the group's range over 2ᵇ−1 (float32 rounding apart).
    low, high = ref.nan_to_num(float("inf")).amin(1), ref.nan_to_num(float("-inf")).amax(1)
    assert bool(((scale - (high - low) / (2**bits - 1)).abs() <= slack).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_storage_is_low_bit(bits):
    x = torch.randn(101, 9)
    q = quantize(x, bits, group_size=256)
    assert q["codes"].dtype == torch.uint8
    assert q["codes"].numel() == (x.numel() if bits == 8 else math.ceil(x.numel() / 2))
    assert q["scale"].dtype == q["zero"].dtype == torch.float32
    assert q["scale"].numel() == math.ceil(x.numel() / 256)
    assert qtensor_nbytes(q) == q["codes"].numel() + 8 * q["scale"].numel()
    assert q["shape"] == (101, 9) and q["bits"] == bits and q["group_size"] == 256


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_groups_are_exact(bits):
    x = torch.cat([torch.full((64,), 3.25), torch.zeros(64), torch.full((30,), -1e-7)])
    q = quantize(x, bits, group_size=64)
    assert torch.equal(q["scale"], torch.zeros(3))
    assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("bits", [4, 8])
def test_extreme_values_of_a_group_are_exact(bits):
    # Min and max map to codes 0 and 2ᵇ−1, so they come back unchanged.
    x = varied((40, 16), seed=3)
    x_hat = dequantize(quantize(x, bits, group_size=16))
    slack = 8 * EPS32 * x.abs().amax(1)
    assert bool(((x_hat.amin(1) - x.amin(1)).abs() <= slack).all())
    assert bool(((x_hat.amax(1) - x.amax(1)).abs() <= slack).all())


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_groups_spanning_the_float32_range_stay_finite_and_within_bound(bits, stochastic):
    # max − min of these groups (up to 2·3.4e38) overflows float32; the scale must not.
    big = torch.finfo(torch.float32).max
    x = torch.tensor(
        [
            [big, -big, 0.0, 1.0, 5e37, -7e37, 3e38, -1e-30],
            [3e38, -3e38, 2e38, -2e38, 1e38, -1e38, 0.0, 1e-45],
        ]
    )
    q = quantize(
        x, bits, group_size=8, stochastic=stochastic, generator=torch.Generator().manual_seed(0)
    )
    x_hat = dequantize(q)
    assert bool(torch.isfinite(q["scale"]).all()) and bool(torch.isfinite(x_hat).all())
    ref = x.double()
    scale = (ref.amax(1) - ref.amin(1)) / (2**bits - 1)  # float64, no overflow
    slack = 8 * EPS32 * ref.abs().amax(1)
    assert bool(((q["scale"].double() - scale).abs() <= slack).all())
    bound = (scale if stochastic else scale / 2) + slack
    assert bool(((x_hat.double() - ref).abs() <= bound[:, None]).all())


def test_int8linear_holds_a_weight_spanning_three_e38():
    linear = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(
            torch.tensor(
                [
                    [3e38, -3e38, 1.0, 0.0, 2e38, -1e38, 0.5, 7.0],
                    [-3e38, 3e38, 0.0, 1e30, 1.0, 2.0, 3.0, 4.0],
                ]
            )
        )
    layer = Int8Linear.from_linear(linear, group_size=8)
    W = layer.dequantized_weight()
    assert bool(torch.isfinite(W).all()) and bool(torch.isfinite(layer.weight_scale).all())
    err = (W.double() - linear.weight.detach().double()).abs()
    slack = 8 * EPS32 * 3e38
    assert bool((err <= layer.weight_scale.double()[:, None] / 2 + slack).all())
    layer.apply_update_(torch.zeros(2, 8), generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(layer.dequantized_weight()).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_quantize_is_unbiased_and_within_one_scale(bits):
    # 200 draws of a 3-group tensor; per element σ ≤ scale/2, mean within 5σ/√N.
    n_draws = 200
    x = varied((3, 64), seed=5)
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(n_draws):
        q = quantize(x, bits, group_size=64, stochastic=True, generator=gen)
        x_hat = dequantize(q).double()
        scale = q["scale"].double()[:, None]
        slack = 8 * EPS32 * x.double().abs().amax(1, keepdim=True)
        assert bool(((x_hat - x.double()).abs() < scale + slack).all())
        total += x_hat
    tol = 5 * (scale / 2) / math.sqrt(n_draws) + slack
    assert bool(((total / n_draws - x.double()).abs() <= tol).all())


def test_qtensor_survives_weights_only_checkpoint_and_flat_state():
    q = quantize(torch.randn(33, 10), 4, group_size=32)
    loaded = roundtrip(q)
    assert torch.equal(dequantize(loaded), dequantize(q))
    state = {"step": torch.tensor(3.0), **flatten_qtensor(q, "proj_left")}
    back = unflatten_qtensor(roundtrip(state), "proj_left")
    assert back["shape"] == (33, 10) and torch.equal(dequantize(back), dequantize(q))
    assert unflatten_qtensor(state, "proj_right") is None


def test_quantize_and_dequantize_reject_bad_input():
    with pytest.raises(ValueError, match="bits=3"):
        quantize(torch.randn(4), 3)
    with pytest.raises(ValueError, match="group_size=0"):
        quantize(torch.randn(4), 4, group_size=0)
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.arange(4), 8)
    q = quantize(torch.randn(10), 8, group_size=4)
    with pytest.raises(ValueError, match="needs 12 code bytes"):
        dequantize({**q, "shape": (12,)})
    with pytest.raises(ValueError, match="missing keys"):
        dequantize({"codes": q["codes"]})


# ------------------------------------------------------- stochastic rounding


def test_stochastic_round_is_unbiased():
    # N = 20000 draws per value; the mean of Bernoulli(f) draws has σ = √(f(1−f)/N),
    # so a 5σ tolerance fails by chance with probability < 1e-6 per value.
    n_draws = 20000
    x = torch.tensor(
        [-3.7, -0.5, -1e-3, 0.0, 0.25, 0.5, 0.999, 2.0, 17.125, 254.9, 1000.3, -77.75],
        dtype=torch.float64,
    )
    gen = torch.Generator().manual_seed(0)
    draws = stochastic_round(x.expand(n_draws, -1).contiguous(), generator=gen)
    frac = x - x.floor()
    tol = 5 * torch.sqrt(frac * (1 - frac) / n_draws) + 1e-12
    assert bool(((draws.mean(0) - x).abs() <= tol).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stochastic_round_is_bounded_and_integral(dtype):
    # Values just below an integer where x + U would round up to x + 1 in float32.
    x = torch.cat([torch.randn(2000) * 300, torch.tensor([255.99998, 8388607.5, -0.3, 4.0])])
    x = x.to(dtype)
    r = stochastic_round(x.expand(50, -1).contiguous())
    assert r.dtype == dtype
    assert torch.equal(r, r.floor())
    lo = x.floor().expand_as(r)
    assert bool(((r == lo) | (r == lo + 1)).all())
    assert bool(((r.double() - x.double()).abs() < 1).all())
    assert torch.equal(
        stochastic_round(torch.tensor([4.0, -2.0], dtype=dtype)),
        torch.tensor([4.0, -2.0], dtype=dtype),
    )


def test_stochastic_round_is_reproducible_with_a_generator():
    x = torch.randn(100) * 10
    a = stochastic_round(x, torch.Generator().manual_seed(7))
    b = stochastic_round(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ------------------------------------------------------------- Int8Linear


def make_int8(in_f=40, out_f=6, bias=True, group_size=32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    return linear, Int8Linear.from_linear(linear, group_size)


def test_int8linear_stores_int8_within_half_scale_of_the_float_weight():
    linear, layer = make_int8()
    w = layer.weight
    assert isinstance(w, Int8Weight) and isinstance(w, nn.Parameter) and w.requires_grad
    assert w.dtype == torch.float32 and w.codes.dtype == torch.int8  # stands for float32
    assert w.stored_bytes() == 6 * 40 + 8 * math.ceil(6 * 40 / 32)
    assert tuple(w.shape) == (6, 40) and is_int8_weight(w)
    assert not is_int8_weight(linear.weight)
    err = per_group(layer.dequantized_weight() - linear.weight.detach(), 32).abs()
    slack = 8 * EPS32 * linear.weight.detach().abs().max()
    assert bool((err.nan_to_num(0.0) <= layer.weight_scale.double()[:, None] / 2 + slack).all())
    assert torch.equal(layer.bias, linear.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_int8linear_forward_equals_linear_on_dequantised_weight(bias):
    _, layer = make_int8(bias=bias)
    x = torch.randn(2, 5, 40)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.equal(layer(x), expected)


def test_int8linear_gradients_equal_the_float_reference():
    _, layer = make_int8()
    x = torch.randn(3, 4, 40, dtype=torch.float64).float().requires_grad_()
    w_ref = layer.dequantized_weight().double().requires_grad_()
    b_ref = layer.bias.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    g = torch.randn(3, 4, 6)
    layer(x).backward(g)
    F.linear(x_ref, w_ref, b_ref).backward(g.double())
    grad = layer.weight.grad
    assert type(grad) is torch.Tensor and grad.dtype == torch.float32 and grad.shape == (6, 40)
    torch.testing.assert_close(grad.double(), w_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), b_ref.grad, rtol=1e-5, atol=1e-5)
    # A second backward accumulates, like any .grad.
    layer(x.detach()).backward(g)
    torch.testing.assert_close(layer.weight.grad.double(), 2 * w_ref.grad, rtol=1e-5, atol=1e-5)


def test_weight_grad_exists_when_nothing_else_needs_grad_and_not_when_frozen():
    _, layer = make_int8(bias=False)
    layer(torch.randn(5, 40)).square().sum().backward()
    assert layer.weight.grad is not None
    layer.weight.grad = None
    with torch.no_grad():
        layer(torch.randn(5, 40))
    assert layer.weight.grad is None
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 40, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None


def test_post_accumulate_grad_hook_fires_and_can_be_removed():
    _, layer = make_int8()
    seen = []
    handle = layer.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    layer(torch.randn(5, 40)).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], layer.weight.grad)
    handle.remove()
    layer(torch.randn(5, 40)).sum().backward()
    assert len(seen) == 1


def test_apply_update_is_unbiased_and_within_one_scale():
    # 2000 draws; each element's result is one of two neighbouring codes of the
    # new grid, σ ≤ scale/2, so the mean is within 5·(scale/2)/√N of Ŵ + delta.
    n_draws = 2000
    _, layer = make_int8(in_f=64, out_f=4, bias=False, group_size=64)
    start = copy.deepcopy(layer.state_dict())
    W0 = layer.dequantized_weight()
    delta = 0.1 * layer.weight_scale[:, None] * torch.randn(4, 64)  # far below one step
    target = (W0 + delta).double()
    gen = torch.Generator().manual_seed(3)
    total = torch.zeros(4, 64, dtype=torch.float64)
    for _ in range(n_draws):
        layer.load_state_dict(start)
        layer.apply_update_(delta, gen)
        W = layer.dequantized_weight().double()
        scale = layer.weight_scale.double()[:, None]
        slack = 8 * EPS32 * target.abs().amax()
        assert bool(((W - target).abs() < scale + slack).all())
        total += W
    tol = 5 * (scale / 2) / math.sqrt(n_draws) + slack
    assert bool(((total / n_draws - target).abs() <= tol).all())
    # Nearest rounding loses updates this small: most codes would not move.
    layer.load_state_dict(start)
    layer.apply_update_(delta, stochastic=False)
    assert (layer.weight.codes == start["weight"]).float().mean() > 0.5


def test_apply_update_rejects_a_wrong_shape():
    _, layer = make_int8()
    with pytest.raises(ValueError, match=r"\(6, 40\)"):
        layer.apply_update_(torch.zeros(40, 6 + 1))


def test_int8linear_state_dict_roundtrip_is_weights_only_loadable():
    _, layer = make_int8()
    saved = roundtrip(layer.state_dict())
    assert saved["weight"].dtype == torch.int8 and saved["weight_scale"].dtype == torch.float32
    assert list(saved) == ["weight", "bias", "weight_scale", "weight_zero"]
    assert all(type(v) is torch.Tensor for v in saved.values())
    fresh = Int8Linear(40, 6, group_size=32)
    weight = fresh.weight
    fresh.load_state_dict(saved)
    assert fresh.weight is weight  # loaded in place: an optimizer's state stays attached
    x = torch.randn(4, 40)
    assert torch.equal(fresh(x), layer(x))
    assigned = Int8Linear(40, 6, group_size=32)
    assigned.load_state_dict(saved, assign=True)
    assert isinstance(assigned.weight, Int8Weight) and torch.equal(assigned(x), layer(x))


def test_int8linear_load_refuses_a_float_weight_and_reports_missing_keys():
    _, layer = make_int8()
    float_state = nn.Linear(40, 6).state_dict()
    with pytest.raises(RuntimeError, match="needs int8 codes of shape"):
        layer.load_state_dict(
            {**float_state, "weight_scale": layer.weight_scale, "weight_zero": layer.weight_zero}
        )
    with pytest.raises(RuntimeError, match="Missing key.*weight_scale"):
        layer.load_state_dict(float_state)


def test_int8linear_conversions_keep_codes_and_the_parameter_object():
    _, layer = make_int8()
    copied = copy.deepcopy(layer)
    assert isinstance(copied.weight, Int8Weight) and copied.weight.codes is not layer.weight.codes
    assert torch.equal(copied.weight.codes, layer.weight.codes)
    weight, codes = layer.weight, layer.weight.codes.clone()
    layer(torch.randn(2, 40)).sum().backward()
    layer.to(torch.float64)
    assert layer.weight is weight and torch.equal(layer.weight.codes, codes)
    assert layer.weight.dtype == layer.bias.dtype == layer.weight.grad.dtype == torch.float64
    assert layer.weight_scale.dtype == layer.weight_zero.dtype == torch.float32
    layer.weight.grad = None
    out = layer(torch.randn(2, 40, dtype=torch.float64))
    out.sum().backward()
    assert out.dtype == torch.float64 and layer.weight.grad.dtype == torch.float64
    layer.to("meta")  # a device move (the one this CPU test can make)
    assert layer.weight is weight and layer.weight.codes.device.type == "meta"
    assert layer.weight.scale.device.type == "meta" == layer.weight.device.type


class Lm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.blocks = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.lm_head = nn.Linear(16, 11, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.blocks(self.embed(tokens)))


def test_quantize_linears_replaces_all_but_excluded():
    model = Lm()
    reference = copy.deepcopy(model)
    names = quantize_linears(model, group_size=16)
    assert names == ["blocks.0", "blocks.2"]
    assert isinstance(model.blocks[0], Int8Linear) and type(model.lm_head) is nn.Linear
    tokens = torch.randint(0, 11, (2, 7))
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=0.05, atol=0.02)
    assert quantize_linears(model) == []  # already quantised


def test_quantize_linears_refuses_tied_weights():
    model = Lm()
    model.extra = nn.Linear(32, 16)
    model.extra.weight = model.blocks[2].weight
    with pytest.raises(ValueError, match="shared"):
        quantize_linears(model)
    with pytest.raises(ValueError, match="exclude='embed'"):
        quantize_linears(model, exclude="embed")
