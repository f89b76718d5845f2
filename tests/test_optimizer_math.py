"""Adam in the subspace against hand-written float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyNet, low_rank_plus_noise, train

import adarank

BETAS = (0.9, 0.99)


def linear_loss_grads(W: torch.nn.Parameter, grads: list[torch.Tensor], opt, steps: int):
    """Drive ``opt`` with prescribed gradients: loss_t = Σ W ∘ grads[t]."""
    for t in range(steps):
        opt.zero_grad()
        (W * grads[t]).sum().backward()
        opt.step()


def reference_lowrank_adam(W0, grads, rank, lr, eps, wd, scale, convention, side):
    """Float64 GaLore/AdaRank update with one refresh at step 0 (no tracking)."""
    W = W0.double().clone()
    U, _, Vh = torch.linalg.svd(grads[0].double(), full_matrices=False)
    P, Q = U[:, :rank], Vh[:rank].T
    M = V = 0
    b1, b2 = BETAS
    for t, G in enumerate(grads, start=1):
        G = G.double()
        R = P.T @ G if side == "left" else G @ Q
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if convention == "galore":
            N = M / (V.sqrt() + eps) * math.sqrt(bc2) / bc1
        else:
            N = (M / bc1) / ((V / bc2).sqrt() + eps)
        full = P @ N if side == "left" else N @ Q.T
        if convention == "torch":
            W = W * (1 - lr * wd)
        W = W - lr * scale * full
        if convention == "galore":
            W = W - lr * wd * W
    return W


@pytest.mark.parametrize("shape, side", [((10, 30), "left"), ((30, 10), "right")])
@pytest.mark.parametrize("which", ["galore", "adarank"])
def test_adam_in_subspace_matches_float64_reference(shape, side, which):
    m, n = shape
    rank, lr, wd, scale = 3, 1e-2, 0.1, 0.5
    grads = [low_rank_plus_noise(m, n, 3, 0.05, seed=s) for s in range(6)]
    W0 = torch.randn(m, n)
    W = torch.nn.Parameter(W0.clone())
    if which == "galore":
        opt = adarank.GaLoreAdamW(
            [{"params": [W], "rank": rank, "update_proj_gap": 100, "scale": scale}],
            lr=lr,
            betas=BETAS,
            weight_decay=wd,
        )
        eps = 1e-6
    else:
        opt = adarank.AdaRankAdamW(
            [W],
            lr=lr,
            betas=BETAS,
            weight_decay=wd,
            scale=scale,
            rank_rule="fixed",
            max_rank=rank,
            backend="exact",
            track_every=0,
            check_every=0,
            update_gap=100,
        )
        eps = 1e-8
    linear_loss_grads(W, grads, opt, len(grads))
    ref = reference_lowrank_adam(
        W0, grads, rank, lr, eps, wd, scale, "galore" if which == "galore" else "torch", side
    )
    torch.testing.assert_close(W.detach().double(), ref, rtol=1e-5, atol=1e-6)
    assert opt.ranks() == {"0": rank}


def test_plain_groups_match_torch_adamw():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    ours = adarank.AdaRankAdamW(
        [{"params": a.parameters(), "lowrank": False}], lr=3e-3, weight_decay=0.05
    )
    theirs = torch.optim.AdamW(b.parameters(), lr=3e-3, weight_decay=0.05, foreach=False)
    train(a, ours, range(8))
    train(b, theirs, range(8))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_galore_refreshes_at_step_zero_and_every_gap_with_moments_kept():
    W = torch.nn.Parameter(torch.randn(8, 20))
    opt = adarank.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 3}], lr=1e-3)
    grads = [low_rank_plus_noise(8, 20, 2, 0.1, seed=s) for s in range(7)]
    counts = []
    for t in range(7):
        before = opt.state[W].get("exp_avg")
        before = None if before is None else before.clone()
        linear_loss_grads(W, grads[t:], opt, 1)
        counts.append(opt.refresh_counts()["0"])
        if t == 3:  # a refresh step: 'keep' reuses the old moments as they are
            expected = BETAS[0] * before  # M ← β₁M + (1−β₁)R with R from the new P
            R = opt.state[W]["proj_left"].T @ grads[3]
            torch.testing.assert_close(opt.state[W]["exp_avg"], expected + 0.1 * R)
    # Reference schedule: SVD when the step count (before increment) is 0, 3, 6.
    assert counts == [1, 1, 1, 2, 2, 2, 3]


def test_energy_rank_chosen_from_the_gradient_spectrum():
    # G has 4 dominant directions carrying > 99% of the energy: η = 0.95 gives 4.
    W = torch.nn.Parameter(torch.zeros(40, 64))
    G = low_rank_plus_noise(40, 64, 4, 0.01, seed=3)
    opt = adarank.AdaRankAdamW([W], eta=0.95, max_rank=16)
    linear_loss_grads(W, [G], opt, 1)
    S = torch.linalg.svdvals(G.double())
    expected = int(torch.nonzero(torch.cumsum(S**2, 0) >= 0.95 * (S**2).sum())[0]) + 1
    assert expected == 4
    assert opt.ranks() == {"0": expected}


def test_sketch_grows_until_eta_is_reached():
    # A flat spectrum needs 90% of 48 directions: well past the first sketch of 16.
    W = torch.nn.Parameter(torch.zeros(48, 48))
    G = torch.linalg.qr(torch.randn(48, 48)).Q * 3.0  # all σ = 3
    opt = adarank.AdaRankAdamW([W], eta=0.9, max_rank=48)
    linear_loss_grads(W, [G], opt, 1)
    assert opt.ranks()["0"] == math.ceil(0.9 * 48)


def test_early_refresh_when_subspace_goes_stale():
    W = torch.nn.Parameter(torch.zeros(20, 30))
    basis = torch.linalg.qr(torch.randn(20, 20)).Q
    right = torch.randn(2, 30)
    G_a = basis[:, :2] @ right
    G_b = basis[:, 10:12] @ right  # orthogonal to G_a's column space
    opt = adarank.AdaRankAdamW(
        [W], eta=0.9, check_every=1, track_every=0, update_gap=1000, refresh_below=0.5
    )
    linear_loss_grads(W, [G_a] * 3, opt, 3)
    assert opt.refresh_counts()["0"] == 1
    assert opt.captured_energy()["0"] == pytest.approx(1.0, abs=1e-5)
    linear_loss_grads(W, [G_b], opt, 1)
    assert opt.refresh_counts()["0"] == 2
    assert opt.captured_energy()["0"] == pytest.approx(1.0, abs=1e-5)
    assert opt.subspace_overlaps()["0"] == pytest.approx(0.0, abs=1e-5)


def test_tracking_follows_a_rotating_subspace_without_refresh():
    W = torch.nn.Parameter(torch.zeros(30, 40))
    opt = adarank.AdaRankAdamW(
        [W], rank_rule="fixed", max_rank=2, track_every=1, check_every=0, update_gap=1000
    )
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(30, 30, generator=gen)).Q
    right = torch.randn(2, 40, generator=gen)
    captured = []
    for t in range(12):
        angle = 0.05 * t  # the column space drifts slowly
        cols = math.cos(angle) * basis[:, :2] + math.sin(angle) * basis[:, 2:4]
        linear_loss_grads(W, [cols @ right], opt, 1)
        captured.append(opt.captured_energy()["0"])
    assert opt.refresh_counts()["0"] == 1
    # Drifted by 0.55 rad: a frozen subspace would capture cos(0.55) ≈ 0.85.
    assert min(captured[-3:]) > 0.99


def test_conv_weights_are_projected_as_matrices():
    conv = torch.nn.Conv2d(4, 8, 3)
    opt = adarank.AdaRankAdamW(conv.parameters(), max_rank=3, rank_rule="fixed")
    x = torch.randn(2, 4, 6, 6)
    conv(x).square().mean().backward()
    before = conv.weight.detach().clone()
    opt.step()
    assert opt.ranks() == {"0": 3}
    assert opt.state[conv.weight]["exp_avg"].shape == (3, 36)  # 8×36: left side
    assert not torch.equal(before, conv.weight)


def test_residual_path_matches_float64_reference_and_limits_growth():
    m, n, rank, lr, scale, gamma = 12, 20, 2, 1e-2, 0.5, 1.01
    grads = [low_rank_plus_noise(m, n, 2, 0.3, seed=s) for s in range(4)]
    grads[3] = grads[3] * 50.0  # a sudden jump in gradient norm
    W0 = torch.randn(m, n)
    W = torch.nn.Parameter(W0.clone())
    opt = adarank.AdaRankAdamW(
        [W],
        lr=lr,
        betas=BETAS,
        scale=scale,
        rank_rule="fixed",
        max_rank=rank,
        backend="exact",
        track_every=0,
        check_every=0,
        update_gap=100,
        residual=True,
        residual_limit=gamma,
    )
    linear_loss_grads(W, grads, opt, len(grads))

    ref = W0.double().clone()
    U, _, _ = torch.linalg.svd(grads[0].double(), full_matrices=False)
    P = U[:, :rank]
    M = V = 0
    previous = 0.0
    for t, G in enumerate(grads, start=1):
        G = G.double()
        R = P.T @ G
        M = BETAS[0] * M + (1 - BETAS[0]) * R
        V = BETAS[1] * V + (1 - BETAS[1]) * R * R
        N = (M / (1 - BETAS[0] ** t)) / ((V / (1 - BETAS[1] ** t)).sqrt() + 1e-8)
        S = (G - P @ R) * (N.norm() / R.norm())
        if previous > 0 and S.norm() > gamma * previous:
            S = S * (gamma * previous / S.norm())
        previous = float(S.norm())
        ref = ref - lr * scale * (P @ N + S)
    torch.testing.assert_close(W.detach().double(), ref, rtol=1e-5, atol=1e-6)
    assert float(opt.state[W]["residual_norm"]) == pytest.approx(previous, rel=1e-5)


def test_lazy_refresh_doubles_the_gap_after_a_stable_window():
    # A constant gradient: every refresh finds the same leading vector (|cos| = 1),
    # so after 5 recorded similarities (6 refreshes) the gap doubles, and again later.
    W = torch.nn.Parameter(torch.zeros(10, 16))
    G = low_rank_plus_noise(10, 16, 2, 0.0, seed=0)
    opt = adarank.AdaRankAdamW(
        [W],
        update_gap=2,
        lazy_refresh=True,
        lazy_window=5,
        lazy_threshold=0.4,
        lazy_factor=2,
        track_every=0,
        check_every=0,
    )
    gaps, refresh_steps = [], []
    for t in range(40):
        before = opt.refresh_counts()["0"]
        linear_loss_grads(W, [G], opt, 1)
        if opt.refresh_counts()["0"] > before:
            refresh_steps.append(t)
        gaps.append(opt.refresh_gaps()["0"])
    # Refreshes at 0,2,...,10 (6 refreshes, 5 similarities) -> gap 4: 14,18,22,26,30 -> gap 8.
    assert refresh_steps[:6] == [0, 2, 4, 6, 8, 10]
    assert refresh_steps[6:11] == [14, 18, 22, 26, 30]
    assert refresh_steps[11:] == [38]
    assert gaps[-1] == 8


def test_lazy_refresh_keeps_the_gap_when_subspaces_keep_changing():
    W = torch.nn.Parameter(torch.zeros(10, 16))
    basis = torch.linalg.qr(torch.randn(10, 10)).Q
    opt = adarank.AdaRankAdamW(
        [W],
        update_gap=2,
        lazy_refresh=True,
        rank_rule="fixed",
        max_rank=1,
        track_every=0,
        check_every=0,
    )
    for t in range(30):
        # The leading direction changes at every refresh: consecutive |cos| = 0.
        G = basis[:, (t // 2) % 10 : (t // 2) % 10 + 1] @ torch.randn(1, 16)
        linear_loss_grads(W, [G], opt, 1)
    assert opt.refresh_gaps()["0"] == 2
    assert opt.refresh_counts()["0"] == 15
