"""Rank rules: how many singular directions a refresh keeps.

Convention (DESIGN §3.2): the *energy* of a rank-k subspace is the fraction of
the squared Frobenius norm it captures, ``Σ_{i≤k} σ_i² / ‖G‖_F²``. The energy
rule keeps the smallest ``k`` whose energy reaches ``η``. This is the σ²
fraction, not the unsquared residual ``‖G − G_k‖_F / ‖G‖_F``: η = 0.9 leaves a
residual of ``√0.1 ≈ 0.32`` of the gradient norm.

The denominator is the exact ``‖G‖_F²`` of the full gradient, never the sum of
the sketch's σ²: a sketch sees only what it captured, so normalising by its own
energy would overstate coverage and bias ranks low.

A rule is a plain function ``rule(S, total_energy, group, previous_rank) ->
(rank, satisfied)``; ``satisfied`` is False when the singular values given are
too few to decide (the sketch must grow). Rules are registered by name in
``RANK_RULES`` and param groups store the name, so checkpoints stay
``weights_only``-loadable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["RANK_RULES", "energy_rank", "energy_rule", "fixed_rule"]


def energy_rank(s: torch.Tensor, eta: float, total_energy: float | None = None) -> int:
    """Smallest ``k`` with ``Σ_{i≤k} s_i² ≥ η · total_energy``.

    Args:
        s: singular values in descending order (1-D, any float dtype).
        eta: energy fraction in (0, 1].
        total_energy: ``‖G‖_F²``; defaults to ``Σ s_i²`` (exact only when ``s``
            is the full spectrum).

    Returns:
        ``k`` in ``[1, len(s)]``; ``len(s) + 1`` when even all of ``s`` falls short,
        which tells the caller the spectrum given was too short.
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    energy = s.detach().to(torch.float64).square()
    cumulative = torch.cumsum(energy, 0)
    total = float(cumulative[-1]) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 1
    # A relative slack of a few ulps keeps η = 1 reachable on a full spectrum.
    target = eta * total * (1.0 - 1e-12)
    reached = torch.nonzero(cumulative >= target)
    if reached.numel() == 0:
        return int(s.numel()) + 1
    return int(reached[0, 0]) + 1


RankRule = Callable[[torch.Tensor, float, Mapping[str, Any], int], tuple[int, bool]]


def energy_rule(
    S: torch.Tensor, total_energy: float, group: Mapping[str, Any], previous_rank: int
) -> tuple[int, bool]:
    """Adaptive rank by the energy threshold ``group["eta"]``, clamped to
    ``[group["min_rank"], group["max_rank"]]``, with optional hysteresis: a drop
    of at most ``group["rank_hysteresis"]`` below ``previous_rank`` is ignored so
    the rank does not flap between neighbouring values."""
    k = energy_rank(S, group["eta"], total_energy)
    satisfied = k <= S.numel()
    k = min(k, S.numel())
    k = max(group["min_rank"], min(k, group["max_rank"]))
    h = group["rank_hysteresis"]
    if previous_rank > 0 and previous_rank - h <= k < previous_rank:
        k = previous_rank
    return k, satisfied


def fixed_rule(
    S: torch.Tensor, total_energy: float, group: Mapping[str, Any], previous_rank: int
) -> tuple[int, bool]:
    """GaLore's fixed rank ``group["max_rank"]`` (the caller clamps to the shape)."""
    del S, total_energy, previous_rank
    return group["max_rank"], True


RANK_RULES: dict[str, RankRule] = {"energy": energy_rule, "fixed": fixed_rule}
