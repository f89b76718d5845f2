"""Guarantees of issue "Nothing silently wrong" in the optimizer core: finite state under
finite but huge gradients, atomic steps, zero-element parameters, tensor lr, the names
users wrote in error messages, checkpoint versions and state matched by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import adarank


def _finite(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    tensors = list(params)
    for state in opt.state.values():
        tensors += [
            v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("cls", [adarank.AdaRankAdamW, adarank.GaLoreAdamW])
@pytest.mark.parametrize("foreach", [True, False])
def test_huge_finite_gradient_never_makes_weights_or_state_nonfinite(cls, foreach):
    # The repro: one entry of 1e30 at step 0 made V = inf, and the next refresh
    # or tracking step turned weights into NaN (inf − inf in the moment transfer).
    gen = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(8, 16, generator=gen))
    b = torch.nn.Parameter(torch.randn(16, generator=gen))
    opt = cls(
        [
            {"params": [W], "rank": 4} if cls is adarank.GaLoreAdamW else {"params": [W]},
            {"params": [b], "lowrank": False},
        ],
        lr=1e-2,
        update_gap=5,
        foreach=foreach,
    )
    for step in range(12):
        W.grad = torch.randn(8, 16, generator=gen)
        b.grad = torch.randn(16, generator=gen)
        if step == 0:
            W.grad[0, 0] = 1e30
            b.grad[3] = 1e30
        opt.step()
        assert _finite(opt, [W, b]), f"non-finite value after step {step}"
    assert opt.nonfinite_skips() == {"0": 1, "1": 1}


def test_huge_finite_gradient_raises_when_asked():
    W = torch.nn.Parameter(torch.randn(8, 16))
    opt = adarank.AdaRankAdamW([W], nonfinite="raise")
    W.grad = torch.randn(8, 16)
    W.grad[0, 0] = 1e30
    with pytest.raises(FloatingPointError, match="too large"):
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_raise_leaves_every_parameter_untouched(foreach):
    # A NaN in the second group's (and the second parameter's) gradient: nothing of the
    # first group or of the first parameter may have been updated when step() raises.
    gen = torch.Generator().manual_seed(1)
    A, B = (torch.nn.Parameter(torch.randn(6, 10, generator=gen)) for _ in range(2))
    c = torch.nn.Parameter(torch.randn(10, generator=gen))
    d = torch.nn.Parameter(torch.randn(10, generator=gen))
    opt = adarank.AdaRankAdamW(
        [{"params": [c], "lowrank": False}, {"params": [A, B]}, {"params": [d], "lowrank": False}],
        lr=0.1,
        nonfinite="raise",
        foreach=foreach,
    )
    before = [p.detach().clone() for p in (A, B, c, d)]
    for p in (A, B, c, d):
        p.grad = torch.randn(p.shape, generator=gen)
    B.grad[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    for p, was in zip((A, B, c, d), before, strict=True):
        assert torch.equal(p.detach(), was)
    assert not any(opt.state[p] for p in (A, B, c, d))


@pytest.mark.parametrize("foreach", [True, False])
def test_zero_element_parameter_is_stepped_like_adamw(foreach):
    empty = torch.nn.Parameter(torch.randn(4, 0))
    W = torch.nn.Parameter(torch.randn(4, 6))
    opt = adarank.AdaRankAdamW([empty, W], foreach=foreach)
    for _ in range(3):
        empty.grad = torch.zeros(4, 0)
        W.grad = torch.randn(4, 6)
        opt.step()
    assert empty.shape == (4, 0) and opt.ranks()["1"] >= 1


# ------------------------------------------------------------------ checkpoints

FIXTURES = Path(__file__).parent / "fixtures"
FROZEN = torch.load(FIXTURES / "frozen_states_v0.pt", weights_only=True)


def _two_matrices(names: tuple[str, str] = ("a", "b"), **options):
    gen = torch.Generator().manual_seed(3)
    params = {n: torch.nn.Parameter(torch.randn(6, 10, generator=gen)) for n in names}
    group = {"params": [params[n] for n in names], "param_names": list(names), **options}
    return params, group


def _train(params: dict, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        for i, (_, p) in enumerate(sorted(params.items())):
            gen = torch.Generator().manual_seed(100 * step + i)
            p.grad = torch.randn(p.shape, generator=gen) * (1 + i)
        opt.step()


def test_state_dict_records_its_version_and_class():
    params, group = _two_matrices()
    opt = adarank.AdaRankAdamW([group])
    _train(params, opt, range(2))
    saved = opt.state_dict()
    assert saved["param_groups"][0]["state_version"] == 1
    assert saved["param_groups"][0]["optimizer"] == "AdaRankAdamW"


def test_older_checkpoint_without_new_group_keys_loads_and_steps():
    # A checkpoint from before foreach/stagger existed: those keys are filled in.
    params, group = _two_matrices()
    opt = adarank.AdaRankAdamW([group])
    _train(params, opt, range(3))
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        for key in ("foreach", "stagger", "state_version", "optimizer", "convention"):
            g.pop(key)
    fresh = adarank.AdaRankAdamW([_two_matrices()[1]])
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["foreach"] is True and fresh.param_groups[0]["stagger"] == 0
    p = fresh.param_groups[0]["params"][0]
    p.grad = torch.randn(p.shape)
    fresh.param_groups[0]["params"][1].grad = torch.randn(p.shape)
    fresh.step()


@pytest.mark.parametrize(("key", "value"), [("eta", 7.0), ("backend", "nonsense")])
def test_invalid_checkpoint_group_is_refused_as_the_constructor_refuses(key, value):
    params, group = _two_matrices()
    opt = adarank.AdaRankAdamW([group])
    _train(params, opt, range(1))
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=f"invalid {key}="):
        adarank.AdaRankAdamW([_two_matrices()[1]]).load_state_dict(saved)


def test_state_of_another_optimizer_class_is_refused_unless_converted():
    params, group = _two_matrices()
    galore = adarank.GaLoreAdamW([dict(group, rank=2)])
    _train(params, galore, range(2))
    saved = galore.state_dict()
    target = adarank.AdaRankAdamW([_two_matrices()[1]])
    with pytest.raises(ValueError, match="written by GaLoreAdamW"):
        target.load_state_dict(saved)
    target.load_state_dict(adarank.AdaRankAdamW.convert_state_dict(saved))
    assert target.param_groups[0]["convention"] == "galore"  # kept as saved


def test_torch_adamw_state_is_refused():
    params, group = _two_matrices()
    plain = torch.optim.AdamW(group["params"])
    _train(params, plain, range(1))
    with pytest.raises(ValueError, match="not an adarank optimizer"):
        adarank.AdaRankAdamW([_two_matrices()[1]]).load_state_dict(plain.state_dict())


def test_frozen_checkpoint_loads_and_is_saved_again_with_version_and_class():
    # A checkpoint of the release before versions (tests/fixtures): it loads into the
    # class it was written by, is saved back versioned, and then another class refuses it.
    spec = importlib.util.spec_from_file_location("maker", FIXTURES / "make_frozen_states.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    entry = FROZEN["galore"]
    assert "state_version" not in entry["state_dict"]["param_groups"][0]
    _, opt = maker.build(entry["class"], entry["options"], entry["params"])
    opt.load_state_dict(entry["state_dict"])
    saved = opt.state_dict()
    assert {g["state_version"] for g in saved["param_groups"]} == {1}
    assert {g["optimizer"] for g in saved["param_groups"]} == {"GaLoreAdamW"}
    _, other = maker.build("AdaRankAdamW", {}, entry["params"])
    with pytest.raises(ValueError, match="written by GaLoreAdamW"):
        other.load_state_dict(saved)


def test_state_is_matched_by_name_not_position():
    params, group = _two_matrices()
    opt = adarank.AdaRankAdamW([group], max_rank=3)
    _train(params, opt, range(4))
    saved = opt.state_dict()
    expected = {n: opt.state[p]["exp_avg"].clone() for n, p in params.items()}
    ranks = opt.ranks()
    # The same parameters, listed b before a.
    swapped = {"params": [params["b"], params["a"]], "param_names": ["b", "a"]}
    other = adarank.AdaRankAdamW([swapped], max_rank=3)
    other.load_state_dict(saved)
    for n, p in params.items():
        assert torch.equal(other.state[p]["exp_avg"], expected[n])
    assert other.ranks() == ranks


def test_state_with_other_names_is_refused():
    params, group = _two_matrices()
    opt = adarank.AdaRankAdamW([group])
    _train(params, opt, range(1))
    _, renamed = _two_matrices(("a", "c"))
    with pytest.raises(ValueError, match=r"missing \['c'\], unexpected \['b'\]"):
        adarank.AdaRankAdamW([renamed]).load_state_dict(opt.state_dict())


# ------------------------------------------------------------------ constructor


def test_tensor_lr_is_accepted_in_the_constructor():
    params, group = _two_matrices()
    opt = adarank.AdaRankAdamW([group], lr=torch.tensor(0.01))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    _train(params, opt, range(1))
    with pytest.raises(ValueError, match="lr"):
        adarank.AdaRankAdamW([_two_matrices()[1]], lr=torch.ones(2))


@pytest.mark.parametrize(
    ("theirs", "value"),
    [
        ("quant_n_bit", 3),
        ("quant_group_size", 0),
        ("queue_size", 0),
        ("gamma_proj", 0),
        ("cos_threshold", 2.0),
    ],
)
def test_qgalore_reference_keys_are_reported_as_written(theirs, value):
    _, group = _two_matrices()
    with pytest.raises(ValueError, match=f"invalid {theirs}={value}"):
        adarank.QGaLoreAdamW([dict(group, rank=2, **{theirs: value})])
    with pytest.raises(ValueError, match=f"invalid {theirs}={value}"):
        adarank.QGaLoreAdamW([dict(group, rank=2)], **{theirs: value})


# ------------------------------------------------------------------ refresh


def _spectrum_matrix(m: int, n: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(sigmas), generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sigmas), generator=gen, dtype=torch.float64)).Q
    return (U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("foreach", [True, False])
def test_refresh_on_an_all_zero_gradient_keeps_the_subspace(foreach):
    G = _spectrum_matrix(12, 20, [3.0, 2.0, 0.05]).float()
    W = torch.nn.Parameter(torch.zeros(12, 20))
    opt = adarank.AdaRankAdamW(
        [W], update_gap=3, track_every=0, check_every=0, max_rank=2, foreach=foreach
    )
    for _ in range(3):
        W.grad = G.clone()
        opt.step()
    P = opt.state[W]["proj_left"].clone()
    W.grad = torch.zeros_like(G)  # step 3: a scheduled refresh, on zeros
    opt.step()
    assert torch.equal(opt.state[W]["proj_left"], P)
    W.grad = G.clone()
    opt.step()
    # σ₁² + σ₂² of 13.0025 in the subspace: captured ≈ 0.9999 (an arbitrary basis: ≈ 0.5).
    assert float(opt.captured_energy()["0"]) > 0.999


@pytest.mark.parametrize("backend", ["exact", "torch"])
def test_rank_choice_does_not_depend_on_the_gradient_scale(backend):
    # σ² fractions 0.64, 0.16, 0.09, 0.04, ... : η = 0.9 needs 3 (0.89 at 2 + 0.09).
    sigmas = [0.8, 0.4, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02]
    G = _spectrum_matrix(16, 24, sigmas)
    G = G / torch.linalg.matrix_norm(G)
    energy = torch.cumsum(torch.tensor(sigmas, dtype=torch.float64) ** 2, 0)
    expected = int(torch.nonzero(energy >= 0.9 * energy[-1])[0, 0]) + 1  # float64 reference
    ranks = {}
    for scale in (1e-24, 1.0, 1e15):
        W = torch.nn.Parameter(torch.zeros(16, 24))
        opt = adarank.AdaRankAdamW([W], eta=0.9, max_rank=12, backend=backend)
        W.grad = (G * scale).float()
        opt.step()
        ranks[scale] = opt.ranks()["0"]
    assert ranks == {1e-24: expected, 1.0: expected, 1e15: expected}
