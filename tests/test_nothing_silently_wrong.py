"""Guarantees of issue "Nothing silently wrong" in the optimizer core: finite state under
finite but huge gradients, atomic steps, zero-element parameters, tensor lr, the names
users wrote in error messages, checkpoint versions and state matched by name."""

from __future__ import annotations

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
