"""Projection and back-projection algebra for every proj_type, against float64."""

from __future__ import annotations

import pytest
import torch

from adarank.projector import project, project_back, projector_from_svd, side_for


@pytest.mark.parametrize(
    "proj_type, shape, side",
    [
        ("std", (8, 20), "left"),
        ("std", (20, 8), "right"),
        ("std", (10, 10), "right"),
        ("reverse_std", (8, 20), "right"),
        ("reverse_std", (20, 8), "left"),
        ("left", (20, 8), "left"),
        ("right", (8, 20), "right"),
        ("full", (8, 20), "both"),
    ],
)
def test_side_follows_galore_proj_type(proj_type, shape, side):
    assert side_for(shape, proj_type) == side


def test_unknown_proj_type_names_the_argument():
    with pytest.raises(ValueError, match="proj_type='diag'"):
        side_for((3, 4), "diag")


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_projection_roundtrip_is_orthogonal_projection(proj_type, shape):
    m, n = shape
    r = 5
    G = torch.randn(m, n, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    side = side_for(shape, proj_type)
    P, Q = projector_from_svd(U, Vh, r, side)
    R = project(G, P, Q)
    expected_shape = {"left": (r, n), "right": (m, r), "both": (r, r)}[side]
    assert R.shape == expected_shape
    back = project_back(R, P, Q)
    # Independent reference: the orthogonal projectors built explicitly.
    Pl = U[:, :r] @ U[:, :r].T
    Pr = Vh[:r].T @ Vh[:r]
    reference = {"left": Pl @ G, "right": G @ Pr, "both": Pl @ G @ Pr}[side]
    torch.testing.assert_close(back, reference, rtol=1e-12, atol=1e-12)
    # Projecting twice changes nothing (idempotence).
    torch.testing.assert_close(project_back(project(back, P, Q), P, Q), back, atol=1e-12, rtol=0)


def test_top_r_projection_keeps_the_top_r_energy():
    G = torch.randn(16, 40, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    P, Q = projector_from_svd(U, Vh, 4, "left")
    R = project(G, P, Q)
    torch.testing.assert_close(R.square().sum(), S[:4].square().sum())


def test_full_rank_projector_is_identity():
    G = torch.randn(6, 9, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    P, Q = projector_from_svd(U, Vh, 6, "left")
    torch.testing.assert_close(project_back(project(G, P, Q), P, Q), G)
