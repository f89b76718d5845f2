"""Split a model's parameters into low-rank groups and plain AdamW groups (``param_groups``)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .optimizer import LOWRANK_DEFAULTS
from .quant import is_int8_weight

__all__ = ["DEFAULT_EXCLUDE", "param_groups"]

# Layers that are never projected unless the caller says otherwise: embeddings and the output
# head (their gradient is sparse or their shape is vocabulary-sized, as in GaLore), and the
# task heads and poolers that transformers puts on a pretrained body (`classifier`, `score`,
# `qa_outputs`, `pooler`): freshly initialised, small, and hurt by rank-1 updates scaled by α.
DEFAULT_EXCLUDE = ("embed", "lm_head", "classifier", "score", "qa_outputs", "pooler")

# Group keys the optimizers accept besides LOWRANK_DEFAULTS: Adam's, and the names used by the
# GaLore and Q-GaLore reference packages (translated by GaLoreAdamW / QGaLoreAdamW).
_ADAM_KEYS = frozenset({"lr", "betas", "eps", "weight_decay"})
_REFERENCE_KEYS = frozenset(
    {
        "rank",
        "update_proj_gap",
        "cos_threshold",
        "gamma_proj",
        "queue_size",
        "quant_n_bit",
        "quant_group_size",
    }
)
_KNOWN_KEYS = frozenset(LOWRANK_DEFAULTS) | _ADAM_KEYS | _REFERENCE_KEYS

# A Conv1D weight is the transpose of the Linear weight of the same layer (stored in × out), so
# the side that holds the output features swaps: its groups carry the mirrored proj_type.
_MIRRORED = {
    "left": "right",
    "right": "left",
    "full": "full",
    "std": "std",
    "reverse_std": "reverse_std",
}
_ALL_LINEAR = ("all-linear", "all_linear")


def param_groups(
    model: nn.Module,
    *,
    target_modules: str | Iterable[str] | None = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    no_decay: bool = False,
    **lowrank: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``AdaRankAdamW`` / ``GaLoreAdamW`` / ``QGaLoreAdamW``, with names.

    Which matrices are projected: the weights of the *linear layers* of ``model`` (``nn.Linear``,
    transformers' ``Conv1D`` as in GPT-2, and ``adarank.Int8Linear``) that ``target_modules``
    selects and whose qualified module name contains none of the ``exclude`` substrings.
    By default ``exclude`` leaves out embeddings, ``lm_head``, task heads (``classifier``,
    ``score``, ``qa_outputs``) and poolers (``pooler``): pass ``exclude=()`` to project them
    too. Every other trainable parameter (biases, norms, embeddings, heads) goes into a plain
    AdamW group of the same optimizer.

    ``target_modules`` follows transformers' ``optim_target_modules``: ``None`` or
    ``"all-linear"`` selects every linear layer (minus ``exclude``, unlike transformers, whose
    ``"all-linear"`` includes the heads); another string is a regular expression that must match
    a module's whole qualified name; a list holds module names, each matching a module whose
    name equals it, contains it, or matches it as a whole regular expression. An entry that
    matches no module, or only modules that are not linear layers or are excluded, is a
    ``ValueError`` naming it.

    A ``Conv1D`` weight is stored in × out, the transpose of a ``Linear``'s out × in, and the
    optimizer sees it as stored. With the default ``proj_type="std"`` (project the smaller
    side) that gives the same update, transposed, as the equivalent ``Linear``; for explicit
    sides (``"left"`` = the output features of a ``Linear``) and square matrices, Conv1D
    weights get a group of their own with the mirrored ``proj_type``, so that every layer is
    projected on the same side of its features. Give ``proj_type`` here, not to the optimizer,
    when a model has ``Conv1D`` layers.

    ``no_decay=True`` moves biases and the weights of normalisation layers (``nn.LayerNorm``,
    ``nn.RMSNorm``, ``nn.GroupNorm``, batch norms, and any module class whose name contains
    ``Norm``, as transformers' RMS norms) into a plain group with ``weight_decay=0.0``; other
    groups keep the optimizer's ``weight_decay``.

    A shared (tied) parameter is listed once, under its first name. Groups that would be empty
    are omitted.

    Args:
        model: the module whose parameters are grouped.
        target_modules: which linear layers to project (see above).
        exclude: module-name substrings never projected; default ``DEFAULT_EXCLUDE``.
        no_decay: split biases and norm weights into a ``weight_decay=0.0`` group.
        **lowrank: options of the low-rank groups (``LOWRANK_DEFAULTS`` keys such as
            ``eta=0.9, max_rank=128``, GaLore's ``rank=128, update_proj_gap=200``, or Adam's
            ``lr``); an unknown key is a ``ValueError``.

    Returns:
        ``[{"params", "param_names", "lowrank": True, **lowrank}, ...,
        {"params", "param_names", "lowrank": False}, ...]``: low-rank groups first.

    Example::

        groups = adarank.param_groups(model, target_modules=["q_proj", "v_proj"], max_rank=64)
        opt = adarank.AdaRankAdamW(groups, lr=1e-3)
    """
    _check_options(lowrank)
    exclude = _check_exclude(exclude)
    linears = _linear_layers(model)
    selected = _select(model, linears, target_modules, exclude)

    base_proj = lowrank.get("proj_type", LOWRANK_DEFAULTS["proj_type"])
    if base_proj not in _MIRRORED:
        raise ValueError(f"proj_type={base_proj!r} is not known; choose one of {tuple(_MIRRORED)}")
    lowrank_of: dict[int, str] = {}  # id(weight) -> the proj_type of its group
    for module_name in selected:
        module, kind = linears[module_name]
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        if not (weight.requires_grad or is_int8_weight(weight)):
            continue
        lowrank_of[id(weight)] = (
            _conv1d_proj_type(base_proj, weight.shape) if (kind == "conv1d") else base_proj
        )

    norm_params = _norm_parameter_ids(model) if no_decay else set()
    low: dict[str, dict[str, list]] = {}
    plain: dict[bool, dict[str, list]] = {}  # decays? -> group
    # named_parameters() yields a shared tensor once, under its first name.
    for name, p in model.named_parameters():
        if not p.requires_grad and not is_int8_weight(p):
            continue
        if id(p) in lowrank_of:
            target = low.setdefault(lowrank_of[id(p)], {"params": [], "param_names": []})
        else:
            decays = not (no_decay and (id(p) in norm_params or name.rsplit(".", 1)[-1] == "bias"))
            target = plain.setdefault(decays, {"params": [], "param_names": []})
        target["params"].append(p)
        target["param_names"].append(name)

    groups = []
    for proj_type, members in low.items():
        options = dict(lowrank)
        if proj_type != base_proj:
            options["proj_type"] = proj_type
        groups.append({**members, "lowrank": True, **options})
    if True in plain:
        groups.append({**plain[True], "lowrank": False})
    if False in plain:
        groups.append({**plain[False], "lowrank": False, "weight_decay": 0.0})
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters")
    return groups


