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

from collections.abc import Mapping
from typing import Any, Protocol

import torch

__all__ = [
    "RANK_RULES",
    "TIE_RTOL",
    "RankRule",
    "clamp_rank",
    "energy_count",
    "energy_rank",
    "energy_rule",
    "fixed_rule",
    "rank_cap",
]


# A partial sum that reaches η·E in exact arithmetic can fall short by a few ulps after
# rounding (σ² of a float32 σ, summation order): comparisons allow this relative slack, so
# such ties count as reached (and η = 1 is reachable on a full spectrum).
TIE_RTOL = 1e-9


def energy_count(s: torch.Tensor, eta: float, total_energy: float | None = None) -> int | None:
    """The one definition of the energy rank: smallest ``k`` with
    ``Σ_{i≤k} s_i² ≥ η · E·(1 − TIE_RTOL)``, ``E = total_energy`` or ``Σ s_i²``.

    Contract: ``s`` is 1-D, descending, finite and non-negative (any float dtype; summed
    in float64). Returns ``k`` in ``[1, len(s)]``; ``0`` when ``E = 0`` (a zero spectrum
    has no direction to keep); ``None`` when even all of ``s`` falls short of ``η·E`` (η
    is not reached from the values given: ``s`` is the top of a longer spectrum).
    ``ValueError`` for η outside (0, 1].
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    cumulative = torch.cumsum(s.detach().to(torch.float64).square(), 0)
    if total_energy is None:
        total = float(cumulative[-1]) if cumulative.numel() else 0.0
    else:
        total = float(total_energy)
    if total <= 0.0:
        return 0
    target = eta * total * (1.0 - TIE_RTOL)
    reached = torch.nonzero(cumulative >= target)
    if reached.numel() == 0:
        return None
    return int(reached[0, 0]) + 1


def energy_rank(s: torch.Tensor, eta: float, total_energy: float | None = None) -> int:
    """The energy rank as a rank rule needs it (``energy_count`` with two mappings).

    Args:
        s: singular values in descending order (1-D, any float dtype).
        eta: energy fraction in (0, 1].
        total_energy: ``‖G‖_F²``; defaults to ``Σ s_i²`` (exact only when ``s``
            is the full spectrum).

    Returns:
        ``k`` in ``[1, len(s)]``; ``len(s) + 1`` when even all of ``s`` falls short,
        which tells the caller the spectrum given was too short; 1 for a zero spectrum
        (a subspace needs at least one direction).
    """
    k = energy_count(s, eta, total_energy)
    if k is None:
        return int(s.numel()) + 1
    return max(k, 1)


def rank_cap(max_rank: int, shape: tuple[int, int]) -> int:
    """The largest rank a matrix of ``shape`` may get: ``max_rank`` clamped to min(m, n)."""
    return max(1, min(max_rank, *shape))


def clamp_rank(rank: int, cap: int, available: int) -> int:
    """The one rank clamp: at least 1, at most ``cap`` and the ``available`` singular
    vectors of the SVD that chose it."""
    return max(1, min(rank, cap, available))


class RankRule(Protocol):
    """A rank rule: from the singular values ``S`` of a sketch (descending), the exact
    ``total_energy = ‖G‖_F²``, the param group and the previous rank (0 at first),
    return ``(rank, satisfied)``; ``satisfied`` is False when ``S`` is too short to
    decide (the sketch must grow). Registered by name in ``RANK_RULES``; a group stores
    the name, and the options a rule reads are group keys."""

    def __call__(
        self,
        S: torch.Tensor,
        total_energy: float,
        group: Mapping[str, Any],
        previous_rank: int,
    ) -> tuple[int, bool]: ...


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
