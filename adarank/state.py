"""The optimizer's per-parameter state: its keys, their types, and the projector store.

State holds tensors and plain numbers only, so ``state_dict()`` loads with
``torch.load(weights_only=True)``. ``STATE_SCHEMA`` is the one list of what a state may
hold; ``STATE_VERSION`` is the version of this schema written into every ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch

from .quant import dequantize, flatten_qtensor, quantize, unflatten_qtensor
from .rows import LOCAL, RowOps, local_tensor

__all__ = [
    "BIAS_KEYS",
    "MOMENT_KEYS",
    "PROJ_KEYS",
    "STATE_SCHEMA",
    "STATE_VERSION",
    "init_lowrank_state",
    "init_plain_state",
    "projector_shape",
    "projectors",
    "set_projectors",
]

# key: (type, meaning). "lowrank"/"plain"/"both": which parameters hold it.
STATE_SCHEMA: dict[str, tuple[str, str, str]] = {
    "step": ("both", "0-d float32 tensor (CPU)", "Adam steps taken"),
    "exp_avg": ("both", "tensor", "M: first moment (compact r×n, m×r, r×r if low-rank)"),
    "exp_avg_sq": ("both", "tensor", "V: second moment, shaped as exp_avg"),
    "nonfinite_skips": ("both", "int", "steps skipped for a non-finite gradient"),
    "bias1": (
        "lowrank",
        "float32 tensor (r×1, 1×r or r×r)",
        "accumulated weight of M per compact coordinate (Adam's 1 − β₁ᵗ)",
    ),
    "bias2": ("lowrank", "float32 tensor", "accumulated weight of V (1 − β₂ᵗ)"),
    "proj_left": ("lowrank", "float32 tensor m×r", "P, when not quantised"),
    "proj_right": ("lowrank", "float32 tensor n×r", "Q, when not quantised"),
    "proj_left_*": ("lowrank", "tensors and ints", "P quantised (quant.flatten_qtensor)"),
    "proj_right_*": ("lowrank", "tensors and ints", "Q quantised"),
    "rank": ("lowrank", "int", "current rank r (0 before the first refresh)"),
    "since_refresh": ("lowrank", "int", "steps since the last refresh"),
    "refreshes": ("lowrank", "int", "refreshes so far (part of the sketch's seed)"),
    "overlap": ("lowrank", "float or 0-d tensor", "subspace overlap at the last refresh"),
    "captured": ("lowrank", "0-d tensor", "‖R‖_F/‖G‖_F at the last step"),
    "residual_norm": ("lowrank", "0-d tensor", "residual path: ‖S‖_F of the last step"),
    "gap": ("lowrank", "int", "lazy refresh: this layer's current gap"),
    "lead_vector": ("lowrank", "float32 tensor", "lazy refresh: leading basis vector"),
    "lazy_sims": ("lowrank", "float32 tensor (lazy_window,)", "lazy refresh: recent |cos|"),
    "lazy_count": ("lowrank", "int", "lazy refresh: entries since the window restarted"),
}
STATE_VERSION = 1

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
PROJ_KEYS = ("proj_left", "proj_right")
BIAS_KEYS = ("bias1", "bias2")


def init_lowrank_state(state: dict[str, Any]) -> None:
    """The counters of a low-rank parameter's state before its first step."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        for key, value in (
            ("rank", 0),
            ("since_refresh", 0),
            ("refreshes", 0),
            ("overlap", float("nan")),
        ):
            state[key] = value
        state.setdefault("nonfinite_skips", 0)


def init_plain_state(p: torch.Tensor, state: dict[str, Any]) -> None:
    """Plain AdamW moments like ``p``, dtype included (as ``torch.optim.AdamW``); under
    FSDP2 DTensors of p's placements (AdamW is elementwise)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
        state.setdefault("nonfinite_skips", 0)


def projectors(state: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(P, Q)`` in float32, dequantised when stored in low precision (this rank's
    rows of a row-sharded P)."""
    out = []
    for key in PROJ_KEYS:
        q = unflatten_qtensor(state, key)
        value = state.get(key)
        out.append(
            dequantize(q) if q is not None else None if value is None else local_tensor(value)
        )
    return out[0], out[1]


def set_projectors(
    state: dict[str, Any],
    group: dict[str, Any],
    P: torch.Tensor | None,
    Q: torch.Tensor | None,
    ops: RowOps = LOCAL,
) -> None:
    """Store projectors as float32, or quantised to ``proj_bits`` under flat keys
    (``proj_left_codes``, ``proj_left_scale``, ...; see ``quant.flatten_qtensor``).

    A row-sharded float32 P is stored as a DTensor (``ops.wrap_rows``). A quantised
    one stays a plain per-rank tensor: its groups of ``proj_group_size`` restart at the
    shard boundary, so it is not a block of the one-process quantisation."""
    for key, value in zip(PROJ_KEYS, (P, Q), strict=True):
        for stale in [k for k in state if k == key or k.startswith(key + "_")]:
            del state[stale]
        if value is None:
            continue
        if group["proj_bits"] < 32 and value.numel() > 0:
            state.update(
                flatten_qtensor(quantize(value, group["proj_bits"], group["proj_group_size"]), key)
            )
        else:  # float32, or an empty shard (nothing to quantise)
            state[key] = ops.wrap_rows(value) if key == "proj_left" else value


def projector_shape(state: dict[str, Any], key: str) -> tuple[int, ...] | None:
    """Shape of the stored projector ``key`` (float32 or quantised), None if absent."""
    if key in state:
        return tuple(state[key].shape)
    if f"{key}_shape" in state:
        return tuple(state[f"{key}_shape"])
    return None
