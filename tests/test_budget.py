"""The memory budget's pure parts: parsing, the byte model, the greedy allocation."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

import adarank
from adarank.budget import (
    BudgetError,
    Demand,
    allocate,
    lowrank_bytes,
    parse_budget,
    plain_bytes,
)
from adarank.optimizer import LOWRANK_DEFAULTS

# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5GiB", 3 * 2**29),
        ("800MB", 800 * 10**6),
        ("4096", 4096),
        ("2 KB", 2000),
        ("1kib", 1024),
        ("0.5MiB", 2**19),
        ("1e3B", 1000),
        ("3TB", 3 * 10**12),
        ("1.5B", 1),
        (12345, 12345),
    ],
)
def test_parse_budget_units_binary_and_decimal(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "GiB", "1.5XB", "-1GB", "0B", "0.4B", "1 2MB", 0, -5, True, 1.5, None]
)
def test_parse_budget_rejects_bad_input_naming_the_option(bad):
    with pytest.raises(ValueError, match="state_budget"):
        parse_budget(bad)


# -------------------------------------------------------------- allocation


def _value(demands, ranks):
    return sum(d.gain(k) for d, r in zip(demands, ranks, strict=True) for k in range(1, r + 1))


def _brute_force(demands, available):
    """The exact optimum by enumerating every rank tuple (independent of the greedy)."""
    best, best_ranks = -1.0, None
    ranges = [range(d.bounds()[0], d.bounds()[1] + 1) for d in demands]
    for ranks in itertools.product(*ranges):
        if sum(d.bytes_at(r) for d, r in zip(demands, ranks, strict=True)) <= available:
            value = _value(demands, ranks)
            if value > best:
                best, best_ranks = value, ranks
    return best, best_ranks


def _random_demands(rng, count, costs):
    demands = []
    for i in range(count):
        size = rng.randint(2, 5)
        energies = sorted((rng.random() ** 3 for _ in range(size)), reverse=True)
        tail = rng.random()  # energy outside the sketch: ‖G‖_F² exceeds Σσ²
        base = rng.randint(0, 40)
        demands.append(
            Demand(
                energies=energies,
                total_energy=sum(energies) + tail,
                bytes_at=lambda r, b=base, c=costs[i]: b + c * r,
                min_rank=rng.randint(1, 2),
                max_rank=rng.randint(1, size),
            )
        )
    return demands


@pytest.mark.parametrize("seed", range(40))
def test_greedy_equals_brute_force_optimum_with_equal_rank_costs(seed):
    rng = random.Random(seed)
    count = rng.randint(2, 4)
    demands = _random_demands(rng, count, [rng.choice([3, 8])] * count)
    floor = sum(d.bytes_at(d.bounds()[0]) for d in demands)
    top = sum(d.bytes_at(d.bounds()[1]) for d in demands)
    for available in range(floor, top + 2, max(1, (top - floor) // 7)):
        ranks = allocate(demands, available)
        assert sum(d.bytes_at(r) for d, r in zip(demands, ranks, strict=True)) <= available
        best, _ = _brute_force(demands, available)
        assert _value(demands, ranks) == pytest.approx(best, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(40))
def test_greedy_within_one_rank_of_optimum_with_unequal_costs(seed):
    rng = random.Random(100 + seed)
    count = rng.randint(2, 4)
    demands = _random_demands(rng, count, [rng.randint(1, 12) for _ in range(count)])
    v_max = max(d.gain(k) for d in demands for k in range(1, len(d.energies) + 1))
    floor = sum(d.bytes_at(d.bounds()[0]) for d in demands)
    top = sum(d.bytes_at(d.bounds()[1]) for d in demands)
    for available in range(floor, top + 2, max(1, (top - floor) // 9)):
        ranks = allocate(demands, available)
        assert sum(d.bytes_at(r) for d, r in zip(demands, ranks, strict=True)) <= available
        best, _ = _brute_force(demands, available)
        value = _value(demands, ranks)
        assert value <= best + 1e-12
        assert value >= best - v_max - 1e-12


def test_greedy_is_not_optimal_with_unequal_costs_on_a_known_instance():
    # A's second rank: gain 1/3 for 1 byte; B's: gain 0.9/1.9 for 10 bytes. Greedy takes A's
    # (better per byte) and then B's no longer fits; the optimum takes B's alone.
    a = Demand([1.0, 0.5], 1.5, lambda r: r, 1, 2)
    b = Demand([1.0, 0.9], 1.9, lambda r: 10 * r, 1, 2)
    available = 1 + 10 + 10
    assert allocate([a, b], available) == [2, 1]
    best, best_ranks = _brute_force([a, b], available)
    assert best_ranks == (1, 2)
    assert _value([a, b], [2, 1]) < best


def test_allocation_fills_the_water_level_of_known_spectra():
    # σ² = 2^-k for one matrix, 3^-k for another, equal costs: the 5 largest gains overall
    # are 2^-1, 2^-2, 3^-1, 2^-3, 3^-2 (normalised by the same total), i.e. ranks (3, 2).
    e2 = [2.0**-k for k in range(1, 7)]
    e3 = [3.0**-k for k in range(1, 7)]
    demands = [Demand(e2, 1.0, lambda r: 4 * r, 1, 6), Demand(e3, 1.0, lambda r: 4 * r, 1, 6)]
    assert allocate(demands, 4 * 5) == [3, 2]
    assert allocate(demands, 4 * 5 + 3) == [3, 2]  # 3 spare bytes buy nothing
    assert allocate(demands, 10**6) == [6, 6]  # capped by the energies given


def test_caps_and_floors_bound_the_allocation():
    d = Demand([1.0, 0.5, 0.25, 0.1], 2.0, lambda r: r, min_rank=2, max_rank=3)
    assert allocate([d], 100) == [3]
    assert allocate([d], 2) == [2]
    zero = Demand([0.0, 0.0, 0.0], 0.0, lambda r: r, min_rank=1, max_rank=3)
    assert allocate([zero], 100) == [3]  # free of gain but fits: nothing is lost by keeping it


def test_floors_that_do_not_fit_raise_with_the_smallest_budget():
    demands = [
        Demand([1.0, 0.5], 1.5, lambda r: 10 + 5 * r, 2, 2),
        Demand([1.0], 1.0, lambda r: 7 * r, 1, 1),
    ]
    with pytest.raises(BudgetError, match="min_rank") as info:
        allocate(demands, 26)
    assert info.value.needed == 27
    assert allocate(demands, 27) == [2, 1]


# ------------------------------------------------------------ the byte model


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(13, 7)  # weight 7×13: m < n
        self.tall = nn.Linear(6, 11)  # weight 11×6: m > n
        self.conv = nn.Conv2d(3, 5, 2)  # weight 5×3×2×2: a 5×12 matrix


def _model_bytes(opt):
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if group["lowrank"] and p.ndim >= 2:
                shape = (p.shape[0], p[0].numel())
                out[p] = lowrank_bytes(shape, opt.state[p]["rank"], group)
            else:
                out[p] = plain_bytes(p)
    return out


def _actual_bytes(state):
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("proj_type", ["std", "left", "right", "full"])
@pytest.mark.parametrize("proj_bits", [32, 8, 4])
@pytest.mark.parametrize(("residual", "lazy"), [(False, False), (True, True)])
def test_byte_model_equals_the_state_after_two_refreshes(proj_type, proj_bits, residual, lazy):
    torch.manual_seed(0)
    net = _Net()
    opt = adarank.AdaRankAdamW(
        net.parameters(),
        lr=1e-3,
        proj_type=proj_type,
        proj_bits=proj_bits,
        proj_group_size=16,
        residual=residual,
        lazy_refresh=lazy,
        lazy_window=3,
        update_gap=2,
        track_every=1,
        max_rank=3,
        rank_rule="energy",
        eta=0.7,
    )
    for _ in range(5):
        opt.zero_grad()
        x = torch.randn(4, 13)
        loss = net.wide(x).square().sum() + net.tall(torch.randn(4, 6)).square().sum()
        loss = loss + net.conv(torch.randn(2, 3, 4, 4)).square().sum()
        loss.backward()
        opt.step()
    model = _model_bytes(opt)
    for p, predicted in model.items():
        assert opt.state[p]["refreshes" if p.ndim >= 2 else "step"] >= 2
        assert _actual_bytes(opt.state[p]) == predicted, tuple(p.shape)
    assert sum(model.values()) == opt.state_bytes()["total"]


def test_byte_model_is_an_upper_bound_before_the_second_refresh():
    net = _Net()
    opt = adarank.AdaRankAdamW(net.parameters(), lazy_refresh=True, lazy_window=4)
    net.wide(torch.randn(3, 13)).sum().backward()
    opt.step()
    p = net.wide.weight
    group = dict(LOWRANK_DEFAULTS, lazy_refresh=True, lazy_window=4)
    predicted = lowrank_bytes((7, 13), opt.state[p]["rank"], group)
    # No overlap yet (4 bytes) and no cosine record (4 per window entry).
    assert predicted - _actual_bytes(opt.state[p]) == 4 + 4 * 4


def test_plain_bytes_follow_the_parameter_dtype():
    p = torch.zeros(10, 3, dtype=torch.bfloat16)
    assert plain_bytes(p) == 2 * 30 * 2 + 4
    assert plain_bytes(p, torch.float32) == 2 * 30 * 4 + 4