def _check_options(lowrank: dict[str, Any]) -> None:
    unknown = sorted(set(lowrank) - _KNOWN_KEYS)
    if not unknown:
        return
    hint = ""
    if {"include", "target", "targets", "modules"} & set(unknown):
        hint = "; choose the projected layers with target_modules= (names or regexes) and exclude="
    raise ValueError(
        f"param_groups got unknown option(s) {unknown}{hint}; low-rank options are "
        f"{sorted(LOWRANK_DEFAULTS)} (and GaLore's rank, update_proj_gap)"
    )


def _check_exclude(exclude: Iterable[str]) -> tuple[str, ...]:
    if isinstance(exclude, str):
        raise ValueError(
            f"exclude={exclude!r} must be a sequence of substrings, e.g. ({exclude!r},)"
        )
    exclude = tuple(exclude)
    bad = [x for x in exclude if not isinstance(x, str) or not x]
    if bad:
        raise ValueError(f"exclude must hold non-empty strings (module-name substrings), got {bad}")
    return exclude


def _conv1d_class() -> type[nn.Module] | None:
    # Only a model built by transformers can hold its Conv1D, so adarank never imports it.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Qualified name -> (module, "linear" | "conv1d") for every linear layer of ``model``."""
    conv1d = _conv1d_class()
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if conv1d is not None and isinstance(module, conv1d):
            found[name] = (module, "conv1d")
        elif isinstance(module, nn.Linear) or (weight is not None and is_int8_weight(weight)):
            found[name] = (module, "linear")
    return found


