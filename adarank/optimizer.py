"""AdaRankAdamW and GaLoreAdamW: drop-in ``torch.optim.Optimizer`` classes.

One optimizer serves two kinds of param group through the ``lowrank`` flag:
low-rank groups project every matrix parameter's gradient onto a subspace and
run Adam there; plain groups (and 1-D parameters of any group) get AdamW. The
step math lives in ``functional.py``; this file holds state handling: when to
refresh, tracking, moment transfer, checkpoints and accounting.

Per-parameter state holds tensors and plain numbers only (``weights_only``
checkpoints): ``step`` (0-d tensor), ``exp_avg``/``exp_avg_sq`` (compact for
low-rank parameters), ``proj_left`` (m×r) and/or ``proj_right`` (n×r),
``bias1``/``bias2`` (the moments' accumulated weights per compact coordinate,
Adam's ``1 − βᵗ`` until a subspace change), ``captured`` (0-d tensor:
‖R‖_F/‖G‖_F at the last step), and integer counters ``rank``,
``since_refresh``, ``refreshes``, ``nonfinite_skips``
plus the float ``overlap`` (subspace overlap at the last refresh).

Under FSDP2 (``fully_shard``: parameters and gradients are DTensors sharded on
dim 0) every step works on this rank's rows through a per-parameter
``distributed.ShardContext``: the sketch, power iterations, projections and
statistics combine ranks with all-reduces of small matrices, and no rank holds
a full gradient or a full moment. State that has the parameter's rows (a left
projector ``proj_left``, right-side moments, ``lead_vector`` of a left basis,
plain AdamW moments) is stored as DTensors of the parameter's mesh and
placements, so ``torch.distributed.checkpoint`` writes each rank's rows; the
rest (``proj_right``, left-side moments r×n, counters) is replicated and
identical on every rank. One process and DDP take the unsharded path, where
the context is the identity (``distributed.UNSHARDED``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw

from .distributed import (
    UNSHARDED,
    ShardContext,
    check_sharded_backend,
    finite_flags,
    is_dtensor,
    local_tensor,
)
from .functional import (
    adam_step_,
    apply_lowrank_update_,
    foreach_adam_directions_,
    lowrank_adam_step_,
)
from .projector import PROJ_TYPES, project, projector_from_svd, side_for
from .quant import dequantize, flatten_qtensor, is_int8_weight, quantize, unflatten_qtensor
from .rank import RANK_RULES
from .rsvd import BACKENDS, mix_seed, truncated_svd_batched
from .subspace import (
    MOMENT_POLICIES,
    align_signs,
    subspace_overlap,
    subspace_overlap_tensor,
    transfer_moments,
)

__all__ = ["AdaRankAdamW", "GaLoreAdamW", "QGaLoreAdamW"]

# The low-rank options, their AdaRankAdamW defaults and their meaning.
LOWRANK_DEFAULTS: dict[str, Any] = {
    "lowrank": True,        # project matrix parameters of this group
    "rank_rule": "energy",  # "energy" (adaptive) or "fixed" (always max_rank)
    "eta": 0.9,             # η: energy fraction of Σσ² the rank must capture
    "min_rank": 1,
    "max_rank": 256,        # also clamped to min(m, n)
    "rank_hysteresis": 0,   # ignore rank drops of at most this many
    "update_gap": 200,      # T: steps between scheduled refreshes
    "backend": "torch",     # "torch" | "fbpca" | "exact"
    "oversample": 8,        # p: extra sketch columns
    "power_iters": 2,       # q: subspace iterations of the range finder
    "proj_type": "std",     # "std" | "reverse_std" | "left" | "right" | "full"
    "track_every": 10,      # online subspace step every k steps (0: off)
    "check_every": 10,      # test for a stale subspace every k steps (0: off)
    "refresh_below": 0.5,   # refresh early when ‖R‖_F/‖G‖_F falls below this
    "converge_tol": 0.0,    # refresh early when ‖R‖_F ≤ this (AdaRankGrad; 0: off)
    "moments": "rotate",    # "keep" | "reset" | "rotate" on a subspace change
    "scale": 0.25,          # α: back-projection scale
    "residual": False,      # also apply the gradient outside the subspace (Fira-style)
    "residual_limit": 1.01,  # γ: max growth of the residual's norm per step
    "nonfinite": "skip",    # "skip" (count, leave state untouched) | "raise"
    "seed": 0,              # base seed of the sketches' random streams
    "proj_bits": 32,        # 32: float32 projectors; 8 or 4: group-wise quantised (Q-GaLore)
    "proj_group_size": 256,  # elements per quantisation group of a projector
    "stochastic_rounding": True,  # INT8 weights (Int8Linear): round updates stochastically
    "lazy_refresh": False,  # Q-GaLore: lengthen a layer's gap while its subspace is stable
    "lazy_threshold": 0.4,  # ... when the mean |cos| of consecutive leading vectors ≥ this
    "lazy_window": 5,       # ... over this many consecutive refreshes
    "lazy_factor": 2,       # γ: the gap is multiplied by this
    "stagger": 0,           # spread scheduled refreshes over this many phases of the gap
    "foreach": True,        # multi-tensor fast paths (False: one matrix at a time)
}

_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")
# Keys torch or its schedulers may add to a group.
_TORCH_KEYS = ("params", "param_names", "initial_lr")
_NONFINITE_POLICIES = ("skip", "raise")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_PROJ_KEYS = ("proj_left", "proj_right")
_BIAS_KEYS = ("bias1", "bias2")
# Backends whose refresh runs as one batched SVD per shape (fbpca goes one matrix at a time).
BATCHED_BACKENDS = ("torch", "exact")
# At most this many bytes of stacked float32 gradients per batched SVD: a refresh
# must not need a float32 copy of every gradient at once.
REFRESH_BATCH_BYTES = 256 * 2**20


def _grad(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient the optimizer uses: ``p.grad``, or an INT8 weight's float32
    ``weight_grad`` (integer tensors cannot hold a float ``.grad``)."""
    if p.grad is not None:
        return p.grad
    return p.weight_grad if is_int8_weight(p) else None


