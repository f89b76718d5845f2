"""Moment transfer across subspace changes (shapes and values) and online tracking."""

from __future__ import annotations

import pytest
import torch

from adarank.subspace import (
    align_signs,
    subspace_overlap,
    track_subspace,
    transfer_moments,
)


def orthonormal(d: int, r: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q


def moments(r: int, n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(r, n, generator=gen, dtype=torch.float64)
    V = M.square() + torch.rand(r, n, generator=gen, dtype=torch.float64)
    return M, V


@pytest.mark.parametrize("r_new", [2, 4, 6])
def test_rotate_shapes_across_a_rank_change_left(r_new):
    P_old = orthonormal(20, 4)
    P_new = orthonormal(20, r_new, seed=5)
    M, V = moments(4, 7)
    W = torch.full((4, 1), 0.9, dtype=torch.float64)
    C = P_new.T @ P_old
    M2, V2, W1, W2 = transfer_moments(M, V, W, W.clone(), C, None, "rotate")
    assert M2.shape == V2.shape == (r_new, 7)
    assert W1.shape == W2.shape == (r_new, 1)
    assert torch.all(V2 >= 0)


def test_rotate_shapes_right_and_both():
    Q_old, Q_new = orthonormal(15, 3), orthonormal(15, 5, seed=2)
    M = torch.randn(9, 3, dtype=torch.float64)
    V = M.square() + 1
    W = torch.ones(1, 3, dtype=torch.float64)
    M2, V2, W1, _ = transfer_moments(M, V, W, W, None, Q_new.T @ Q_old, "rotate")
    assert M2.shape == (9, 5) and W1.shape == (1, 5)
    P_old, P_new = orthonormal(8, 3, 3), orthonormal(8, 2, 4)
    Mb = torch.randn(3, 3, dtype=torch.float64)
    Wb = torch.ones(3, 3, dtype=torch.float64)
    M3, V3, W3, _ = transfer_moments(
        Mb, Mb.square(), Wb, Wb, P_new.T @ P_old, Q_new.T @ Q_old, "rotate"
    )
    assert M3.shape == V3.shape == W3.shape == (2, 5)


def test_rotate_matches_closed_form_with_full_history():
    # With W = 1 everywhere the transfer is LDAdam's formula on raw moments.
    P_old, P_new = orthonormal(12, 4), orthonormal(12, 3, seed=9)
    M, V = moments(4, 5)
    ones = torch.ones(4, 1, dtype=torch.float64)
    C = P_new.T @ P_old
    M2, V2, W1, _ = transfer_moments(M, V, ones, ones, C, None, "rotate")
    M_ref = C @ M
    V_ref = torch.clamp((C * C) @ (V - M * M) + M_ref * M_ref, min=0)
    W_ref = (C * C).sum(1, keepdim=True)
    torch.testing.assert_close(W1, W_ref)
    torch.testing.assert_close(M2, M_ref * W_ref)
    torch.testing.assert_close(V2, V_ref * W_ref)


def test_rotate_is_exact_for_a_permuted_basis():
    P_old = orthonormal(10, 4)
    perm = torch.tensor([2, 0, 3, 1])
    P_new = P_old[:, perm] * torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    M, V = moments(4, 6)
    W1 = torch.tensor([[0.5], [0.6], [0.7], [0.8]], dtype=torch.float64)
    W2 = W1 / 10
    M2, V2, W1n, W2n = transfer_moments(M, V, W1, W2, P_new.T @ P_old, None, "rotate")
    signs = torch.tensor([[1.0], [-1.0], [1.0], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(M2, M[perm] * signs)
    torch.testing.assert_close(V2, V[perm])
    torch.testing.assert_close(W1n, W1[perm])
    torch.testing.assert_close(W2n, W2[perm])


def test_rotate_preserves_the_back_projected_first_moment_when_subspace_grows():
    # If span(P_old) ⊂ span(P_new), P_new M̂_new = P_old M̂_old exactly.
    P_big = orthonormal(16, 6)
    P_old = P_big[:, :3] @ torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
    M, V = moments(3, 5)
    ones = torch.ones(3, 1, dtype=torch.float64)
    M2, _, W1, _ = transfer_moments(M, V, ones, ones, P_big.T @ P_old, None, "rotate")
    M_hat = torch.where(W1 > 0, M2 / W1.clamp_min(1e-300), torch.zeros_like(M2))
    torch.testing.assert_close(P_big @ M_hat, P_old @ M)


def test_rotate_new_orthogonal_direction_starts_fresh():
    P_old = orthonormal(10, 3)
    P_new = torch.linalg.qr(
        torch.randn(10, 1, dtype=torch.float64)
        - P_old @ (P_old.T @ torch.randn(10, 1, dtype=torch.float64))
    ).Q
    # Make P_new exactly orthogonal to P_old.
    P_new = P_new - P_old @ (P_old.T @ P_new)
    P_new = P_new / P_new.norm()
    M, V = moments(3, 4)
    ones = torch.ones(3, 1, dtype=torch.float64)
    M2, V2, W1, W2 = transfer_moments(M, V, ones, ones, P_new.T @ P_old, None, "rotate")
    assert float(W1.abs().max()) < 1e-12 and float(W2.abs().max()) < 1e-12
    assert float(M2.abs().max()) < 1e-12 and float(V2.abs().max()) < 1e-12


def test_plain_rotation_of_v_can_go_negative_but_ours_cannot():
    P_old, P_new = orthonormal(6, 4), orthonormal(6, 4, seed=3)
    C = P_new.T @ P_old
    V = torch.rand(4, 50, dtype=torch.float64)
    assert float((C @ V).min()) < 0  # the transfer DESIGN §3.5 forbids
    M = torch.randn(4, 50, dtype=torch.float64)
    ones = torch.ones(4, 1, dtype=torch.float64)
    _, V2, _, _ = transfer_moments(M, V, ones, ones, C, None, "rotate")
    assert float(V2.min()) >= 0


def test_keep_reuses_and_falls_back_to_reset_on_rank_change():
    M, V = moments(4, 5)
    W = torch.full((4, 1), 0.3, dtype=torch.float64)
    C_same = orthonormal(9, 4, 1).T @ orthonormal(9, 4, 2)
    out = transfer_moments(M, V, W, W, C_same, None, "keep")
    assert out[0] is M and out[1] is V and out[2] is W
    C_shrink = orthonormal(9, 2, 1).T @ orthonormal(9, 4, 2)
    M2, V2, W1, W2 = transfer_moments(M, V, W, W, C_shrink, None, "keep")
    assert M2.shape == (2, 5) and not M2.any() and not V2.any()
    assert W1.shape == (2, 1) and not W1.any() and not W2.any()


def test_reset_zeroes_everything():
    M, V = moments(4, 5)
    W = torch.ones(4, 1, dtype=torch.float64)
    C = orthonormal(9, 4, 1).T @ orthonormal(9, 4, 2)
    M2, V2, W1, _ = transfer_moments(M, V, W, W, C, None, "reset")
    assert M2.shape == (4, 5) and not M2.any() and not V2.any() and not W1.any()


def test_unknown_policy_names_the_argument():
    M = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="moments='swap'"):
        transfer_moments(M, M, M[:, :1], M[:, :1], torch.eye(2), None, "swap")


def test_tracking_converges_to_the_dominant_subspace():
    # Repeated tracking steps on a fixed G are subspace iteration: they converge
    # to G's top-r left singular subspace at rate (σ_{r+1}/σ_r)².
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(50, 30, generator=gen, dtype=torch.float64)).Q
    sigma = torch.cat([torch.tensor([5.0, 4.0, 3.0]), 0.5 * torch.ones(27)]).double()
    G = (U * sigma) @ V.T
    P = orthonormal(30, 3, seed=7)
    Q = orthonormal(50, 3, seed=8)
    overlaps = []
    for _ in range(6):
        P, Q = track_subspace(G, P, Q)
        overlaps.append(subspace_overlap(U[:, :3], P))
    assert overlaps[-1] > 1 - 1e-6
    assert subspace_overlap(V[:, :3], Q) > 1 - 1e-6
    torch.testing.assert_close(P.T @ P, torch.eye(3, dtype=torch.float64))


def test_align_signs_makes_overlaps_nonnegative():
    P = orthonormal(10, 3)
    flipped = P * torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(align_signs(flipped, P), P)
    assert align_signs(P, None) is P


def test_subspace_overlap_bounds():
    P = orthonormal(20, 4)
    assert abs(subspace_overlap(P, P) - 1.0) < 1e-12
    perp = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64)).Q
    A, B = perp[:, :4], perp[:, 4:8]
    assert abs(subspace_overlap(A, B)) < 1e-12
    assert subspace_overlap(None, P) != subspace_overlap(None, P)  # nan
