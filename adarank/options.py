"""The optimizers' options: their defaults, their types, the reference implementations'
names for some of them, and their validation (the same for constructor arguments, param
groups and the groups of a loaded checkpoint)."""

from __future__ import annotations

from typing import Any, TypedDict

import torch

from .functional import CONVENTIONS
from .projector import PROJ_TYPES
from .rank import RANK_RULES
from .rsvd import BACKENDS
from .subspace import MOMENT_POLICIES

__all__ = [
    "ADAM_KEYS",
    "GALORE_KEYS",
    "LOWRANK_DEFAULTS",
    "QGALORE_KEYS",
    "GaLoreOptions",
    "LowRankOptions",
    "QGaLoreOptions",
    "TORCH_KEYS",
    "as_lr",
    "check",
    "check_as",
    "is_int",
    "validate_group",
]

# The low-rank options, their AdaRankAdamW defaults and their meaning.
LOWRANK_DEFAULTS: dict[str, Any] = {
    "lowrank": True,  # project matrix parameters of this group
    "rank_rule": "energy",  # "energy" (adaptive) or "fixed" (always max_rank)
    "eta": 0.9,  # η: energy fraction of Σσ² the rank must capture
    "min_rank": 1,
    "max_rank": 256,  # also clamped to min(m, n)
    "rank_hysteresis": 0,  # ignore rank drops of at most this many
    "update_gap": 200,  # T: steps between scheduled refreshes
    "backend": "torch",  # "torch" | "fbpca" | "exact"
    "oversample": 8,  # p: extra sketch columns
    "power_iters": 2,  # q: subspace iterations of the range finder
    "proj_type": "std",  # "std" | "reverse_std" | "left" | "right" | "full"
    "track_every": 10,  # online subspace step every k steps (0: off)
    "check_every": 10,  # test for a stale subspace every k steps (0: off)
    "refresh_below": 0.5,  # refresh early when ‖R‖_F/‖G‖_F falls below this
    "converge_tol": 0.0,  # refresh early when ‖R‖_F ≤ this (AdaRankGrad; 0: off)
    "moments": "rotate",  # "keep" | "reset" | "rotate" on a subspace change
    "scale": 0.25,  # α: back-projection scale
    "residual": False,  # also apply the gradient outside the subspace (Fira-style)
    "residual_limit": 1.01,  # γ: max growth of the residual's norm per step
    "nonfinite": "skip",  # "skip" (count, leave state untouched) | "raise"
    "seed": 0,  # base seed of the sketches' random streams
    "proj_bits": 32,  # 32: float32 projectors; 8 or 4: group-wise quantised (Q-GaLore)
    "proj_group_size": 256,  # elements per quantisation group of a projector
    "stochastic_rounding": True,  # INT8 weights (Int8Linear): round updates stochastically
    "lazy_refresh": False,  # Q-GaLore: lengthen a layer's gap while its subspace is stable
    "lazy_threshold": 0.4,  # ... when the mean |cos| of consecutive leading vectors ≥ this
    "lazy_window": 5,  # ... over this many consecutive refreshes
    "lazy_factor": 2,  # γ: the gap is multiplied by this
    "stagger": 0,  # spread scheduled refreshes over this many phases of the gap
    # (i, n): the group's first matrix is the i-th of n staggered together (None: the
    # group's own matrices; adarank.layerwise sets it for its one-matrix groups)
    "stagger_position": None,
    "foreach": True,  # multi-tensor fast paths (False: one matrix at a time)
    "convention": "torch",  # Adam convention: "torch" (torch.optim.AdamW) | "galore"
    "align_signs": True,  # align basis signs with the previous subspace at a refresh
}


class LowRankOptions(TypedDict, total=False):
    """The low-rank options as keyword arguments (meanings in ``LOWRANK_DEFAULTS``)."""

    lowrank: bool
    rank_rule: str
    eta: float
    min_rank: int
    max_rank: int
    rank_hysteresis: int
    update_gap: int
    backend: str
    oversample: int
    power_iters: int
    proj_type: str
    track_every: int
    check_every: int
    refresh_below: float
    converge_tol: float
    moments: str
    scale: float
    residual: bool
    residual_limit: float
    nonfinite: str
    seed: int
    proj_bits: int
    proj_group_size: int
    stochastic_rounding: bool
    lazy_refresh: bool
    lazy_threshold: float
    lazy_window: int
    lazy_factor: int
    stagger: int
    stagger_position: tuple[int, int] | None
    foreach: bool
    convention: str
    align_signs: bool


ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")
# Keys torch or its schedulers may add to a group.
TORCH_KEYS = ("params", "param_names", "initial_lr")
_NONFINITE_POLICIES = ("skip", "raise")


def check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: expected {expected}")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def as_lr(lr: Any) -> Any:
    """A one-element tensor ``lr`` as a float (as torch.optim accepts it); else as given."""
    if isinstance(lr, torch.Tensor):
        check(lr.numel() == 1, "lr", lr, "a number >= 0 or a one-element tensor")
        return float(lr)
    return lr