def _update_target(p: torch.Tensor) -> torch.Tensor:
    """The tensor an update is applied to: ``p``, or an INT8 weight's float32
    dequantisation (re-quantised afterwards by ``_store_int8``)."""
    return p.int8_module.dequantized_weight() if is_int8_weight(p) else p


class _Item:
    """An unsharded low-rank parameter on the fast path of one step."""

    __slots__ = ("R", "index", "param", "shape", "state")

    def __init__(self, index: int, param: torch.Tensor, state: dict) -> None:
        self.index = index
        self.param = param
        self.state = state
        self.shape = (param.shape[0], math.prod(param.shape[1:]))
        # The staleness test's compact gradient, reused by the step if P stays.
        self.R: torch.Tensor | None = None

    def gradient(self) -> torch.Tensor:
        """G as a float32 m×n matrix: a view of a float32 gradient, else a fresh
        conversion on every call, so no float32 copies of all gradients live at once."""
        return _grad(self.param).flatten(1).to(torch.float32)


def _projectors(state: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(P, Q)`` in float32, dequantised when stored in low precision (this
    rank's rows of a row-sharded P)."""
    out = []
    for key in _PROJ_KEYS:
        q = unflatten_qtensor(state, key)
        value = state.get(key)
        out.append(dequantize(q) if q is not None else
                   None if value is None else local_tensor(value))
    return out[0], out[1]


def _set_projectors(
    state: dict, group: dict, P: torch.Tensor | None, Q: torch.Tensor | None,
    ctx: ShardContext = UNSHARDED,
) -> None:
    """Store projectors as float32, or quantised to ``proj_bits`` under flat keys
    (``proj_left_codes``, ``proj_left_scale``, ...; see ``quant.flatten_qtensor``).

    A row-sharded float32 P is stored as a DTensor (``ctx.wrap_rows``). A
    quantised one stays a plain per-rank tensor: its groups of
    ``proj_group_size`` restart at the shard boundary, so it is not a block of
    the one-process quantisation (and not checkpointable with DCP)."""
    for key, value in zip(_PROJ_KEYS, (P, Q), strict=True):
        for stale in [k for k in state if k == key or k.startswith(key + "_")]:
            del state[stale]
        if value is None:
            continue
        if group["proj_bits"] < 32 and value.numel() > 0:
            state.update(flatten_qtensor(
                quantize(value, group["proj_bits"], group["proj_group_size"]), key))
        else:  # float32, or an empty shard (nothing to quantise)
            state[key] = ctx.wrap_rows(value) if key == "proj_left" else value


def _projector_shape(state: dict, key: str) -> tuple[int, ...] | None:
    if key in state:
        return tuple(state[key].shape)
    if f"{key}_shape" in state:
        return tuple(state[f"{key}_shape"])
    return None


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: expected {expected}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyper-parameter of ``group``."""
    lr = group["lr"]
    _check(isinstance(lr, (int, float)) and lr >= 0, "lr", lr, "a number >= 0")
    betas = group["betas"]
    _check(
        isinstance(betas, (tuple, list)) and len(betas) == 2
        and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas),
        "betas", betas, "two numbers in [0, 1)",
    )
    _check(isinstance(group["eps"], (int, float)) and group["eps"] >= 0, "eps", group["eps"],
           "a number >= 0")
    wd = group["weight_decay"]
    _check(isinstance(wd, (int, float)) and wd >= 0, "weight_decay", wd, "a number >= 0")
    _check(isinstance(group["lowrank"], bool), "lowrank", group["lowrank"], "True or False")
    _check(group["rank_rule"] in RANK_RULES, "rank_rule", group["rank_rule"],
           f"one of {sorted(RANK_RULES)}")
    eta = group["eta"]
    _check(isinstance(eta, (int, float)) and 0.0 < eta <= 1.0, "eta", eta, "a number in (0, 1]")
    for key in ("min_rank", "max_rank", "update_gap"):
        _check(_is_int(group[key]) and group[key] >= 1, key, group[key], "an integer >= 1")
    if group["min_rank"] > group["max_rank"]:
        raise ValueError(
            f"invalid min_rank={group['min_rank']} > max_rank={group['max_rank']}: "
            "min_rank must not exceed max_rank"
        )
    for key in ("rank_hysteresis", "oversample", "power_iters", "track_every", "check_every",
                "seed", "stagger"):
        _check(_is_int(group[key]) and group[key] >= 0, key, group[key], "an integer >= 0")
    _check(group["backend"] in BACKENDS, "backend", group["backend"], f"one of {sorted(BACKENDS)}")
    _check(group["proj_type"] in PROJ_TYPES, "proj_type", group["proj_type"],
           f"one of {PROJ_TYPES}")
    _check(group["moments"] in MOMENT_POLICIES, "moments", group["moments"],
           f"one of {MOMENT_POLICIES}")
    _check(group["nonfinite"] in _NONFINITE_POLICIES, "nonfinite", group["nonfinite"],
           f"one of {_NONFINITE_POLICIES}")
    rb = group["refresh_below"]
    _check(isinstance(rb, (int, float)) and 0.0 <= rb <= 1.0, "refresh_below", rb,
           "a number in [0, 1]")
    ct = group["converge_tol"]
    _check(isinstance(ct, (int, float)) and ct >= 0, "converge_tol", ct, "a number >= 0")
    sc = group["scale"]
    _check(isinstance(sc, (int, float)) and sc > 0, "scale", sc, "a number > 0")
    _check(isinstance(group["residual"], bool), "residual", group["residual"], "True or False")
    _check(group["proj_bits"] in (4, 8, 32), "proj_bits", group["proj_bits"], "4, 8 or 32")
    pg = group["proj_group_size"]
    _check(_is_int(pg) and pg >= 1, "proj_group_size", pg, "an integer >= 1")
    _check(isinstance(group["stochastic_rounding"], bool), "stochastic_rounding",
           group["stochastic_rounding"], "True or False")
    for key in ("lazy_refresh", "foreach"):
        _check(isinstance(group[key], bool), key, group[key], "True or False")
    lt = group["lazy_threshold"]
    _check(isinstance(lt, (int, float)) and -1.0 <= lt <= 1.0, "lazy_threshold", lt,
           "a number in [-1, 1]")
    for key in ("lazy_window", "lazy_factor"):
        _check(_is_int(group[key]) and group[key] >= 1, key, group[key], "an integer >= 1")
    gamma = group["residual_limit"]
    _check(isinstance(gamma, (int, float)) and gamma >= 1.0, "residual_limit", gamma,
           "a number >= 1")


class AdaRankAdamW(Optimizer):
    """AdamW with gradients of matrix parameters projected onto an adaptive-rank subspace.

    At a refresh the subspace comes from a randomized SVD of the gradient and
    its rank is the smallest capturing ``eta`` of ‖G‖_F² (clamped to
    ``[min_rank, max_rank]``). Between refreshes the subspace follows the
    gradient by one subspace-iteration step every ``track_every`` steps. A
    refresh happens every ``update_gap`` steps, or earlier when the captured
    fraction ‖PᵀG‖_F/‖G‖_F falls below ``refresh_below`` (tested every
    ``check_every`` steps). Moments cross a subspace change by ``moments``.

    Args:
        params: parameters or param groups; ``adarank.param_groups(model)``
            builds a low-rank group and a plain AdamW group with names.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled decay).
        **lowrank: defaults of the low-rank options (see ``LOWRANK_DEFAULTS``);
            each can be overridden per param group.

    Example::

        opt = adarank.AdaRankAdamW(adarank.param_groups(model), lr=1e-3, eta=0.9)
    """

    _convention = "torch"
    # Align basis signs with the previous subspace (GaLore's reference does not).
    _align_signs = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **lowrank: Any,
    ) -> None:
        defaults = dict(self._lowrank_defaults())
        self._reject_unknown(lowrank, "optimizer argument")
        defaults.update(lowrank)
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        validate_group(defaults)
        super().__init__(params, defaults)

    @classmethod
    def _lowrank_defaults(cls) -> dict[str, Any]:
        return LOWRANK_DEFAULTS

    def _reject_unknown(self, keys: Iterable[str], what: str) -> None:
        allowed = set(LOWRANK_DEFAULTS) | set(_ADAM_KEYS) | set(_TORCH_KEYS)
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise ValueError(
                f"unknown {what} {unknown[0]!r} for {type(self).__name__}; "
                f"known: {sorted(allowed - set(_TORCH_KEYS))}"
            )

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = self._translate_group(dict(param_group))
        self._reject_unknown(param_group, "param-group key")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        group["betas"] = tuple(group["betas"])
        try:
            validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step; returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            params = group["params"]
            with_grad = [(index + i, p) for i, p in enumerate(params) if _grad(p) is not None]
            index += len(params)
            if not with_grad:
                continue
            for _, p in with_grad:
                if _grad(p).is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter {self._name_of(group, p)}); use dense gradients, "
                        "e.g. nn.Embedding(sparse=False)"
                    )
            contexts = [self._shard_context(p, group) for _, p in with_grad]
            # One host synchronisation per group for the finiteness test; under
            # FSDP2 the flags are all-reduced, as a NaN may sit in one rank's
            # shard and every rank must skip (and issue the same collectives).
            finite = finite_flags([local_tensor(_grad(p)) for _, p in with_grad], contexts)
            fast: list[_Item] = []
            plain: list[torch.Tensor] = []  # float32 AdamW parameters for torch's kernels
            first: list[torch.Tensor] = []  # low-rank parameters without a subspace yet
            for (i, p), ok, ctx in zip(with_grad, finite, contexts, strict=True):
                state = self.state[p]
                if not ok:
                    if group["nonfinite"] == "raise":
                        raise FloatingPointError(
                            f"non-finite gradient for parameter {self._name_of(group, p)} "
                            "(set nonfinite='skip' to skip such steps instead)"
                        )
                    state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
                    continue
                if group["lowrank"] and p.ndim >= 2:
                    if "exp_avg" not in state:
                        first.append(p)
                    if group["foreach"] and not ctx.sharded:
                        fast.append(_Item(i, p, state))
                        continue
                elif (group["foreach"] and not ctx.sharded and self._convention == "torch"
                      and p.dtype == torch.float32 and not is_int8_weight(p)):
                    plain.append(p)
                    continue
                # An INT8 weight is updated through its float32 dequantisation.
                target = _update_target(p)
                if group["lowrank"] and p.ndim >= 2:
                    self._lowrank_param_step(target, _grad(p), state, group, i, ctx)
                else:
                    self._plain_param_step(target, _grad(p), state, group)
                if target is not p:
                    self._store_int8(p, target, state, group, i)
            if fast:
                self._lowrank_group_step(group, fast)
            if plain:
                self._plain_group_step(group, plain)
            if group["stagger"] > 1:
                for p in first:
                    if "exp_avg" in self.state[p]:
                        self.state[p]["since_refresh"] += self._stagger_offset(group, p)
        return loss

    @staticmethod
    def _stagger_offset(group: dict, p: torch.Tensor) -> int:
        """Steps by which ``p``'s first refresh period is shortened under ``stagger`` = k:
        the group's matrices, in order, fall into k contiguous phases and phase j
        starts j·T/k steps into its period, so about 1/k of them refresh on any
        scheduled step while neighbours (one block's matrices, often of one shape)
        still refresh together and share a batched SVD."""
        k = group["stagger"]
        matrices = [q for q in group["params"] if q.ndim >= 2]
        position = next(j for j, q in enumerate(matrices) if q is p)
        return (position * k // len(matrices)) * group["update_gap"] // k

    def _shard_context(self, p: torch.Tensor, group: dict) -> ShardContext:
        """``ShardContext.of(p)``, refusing what cannot run on row shards."""
        if not is_dtensor(p):
            return UNSHARDED
        if is_int8_weight(p):
            raise ValueError(f"INT8 weights (Int8Linear) are not supported under FSDP2 "
                             f"(parameter {self._name_of(group, p)})")
        if group["lowrank"] and p.ndim >= 2:
            check_sharded_backend(group["backend"])
        return ShardContext.of(p)

    @staticmethod
    def _store_int8(p: torch.Tensor, W: torch.Tensor, state: dict, group: dict, index: int) -> None:
        """Re-quantise an INT8 weight; the rounding noise is drawn from a stream
        derived from (seed, parameter, step), so a resumed run rounds identically."""
        gen = torch.Generator(device=W.device)
        gen.manual_seed(mix_seed(group["seed"], index, int(state["step"]), 0x1A7))
        p.int8_module.set_weight_(W, stochastic=group["stochastic_rounding"], generator=gen)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``, and also for INT8 weights' ``weight_grad``."""
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if is_int8_weight(p) and p.weight_grad is not None:
                    if set_to_none:
                        p.weight_grad = None
                    else:
                        p.weight_grad.zero_()

    def _plain_group_step(self, group: dict, params: list[torch.Tensor]) -> None:
        """AdamW on float32 parameters through torch's own multi-tensor kernel (fused on
        the CPU, foreach elsewhere, where the steps would have to live on the device for
        the fused one): the ``torch`` convention is ``torch.optim.AdamW``'s update."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            self._init_plain_state(p, state)
        beta1, beta2 = group["betas"]
        on_cpu = all(p.device.type == "cpu" for p in params)
        adamw(
            params, [p.grad for p in params], [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states], [], [st["step"] for st in states],
            foreach=not on_cpu, fused=on_cpu or None, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False,
        )

    @staticmethod
    def _init_plain_state(p: torch.Tensor, state: dict) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            # Like p, dtype included (as torch.optim.AdamW); under FSDP2 DTensors of
            # p's placements (AdamW is elementwise).
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state.setdefault("nonfinite_skips", 0)

    def _plain_param_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict,
                          group: dict) -> None:
        self._init_plain_state(p, state)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_step_(
            local_tensor(p), local_tensor(grad), local_tensor(state["exp_avg"]),
            local_tensor(state["exp_avg_sq"]), step=int(state["step"]),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], convention=self._convention,
        )

    @staticmethod
    def _init_lowrank_state(state: dict) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            for key, value in (("rank", 0), ("since_refresh", 0),
                               ("refreshes", 0), ("overlap", float("nan"))):
                state[key] = value
            state.setdefault("nonfinite_skips", 0)

    def _refresh_due(self, state: dict, group: dict) -> bool:
        return "exp_avg" not in state or state["since_refresh"] >= self._gap(state, group)

    @staticmethod
    def _due(state: dict, every: int) -> bool:
        """Whether a periodic action (``check_every``, ``track_every``) falls on this step."""
        return bool(every) and state["since_refresh"] % every == 0

    @staticmethod
    def _is_stale(r_norm: float, g_norm: float, group: dict) -> bool:
        """The refresh events of DESIGN §3.4 from ``‖R‖_F`` and ``‖G‖_F``."""
        if g_norm == 0.0:
            return False
        return r_norm / g_norm < group["refresh_below"] or r_norm <= group["converge_tol"]

    def _lowrank_param_step(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, index: int,
        ctx: ShardContext = UNSHARDED,
    ) -> None:
        """One matrix at a time (``foreach=False``, and always under FSDP2); the
        reference the fast path ``_lowrank_group_step`` is tested against."""
        # This rank's rows (all of them unsharded); flatten(1), not
        # reshape(m, -1), which fails on an empty shard. Projection math in
        # float32 whatever the parameter dtype (DESIGN §5).
        G = local_tensor(grad).flatten(1).to(torch.float32)
        self._init_lowrank_state(state)
        refresh = self._refresh_due(state, group)
        R = None  # the staleness test's PᵀG, reused by the step when P stays
        if not refresh and self._due(state, group["check_every"]):
            P, Q = _projectors(state)
            R = ctx.project(G, P, Q)
            refresh = self._is_stale(*ctx.projection_norms(R, G, R_rows=P is None), group)
        if refresh:
            self._refresh(G, state, group, index, ctx)
            R = None
        elif self._due(state, group["track_every"]):
            self._track(G, state, group, ctx)
            R = None
        self._adam_update(local_tensor(p), G, state, group, ctx, R)

    def _adam_update(
        self, W: torch.Tensor, G: torch.Tensor, state: dict, group: dict,
        ctx: ShardContext = UNSHARDED, R: torch.Tensor | None = None,
    ) -> None:
        state["step"] += 1
        state["since_refresh"] += 1
        beta1, beta2 = group["betas"]
        P, Q = _projectors(state)
        if R is None:
            R = ctx.project(G, P, Q)
        lowrank_adam_step_(
            W, G, P, Q, local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]),
            state["bias1"], state["bias2"], lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            scale=group["scale"], convention=self._convention,
            residual_norm=self._residual_norm(state, group, G),
            residual_limit=group["residual_limit"], R=R, norm=ctx.norm,
        )
        # Kept on the device: reading it costs a sync only when someone asks.
        state["captured"] = ctx.captured_fraction(R, G, R_rows=P is None)

    # --------------------------------------------------- multi-tensor fast path

    def _lowrank_group_step(self, group: dict, items: list[_Item]) -> None:
        """A step of a group's unsharded low-rank parameters (``foreach=True``).

        The decisions are ``_lowrank_param_step``'s, taken for all matrices first,
        so that the work can be batched: the staleness tests of the group cost one
        host synchronisation together; the matrices to refresh go through
        ``_refresh_batched`` (one batched SVD per shape, one synchronisation per
        batch for the rank choice); the compact Adam update is a handful of
        ``torch._foreach_*`` kernels for the whole group, and each weight takes
        its update, decay included, in one GEMM (``apply_lowrank_update_``).
        Results equal the one-matrix path up to float rounding.
        """
        refresh: list[_Item] = []
        checks: list[_Item] = []
        tracks: list[_Item] = []
        for it in items:
            self._init_lowrank_state(it.state)
            if self._refresh_due(it.state, group):
                refresh.append(it)
            elif self._due(it.state, group["check_every"]):
                checks.append(it)
            elif self._due(it.state, group["track_every"]):
                tracks.append(it)
        if checks:
            norms = []
            for it in checks:
                G = it.gradient()
                it.R = project(G, *_projectors(it.state))
                norms.append(torch.stack([torch.linalg.vector_norm(it.R),
                                          torch.linalg.vector_norm(G)]))
            for it, (r_norm, g_norm) in zip(checks, torch.stack(norms).tolist(), strict=True):
                if self._is_stale(r_norm, g_norm, group):
                    refresh.append(it)
                    it.R = None
                elif self._due(it.state, group["track_every"]):
                    tracks.append(it)
                    it.R = None
        if refresh:
            if group["backend"] in BATCHED_BACKENDS:
                self._refresh_batched(group, refresh)
            else:
                for it in refresh:
                    self._refresh(it.gradient(), it.state, group, it.index)
        for it in tracks:
            self._track(it.gradient(), it.state, group)
        if group["residual"]:
            for it in items:
                W = _update_target(it.param)
                self._adam_update(W, it.gradient(), it.state, group, R=it.R)
                if W is not it.param:
                    self._store_int8(it.param, W, it.state, group, it.index)
        else:
            self._foreach_adam_update(group, items)

    def _foreach_adam_update(self, group: dict, items: list[_Item]) -> None:
        """``lowrank_adam_step_`` (without the residual path) for many matrices at once."""
        beta1, beta2 = group["betas"]
        states = [it.state for it in items]
        torch._foreach_add_([st["step"] for st in states], 1.0)
        # Float32 projectors are the stored tensors; quantised ones are dequantised
        # again below rather than kept, which would hold a float32 copy of all at once.
        keep = group["proj_bits"] == 32
        projectors, Rs, g_norms = [], [], []
        for it in items:
            it.state["since_refresh"] += 1
            P, Q = _projectors(it.state)
            G = it.gradient()
            projectors.append((P, Q) if keep else None)
            Rs.append(project(G, P, Q) if it.R is None else it.R)
            g_norms.append(torch.linalg.vector_norm(G))
        Ms = [st["exp_avg"] for st in states]
        Vs = [st["exp_avg_sq"] for st in states]
        B1s = [st["bias1"] for st in states]
        B2s = [st["bias2"] for st in states]
        Ns = foreach_adam_directions_(Rs, Ms, Vs, B1s, B2s, beta1=beta1, beta2=beta2,
                                      eps=group["eps"], convention=self._convention)
        tiny = torch.finfo(torch.float32).tiny
        captured = torch.stack(torch._foreach_norm(Rs)) / torch.stack(g_norms).clamp_min(tiny)
        for it, N, PQ, fraction in zip(items, Ns, projectors, captured.unbind(), strict=True):
            it.state["captured"] = fraction
            P, Q = PQ if PQ is not None else _projectors(it.state)
            W = _update_target(it.param)
            apply_lowrank_update_(W, N, P, Q, lr=group["lr"],
                                  weight_decay=group["weight_decay"], scale=group["scale"],
                                  convention=self._convention)
            if W is not it.param:
                self._store_int8(it.param, W, it.state, group, it.index)

    @staticmethod
    def _residual_norm(state: dict, group: dict, G: torch.Tensor) -> torch.Tensor | None:
        if not group["residual"]:
            return None
        if "residual_norm" not in state:
            state["residual_norm"] = G.new_zeros(())
        return state["residual_norm"]

    @staticmethod
    def _rank_cap(group: dict, shape: tuple[int, int]) -> int:
        return max(1, min(group["max_rank"], *shape))

    @staticmethod
    def _first_sketch(state: dict, group: dict, cap: int) -> int:
        """Sketch width of a refresh's first attempt: the cap for a fixed rank or an
        exact SVD, else twice the previous rank (16 at first), grown on demand."""
        if group["rank_rule"] == "fixed" or group["backend"] == "exact":
            return cap
        previous = state["rank"]
        return min(cap, max(group["min_rank"], 2 * previous if previous else 16))

    @staticmethod
    def _sketch_seed(group: dict, index: int, state: dict, sketch: int) -> int:
        """The sketch's random stream: (seed, parameter index, refresh count, width)."""
        return mix_seed(mix_seed(group["seed"], index, state["refreshes"]), sketch)

    def _refresh(self, G: torch.Tensor, state: dict, group: dict, index: int,
                 ctx: ShardContext = UNSHARDED) -> None:
        # G holds this rank's rows; the side and the cap follow the whole matrix.
        shape = (ctx.rows(G), G.shape[1])
        cap = self._rank_cap(group, shape)
        sketch = self._first_sketch(state, group, cap)
        options = dict(oversample=group["oversample"], power_iters=group["power_iters"])
        rule = RANK_RULES[group["rank_rule"]]
        total_energy = ctx.fro_sq(G)
        while True:
            # Fixed-accuracy range finder: grow the sketch until η is reached.
            U, S, Vh = ctx.truncated_svd(G, sketch, group["backend"],
                                         seed=self._sketch_seed(group, index, state, sketch),
                                         **options)
            rank, satisfied = rule(S, total_energy, group, state["rank"])
            if satisfied or sketch >= cap:
                break
            sketch = min(2 * sketch, cap)
        rank = max(1, min(rank, cap, S.numel()))
        self._install_subspace(state, group, U, Vh, rank, shape, G.shape[0], ctx)

    def _refresh_batched(self, group: dict, items: list[_Item]) -> None:
        """``_refresh`` for many unsharded matrices: those of one shape and sketch
        width are stacked (at most ``REFRESH_BATCH_BYTES`` of float32 gradients at
        once) and decomposed by one batched SVD; their singular values and
        ‖G‖_F reach the host in one transfer, the only synchronisation of the
        batch. Matrices whose sketch fell short of η go round again, wider."""
        rule = RANK_RULES[group["rank_rule"]]
        options = dict(oversample=group["oversample"], power_iters=group["power_iters"])
        pending = []
        for it in items:
            cap = self._rank_cap(group, it.shape)
            pending.append((it, cap, self._first_sketch(it.state, group, cap)))
        while pending:
            buckets: dict[tuple[tuple[int, int], int], list] = {}
            for entry in pending:
                buckets.setdefault((entry[0].shape, entry[2]), []).append(entry)
            pending = []
            for ((m, n), sketch), members in buckets.items():
                per_batch = max(1, REFRESH_BATCH_BYTES // (4 * m * n))
                for start in range(0, len(members), per_batch):
                    batch = members[start:start + per_batch]
                    Gs = torch.stack([it.gradient() for it, _, _ in batch])
                    seeds = [self._sketch_seed(group, it.index, it.state, sketch)
                             for it, _, _ in batch]
                    U, S, Vh = truncated_svd_batched(Gs, sketch, group["backend"],
                                                     seeds=seeds, **options)
                    norms = torch.linalg.vector_norm(Gs, dim=(1, 2))
                    del Gs
                    host = torch.cat([norms[:, None], S], dim=1).cpu()
                    for j, (it, cap, _) in enumerate(batch):
                        total_energy = float(host[j, 0]) ** 2
                        rank, satisfied = rule(host[j, 1:], total_energy, group,
                                               it.state["rank"])
                        if satisfied or sketch >= cap:
                            rank = max(1, min(rank, cap, S.shape[1]))
                            self._install_subspace(it.state, group, U[j], Vh[j], rank,
                                                   it.shape, m)
                        else:
                            pending.append((it, cap, min(2 * sketch, cap)))

    def _install_subspace(
        self, state: dict, group: dict, U: torch.Tensor, Vh: torch.Tensor, rank: int,
        shape: tuple[int, int], local_rows: int, ctx: ShardContext = UNSHARDED,
    ) -> None:
        """Make the top-``rank`` singular vectors of a refresh the subspace: align
        signs, carry the moments over (or create them), update the counters.
        ``shape``: the whole matrix; ``local_rows``: this rank's rows of it."""
        side = side_for(shape, group["proj_type"])
        P_new, Q_new = projector_from_svd(U, Vh, rank, side)
        P_old, Q_old = _projectors(state)
        if self._align_signs:
            P_new = None if P_new is None else ctx.align_rows(P_new, P_old)
            Q_new = None if Q_new is None else align_signs(Q_new, Q_old)
        if "exp_avg" in state:
            self._change_subspace(state, group, P_new, Q_new, ctx)
            if ctx.sharded:
                state["overlap"] = ctx.overlap_rows(P_old, P_new) if P_new is not None else (
                    subspace_overlap(Q_old, Q_new))
            else:  # a 0-d tensor: no host synchronisation
                state["overlap"] = subspace_overlap_tensor(
                    *((P_old, P_new) if P_new is not None else (Q_old, Q_new)))
        else:
            # Right side: moments have G's rows (this rank's local_rows of them).
            rows = rank if P_new is not None else local_rows
            cols = rank if Q_new is not None else shape[1]
            moments_rows = P_new is None
            state["exp_avg"] = self._rows_state(U.new_zeros(rows, cols), ctx, moments_rows)
            state["exp_avg_sq"] = self._rows_state(U.new_zeros(rows, cols), ctx, moments_rows)
            # One accumulated weight per compact coordinate (see transfer_moments).
            weight_shape = (rows if P_new is not None else 1, cols if Q_new is not None else 1)
            state["bias1"] = U.new_zeros(weight_shape)
            state["bias2"] = U.new_zeros(weight_shape)
            _set_projectors(state, group, P_new, Q_new, ctx)
        state["rank"] = rank
        if group["lazy_refresh"]:
            if P_new is not None:
                self._lazy_schedule(state, group, P_new, ctx, basis_rows=True)
            else:
                self._lazy_schedule(state, group, Q_new)
        state["refreshes"] += 1
        state["since_refresh"] = 0

    @staticmethod
    def _gap(state: dict, group: dict) -> int:
        if group["lazy_refresh"]:
            return state.get("gap", group["update_gap"])
        return group["update_gap"]

    @staticmethod
    def _rows_state(t: torch.Tensor, ctx: ShardContext, rows: bool) -> torch.Tensor:
        """State tensor ``t``, stored as a row-sharded DTensor when it has the parameter's rows."""
        return ctx.wrap_rows(t) if rows else t

    @staticmethod
    def _lazy_schedule(state: dict, group: dict, basis: torch.Tensor,
                       ctx: ShardContext = UNSHARDED, basis_rows: bool = False) -> None:
        """Q-GaLore's layer-adaptive gap (arXiv 2407.08296 §3.2): record |cos| between
        the leading basis vectors of consecutive refreshes; once ``lazy_window`` are
        recorded and their mean is at least ``lazy_threshold``, multiply this layer's
        gap by ``lazy_factor`` and start a new window. |cos|, since an SVD fixes
        each singular vector only up to sign. ``basis_rows``: the basis is a left
        projector, row-sharded under FSDP2, so the cosine is all-reduced (else
        ranks would choose different gaps and their collectives would deadlock)."""
        lead = basis[:, 0].clone()
        window = group["lazy_window"]
        if "lead_vector" in state:
            sims = state.get("lazy_sims")
            if sims is None or sims.numel() != window:
                sims = lead.new_zeros(window)
            count = state.get("lazy_count", 0)
            dot = ctx.dot_rows if basis_rows else torch.dot
            sims[count % window] = dot(lead, local_tensor(state["lead_vector"])).abs()
            count += 1
            if count >= window and float(sims.mean()) >= group["lazy_threshold"]:
                state["gap"] = state.get("gap", group["update_gap"]) * group["lazy_factor"]
                count = 0
            state["lazy_sims"], state["lazy_count"] = sims, count
        state.setdefault("gap", group["update_gap"])
        state["lead_vector"] = AdaRankAdamW._rows_state(lead, ctx, basis_rows)

    def _track(self, G: torch.Tensor, state: dict, group: dict,
               ctx: ShardContext = UNSHARDED) -> None:
        P_new, Q_new = ctx.track(G, *_projectors(state))
        self._change_subspace(state, group, P_new, Q_new, ctx)

    def _change_subspace(
        self, state: dict, group: dict, P_new: torch.Tensor | None, Q_new: torch.Tensor | None,
        ctx: ShardContext = UNSHARDED,
    ) -> None:
        P_old, Q_old = _projectors(state)
        C_left = None if P_new is None else ctx.matmul_tn(P_new, P_old)
        C_right = None if Q_new is None else Q_new.T @ Q_old
        moments = [local_tensor(state[key]) for key in _MOMENT_KEYS + _BIAS_KEYS]
        moments = transfer_moments(*moments, C_left, C_right, group["moments"])
        for key, value in zip(_MOMENT_KEYS + _BIAS_KEYS, moments, strict=True):
            # Moments keep G's rows on the right side (no left projector).
            state[key] = self._rows_state(value, ctx, key in _MOMENT_KEYS and P_new is None)
        _set_projectors(state, group, P_new, Q_new, ctx)

    # ------------------------------------------------------------ accounting

    @staticmethod
    def _name_of(group: dict, p: torch.Tensor) -> str:
        names = group.get("param_names")
        for i, q in enumerate(group["params"]):
            if q is p:
                return names[i] if names else f"#{i} of its group"
        return "?"

    def _named_params(self) -> Iterable[tuple[str, torch.Tensor, dict]]:
        """``(name, parameter, group)`` for every parameter; names from the group's
        ``param_names``, else the parameter's global index as a string."""
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                yield (names[i] if names else str(index + i)), p, group
            index += len(group["params"])

    def _lowrank_params(self) -> Iterable[tuple[str, torch.Tensor, dict]]:
        for name, p, group in self._named_params():
            if group["lowrank"] and p.ndim >= 2:
                yield name, p, group

    def _per_param(self, key: str, default: Any) -> dict[str, Any]:
        out = {}
        for name, p, _ in self._lowrank_params():
            value = self.state[p].get(key, default) if p in self.state else default
            out[name] = value.item() if isinstance(value, torch.Tensor) else value
        return out

    def ranks(self) -> dict[str, int]:
        """Current rank of every low-rank parameter (0 before its first step)."""
        return self._per_param("rank", 0)

    def refresh_gaps(self) -> dict[str, int]:
        """Current refresh gap of every low-rank parameter (grows under lazy refresh)."""
        return {name: self._gap(self.state[p] if p in self.state else {}, group)
                for name, p, group in self._lowrank_params()}

    def refresh_counts(self) -> dict[str, int]:
        """Number of SVD refreshes each low-rank parameter has had."""
        return self._per_param("refreshes", 0)

    def captured_energy(self) -> dict[str, float]:
        """‖R‖_F/‖G‖_F at each low-rank parameter's last step (nan before one)."""
        return self._per_param("captured", float("nan"))

    def subspace_overlaps(self) -> dict[str, float]:
        """Overlap of the subspaces before and after each parameter's last refresh."""
        return self._per_param("overlap", float("nan"))

    def nonfinite_skips(self) -> dict[str, int]:
        """Steps skipped because of a NaN/Inf gradient, for every parameter that had one."""
        out = {}
        for name, p, _ in self._named_params():
            skips = self.state[p].get("nonfinite_skips", 0) if p in self.state else 0
            if skips:
                out[name] = skips
        return out

    def state_bytes(self) -> dict[str, int]:
        """Bytes of every tensor in ``self.state`` this process holds: ``total`` and by
        kind (``moments``, ``projectors``, ``other``). Under FSDP2, the local shards
        of DTensor state: right-side moments, left projectors and plain AdamW
        moments shrink with the number of ranks; right projectors and left-side
        moments (r×n) are replicated."""
        out = {"moments": 0, "projectors": 0, "other": 0}
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    kind = ("moments" if key in _MOMENT_KEYS
                            else "projectors" if key.startswith(_PROJ_KEYS) else "other")
                    value = local_tensor(value)
                    out[kind] += value.numel() * value.element_size()
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; tensors keep their saved dtypes (torch's loader
        would cast float32 moments and projectors to a bf16 parameter's dtype)."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"checkpoint holds {len(saved_ids)} parameters, this optimizer {len(params)}"
            )
        by_id = dict(zip(saved_ids, params, strict=True))
        names = [
            n for g in self.param_groups for n in g.get("param_names", [None] * len(g["params"]))
        ]
        name_by_id = dict(zip(saved_ids, names, strict=True))
        saved_groups = {i: g for g in state_dict["param_groups"] for i in g["params"]}
        for pid, st in state_dict["state"].items():
            if pid in by_id:
                self._check_state_fits(by_id[pid], st, saved_groups[pid],
                                       name_by_id[pid] or f"index {pid}")
        super().load_state_dict(state_dict)
        for pid, st in state_dict["state"].items():
            if pid in by_id:
                p = by_id[pid]
                for key, value in st.items():
                    if isinstance(value, torch.Tensor):
                        # ``step`` stays on the CPU, where a fresh state creates it (the
                        # foreach path updates all of a group's steps in one call).
                        device = "cpu" if key == "step" else p.device
                        self.state[p][key] = value.to(device=device, copy=True)

    @staticmethod
    def _check_state_fits(p: torch.Tensor, st: dict, group: dict, name: str) -> None:
        if "exp_avg" not in st:
            return
        shape = tuple(p.shape)
        if group.get("lowrank") and p.ndim >= 2:
            m, n = shape[0], math.prod(shape[1:])
            left, right = _projector_shape(st, "proj_left"), _projector_shape(st, "proj_right")
            rows = left[1] if left else m
            cols = right[1] if right else n
            fits = (
                (left is None or left[0] == m)
                and (right is None or right[0] == n)
                and tuple(st["exp_avg"].shape) == (rows, cols)
            )
        else:
            fits = tuple(st["exp_avg"].shape) == shape
        if not fits:
            saved = {k: tuple(v.shape) for k, v in st.items() if isinstance(v, torch.Tensor)}
            raise ValueError(
                f"checkpoint state for parameter {name} does not fit its shape {shape}: "
                f"saved tensors {saved}; load it into the model it was saved from"
            )


# GaLore's reference key names and ours.
_GALORE_KEYS = {"rank": "max_rank", "update_proj_gap": "update_gap"}


class GaLoreAdamW(AdaRankAdamW):
    """The published GaLore AdamW (arXiv 2403.03507, Algorithm 2), reference semantics.

    Groups that carry ``rank`` (and optionally ``update_proj_gap``, ``scale``,
    ``proj_type``) are projected, others get plain AdamW, exactly as with the
    reference package. Fixed rank, exact SVD of the float32 gradient at the first
    step and every ``update_proj_gap`` steps, moments kept across refreshes, no
    tracking, ``scale`` α=0.25 by default, the reference's Adam convention
    (``√v + eps`` denominator, step size ``lr·√(1−β₂ᵗ)/(1−β₁ᵗ)``, decay after the
    update). AdaRankAdamW's options may be set too (e.g. ``backend="torch"``).
    Stored groups use adarank's names (``max_rank``, ``update_gap``).
    """

    _convention = "galore"
    _align_signs = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        **lowrank: Any,
    ) -> None:
        lowrank = self._translate_group(dict(lowrank))
        # Options given to the constructor apply to groups that do not say
        # otherwise; a rank given here makes those groups low-rank.
        lowrank.setdefault("lowrank", "max_rank" in lowrank)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **lowrank)

    @classmethod
    def _lowrank_defaults(cls) -> dict[str, Any]:
        return dict(
            LOWRANK_DEFAULTS, lowrank=False, rank_rule="fixed", max_rank=128, backend="exact",
            track_every=0, check_every=0, refresh_below=0.0, moments="keep",
        )

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        # As in the reference, a group is projected when it names a rank.
        if "params" in group and "lowrank" not in group and (
            "rank" in group or "max_rank" in group
        ):
            group["lowrank"] = True
        for theirs, ours in _GALORE_KEYS.items():
            if theirs in group:
                value = group.pop(theirs)
                _check(_is_int(value) and value >= 1, theirs, value, "an integer >= 1")
                group[ours] = value
        return group


# The Q-GaLore reference's key names and ours.
_QGALORE_KEYS = {
    "cos_threshold": "lazy_threshold",
    "gamma_proj": "lazy_factor",
    "queue_size": "lazy_window",
    "quant_n_bit": "proj_bits",
    "quant_group_size": "proj_group_size",
}


class QGaLoreAdamW(GaLoreAdamW):
    """Q-GaLore (arXiv 2407.08296): GaLore with INT4 projectors, lazy layer-adaptive
    refresh, and INT8 weights updated with stochastic rounding.

    Defaults follow the paper's code: projectors quantised to 4 bits, group-wise
    asymmetric min/max over groups of 256 (``proj_bits``, ``proj_group_size``);
    a layer's refresh gap is multiplied by ``lazy_factor`` γ=2 once the mean |cos|
    between the leading singular vectors of its last ``lazy_window``=5
    consecutive subspaces is at least ``lazy_threshold``=0.4. Accepts GaLore's
    group keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) and the
    reference's ``cos_threshold``, ``gamma_proj``, ``queue_size``,
    ``quant_n_bit``, ``quant_group_size``.

    INT8 weights are a property of the model, not of the optimizer: convert the
    linear layers with ``adarank.quantize_linears(model)`` before building the
    optimizer; every ``Int8Linear`` weight in a group is then updated through its
    dequantised value and re-quantised with stochastic rounding (unbiased).
    """

    @classmethod
    def _lowrank_defaults(cls) -> dict[str, Any]:
        return dict(super()._lowrank_defaults(), proj_bits=4, proj_group_size=256,
                    lazy_refresh=True, lazy_threshold=0.4, lazy_window=5, lazy_factor=2)

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        for theirs, ours in _QGALORE_KEYS.items():
            if theirs in group:
                group[ours] = group.pop(theirs)
        return super()._translate_group(group)
