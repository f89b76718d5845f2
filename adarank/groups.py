"""Split a model's parameters into a low-rank group and a plain AdamW group."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .quant import is_int8_weight

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module, *, exclude: Iterable[str] = ("embed", "lm_head"), **lowrank: Any
) -> list[dict[str, Any]]:
    """Param groups for ``AdaRankAdamW`` / ``GaLoreAdamW`` with parameter names.

    The low-rank group holds the 2-D weights of ``nn.Linear`` layers (and the
    INT8 weights of ``Int8Linear`` layers) whose qualified names contain none of
    the ``exclude`` substrings; its options are
    ``lowrank`` (e.g. ``eta=0.9, max_rank=128`` or GaLore's ``rank=128``). Every
    other trainable parameter (biases, norms, embeddings, the output head, and
    linear layers matched by ``exclude``) goes into a plain AdamW group. A shared
    (tied) parameter is listed once, under its first name. Groups that would be
    empty are omitted.

    Returns:
        ``[{"params", "param_names", "lowrank": True, **lowrank},
        {"params", "param_names", "lowrank": False}]``.
    """
    if isinstance(exclude, str):
        raise ValueError(
            f"exclude={exclude!r} must be a sequence of substrings, e.g. ({exclude!r},)"
        )
    exclude = tuple(exclude)
    lowrank_ids = set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_linear = isinstance(module, nn.Linear) or (
            weight is not None and is_int8_weight(weight))
        if is_linear and not any(x in module_name for x in exclude):
            if weight.requires_grad or is_int8_weight(weight):
                lowrank_ids.add(id(weight))
    low: dict[str, list] = {"params": [], "param_names": []}
    plain: dict[str, list] = {"params": [], "param_names": []}
    # named_parameters() yields a shared tensor once, under its first name.
    for name, p in model.named_parameters():
        if not p.requires_grad and not is_int8_weight(p):
            continue
        target = low if id(p) in lowrank_ids else plain
        target["params"].append(p)
        target["param_names"].append(name)
    groups = []
    if low["params"]:
        groups.append({**low, "lowrank": True, **lowrank})
    if plain["params"]:
        groups.append({**plain, "lowrank": False})
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters")
    return groups
