"""The energy rule on constructed spectra with hand-computed ranks."""

from __future__ import annotations

import pytest
import torch

from adarank.rank import energy_rank, energy_rule, fixed_rule


def group(**kw):
    base = {"eta": 0.9, "min_rank": 1, "max_rank": 100, "rank_hysteresis": 0}
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "eta, expected",
    # σ² = 16, 9, 4, 1, 1 (total 31); cumulative 16, 25, 29, 30, 31.
    [
        (0.5, 1),
        (0.516, 1),
        (0.52, 2),
        (0.8, 2),
        (0.81, 3),
        (0.9, 3),
        (0.94, 4),
        (0.97, 5),
        (1.0, 5),
    ],
)
def test_energy_rank_on_known_spectrum(eta, expected):
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0])
    assert energy_rank(s, eta) == expected


def test_energy_rank_uses_the_exact_total_not_the_sketch_energy():
    # The sketch saw σ = 3, 2 (energy 13) of a matrix with ‖G‖_F² = 26: 13/26 = 0.5.
    s = torch.tensor([3.0, 2.0])
    assert energy_rank(s, 0.5, total_energy=26.0) == 2
    assert energy_rank(s, 0.34, total_energy=26.0) == 1  # 9/26 = 0.346
    # Not reachable from these values: the caller must grow the sketch.
    assert energy_rank(s, 0.9, total_energy=26.0) == 3


def test_energy_rank_accepts_numpy_like_dtypes_and_flat_spectrum():
    s = torch.ones(10, dtype=torch.float64)
    assert energy_rank(s, 0.9) == 9
    assert energy_rank(s, 0.91) == 10


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.5])
def test_energy_rank_rejects_bad_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        energy_rank(torch.ones(3), eta)


def test_energy_rule_clamps_and_reports_unsatisfied():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0])
    assert energy_rule(s, 31.0, group(eta=0.97), 0) == (5, True)
    assert energy_rule(s, 31.0, group(eta=0.97, max_rank=3), 0) == (3, True)
    assert energy_rule(s, 31.0, group(eta=0.5, min_rank=2), 0) == (2, True)
    rank, satisfied = energy_rule(s, 62.0, group(eta=0.9), 0)
    assert not satisfied and rank == 5


def test_energy_rule_hysteresis_ignores_small_drops_only():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0])  # η=0.8 gives 2
    assert energy_rule(s, 31.0, group(eta=0.8, rank_hysteresis=1), 3) == (3, True)
    assert energy_rule(s, 31.0, group(eta=0.8, rank_hysteresis=1), 4) == (2, True)
    # Increases are always taken.
    assert energy_rule(s, 31.0, group(eta=0.9, rank_hysteresis=3), 2) == (3, True)


def test_fixed_rule_returns_max_rank():
    assert fixed_rule(torch.ones(3), 3.0, group(max_rank=7), 2) == (7, True)