def validate_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyper-parameter of ``group``."""
    lr = group["lr"]
    check(isinstance(lr, (int, float)) and lr >= 0, "lr", lr, "a number >= 0")
    betas = group["betas"]
    check(
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas),
        "betas",
        betas,
        "two numbers in [0, 1)",
    )
    check(
        isinstance(group["eps"], (int, float)) and group["eps"] >= 0,
        "eps",
        group["eps"],
        "a number >= 0",
    )
    wd = group["weight_decay"]
    check(isinstance(wd, (int, float)) and wd >= 0, "weight_decay", wd, "a number >= 0")
    check(isinstance(group["lowrank"], bool), "lowrank", group["lowrank"], "True or False")
    check(
        group["rank_rule"] in RANK_RULES,
        "rank_rule",
        group["rank_rule"],
        f"one of {sorted(RANK_RULES)}",
    )
    eta = group["eta"]
    check(isinstance(eta, (int, float)) and 0.0 < eta <= 1.0, "eta", eta, "a number in (0, 1]")
    for key in ("min_rank", "max_rank", "update_gap"):
        check(is_int(group[key]) and group[key] >= 1, key, group[key], "an integer >= 1")
    if group["min_rank"] > group["max_rank"]:
        raise ValueError(
            f"invalid min_rank={group['min_rank']} > max_rank={group['max_rank']}: "
            "min_rank must not exceed max_rank"
        )
    for key in (
        "rank_hysteresis",
        "oversample",
        "power_iters",
        "track_every",
        "check_every",
        "seed",
        "stagger",
    ):
        check(is_int(group[key]) and group[key] >= 0, key, group[key], "an integer >= 0")
    position = group["stagger_position"]
    check(
        position is None
        or (
            isinstance(position, (tuple, list))
            and len(position) == 2
            and all(is_int(v) for v in position)
            and 0 <= position[0] < position[1]
        ),
        "stagger_position",
        position,
        "None or a pair (i, n) of integers with 0 <= i < n",
    )
    check(group["backend"] in BACKENDS, "backend", group["backend"], f"one of {sorted(BACKENDS)}")
    check(group["proj_type"] in PROJ_TYPES, "proj_type", group["proj_type"], f"one of {PROJ_TYPES}")
    check(
        group["moments"] in MOMENT_POLICIES,
        "moments",
        group["moments"],
        f"one of {MOMENT_POLICIES}",
    )
    check(
        group["nonfinite"] in _NONFINITE_POLICIES,
        "nonfinite",
        group["nonfinite"],
        f"one of {_NONFINITE_POLICIES}",
    )
    rb = group["refresh_below"]
    check(
        isinstance(rb, (int, float)) and 0.0 <= rb <= 1.0, "refresh_below", rb, "a number in [0, 1]"
    )
    ct = group["converge_tol"]
    check(isinstance(ct, (int, float)) and ct >= 0, "converge_tol", ct, "a number >= 0")
    sc = group["scale"]
    check(isinstance(sc, (int, float)) and sc > 0, "scale", sc, "a number > 0")
    check(isinstance(group["residual"], bool), "residual", group["residual"], "True or False")
    check(group["proj_bits"] in (4, 8, 32), "proj_bits", group["proj_bits"], "4, 8 or 32")
    pg = group["proj_group_size"]
    check(is_int(pg) and pg >= 1, "proj_group_size", pg, "an integer >= 1")
    check(
        isinstance(group["stochastic_rounding"], bool),
        "stochastic_rounding",
        group["stochastic_rounding"],
        "True or False",
    )
    check(
        group["convention"] in CONVENTIONS,
        "convention",
        group["convention"],
        f"one of {CONVENTIONS}",
    )
    for key in ("lazy_refresh", "foreach", "align_signs"):
        check(isinstance(group[key], bool), key, group[key], "True or False")
    lt = group["lazy_threshold"]
    check(
        isinstance(lt, (int, float)) and -1.0 <= lt <= 1.0,
        "lazy_threshold",
        lt,
        "a number in [-1, 1]",
    )
    for key in ("lazy_window", "lazy_factor"):
        check(is_int(group[key]) and group[key] >= 1, key, group[key], "an integer >= 1")
    gamma = group["residual_limit"]
    check(
        isinstance(gamma, (int, float)) and gamma >= 1.0, "residual_limit", gamma, "a number >= 1"
    )


# GaLore's reference key names and ours.
GALORE_KEYS = {"rank": "max_rank", "update_proj_gap": "update_gap"}


class GaLoreOptions(LowRankOptions, total=False):
    """``LowRankOptions`` and the reference GaLore's names for two of them."""

    rank: int  # max_rank
    update_proj_gap: int  # update_gap


# The Q-GaLore reference's key names and ours.
QGALORE_KEYS = {
    "cos_threshold": "lazy_threshold",
    "gamma_proj": "lazy_factor",
    "queue_size": "lazy_window",
    "quant_n_bit": "proj_bits",
    "quant_group_size": "proj_group_size",
}


class QGaLoreOptions(GaLoreOptions, total=False):
    """``GaLoreOptions`` and the Q-GaLore reference's names (see ``QGALORE_KEYS``)."""

    cos_threshold: float
    gamma_proj: int
    queue_size: int
    quant_n_bit: int
    quant_group_size: int


def check_as(theirs: str, ours: str, value: Any, defaults: dict[str, Any]) -> None:
    """Validate ``value`` as the option ``ours`` and report it under the name the user
    wrote, ``theirs`` (a reference implementation's key)."""
    probe = dict(defaults, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    probe[ours] = value
    try:
        validate_group(probe)
    except ValueError as error:
        message = str(error).replace(f"invalid {ours}=", f"invalid {theirs}=")
        raise ValueError(f"{message} (adarank's {ours})") from None
