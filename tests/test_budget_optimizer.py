"""``state_budget``: the optimizer state stays within it at every step (DESIGN §13)."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn

import adarank
from adarank.budget import smallest_budget


def _spectrum_grad(m, n, sigma, seed):
    """A gradient of known singular values ``sigma`` (random orthonormal factors)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    k = len(sigma)
    return (U[:, :k] * torch.tensor(sigma, dtype=torch.float64)) @ V[:, :k].T


def _growing(step, k_max=10):
    """Spectra whose energy spreads over more directions as the steps go: ranks grow."""
    k = min(k_max, 2 + step // 2)
    return [1.0 / (1 + 0.1 * i) for i in range(k)]


def _set_grads(params, step):
    for i, p in enumerate(params):
        g = _spectrum_grad(p.shape[0], p[0].numel(), _growing(step), 100 * i + step)
        p.grad = g.reshape(p.shape).to(p.dtype)


def _matrices():
    torch.manual_seed(0)
    return [
        nn.Parameter(torch.randn(12, 20)),
        nn.Parameter(torch.randn(18, 10)),
        nn.Parameter(torch.randn(14, 16)),
        nn.Parameter(torch.randn(16)),
    ]


OPTIONS = dict(lr=1e-2, eta=0.97, update_gap=3, check_every=2, track_every=1)


def _run(params, opt, steps):
    used = []
    for step in steps:
        _set_grads(params[:3], step)
        params[3].grad = torch.full_like(params[3], 0.1 * step)
        opt.step()
        used.append(opt.state_bytes()["total"])
    return used


def test_state_budget_rejects_bad_values_naming_the_option():
    for bad in ("lots", "-1GB", 0, True, 2.5):
        with pytest.raises(ValueError, match="state_budget"):
            adarank.AdaRankAdamW(_matrices(), state_budget=bad)


def test_impossible_budget_names_the_smallest_that_works():
    params = _matrices()
    smallest = smallest_budget(adarank.AdaRankAdamW(params, min_rank=2))
    # By hand: the bias's AdamW state, and each matrix at rank 2 (float32 moments and
    # their weights, projector on the smaller side, three 4-byte scalars).
    by_hand = (2 * 16 * 4 + 4) + sum(
        4 * (2 * 2 * big + 2 * 2) + 4 * small * 2 + 12
        for small, big in ((12, 20), (10, 18), (14, 16))
    )
    assert smallest == by_hand
    with pytest.raises(ValueError, match=f"need {smallest} bytes"):
        adarank.AdaRankAdamW(params, min_rank=2, state_budget=smallest - 1)
    opt = adarank.AdaRankAdamW(params, min_rank=2, state_budget=smallest, **OPTIONS)
    used = _run(params, opt, range(4))
    assert max(used) <= smallest
    assert set(opt.ranks().values()) == {2}


def test_a_group_added_later_is_checked_against_the_budget():
    params = _matrices()
    opt = adarank.AdaRankAdamW(params[:1], state_budget=2000)
    with pytest.raises(ValueError, match="state_budget"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1000))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    ("proj_bits", "stagger", "foreach"),
    [(32, 0, True), (32, 2, True), (4, 2, True), (32, 0, False)],
)
def test_budget_holds_at_every_step_while_ranks_grow(proj_bits, stagger, foreach):
    options = dict(
        OPTIONS, proj_bits=proj_bits, proj_group_size=16, stagger=stagger, foreach=foreach
    )
    free_params = _matrices()
    free = adarank.AdaRankAdamW(free_params, **options)
    free_used = _run(free_params, free, range(16))
    assert free_used[-1] > free_used[0]  # unconstrained, the ranks (and the state) grow
    budget = (free_used[0] + free_used[-1]) // 2
    params = _matrices()
    opt = adarank.AdaRankAdamW(params, state_budget=budget, **options)
    used = []
    for step in range(16):
        used += _run(params, opt, [step])
        report = opt.budget_report()
        assert report["used"] <= report["reserved"] <= budget, step
    assert max(used) <= budget < max(free_used)
    assert max(used) > budget * 0.9  # the budget is used, not just respected


def test_allocation_equals_brute_force_on_known_spectra():
    # Three 12×20 matrices (left side: P 12×r, M and V r×20, weights r×1): every rank costs
    # 4·(2·20 + 2 + 12) = 216 bytes, plus 12 bytes of scalars per matrix. Equal costs and
    # sorted spectra: the greedy must find the exact optimum, here by enumeration.
    spectra = [
        [0.8**k for k in range(12)],
        [0.6**k for k in range(12)],
        [1.0 / (1 + k) for k in range(12)],
    ]
    params = [nn.Parameter(torch.zeros(12, 20)) for _ in spectra]
    for budget in (3 * 12 + 216 * 9, 3 * 12 + 216 * 14 + 100):
        opt = adarank.AdaRankAdamW(
            params, backend="exact", eta=1.0, max_rank=12, state_budget=budget
        )
        for i, (p, s) in enumerate(zip(params, spectra, strict=True)):
            p.grad = _spectrum_grad(12, 20, s, i).float()
        opt.step()
        gains = [[x * x / sum(y * y for y in s) for x in s] for s in spectra]
        best = max(
            (sum(sum(g[:r]) for g, r in zip(gains, ranks, strict=True)), ranks)
            for ranks in itertools.product(range(1, 13), repeat=3)
            if sum(12 + 216 * r for r in ranks) <= budget
        )
        assert tuple(opt.ranks().values()) == best[1]
        assert opt.state_bytes()["total"] <= budget


@pytest.mark.parametrize(("proj_bits", "stagger"), [(32, 2), (4, 0)])
def test_resume_under_a_budget_is_bit_identical(proj_bits, stagger):
    options = dict(
        OPTIONS, proj_bits=proj_bits, proj_group_size=16, stagger=stagger, state_budget="6KiB"
    )
    params = _matrices()
    opt = adarank.AdaRankAdamW(params, **options)
    _run(params, opt, range(7))
    saved_params = copy.deepcopy([p.detach() for p in params])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    _run(params, opt, range(7, 15))
    resumed = [nn.Parameter(p.clone()) for p in saved_params]
    opt2 = adarank.AdaRankAdamW(resumed, **options)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    used = _run(resumed, opt2, range(7, 15))
    assert max(used) <= 6 * 1024
    assert opt2.ranks() == opt.ranks()
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)


def test_a_state_over_the_budget_is_cut_at_the_next_step():
    params = _matrices()
    free = adarank.AdaRankAdamW(params, **OPTIONS)
    _run(params, free, range(12))
    over = free.state_bytes()["total"]
    budget = over * 2 // 3
    opt = adarank.AdaRankAdamW(params, state_budget=budget, **OPTIONS)
    opt.load_state_dict(free.state_dict())
    assert opt.budget_report()["used"] > budget
    used = _run(params, opt, [12])  # not a scheduled refresh for all: the cut forces them
    assert used[0] <= budget
    assert sum(opt.ranks().values()) < sum(free.ranks().values())


def test_budget_report_and_the_spectrum_log_record_the_allocation(tmp_path):
    from adarank.analysis.hooks import SpectrumLogger  # noqa: PLC0415
    from adarank.analysis.io import load_log  # noqa: PLC0415

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = adarank.AdaRankAdamW(model.parameters(), state_budget="3KB", eta=0.99)
    logger = SpectrumLogger(model, tmp_path / "log.jsonl", every=1, optimizer=opt)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).square().sum().backward()
        logger.record(step)
        opt.step()
    logger.close()
    report = opt.budget_report()
    assert report["budget"] == 3000
    assert report["used"] <= report["reserved"] <= 3000
    assert report["smallest"] < 3000
    assert sorted(report["ranks"]) == ["0", "2"]  # nn.Sequential's module names
    assert all(r >= 1 for ranks in report["ranks"].values() for r in ranks)
    log = load_log(tmp_path / "log.jsonl")
    assert list(log.scalars["budget.budget"]) == [3000] * 3
    assert log.scalars["budget.used"][-1] == report["used"]
    with pytest.raises(ValueError, match="state_budget"):
        adarank.AdaRankAdamW(model.parameters()).budget_report()
