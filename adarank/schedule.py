"""When a low-rank parameter refreshes, tracks or tests its subspace (DESIGN §3.4).

Pure decisions from a parameter's counters and its group's options; nothing here
touches a tensor except the lazy gap's record of cosines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "Plan",
    "gap",
    "is_stale",
    "periodic_due",
    "plan",
    "refresh_due",
    "stagger_offset",
    "update_lazy_gap",
]

State = Mapping[str, Any]
Group = Mapping[str, Any]


def gap(state: State, group: Group) -> int:
    """Steps between scheduled refreshes: ``update_gap``, or this layer's lazy gap."""
    if group["lazy_refresh"]:
        return int(state.get("gap", group["update_gap"]))
    return int(group["update_gap"])


def refresh_due(state: State, group: Group) -> bool:
    """A first step (no subspace yet) or a full gap since the last refresh."""
    return "exp_avg" not in state or state["since_refresh"] >= gap(state, group)


def periodic_due(state: State, every: int) -> bool:
    """Whether a periodic action (``check_every``, ``track_every``) falls on this step."""
    return bool(every) and state["since_refresh"] % every == 0


def is_stale(r_norm: float, g_norm: float, group: Group) -> bool:
    """The refresh events from ``‖R‖_F`` and ``‖G‖_F``: the captured fraction fell below
    ``refresh_below``, or ``‖R‖_F ≤ converge_tol`` (AdaRankGrad's convergence test)."""
    if g_norm == 0.0:
        return False
    return r_norm / g_norm < group["refresh_below"] or r_norm <= group["converge_tol"]


class Plan:
    """What each of a group's low-rank parameters does before its Adam step, by position
    in the list given to ``plan``: ``refresh``, ``check`` (test staleness first, then
    refresh or track as ``after_check`` says), ``track``; the rest just step."""

    __slots__ = ("check", "refresh", "track")

    def __init__(self) -> None:
        self.refresh: list[int] = []
        self.check: list[int] = []
        self.track: list[int] = []


def plan(states: list[State], group: Group) -> Plan:
    """The schedule's first decisions for a group's low-rank parameters."""
    out = Plan()
    for i, state in enumerate(states):
        if refresh_due(state, group):
            out.refresh.append(i)
        elif periodic_due(state, group["check_every"]):
            out.check.append(i)
        elif periodic_due(state, group["track_every"]):
            out.track.append(i)
    return out


def after_check(state: State, group: Group, r_norm: float, g_norm: float) -> str:
    """``"refresh"``, ``"track"`` or ``"step"`` for a parameter whose subspace was tested."""
    if is_stale(r_norm, g_norm, group):
        return "refresh"
    if periodic_due(state, group["track_every"]):
        return "track"
    return "step"


def stagger_offset(position: int, matrices: int, group: Group) -> int:
    """Steps by which a matrix's first refresh period is shortened under ``stagger`` = k:
    the group's matrices, in order, fall into k contiguous phases and phase j starts
    j·T/k steps into its period, so about 1/k of them refresh on any scheduled step while
    neighbours (one block's matrices, often of one shape) still refresh together and share
    a batched SVD. ``position``: the matrix's index among the group's ``matrices``."""
    k = group["stagger"]
    return int((position * k // matrices) * group["update_gap"] // k)


def update_lazy_gap(state: dict[str, Any], group: Group, cosine: torch.Tensor | None) -> None:
    """Q-GaLore's layer-adaptive gap (arXiv 2407.08296 §3.2): record ``cosine`` = |cos|
    between the leading basis vectors of this refresh and the last (None at the first);
    once ``lazy_window`` are recorded and their mean is at least ``lazy_threshold``,
    multiply this layer's gap by ``lazy_factor`` and start a new window."""
    window = group["lazy_window"]
    if cosine is not None:
        sims = state.get("lazy_sims")
        if sims is None or sims.numel() != window:
            sims = cosine.new_zeros(window)
        count = state.get("lazy_count", 0)
        sims[count % window] = cosine
        count += 1
        if count >= window and float(sims.mean()) >= group["lazy_threshold"]:
            state["gap"] = state.get("gap", group["update_gap"]) * group["lazy_factor"]
            count = 0
        state["lazy_sims"], state["lazy_count"] = sims, count
    state.setdefault("gap", group["update_gap"])
