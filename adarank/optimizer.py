"""AdaRankAdamW, GaLoreAdamW and QGaLoreAdamW: drop-in ``torch.optim.Optimizer`` classes.

One optimizer serves two kinds of param group through the ``lowrank`` flag: low-rank
groups project every matrix parameter's gradient onto a subspace and run Adam there;
plain groups (and 1-D parameters of any group) get AdamW. This file holds the classes:
option validation, the step's pipeline, accounting and checkpoints. The pipeline of a
low-rank group is: decide (``schedule.py``) → refresh or track (``refresh.py``) → compact
Adam, back-projection and decay (``functional.lowrank_adam``). ``foreach`` chooses the
kernels (batched SVDs per shape, multi-tensor Adam) and nothing else: the one-matrix path
is the same control flow on batches of one.

Per-parameter state is declared in ``state.STATE_SCHEMA``. Under FSDP2 (``fully_shard``:
parameters and gradients are DTensors sharded on dim 0) each parameter's row operations
are a ``distributed.ShardContext`` instead of ``rows.LOCAL``; nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw
from typing_extensions import Unpack

from . import budget as budgeting
from . import refresh as refreshing
from . import schedule
from .budget import parse_budget
from .functional import adam_step_, lowrank_adam
from .options import (
    ADAM_KEYS,
    GALORE_KEYS,
    LOWRANK_DEFAULTS,
    QGALORE_KEYS,
    TORCH_KEYS,
    GaLoreOptions,
    LowRankOptions,
    QGaLoreOptions,
    as_lr,
    check,
    check_as,
    is_int,
    validate_group,
)
from .quant import is_int8_weight
from .refresh import Item, gradient_of
from .rows import LOCAL, RowOps, local_tensor
from .state import (
    MOMENT_KEYS,
    PROJ_KEYS,
    STATE_VERSION,
    init_lowrank_state,
    init_plain_state,
    projector_shape,
    projectors,
)

__all__ = ["LOWRANK_DEFAULTS", "AdaRankAdamW", "GaLoreAdamW", "LowRankOptions", "QGaLoreAdamW"]


class AdaRankAdamW(Optimizer):
    r"""AdamW with gradients of matrix parameters projected onto an adaptive-rank subspace.

    For a matrix parameter W (m×n; a k-D kernel as m×(n₁⋯n_k)) with gradient G, each
    step projects G onto a subspace, ``R = PᵀG`` (m ≤ n, left) or ``R = GQ`` (right), runs
    Adam on R and applies ``W ← W − lr·α·back(N)`` with decoupled weight decay. At a
    refresh the subspace comes from a randomized SVD of G and its rank is the smallest
    capturing ``eta`` of ‖G‖_F² (DESIGN §3.2), clamped to ``[min_rank, max_rank]``.
    Between refreshes it follows the gradient by one subspace-iteration step every
    ``track_every`` steps. A refresh happens every ``update_gap`` steps, or earlier when
    the captured fraction ‖R‖_F/‖G‖_F falls below ``refresh_below`` (tested every
    ``check_every`` steps). Parameters of fewer than two dimensions, and groups with
    ``lowrank=False``, get plain AdamW.

    Args:
        params: parameters or param groups; ``adarank.param_groups(model)`` builds a
            low-rank group and a plain AdamW group with names. Every option below can be
            set per group.
        lr (float or 0-d tensor, default 1e-3): learning rate.
        betas (tuple[float, float], default (0.9, 0.999)): β₁, β₂ of the moving averages.
        eps (float, default 1e-8): added to the denominator √V.
        weight_decay (float, default 0): decoupled decay λ, ``W ← W(1 − lr·λ)``.
        state_budget (int, str or None, default None): an optimizer-wide bound on the
            bytes ``state_bytes()`` counts, as bytes or a string (``"1.5GiB"``: KiB/MiB/
            GiB binary, KB/MB/GB decimal). At a refresh the refreshing matrices share what
            the rest of the state leaves, ranked by captured energy per byte
            (``budget.allocate``), the rank rule's rank (η) as a cap and ``min_rank`` as a
            floor; the others keep their ranks unless the budget forces a cut. A budget
            below plain state plus ``min_rank`` everywhere is a ``ValueError`` naming the
            smallest that works. See ``budget_report()``.

    Keyword-only low-rank options (``LowRankOptions``; defaults in ``LOWRANK_DEFAULTS``):
        lowrank (bool, True): project this group's matrix parameters.
        rank_rule (str, "energy"): a name registered in ``rank.RANK_RULES``: ``"energy"``
            (adaptive, η) or ``"fixed"`` (always ``max_rank``).
        eta (float in (0, 1], 0.9): η, the fraction of Σσ² the rank must capture.
        min_rank, max_rank (int, 1 and 256): the rank's bounds (also clamped to min(m, n)).
        rank_hysteresis (int, 0): ignore rank drops of at most this many.
        update_gap (int, 200): T, steps between scheduled refreshes.
        backend (str, "torch"): a name registered in ``rsvd.BACKENDS``: ``"torch"``
            (randomized, seeded), ``"fbpca"`` (CPU reference), ``"exact"``.
        oversample (int, 8), power_iters (int, 2): p and q of the randomized SVD.
        proj_type (str, "std"): ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"``,
            ``"full"`` (GaLore's sides; see ``projector.py``).
        track_every (int, 10): an online subspace step every k steps (0: off).
        check_every (int, 10): test for a stale subspace every k steps (0: off).
        refresh_below (float in [0, 1], 0.5): refresh early below this captured fraction.
        converge_tol (float, 0): refresh early when ‖R‖_F ≤ this (AdaRankGrad; 0: off).
        moments (str, "rotate"): ``"keep"``, ``"reset"`` or ``"rotate"`` on a change.
        scale (float, 0.25): α, the back-projection scale.
        residual (bool, False): also apply the gradient outside the subspace (Fira).
        residual_limit (float ≥ 1, 1.01): γ, max growth of the residual's norm per step.
        nonfinite (str, "skip"): a NaN/Inf gradient skips the step of that parameter
            and is counted (``nonfinite_skips()``), or ``"raise"``.
        seed (int, 0): base seed of the sketches' random streams.
        proj_bits (int, 32): 32 (float32 projectors), 8 or 4 (group-wise quantised).
        proj_group_size (int, 256): elements per quantisation group of a projector.
        stochastic_rounding (bool, True): INT8 weights round updates stochastically.
        lazy_refresh (bool, False): Q-GaLore's layer-adaptive gap, with
            lazy_threshold (float in [-1, 1], 0.4), lazy_window (int, 5) and
            lazy_factor (int, 2): the gap is multiplied by lazy_factor once the mean
            |cos| of lazy_window consecutive leading vectors is at least lazy_threshold.
        stagger (int, 0): spread scheduled refreshes over this many phases of the gap.
        stagger_position (tuple[int, int] or None, None): ``(i, n)``: the group's first
            matrix is the i-th of n matrices staggered together (``layerwise`` sets it
            for its one-parameter groups); None: the group's own matrices.
        foreach (bool, True): the multi-tensor kernels (batched SVDs per shape,
            ``torch._foreach_*`` Adam); False: one matrix at a time, same results to
            float rounding.
        convention (str, "torch"): the Adam convention, ``"torch"`` (torch.optim.AdamW)
            or ``"galore"`` (the reference GaLore's; see ``functional.py``).
        align_signs (bool, True): align the new basis' signs with the previous one.

    Invalid values raise ``ValueError`` naming the option; unknown keys too.

    Example::

        opt = adarank.AdaRankAdamW(adarank.param_groups(model), lr=1e-3, eta=0.9)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_budget: int | str | None = None,
        **lowrank: Unpack[LowRankOptions],
    ) -> None:
        # Set before the groups are added: add_param_group checks the budget once built.
        self.state_budget = None if state_budget is None else parse_budget(state_budget)
        self._budget_built = False
        defaults = dict(self._lowrank_defaults())
        self._reject_unknown(lowrank, "optimizer argument")
        defaults.update(lowrank)
        defaults.update(lr=as_lr(lr), betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        validate_group(defaults)
        super().__init__(params, defaults)
        self._budget_built = True
        if self.state_budget is not None:
            budgeting.check_budget(self)

    @classmethod
    def _lowrank_defaults(cls) -> dict[str, Any]:
        return LOWRANK_DEFAULTS

    def _reject_unknown(self, keys: Iterable[str], what: str) -> None:
        allowed = set(LOWRANK_DEFAULTS) | set(ADAM_KEYS) | set(TORCH_KEYS)
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise ValueError(
                f"unknown {what} {unknown[0]!r} for {type(self).__name__}; "
                f"known: {sorted(allowed - set(TORCH_KEYS))}"
            )

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = self._translate_group(dict(param_group))
        self._reject_unknown(param_group, "param-group key")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr"] = as_lr(group["lr"])
        group["betas"] = tuple(group["betas"])
        try:
            validate_group(group)
            if self._budget_built and self.state_budget is not None:
                budgeting.check_budget(self)
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        *,
        compact_grads: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> float | None:
        """One optimisation step; returns ``closure()``'s loss when given.

        ``compact_grads``: ``{parameter: R}``, a compact gradient ``R = PᵀG`` (as
        ``project_gradient`` makes it) for parameters whose ``.grad`` is None, used
        instead of a full gradient. Only a parameter whose ``gradient_request`` is
        ``"compact"`` may be given one (``ValueError`` otherwise): its step neither
        refreshes, tracks nor tests its subspace, so R is all it needs. This is how
        ``layerwise(..., grad_accum=K)`` steps on K micro-batches accumulated in the
        compact space; its ``captured_energy()`` reads nan for that step (‖G‖ is unknown)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compact = self._check_compact(compact_grads)
        # Every skip and every raise is decided, for all groups, before the first update:
        # a step applies to every parameter or to none (DESIGN §5).
        work = []
        index = 0
        for group in self.param_groups:
            params = group["params"]
            with_grad = [
                (index + i, p)
                for i, p in enumerate(params)
                if gradient_of(p) is not None or id(p) in compact
            ]
            index += len(params)
            if with_grad:
                work.append((group, self._screen(group, with_grad, compact)))
        for group, (lowrank, plain, skipped) in work:
            for it in skipped:
                it.state["nonfinite_skips"] = it.state.get("nonfinite_skips", 0) + 1
            if lowrank:
                self._lowrank_step(group, lowrank)
            if plain:
                self._plain_step(group, plain)
        return loss

    def _screen(
        self,
        group: dict,
        with_grad: list[tuple[int, torch.Tensor]],
        compact: dict[int, torch.Tensor],
    ) -> tuple[list[Item], list[Item], list[Item]]:
        """A group's parameters with a gradient as ``(low-rank, plain, skipped)`` items.

        Skipped (or, under ``nonfinite="raise"``, refused with ``FloatingPointError``): a
        gradient with a NaN/Inf, and a finite one too large for float32 Adam state,
        ``‖G‖_F > MAX_GRAD_NORM``, whose squares would overflow the second moment (an
        inf V turns into NaN in the moment transfer). One host synchronisation per
        group; under FSDP2 the verdicts are all-reduced, as a NaN may sit in one rank's
        shard and every rank must skip (and issue the same collectives)."""
        self._refuse_sparse(group, [p for _, p in with_grad if id(p) not in compact])
        ops = [self._row_ops(p, group) for _, p in with_grad]
        # A compact gradient is screened itself: it is all that reaches the state.
        grads = [
            compact[id(p)] if id(p) in compact else local_tensor(gradient_of(p))  # type: ignore[arg-type]
            for _, p in with_grad
        ]
        verdicts = _gradient_verdicts(grads, ops)
        lowrank: list[Item] = []
        plain: list[Item] = []
        skipped: list[Item] = []
        for (i, p), verdict, o in zip(with_grad, verdicts, ops, strict=True):
            item = Item(i, p, self.state[p], group, o)
            if id(p) in compact:
                item.R, item.compact = compact[id(p)], True
            if verdict is not None:
                if group["nonfinite"] == "raise":
                    raise FloatingPointError(
                        f"{verdict} gradient for parameter {self._name_of(group, p)}; no "
                        "parameter was updated (set nonfinite='skip' to skip such steps "
                        "instead)"
                    )
                skipped.append(item)
            elif group["lowrank"] and p.ndim >= 2 and p.numel() > 0:
                lowrank.append(item)
            else:  # vectors, plain groups, and matrices without elements
                plain.append(item)
        return lowrank, plain, skipped

    # ------------------------------------------------ accumulation in the compact space

    def gradient_request(self, p: torch.Tensor) -> str:
        """What this optimizer's next step of ``p`` needs: ``"compact"`` when it only uses
        the compact gradient ``R = PᵀG`` (a low-rank matrix between refreshes, on a step
        that neither tracks, tests staleness nor applies a residual), else ``"full"``.
        A function of ``p``'s state and group, unchanged until the next step, so a
        caller may decide at the first micro-batch how to accumulate the step's gradient:
        projection is linear, so the sum of the micro-batches' R is the R of their sum.
        Always ``"full"`` under ``state_budget`` (a budget cut may refresh any matrix)."""
        group = self._group_of(p)
        state = self.state.get(p, {})
        if (
            self.state_budget is not None
            or not group["lowrank"]
            or p.ndim < 2
            or p.numel() == 0
            or group["residual"]
            or "exp_avg" not in state
            or self._row_ops(p, group).sharded
        ):
            return "full"
        plan = schedule.plan([state], group)
        return "full" if plan.refresh or plan.check or plan.track else "compact"

    def project_gradient(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``R``: ``grad`` (a gradient of ``p``, e.g. one micro-batch's) projected onto
        ``p``'s current subspace as the next step would project it (float32, the shape
        of the compact moments). Requires ``gradient_request(p) == "compact"``."""
        if self.gradient_request(p) != "compact":
            raise ValueError(
                f"project_gradient: the next step of parameter "
                f"{self._name_of(self._group_of(p), p)} needs its full gradient "
                "(gradient_request() is 'full'), so it has no compact gradient"
            )
        if grad.shape != p.shape:
            raise ValueError(
                f"project_gradient: grad has shape {tuple(grad.shape)}, the parameter "
                f"{tuple(p.shape)}"
            )
        P, Q = projectors(self.state[p])
        return LOCAL.project(local_tensor(grad).flatten(1).to(torch.float32), P, Q)

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(
            f"parameter of shape {tuple(p.shape)} is not in this {type(self).__name__}"
        )

    def _check_compact(
        self, compact_grads: Mapping[torch.Tensor, torch.Tensor] | None
    ) -> dict[int, torch.Tensor]:
        """``compact_grads`` by parameter id, each checked against ``gradient_request``
        and the compact moments' shape before anything is updated."""
        out: dict[int, torch.Tensor] = {}
        for p, R in (compact_grads or {}).items():
            name = self._name_of(self._group_of(p), p)
            if self.gradient_request(p) != "compact":
                raise ValueError(
                    f"compact_grads: parameter {name}'s next step needs its full gradient "
                    "(gradient_request() is 'full'); pass it in .grad instead"
                )
            if p.grad is not None:
                raise ValueError(
                    f"compact_grads: parameter {name} has a .grad too; give one or the other"
                )
            expected = tuple(self.state[p]["exp_avg"].shape)
            if tuple(R.shape) != expected or R.dtype != torch.float32:
                raise ValueError(
                    f"compact_grads: parameter {name} needs a float32 R of shape {expected} "
                    f"(project_gradient makes it), got {R.dtype} {tuple(R.shape)}"
                )
            out[id(p)] = R
        return out

    def _refuse_sparse(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if gradient_of(p).is_sparse:  # type: ignore[union-attr]
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {self._name_of(group, p)}); use dense gradients, "
                    "e.g. nn.Embedding(sparse=False)"
                )

    def _row_ops(self, p: torch.Tensor, group: dict) -> RowOps:
        """``rows.LOCAL`` for a plain tensor; a ``distributed.ShardContext`` for an FSDP2
        DTensor, refusing what cannot run on row shards."""
        if type(p) is torch.Tensor or type(p) is torch.nn.Parameter:
            return LOCAL
        from . import distributed  # only a DTensor (or another subclass) gets here

        if not distributed.is_dtensor(p):
            return LOCAL
        if is_int8_weight(p):
            raise ValueError(
                f"INT8 weights (Int8Linear) are not supported under FSDP2 "
                f"(parameter {self._name_of(group, p)})"
            )
        if group["lowrank"] and p.ndim >= 2:
            distributed.check_sharded_backend(group["backend"])
        return distributed.ShardContext.of(p)

    def _lowrank_step(self, group: dict, items: list[Item]) -> None:
        """A step of a group's low-rank parameters: decide, refresh or track, then Adam.

        The decisions are taken for all matrices first, so that the work can be batched
        under ``foreach``: the staleness tests of the group cost one host
        synchronisation together, the refreshes one batched SVD per shape
        (``refresh.refresh``), the compact Adam update one multi-tensor kernel
        (``functional.lowrank_adam``)."""
        for it in items:
            init_lowrank_state(it.state)
        first = [it for it in items if "exp_avg" not in it.state]
        plan = schedule.plan([it.state for it in items], group)
        for i in (*plan.refresh, *plan.check, *plan.track):
            if items[i].compact:  # gradient_request said "compact": a caller's bug
                raise RuntimeError(
                    f"parameter {self._name_of(group, items[i].param)} was given a compact "
                    "gradient for a step that refreshes, tracks or tests its subspace, which "
                    "needs the full gradient; ask gradient_request() before accumulating"
                )
        refresh = [items[i] for i in plan.refresh]
        tracks = [items[i] for i in plan.track]
        checks = [items[i] for i in plan.check]
        if checks:
            norms = []
            for it in checks:
                G = it.full_gradient()
                P, Q = it.projectors()
                it.R = it.ops.project(G, P, Q)
                norms.append(torch.stack(it.ops.projection_norms(it.R, G, R_rows=P is None)))
            for it, (r_norm, g_norm) in zip(checks, torch.stack(norms).tolist(), strict=True):
                action = schedule.after_check(it.state, group, r_norm, g_norm)
                if action != "step":
                    (refresh if action == "refresh" else tracks).append(it)
                    it.R = None
        budget = None
        if self.state_budget is not None:
            refresh, budget = budgeting.allowance(self, items, refresh)
            tracks = [it for it in tracks if not any(it is r for r in refresh)]
        if refresh:
            refreshing.refresh(group, refresh, batched=group["foreach"], budget=budget)
        for it in tracks:
            refreshing.track(group, it)
        self._lowrank_adam(group, items)
        if group["stagger"] > 1 and first:
            matrices = [q for q in group["params"] if q.ndim >= 2]
            start, count = group["stagger_position"] or (0, len(matrices))
            for it in first:
                if "exp_avg" in it.state:
                    position = start + next(j for j, q in enumerate(matrices) if q is it.param)
                    it.state["since_refresh"] += schedule.stagger_offset(
                        min(position, count - 1), count, group
                    )

    @staticmethod
    def _lowrank_adam(group: dict, items: list[Item]) -> None:
        states = [it.state for it in items]
        torch._foreach_add_([st["step"] for st in states], 1.0)
        for st in states:
            st["since_refresh"] += 1
        residual_norms = None
        if group["residual"]:
            for it in items:
                if "residual_norm" not in it.state:
                    it.state["residual_norm"] = torch.zeros((), device=it.param.device)
            residual_norms = [st["residual_norm"] for st in states]
        beta1, beta2 = group["betas"]
        captured = lowrank_adam(
            items,
            [local_tensor(st["exp_avg"]) for st in states],
            [local_tensor(st["exp_avg_sq"]) for st in states],
            [st["bias1"] for st in states],
            [st["bias2"] for st in states],
            [it.R for it in items],
            residual_norms,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            scale=group["scale"],
            convention=group["convention"],
            residual_limit=group["residual_limit"],
            foreach=group["foreach"],
            cache_projectors=group["proj_bits"] == 32,
        )
        for st, fraction in zip(states, captured, strict=True):
            # Kept on the device: reading it costs a sync only when someone asks.
            st["captured"] = fraction

    def _plain_step(self, group: dict, items: list[Item]) -> None:
        """AdamW on full-size parameters. Float32 ones of the ``torch`` convention go
        through torch's own multi-tensor kernel (fused on the CPU, foreach elsewhere,
        where the steps would have to live on the device for the fused one): that
        convention is ``torch.optim.AdamW``'s update."""
        fused = [
            it
            for it in items
            if group["foreach"]
            and not it.ops.sharded
            and group["convention"] == "torch"
            and it.param.dtype == torch.float32
            and not is_int8_weight(it.param)
        ]
        beta1, beta2 = group["betas"]
        if fused:
            params = [it.param for it in fused]
            states = [it.state for it in fused]
            for p, state in zip(params, states, strict=True):
                init_plain_state(p, state)
            on_cpu = all(p.device.type == "cpu" for p in params)
            adamw(
                params,
                [p.grad for p in params],  # type: ignore[misc]
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                [],
                [st["step"] for st in states],
                foreach=not on_cpu,
                fused=on_cpu or None,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        for it in items:
            if any(it is f for f in fused):
                continue
            W = it.load_weight()
            # Moments like the parameter (a DTensor under FSDP2), or like an INT8
            # weight's float32 dequantisation.
            init_plain_state(W if is_int8_weight(it.param) else it.param, it.state)
            it.state["step"] += 1
            adam_step_(
                W,
                local_tensor(gradient_of(it.param)),  # type: ignore[arg-type]
                local_tensor(it.state["exp_avg"]),
                local_tensor(it.state["exp_avg_sq"]),
                step=int(it.state["step"]),
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                convention=group["convention"],
            )
            it.store_weight(W)

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
        return {
            name: schedule.gap(self.state[p] if p in self.state else {}, group)
            for name, p, group in self._lowrank_params()
        }

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

    def budget_report(self) -> dict[str, Any]:
        """Under ``state_budget``: ``budget``, ``used`` (``state_bytes()["total"]``),
        ``reserved`` (the byte model's count, parameters not yet stepped included;
        ``used ≤ reserved ≤ budget`` after every step), ``smallest`` (the least budget
        that works) and ``ranks`` per layer kind (``budget.report``)."""
        if self.state_budget is None:
            raise ValueError("budget_report() needs an optimizer built with state_budget=...")
        return budgeting.report(self)

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
                    kind = (
                        "moments"
                        if key in MOMENT_KEYS
                        else "projectors"
                        if key.startswith(PROJ_KEYS)
                        else "other"
                    )
                    value = local_tensor(value)
                    out[kind] += value.numel() * value.element_size()
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()``; every group also records the state
        schema's version (``state_version``) and the class that wrote it (``optimizer``),
        so a later adarank can load it and a state of another optimizer is refused."""
        out = super().state_dict()
        for group in out["param_groups"]:
            group["state_version"] = STATE_VERSION
            group["optimizer"] = type(self).__name__
        return out

    @classmethod
    def convert_state_dict(cls, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state_dict`` (of another adarank optimizer class) marked as this
        class's, so ``load_state_dict`` accepts it. Its groups keep their saved options
        (e.g. a GaLoreAdamW state keeps ``convention="galore"``); override any after
        loading through ``param_groups``."""
        groups = []
        for group in state_dict["param_groups"]:
            if "lowrank" not in group:
                raise ValueError(
                    "convert_state_dict: not an adarank optimizer's state (its groups have "
                    "no 'lowrank' key); start this optimizer from its defaults instead"
                )
            groups.append({**group, "optimizer": cls.__name__})
        return {**state_dict, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of this class, current or older.

        The groups of an older state (``state_version`` absent: before versions) get
        the keys added since from this optimizer's defaults; every group is validated as
        the constructor validates (``ValueError``); a state written by another class
        (e.g. GaLoreAdamW, or torch.optim.AdamW) is refused unless converted with
        ``convert_state_dict``. Where the saved and the current groups both name their
        parameters (``param_names``), state is matched by name, and a group whose names
        differ is refused; otherwise by position. Tensors keep their saved dtypes
        (torch's loader would cast float32 moments and projectors to a bf16
        parameter's dtype)."""
        state_dict = self._upgrade(state_dict)
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
                self._check_state_fits(
                    by_id[pid], st, saved_groups[pid], name_by_id[pid] or f"index {pid}"
                )
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

    def _upgrade(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` checked, filled, validated and ordered by name (see
        ``load_state_dict``); the caller's dict is not modified."""
        me = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(saved_groups)} param groups, this {me} "
                f"{len(self.param_groups)}; build the optimizer with the groups it was saved with"
            )
        groups = []
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            group = dict(saved)
            version = group.pop("state_version", 0)
            owner = group.pop("optimizer", None)
            if not is_int(version) or version > STATE_VERSION:
                raise ValueError(
                    f"checkpoint state_version={version!r} is newer than this adarank's "
                    f"({STATE_VERSION}); load it with the adarank release that wrote it"
                )
            if owner is None and "lowrank" not in group:
                raise ValueError(
                    f"checkpoint param group {index} is not an adarank optimizer's (e.g. "
                    f"torch.optim.AdamW's): {me} cannot continue its state; start {me} "
                    "from fresh state instead"
                )
            if owner is not None and owner != me:
                raise ValueError(
                    f"checkpoint was written by {owner}, not {me}: its state follows "
                    f"another algorithm; convert it explicitly with "
                    f"{me}.convert_state_dict(state_dict) if that is intended"
                )
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group["betas"] = tuple(group["betas"])
            try:
                validate_group(group)
            except ValueError as error:
                raise ValueError(f"checkpoint param group {index}: {error}") from None
            groups.append(self._order_by_name(group, current, index))
        return {**state_dict, "param_groups": groups}

    @staticmethod
    def _order_by_name(saved: dict[str, Any], current: dict[str, Any], index: int) -> dict:
        """``saved`` with its parameters in ``current``'s order of names, where both have
        names; refuses groups whose names differ."""
        theirs, ours = saved.get("param_names"), current.get("param_names")
        if not theirs or not ours:
            return saved
        if sorted(theirs) != sorted(ours):
            missing = sorted(set(ours) - set(theirs))
            extra = sorted(set(theirs) - set(ours))
            raise ValueError(
                f"checkpoint param group {index} names other parameters than this "
                f"optimizer's: missing {missing}, unexpected {extra}; load it into the "
                "model it was saved from"
            )
        by_name = dict(zip(theirs, saved["params"], strict=True))
        return {**saved, "params": [by_name[n] for n in ours], "param_names": list(ours)}

    @staticmethod
    def _check_state_fits(p: torch.Tensor, st: dict, group: dict, name: str) -> None:
        if "exp_avg" not in st:
            return
        shape = tuple(p.shape)
        if group.get("lowrank") and p.ndim >= 2:
            m, n = shape[0], math.prod(shape[1:])
            left, right = projector_shape(st, "proj_left"), projector_shape(st, "proj_right")
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

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        **lowrank: Unpack[GaLoreOptions],
    ) -> None:
        options = self._translate_group(dict(lowrank))
        # Options given to the constructor apply to groups that do not say
        # otherwise; a rank given here makes those groups low-rank.
        options.setdefault("lowrank", "max_rank" in options)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)

    @classmethod
    def _lowrank_defaults(cls) -> dict[str, Any]:
        return dict(
            LOWRANK_DEFAULTS,
            lowrank=False,
            rank_rule="fixed",
            max_rank=128,
            backend="exact",
            track_every=0,
            check_every=0,
            refresh_below=0.0,
            moments="keep",
            convention="galore",
            align_signs=False,
        )

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        # As in the reference, a group is projected when it names a rank.
        if (
            "params" in group
            and "lowrank" not in group
            and ("rank" in group or "max_rank" in group)
        ):
            group["lowrank"] = True
        for theirs, ours in GALORE_KEYS.items():
            if theirs in group:
                value = group.pop(theirs)
                check(is_int(value) and value >= 1, theirs, value, "an integer >= 1")
                group[ours] = value
        return group


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

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        **lowrank: Unpack[QGaLoreOptions],
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **lowrank)  # type: ignore[misc]

    @classmethod
    def _lowrank_defaults(cls) -> dict[str, Any]:
        return dict(
            super()._lowrank_defaults(),
            proj_bits=4,
            proj_group_size=256,
            lazy_refresh=True,
            lazy_threshold=0.4,
            lazy_window=5,
            lazy_factor=2,
        )

    def _translate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        for theirs, ours in QGALORE_KEYS.items():
            if theirs in group:
                value = group.pop(theirs)
                check_as(theirs, ours, value, self._lowrank_defaults())
                group[ours] = value
        return super()._translate_group(group)


# Largest accepted ‖G‖_F: 2^60 ≈ 1.2e18, so squares stay below 2^120 and the second
# moment, its transfer to a new subspace (sums over r ≤ 2^8 coordinates) and the
# residual norm keep 2^8 of headroom below float32's largest value, 2^128.
MAX_GRAD_NORM = 2.0**60


def _gradient_verdicts(grads: list[torch.Tensor], ops: list[RowOps]) -> list[str | None]:
    """Per gradient: None (use it), ``"non-finite"`` or ``"too large"`` (see ``_screen``)."""
    if any(o.sharded for o in ops):
        from .distributed import finite_flags

        finite = finite_flags(grads, ops)
        norms = [
            float(o.norm(g.to(torch.float32), rows=True)) for g, o in zip(grads, ops, strict=True)
        ]
    else:
        # One norm per gradient: finite iff every element is, unless the squares
        # overflow; the rare alarm is confirmed exactly.
        norms = torch.stack(
            [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        ).tolist()
        finite = [
            math.isfinite(n) or bool(torch.isfinite(g).all())
            for g, n in zip(grads, norms, strict=True)
        ]
    return [
        "non-finite" if not ok else "too large" if not norm <= MAX_GRAD_NORM else None
        for ok, norm in zip(finite, norms, strict=True)
    ]
