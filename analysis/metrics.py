"""Rank measures of a singular-value spectrum (and of a matrix, through its spectrum).

Each function takes a 1-D vector of singular values σ (a torch tensor, a numpy array or a list; any
order, any float dtype) or a 2-D matrix G, whose exact spectrum it then measures, and computes in
float64. The ``matrix_*`` twins accept only a matrix. Conventions (the same as adarank's rank
rule, DESIGN.md §3.2):

- stable rank        ‖G‖_F² / ‖G‖_2²  =  Σσ_i² / σ_1²                      (in [1, rank G])
- effective rank     exp(H(p)),  p_i = σ_i / Σ_j σ_j,  H(p) = −Σ p_i log p_i  (in [1, rank G])
- energy rank at η   smallest k with Σ_{i≤k} σ_i² ≥ η · ‖G‖_F², σ sorted descending (in [1, rank G])

The energy rank counts the fraction of *squared* singular values (of ‖G‖_F²), not the unsquared
residual ‖G − G_k‖_F / ‖G‖_F. The effective rank is Roy & Vetterli's (EUSIPCO 2007). A zero
spectrum has every rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from adarank.rank import energy_count

__all__ = [
    "energy_rank",
    "effective_rank",
    "matrix_effective_rank",
    "matrix_energy_rank",
    "matrix_stable_rank",
    "singular_values",
    "stable_rank",
]


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _spectrum(s: Any) -> np.ndarray:
    s = _as_float64(s)
    if s.ndim == 2:
        return singular_values(s)
    if s.ndim != 1:
        raise ValueError(
            f"expected singular values (1-D) or a matrix (2-D), got shape {tuple(s.shape)}"
        )
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0):
        raise ValueError("singular values must be finite and non-negative")
    return np.sort(s)[::-1]


def stable_rank(s: Any) -> float:
    """Stable rank Σσ_i² / max σ_i² of the spectrum ``s`` (shape (k,)), or ‖G‖_F²/‖G‖_2² of a
    matrix ``s`` (shape (m, n)); 0.0 for a zero spectrum."""
    s = _spectrum(s)
    if s.size == 0 or s[0] == 0:
        return 0.0
    return float(np.sum((s / s[0]) ** 2))


def effective_rank(s: Any) -> float:
    """Effective rank exp(−Σ p_i log p_i) with p_i = σ_i / Σσ_j (Roy & Vetterli, 2007).

    Zero singular values contribute nothing (0·log 0 = 0); a zero spectrum gives 0.0. On a
    truncated spectrum (only the top k values) it is the effective rank of those k values.
    """
    s = _spectrum(s)
    total = float(np.sum(s))
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def energy_rank(s: Any, eta: float, *, total_energy: float | None = None) -> int | None:
    """Smallest k with Σ_{i≤k} σ_i² ≥ η·E, σ sorted descending, E = Σσ_i² unless given.

    Args:
        s: singular values, shape (k,).
        eta: energy fraction in (0, 1].
        total_energy: E = ‖G‖_F² when ``s`` holds only the top singular values of G (from a
            randomized SVD); then the threshold may lie beyond the values supplied.

    Returns:
        The rank (0 for a zero spectrum), or None when the values supplied hold less than η·E,
        i.e. the energy rank is larger than ``len(s)``.
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta must lie in (0, 1], got {eta}")
    s = _spectrum(s)
    if total_energy is not None and (not np.isfinite(total_energy) or total_energy < 0):
        raise ValueError(f"total_energy must be finite and non-negative, got {total_energy}")
    # adarank's one definition (``adarank.rank.energy_count``) on the sorted spectrum.
    return energy_count(torch.from_numpy(s.copy()), eta, total_energy)


def singular_values(G: Any) -> np.ndarray:
    """All singular values of the 2-D matrix ``G`` (m×n), descending, as float64 (min(m, n),)."""
    G = _as_float64(G)
    if G.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(G.shape)}")
    if G.size == 0:
        return np.zeros(0)
    if not np.all(np.isfinite(G)):
        raise ValueError("the matrix must be finite to have a spectrum")
    return np.linalg.svd(G, compute_uv=False)


def matrix_stable_rank(G: Any) -> float:
    """Stable rank ‖G‖_F² / ‖G‖_2² of the matrix ``G``."""
    return stable_rank(singular_values(G))


def matrix_effective_rank(G: Any) -> float:
    """Effective rank (Roy & Vetterli) of the matrix ``G``'s full spectrum."""
    return effective_rank(singular_values(G))


def matrix_energy_rank(G: Any, eta: float) -> int:
    """Smallest k whose best rank-k approximation of ``G`` holds a fraction η of ‖G‖_F²."""
    rank = energy_rank(singular_values(G), eta)
    assert rank is not None  # the full spectrum always reaches η ≤ 1
    return rank