def _matches(entry: str, name: str) -> bool:
    # transformers' rule for a list entry: the exact name, a substring, or a whole-name regex.
    if entry == name or entry in name:
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def _select(
    model: nn.Module,
    linears: dict[str, tuple[nn.Module, str]],
    target_modules: str | Iterable[str] | None,
    exclude: tuple[str, ...],
) -> list[str]:
    """Names of the linear layers to project, with a ValueError for selections that miss."""
    kept = [name for name in linears if not any(x in name for x in exclude)]
    model_name = type(model).__name__
    if target_modules is None or (
        isinstance(target_modules, str) and target_modules in _ALL_LINEAR
    ):
        if not kept:
            excluded = [name for name in linears if name not in kept]
            detail = f"; excluded by exclude={exclude}: {_few(excluded)}" if excluded else ""
            raise ValueError(
                f"param_groups found no linear layer to project in {model_name}{detail}; "
                "pass target_modules= or exclude=, or train it with torch.optim.AdamW"
            )
        return kept

    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as error:
            raise ValueError(
                f"target_modules={target_modules!r} is not a valid regular expression ({error})"
            ) from None
        entries = [target_modules]

        def hit(entry: str, name: str) -> bool:
            return pattern.fullmatch(name) is not None
    else:
        entries = list(target_modules)
        if not entries:
            raise ValueError("target_modules is empty; pass None or 'all-linear' for every layer")
        if not all(isinstance(entry, str) and entry for entry in entries):
            raise ValueError(f"target_modules must hold non-empty strings, got {entries!r}")
        hit = _matches

    module_names = [name for name, _ in model.named_modules() if name]
    selected: list[str] = []
    problems = []
    for entry in entries:
        linear_hits = [name for name in linears if hit(entry, name)]
        chosen = [name for name in linear_hits if name in kept]
        if chosen:
            selected += [name for name in chosen if name not in selected]
        elif linear_hits:
            problems.append(
                f"{entry!r} matches only excluded layers ({_few(linear_hits)}; exclude={exclude})"
            )
        elif any(hit(entry, name) for name in module_names):
            others = [name for name in module_names if hit(entry, name)]
            problems.append(f"{entry!r} matches no linear layer, only {_few(others)}")
        else:
            problems.append(f"{entry!r} matches no module")
    if problems:
        raise ValueError(
            f"target_modules: {'; '.join(problems)}. Linear layers of {model_name}: "
            f"{_few(list(linears), 8)}"
        )
    return selected


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _conv1d_proj_type(proj_type: str, shape: Any) -> str:
    rows, cols = shape  # in × out
    if rows == cols and proj_type in ("std", "reverse_std"):
        # side_for breaks the tie m == n toward "right" for std, "left" for reverse_std: the
        # input side of a square Linear, which is the rows of its Conv1D twin.
        return "left" if proj_type == "std" else "right"
    return _MIRRORED[proj_type]


def _norm_parameter_ids(model: nn.Module) -> set[int]:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    rms = getattr(nn, "RMSNorm", None)
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, norms) or (rms is not None and isinstance(module, rms))
        if is_norm or "Norm" in type(module).__name__:
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids
