"""What the Trainer and Lightning callbacks share: finding the optimizer, flat scalars."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from adarank.analysis.layer_types import layer_type, type_sort_key

__all__ = ["check_callback_options", "find_optimizer", "optimizer_scalars", "reports_ranks"]

# The SpectrumLogger options a callback passes through (the rest are the callback's own).
LOGGER_OPTIONS = frozenset(
    {
        "top_k",
        "include",
        "exclude",
        "energy_levels",
        "exact_max_dim",
        "max_probe_rank",
        "seed",
        "run_name",
        "meta",
    }
)


def check_callback_options(every: Any, logger_options: dict[str, Any]) -> None:
    """ValueError for a callback's ``every`` that is not a positive integer, or an option that
    is not one of `LOGGER_OPTIONS`."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    unknown = sorted(set(logger_options) - LOGGER_OPTIONS)
    if unknown:
        raise ValueError(
            f"SpectrumCallback got unknown option(s) {unknown}; SpectrumLogger options are "
            f"{sorted(LOGGER_OPTIONS)}"
        )


def reports_ranks(optimizer: Any) -> bool:
    """True for an adarank optimizer (one that reports per-layer ranks and state bytes)."""
    return callable(getattr(optimizer, "ranks", None)) and callable(
        getattr(optimizer, "state_bytes", None)
    )


def find_optimizer(wrapped: Any) -> torch.optim.Optimizer | None:
    """The optimizer inside the wrappers frameworks put around it.

    accelerate's ``AcceleratedOptimizer`` (what the Trainer holds), Lightning's
    ``LightningOptimizer`` and similar keep the real one in ``.optimizer`` (``._optimizer`` for
    Lightning); the innermost adarank optimizer is returned, else the innermost
    ``torch.optim.Optimizer``, else None.
    """
    seen = set()
    innermost = None
    current = wrapped
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if reports_ranks(current):
            return current
        if isinstance(current, torch.optim.Optimizer):
            innermost = current
        current = getattr(current, "optimizer", None) or getattr(current, "_optimizer", None)
    return innermost


def optimizer_scalars(optimizer: Any, prefix: str = "adarank/") -> dict[str, float]:
    """Flat numbers for a metrics logger (TensorBoard, W&B): the mean current rank per layer type
    (``rank_mean/q``, ...) and over all low-rank layers (``rank_mean``), the optimizer state in
    MiB (``state_MiB``) and the number of subspace refreshes so far, summed over layers
    (``refreshes``). Empty for an optimizer that is not adarank's.

    A layer not yet stepped reports rank 0 and is left out of the means.
    """
    if not reports_ranks(optimizer):
        return {}
    out: dict[str, float] = {f"{prefix}state_MiB": optimizer.state_bytes()["total"] / 2**20}
    by_type: dict[str, list[int]] = defaultdict(list)
    for name, rank in optimizer.ranks().items():
        if rank > 0:
            by_type[layer_type(str(name))].append(rank)
    ranks = [r for values in by_type.values() for r in values]
    if ranks:
        out[f"{prefix}rank_mean"] = sum(ranks) / len(ranks)
    for kind in sorted(by_type, key=type_sort_key):
        out[f"{prefix}rank_mean/{kind}"] = sum(by_type[kind]) / len(by_type[kind])
    if callable(getattr(optimizer, "refresh_counts", None)):
        out[f"{prefix}refreshes"] = float(sum(optimizer.refresh_counts().values()))
    return {key: value for key, value in out.items() if math.isfinite(value)}
