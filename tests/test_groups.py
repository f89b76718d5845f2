"""adarank.param_groups: which matrices are projected, Conv1D orientation, no-decay, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import adarank


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d)
        self.norm = nn.LayerNorm(d)


class TinyClassifier(nn.Module):
    """The shape of a transformers model with a task head: body, pooler, classifier."""

    def __init__(self, d: int = 8, vocab: int = 20, labels: int = 3) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.classifier = nn.Linear(d, labels)
        self.score = nn.Linear(d, 1)


def names(groups: list[dict], lowrank: bool) -> list[str]:
    return [n for g in groups if g["lowrank"] is lowrank for n in g["param_names"]]


def test_default_projects_body_linears_and_leaves_out_heads_poolers_embeddings() -> None:
    groups = adarank.param_groups(TinyClassifier())
    projected = names(groups, True)
    assert projected == [
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj", "up_proj")
    ]
    plain = names(groups, False)
    for head in ("pooler.0.weight", "classifier.weight", "score.weight", "embed_tokens.weight"):
        assert head in plain
    same = adarank.param_groups(TinyClassifier(), target_modules="all-linear")
    assert [g["param_names"] for g in same] == [g["param_names"] for g in groups]


def test_exclude_empty_projects_heads_too() -> None:
    projected = names(adarank.param_groups(TinyClassifier(), exclude=()), True)
    assert {"pooler.0.weight", "classifier.weight", "score.weight"} <= set(projected)


@pytest.mark.parametrize(
    "target, expected",
    [
        (["q_proj"], ["layers.0.q_proj", "layers.1.q_proj"]),  # substring
        (["layers.1.v_proj"], ["layers.1.v_proj"]),  # exact name
        ([r"layers\.0\.(q|up)_proj"], ["layers.0.q_proj", "layers.0.up_proj"]),  # regex
        (r".*\.1\..*_proj", ["layers.1.q_proj", "layers.1.v_proj", "layers.1.up_proj"]),  # str
    ],
)
def test_target_modules_follow_optim_target_modules(target, expected) -> None:
    groups = adarank.param_groups(TinyClassifier(), target_modules=target)
    assert sorted(names(groups, True)) == sorted(f"{m}.weight" for m in expected)
    # Everything not selected is still trained, by plain AdamW.
    model_count = len(list(TinyClassifier().parameters()))
    assert len(names(groups, True)) + len(names(groups, False)) == model_count


def test_regex_string_must_match_the_whole_name() -> None:
    with pytest.raises(ValueError, match=r"'q_proj' matches no module"):
        adarank.param_groups(TinyClassifier(), target_modules="q_proj")


def test_unknown_target_module_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'q_prj' matches no module.*layers\.0\.q_proj"):
        adarank.param_groups(TinyClassifier(), target_modules=["q_proj", "q_prj"])


def test_target_matching_no_linear_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'norm' matches no linear layer, only layers\.0\.norm"):
        adarank.param_groups(TinyClassifier(), target_modules=["norm"])


def test_target_matching_only_excluded_layers_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'classifier' matches only excluded layers"):
        adarank.param_groups(TinyClassifier(), target_modules=["classifier"])
    projected = names(
        adarank.param_groups(TinyClassifier(), target_modules=["classifier"], exclude=()), True
    )
    assert projected == ["classifier.weight"]


@pytest.mark.parametrize(
    "target, message",
    [([], "target_modules is empty"), ([""], "non-empty strings"), ("(", "regular expression")],
)
def test_empty_or_malformed_selection_is_an_error(target, message) -> None:
    with pytest.raises(ValueError, match=message):
        adarank.param_groups(TinyClassifier(), target_modules=target)


def test_model_without_linear_layers_is_an_error_not_silent_adamw() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no linear layer to project"):
        adarank.param_groups(model)
    only_heads = nn.ModuleDict({"classifier": nn.Linear(4, 2)})
    with pytest.raises(ValueError, match="excluded by exclude=.*classifier"):
        adarank.param_groups(only_heads)


@pytest.mark.parametrize("key", ["include", "max_rnk"])
def test_unknown_option_fails_at_once(key) -> None:
    with pytest.raises(ValueError, match=f"unknown option.*'{key}'"):
        adarank.param_groups(TinyClassifier(), **{key: ["q_proj"]})


def test_include_points_to_target_modules() -> None:
    with pytest.raises(ValueError, match="target_modules="):
        adarank.param_groups(TinyClassifier(), include=["q_proj"])


def test_no_decay_split_takes_biases_and_norm_weights() -> None:
    class MyRMSNorm(nn.Module):  # transformers' norms are plain modules named ...Norm
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

    model = TinyClassifier()
    model.final_norm = MyRMSNorm()
    groups = adarank.param_groups(model, no_decay=True)
    (no_decay,) = [g for g in groups if g.get("weight_decay") == 0.0]
    expected = {n for n, _ in model.named_parameters() if n.endswith("bias") or "norm" in n}
    assert set(no_decay["param_names"]) == expected
    assert "layers.0.norm.weight" in expected and "final_norm.weight" in expected
    decayed = [g for g in groups if g is not no_decay]
    assert all("weight_decay" not in g for g in decayed)
    assert "embed_tokens.weight" in names(decayed, False)
    # The optimizer decays exactly the other groups.
    opt = adarank.AdaRankAdamW(groups, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    low = set(names(groups, True))
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p) if n in low else torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)
        elif n == "embed_tokens.weight":
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))


# -- transformers' Conv1D (GPT-2): weight stored in × out ---------------------------------------


def conv1d_and_linear(rows_in: int, cols_out: int, seed: int = 0):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils", reason="integrations extra")
    Conv1D = pytorch_utils.Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(cols_out, rows_in)  # weight: in × out
    linear = nn.Linear(rows_in, cols_out)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    x = torch.randn(4, rows_in)
    torch.testing.assert_close(conv(x), linear(x))
    return conv, linear


EXACT = dict(
    rank_rule="fixed",
    max_rank=2,
    backend="exact",
    track_every=0,
    check_every=0,
    refresh_below=0.0,
    update_gap=1000,
)


def reference_steps(
    grads_out_in: list[np.ndarray],
    side: str,
    rank: int,
    lr: float,
    scale: float,
    betas=(0.9, 0.999),
    eps=1e-8,
) -> np.ndarray:
    """Total float64 change of an out × in Linear weight under low-rank Adam (torch convention),
    with the projector from an exact SVD of the first gradient, on the output ("left") or
    input ("right") side."""
    U, _, Vt = np.linalg.svd(grads_out_in[0])
    P = U[:, :rank] if side == "left" else Vt[:rank].T
    M = V = 0.0
    total = np.zeros_like(grads_out_in[0])
    for t, G in enumerate(grads_out_in, start=1):
        R = P.T @ G if side == "left" else G @ P
        M = betas[0] * M + (1 - betas[0]) * R
        V = betas[1] * V + (1 - betas[1]) * R * R
        N = M / (np.sqrt(V) / np.sqrt(1 - betas[1] ** t) + eps) / (1 - betas[0] ** t)
        total -= lr * scale * (P @ N if side == "left" else N @ P.T)
    return total


def output_side(proj_type: str, out_features: int, in_features: int) -> str:
    """The side of an out × in Linear that adarank's proj_type projects (projector.side_for)."""
    m, n = out_features, in_features
    return {
        "left": "left",
        "right": "right",
        "std": "right" if m >= n else "left",
        "reverse_std": "left" if m >= n else "right",
    }[proj_type]


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_conv1d_update_is_the_transpose_of_the_linear_update(shape, proj_type) -> None:
    rows_in, cols_out = shape
    conv, linear = conv1d_and_linear(rows_in, cols_out)
    start = conv.weight.detach().double().clone()
    opt_conv = adarank.AdaRankAdamW(
        adarank.param_groups(conv, proj_type=proj_type, **EXACT), lr=1e-2
    )
    opt_lin = adarank.AdaRankAdamW(
        adarank.param_groups(linear, proj_type=proj_type, **EXACT), lr=1e-2
    )
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(cols_out, rows_in, generator=generator) for _ in range(4)]
    for G in grads:  # G: the out × in gradient of the Linear
        conv.weight.grad, linear.weight.grad = G.T.contiguous(), G.clone()
        conv.bias.grad = linear.bias.grad = torch.zeros(cols_out)
        opt_conv.step()
        opt_lin.step()
    torch.testing.assert_close(conv.weight, linear.weight.T, rtol=0, atol=2e-6)
    side = output_side(proj_type, cols_out, rows_in)
    expected = reference_steps(
        [G.double().numpy() for G in grads], side, rank=2, lr=1e-2, scale=0.25
    )
    change = (conv.weight.detach().double() - start).numpy().T
    np.testing.assert_allclose(change, expected, rtol=0, atol=1e-6)
    # The projector lies on the Linear's side, seen from the stored in × out matrix.
    state = opt_conv.state[conv.weight]
    key = "proj_right" if side == "left" else "proj_left"
    assert state[key].shape == (cols_out if side == "left" else rows_in, 2)


def test_gpt2_conv1d_layers_are_projected() -> None:
    transformers = pytest.importorskip("transformers", reason="the integrations extra")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    groups = adarank.param_groups(model, max_rank=4)
    projected = set(names(groups, True))
    assert projected == {
        f"transformer.h.0.{m}.weight"
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    # The square attention output (16 × 16) projects the side the Linear would: its own group.
    (square,) = [g for g in groups if g["lowrank"] and g.get("proj_type") == "left"]
    assert square["param_names"] == ["transformer.h.0.attn.c_proj.weight"]
    opt = adarank.AdaRankAdamW(groups, lr=1e-3)
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert set(opt.ranks()) == projected
