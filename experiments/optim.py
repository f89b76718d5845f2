"""Optimizer construction: one name and a few options to AdamW, GaLore, Q-GaLore or AdaRankAdamW.

Every experiment builds its optimizer here, so a comparison cannot differ in a setting one script
forgot. The low-rank optimizers project the 2-D weights of the linear layers whose names contain
none of ``exclude`` (``adarank.param_groups``); the other parameters (embeddings, the output
layer, norms) get plain AdamW inside the same optimizer, as in the GaLore paper.

============================  ===============================================================
name                          optimizer
============================  ===============================================================
``adamw``                     ``torch.optim.AdamW`` over every parameter
``galore``                    ``adarank.GaLoreAdamW``: fixed ``rank``, exact SVD every
                              ``update_gap`` steps, moments kept (arXiv 2403.03507)
``qgalore``                   ``adarank.QGaLoreAdamW``: GaLore with INT4 projectors and lazy
                              refresh (arXiv 2407.08296); INT8 weights need
                              ``adarank.quantize_linears(model)`` first
``adarank``                   ``adarank.AdaRankAdamW``: rank ≤ ``rank`` capturing ``eta`` of
                              the gradient's energy, randomized SVD seeded by ``seed``
``adarank-residual``          ``adarank`` plus the gradient outside the subspace
                              (``residual=True``, Fira-style)
============================  ===============================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

import adarank

OPTIMIZERS = ("adamw", "galore", "qgalore", "adarank", "adarank-residual")
# Kept full-rank by the low-rank optimizers: the token embedding and the output layer.
EXCLUDE = ("embed", "lm_head")


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    rank: int = 128,
    eta: float = 0.9,
    update_gap: int = 200,
    scale: float = 0.25,
    seed: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    exclude: Iterable[str] = EXCLUDE,
    group_options: Mapping[str, Any] | None = None,
    **optimizer_options: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of `OPTIMIZERS`) over ``model``'s parameters.

    Args:
        lr, betas, weight_decay: as ``torch.optim.AdamW``; eps stays each class's default
            (1e-8 AdamW and AdaRankAdamW, 1e-6 for GaLore's convention).
        rank: GaLore's fixed rank; AdaRankAdamW's ``max_rank``.
        eta: AdaRankAdamW's energy threshold η.
        update_gap: the refresh gap T in steps (GaLore's ``update_proj_gap``).
        scale: the back-projection scale α.
        seed: base seed of AdaRankAdamW's sketches (GaLore's exact SVD draws none).
        exclude: name substrings of linear layers kept full-rank.
        group_options: further options of the low-rank group only (``LOWRANK_DEFAULTS`` keys,
            GaLore's and Q-GaLore's names accepted), e.g. ``{"moments": "reset"}``.
        **optimizer_options: keyword arguments of the optimizer's constructor, defaults for
            every group (e.g. ``fused=True`` for AdamW, ``foreach=False`` for ours).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    adam = {"lr": lr, "betas": betas, "weight_decay": weight_decay, **optimizer_options}
    if name == "adamw":
        if group_options:
            raise ValueError(f"group_options {dict(group_options)} are for low-rank optimizers")
        return torch.optim.AdamW(model.parameters(), **adam)
    options = dict(group_options or {})
    if name in ("galore", "qgalore"):
        groups = adarank.param_groups(
            model,
            exclude=exclude,
            rank=rank,
            update_proj_gap=update_gap,
            scale=scale,
            proj_type="std",
            **options,
        )
        cls = adarank.QGaLoreAdamW if name == "qgalore" else adarank.GaLoreAdamW
        return cls(groups, **adam)
    if name == "adarank-residual":
        options.setdefault("residual", True)
    groups = adarank.param_groups(
        model,
        exclude=exclude,
        max_rank=rank,
        eta=eta,
        update_gap=update_gap,
        scale=scale,
        seed=seed,
        **options,
    )
    return adarank.AdaRankAdamW(groups, **adam)


def lowrank_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's projected param groups (none for AdamW)."""
    return [g for g in optimizer.param_groups if g.get("lowrank")]


def set_refresh_gap(optimizer: torch.optim.Optimizer, gap: int) -> None:
    """Make every low-rank matrix refresh every ``gap`` steps: our groups' ``update_gap``; the
    reference GaLore package's projectors keep their own copy (``update_proj_gap``) and refresh
    when the step count is a multiple of it, so a gap of 1 refreshes them all too."""
    for g in lowrank_groups(optimizer):
        g["update_gap"] = gap
    for state in optimizer.state.values():
        if "projector" in state:
            state["projector"].update_proj_gap = gap


@contextlib.contextmanager
def refreshing_all(optimizer: torch.optim.Optimizer, *, gap_after: int) -> Iterator[None]:
    """Steps taken inside the block refresh every low-rank matrix (each has gone a step or more
    since its last refresh, so a gap of 1 is due); the gap is ``gap_after`` afterwards."""
    set_refresh_gap(optimizer, 1)
    try:
        yield
    finally:
        set_refresh_gap(optimizer, gap_after)


def refresh_count(optimizer: torch.optim.Optimizer) -> int:
    """Subspace refreshes so far, summed over matrices (0 for an optimizer without them)."""
    counts = getattr(optimizer, "refresh_counts", None)
    return sum(counts().values()) if callable(counts) else 0


def rank_summary(ranks: Mapping[str, int], order: Iterable[str]) -> str:
    """``"q_proj 12, k_proj 8–11, ..."``: the range of ranks per layer type, in ``order``
    (the layer type is the module name, the next-to-last part of a parameter name)."""
    by_type: dict[str, list[int]] = {}
    for name, r in ranks.items():
        by_type.setdefault(name.split(".")[-2], []).append(r)
    parts = []
    for kind in order:
        values = by_type.get(kind, [])
        if values:
            lo, hi = min(values), max(values)
            parts.append(f"{kind} {lo}" if lo == hi else f"{kind} {lo}–{hi}")
    return ", ".join(parts)
