"""Checkpoints, bad input, non-finite gradients, dtypes, accounting, param groups."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import TinyNet, batch, train
from torch import nn

import adarank

CONFIGS = {
    "adarank-torch": (
        adarank.AdaRankAdamW,
        dict(update_gap=4, track_every=2, check_every=3, max_rank=5),
    ),
    "adarank-fbpca-reset": (
        adarank.AdaRankAdamW,
        dict(update_gap=3, backend="fbpca", moments="reset", max_rank=4),
    ),
    "adarank-full": (adarank.AdaRankAdamW, dict(update_gap=3, proj_type="full", eta=0.8)),
    "adarank-residual": (adarank.AdaRankAdamW, dict(update_gap=3, residual=True, max_rank=2)),
    "galore": (adarank.GaLoreAdamW, dict(rank=3, update_proj_gap=3)),
    "qgalore": (
        adarank.QGaLoreAdamW,
        dict(rank=3, update_proj_gap=2, queue_size=2, quant_group_size=16),
    ),
    "adarank-int4": (adarank.AdaRankAdamW, dict(update_gap=3, proj_bits=4, proj_group_size=8)),
    "adarank-stagger": (adarank.AdaRankAdamW, dict(update_gap=4, stagger=2, check_every=3)),
    "adarank-one-at-a-time": (
        adarank.AdaRankAdamW,
        dict(update_gap=4, track_every=2, check_every=3, foreach=False),
    ),
}


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, va in sa["state"][k].items():
            vb = sb["state"][k][key]
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), (k, key)
            elif va == va:  # nan-safe for the overlap of a first refresh
                assert va == vb, (k, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpoint_resume_is_bit_identical(name, dtype):
    cls, options = CONFIGS[name]
    torch.manual_seed(0)
    model = TinyNet(dtype=dtype)
    twin = copy.deepcopy(model)
    opt = cls(adarank.param_groups(model, **options), lr=1e-2)
    train(model, opt, range(7), dtype)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, range(7, 14), dtype)

    resumed_opt = cls(adarank.param_groups(twin, **options), lr=1e-2)
    twin.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(twin, resumed_opt, range(7, 14), dtype)

    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert p.dtype == dtype and torch.equal(p, q)
    assert_states_equal(opt, resumed_opt)
    assert opt.ranks() == resumed_opt.ranks()
    assert sum(opt.refresh_counts().values()) > len(opt.ranks())  # refreshes happened


def test_state_holds_only_tensors_and_numbers():
    model = TinyNet()
    opt = adarank.AdaRankAdamW(adarank.param_groups(model), update_gap=2, proj_bits=4)
    train(model, opt, range(3))
    for state in opt.state_dict()["state"].values():
        for value in state.values():
            ok = isinstance(value, (torch.Tensor, int, float)) or (
                isinstance(value, tuple) and all(isinstance(v, int) for v in value)
            )
            assert ok, type(value)


def test_loading_into_another_shape_fails_clearly():
    opt = adarank.AdaRankAdamW(adarank.param_groups(TinyNet(d_hidden=24)))
    train(TinyNet(d_hidden=24), opt, range(0))  # no-op; build state below
    model = TinyNet(d_hidden=24)
    opt = adarank.AdaRankAdamW(adarank.param_groups(model))
    train(model, opt, range(2))
    other = TinyNet(d_hidden=16)
    other_opt = adarank.AdaRankAdamW(adarank.param_groups(other))
    with pytest.raises(ValueError, match="up.weight.*does not fit"):
        other_opt.load_state_dict(roundtrip(opt.state_dict()))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(eta=0.0), "eta"),
        (dict(eta=1.2), "eta"),
        (dict(min_rank=8, max_rank=4), "min_rank"),
        (dict(max_rank=0), "max_rank"),
        (dict(update_gap=0), "update_gap"),
        (dict(backend="svd"), "backend"),
        (dict(moments="swap"), "moments"),
        (dict(proj_type="diag"), "proj_type"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(rank_rule="entropy"), "rank_rule"),
        (dict(oversample=-1), "oversample"),
        (dict(power_iters=1.5), "power_iters"),
        (dict(refresh_below=2.0), "refresh_below"),
        (dict(scale=0.0), "scale"),
        (dict(track_every=-2), "track_every"),
        (dict(eta_threshold=0.9), "eta_threshold"),
        (dict(lowrank="yes"), "lowrank"),
        (dict(residual=1), "residual"),
        (dict(residual_limit=0.5), "residual_limit"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    params = [nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match=name):
        adarank.AdaRankAdamW(params, **kwargs)
    # The same check applies to a param group added later.
    opt = adarank.AdaRankAdamW([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3))], **kwargs})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rank=0), "rank"),
        (dict(update_proj_gap=-1), "update_proj_gap"),
        (dict(ranks=4), "ranks"),
    ],
)
def test_galore_bad_group_keys_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        adarank.GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3, 3))], **kwargs}])


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = adarank.AdaRankAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped_and_counted(bad):
    model = TinyNet()
    opt = adarank.AdaRankAdamW(adarank.param_groups(model), update_gap=2)
    train(model, opt, range(3))
    params = [p.detach().clone() for p in model.parameters()]
    states = copy.deepcopy(opt.state_dict())
    x, y = batch(3)
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    model.up.weight.grad[0, 0] = bad
    model.norm.bias.grad[1] = bad
    opt.step()
    assert torch.equal(model.up.weight, params[0])
    assert torch.equal(model.norm.bias, params[3])
    assert not torch.equal(model.down.weight, params[4])  # healthy parameters still step
    after = opt.state_dict()["state"]
    for idx in (0,):  # up.weight: moments and projectors untouched
        for key in ("exp_avg", "exp_avg_sq", "proj_left", "proj_right"):
            if key in after[idx]:
                assert torch.equal(after[idx][key], states["state"][idx][key])
    assert opt.nonfinite_skips() == {"up.weight": 1, "norm.bias": 1}
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_nonfinite_gradient_raises_when_asked():
    p = nn.Parameter(torch.zeros(4, 4))
    opt = adarank.AdaRankAdamW([p], nonfinite="raise")
    p.grad = torch.full((4, 4), float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


def test_rank_larger_than_the_matrix_is_clamped():
    p = nn.Parameter(torch.zeros(5, 9))
    opt = adarank.GaLoreAdamW([{"params": [p], "rank": 64}])
    p.grad = torch.randn(5, 9)
    opt.step()
    assert opt.ranks() == {"0": 5}


def test_bf16_and_fp16_parameters_train_with_float32_state():
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = TinyNet(dtype=dtype)
        opt = adarank.AdaRankAdamW(adarank.param_groups(model), lr=1e-2, update_gap=5)
        losses = train(model, opt, [0] * 40, dtype)  # one batch, fitted repeatedly
        assert all(p.dtype == dtype for p in model.parameters())
        for state in opt.state.values():
            compact = "proj_left" in state or "proj_right" in state
            for key in ("exp_avg", "exp_avg_sq", "proj_left", "proj_right"):
                if key in state:
                    # Compact moments and projectors float32; plain moments in p's
                    # dtype, as torch.optim.AdamW keeps them.
                    assert state[key].dtype == (torch.float32 if compact else dtype)
        assert sum(losses[-5:]) < sum(losses[:5])


def test_state_bytes_counts_every_tensor_and_beats_adamw():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))
    opt = adarank.AdaRankAdamW(adarank.param_groups(model), max_rank=8, eta=0.5)
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).square().mean().backward()
    opt.step()
    adamw.step()
    sizes = opt.state_bytes()
    held = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    assert sizes["total"] == held == sizes["moments"] + sizes["projectors"] + sizes["other"]
    adamw_bytes = sum(
        v.numel() * v.element_size()
        for s in adamw.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    assert sizes["total"] < adamw_bytes / 4


def test_param_groups_split_by_layer_kind_and_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(20, 8)
            self.q_proj = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.embed_tokens.weight  # tied

    groups = adarank.param_groups(Block(), eta=0.8)
    low, plain = groups
    assert low["param_names"] == ["q_proj.weight"] and low["lowrank"] and low["eta"] == 0.8
    assert plain["param_names"] == [
        "embed_tokens.weight",
        "q_proj.bias",
        "norm.weight",
        "norm.bias",
    ]
    assert plain["lowrank"] is False
    # Excluding every linear layer leaves nothing to project: since issue 13 an empty selection
    # is a ValueError at once (it used to return one plain group, a silent plain AdamW).
    with pytest.raises(ValueError, match="no linear layer to project"):
        adarank.param_groups(Block(), exclude=("q_", "lm_head"))
    with pytest.raises(ValueError, match="exclude"):
        adarank.param_groups(Block(), exclude="embed")


def test_ranks_use_names_or_indices():
    model = TinyNet()
    named = adarank.AdaRankAdamW(adarank.param_groups(model))
    assert set(named.ranks()) == {"up.weight", "down.weight"}
    unnamed = adarank.AdaRankAdamW(model.parameters())
    assert set(unnamed.ranks()) == {"0", "4"}
    assert unnamed.ranks() == {"0": 0, "4": 0}  # before the first step


def test_galore_reference_style_groups():
    model = TinyNet()
    low = [model.up.weight, model.down.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in low)]
    opt = adarank.GaLoreAdamW(
        [
            {"params": rest},
            {"params": low, "rank": 2, "update_proj_gap": 50, "scale": 0.5, "proj_type": "left"},
        ],
        lr=1e-3,
    )
    assert opt.param_groups[0]["lowrank"] is False
    group = opt.param_groups[1]
    assert group["lowrank"] and group["max_rank"] == 2 and group["update_gap"] == 50
    train(model, opt, range(2))
    assert opt.ranks() == {"4": 2, "5": 2}
    assert opt.state[model.up.weight]["exp_avg"].shape == (2, 12)  # left, as asked


def test_closure_is_evaluated_and_returned():
    model = TinyNet()
    opt = adarank.AdaRankAdamW(adarank.param_groups(model))
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0
    assert all(r > 0 for r in opt.ranks().values())


def test_ranks_fall_on_a_problem_whose_gradient_becomes_low_rank():
    # Linear regression whose inputs have 4 weak directions among 64: the strong
    # directions are fitted first, after which the gradient (W − A)Σ lives almost
    # entirely in the weak ones (GaLore's Lemma 3.3 mechanism), so ranks fall.
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, n = 64, 48, 1024
    scales = torch.ones(d_in)
    scales[:4] = 0.02
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen)).Q
    X = torch.randn(n, d_in, generator=gen) @ (basis * scales.sqrt()).T
    A = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    Y = X @ A.T
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out, bias=False)
    opt = adarank.AdaRankAdamW([layer.weight], lr=2e-2, scale=1.0, update_gap=25)
    losses, ranks = [], []
    for _ in range(200):
        loss = (layer(X) - Y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        ranks.append(opt.ranks()["0"])
    assert ranks[0] >= 20
    assert min(ranks[100:]) <= 4
    assert losses[-1] < 1e-3 * losses[0]


def test_fast_finiteness_test_agrees_with_isfinite():
    # The step tests finiteness by a float32 sum per gradient and confirms alarms
    # exactly; it must agree with isfinite().all() in every case, including finite
    # values whose sum overflows float32.
    from adarank.distributed import UNSHARDED, finite_flags

    big = torch.full((4, 4), 3e38)
    cases = [
        torch.randn(5, 5),
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf")]),
        torch.tensor([float("-inf"), 2.0]),
        torch.tensor([float("inf"), float("-inf")]),
        big,
        -big,
        torch.randn(3).to(torch.bfloat16),
        torch.zeros(0),
    ]
    flags = finite_flags(cases, [UNSHARDED] * len(cases))
    assert flags == [bool(torch.isfinite(t).all()) for t in cases]
    assert flags == [True, False, False, False, False, True, True, True, True]
