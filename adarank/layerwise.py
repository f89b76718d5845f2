"""Layer-wise updates: each parameter stepped inside backward, its gradient freed at once.

``layerwise(model, optimizer_factory)`` builds one optimizer per trainable
parameter (``Int8Linear`` weights included) and registers a post-accumulate-grad
hook on it. When backward has finished accumulating a parameter's gradient the
hook steps that parameter's optimizer and frees ``p.grad`` (leaving a
``ConsumedGrad`` marker, see below), so at most the gradients of the parameters
autograd is working on exist at any moment, never all of them (the per-layer
weight updates of GaLore, arXiv 2403.03507; PyTorch's "optimizer step in
backward" recipe).

**Gradient accumulation** (``grad_accum=K`` ≥ 2; call ``step()`` once every K
backward passes). Each hook adds its micro-batch's gradient to an accumulator
of the parameter and frees the gradient; the K-th backward of a parameter steps
it, inside that backward. A low-rank matrix whose next step only needs the
compact gradient (``AdaRankAdamW.gradient_request`` is ``"compact"``: between
refreshes, on a step without tracking, staleness test or residual) accumulates
``R = PᵀG`` (r×n) instead of G (m×n): projection is linear, so the sum of the
micro-batches' R is the projection of the summed gradient. On its other steps
(the first, a refresh, a tracking step, a staleness test, the residual path, a
state budget), and for every parameter of a plain optimizer or plain group, the
full gradient is accumulated, for that step only; with ``stagger`` only a share
of the matrices does so on any step. Peak gradient memory is therefore that of
the compact accumulators, plus a full m×n accumulator for each matrix whose
step needs it (every matrix on the first step; on a scheduled refresh without
``stagger``, all of them at once, as with ordinary accumulation), plus the
gradients autograd holds at the moment. A parameter that received fewer than K
gradients in an iteration (unused by some micro-batches) is stepped by
``step()`` on the sum it has, as ordinary accumulation would. A ``step()`` after
fewer than K backward passes raises unless ``step(partial=True)`` (a shorter last
accumulation, e.g. at the end of an epoch). A checkpoint (``state_dict()``) is
refused in the middle of an accumulation: save after ``step()``, where resume is
bit-identical.

What this mode cannot do, by construction:

- **Clipping by global norm**: the norm needs every gradient at once, and the
  first parameters are stepped before the last gradients exist. So that no
  tool silently sees "no gradients" (``torch.nn.utils.clip_grad_norm_`` would
  return 0 and clip nothing, a ``GradScaler`` would unscale nothing), the hook
  leaves in ``p.grad`` a ``ConsumedGrad``: a marker of the gradient's shape,
  dtype and device that holds no memory and raises ``RuntimeError`` on any
  operation. Clipping, unscaling, norms or any read of the values then fail
  with an explanation, between micro-batches as after the step. For logging,
  ``grad_norm()`` gives the norm of the last iteration's gradient from the
  pieces that existed (see there). ``LayerwiseOptimizer.step()`` and
  ``zero_grad()`` (and ``model.zero_grad()``, which sets ``.grad`` to None) clear
  the markers; a backward pass that runs after a parameter's step and before
  ``step()`` meets a marker while accumulating and raises.
- A parameter updated in place while autograd still needs its old value (one
  tensor feeding two places whose backward runs after its own hook) makes
  autograd raise its in-place modification error.
- **Data parallelism** (DDP, FSDP2, any ``torch.distributed`` job of more than
  one process): the hook fires when autograd has accumulated the *local*
  gradient, before DDP's all-reduce (or FSDP2's reduce-scatter) has averaged it
  across ranks, so each rank would step on its own gradient and the replicas
  would drift apart. ``layerwise`` refuses a DDP-wrapped model and any process
  group of world size > 1 (``ValueError``); use the normal optimizer there.
- An optimizer-wide ``state_budget``: each per-parameter optimizer would hold
  the whole budget (``ValueError``).

Usage::

    lw = adarank.layerwise(model, lambda groups: adarank.GaLoreAdamW(groups, lr=1e-2),
                           groups=adarank.param_groups(model, rank=128), grad_accum=4)
    for i, (x, y) in enumerate(batches):
        (loss_fn(model(x), y) / 4).backward()   # the 4th backward steps the parameters
        if (i + 1) % 4 == 0:
            lw.step()                           # end of the iteration (bookkeeping)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle

__all__ = ["ConsumedGrad", "LayerwiseOptimizer", "layerwise"]

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
ParamStepHook = Callable[[str, torch.Tensor, Optimizer], None]

# Accumulating into an existing .grad (AccumulateGrad) is add_ or, under create_graph, add.
_ACCUMULATE = {torch.ops.aten.add_.Tensor, torch.ops.aten.add.Tensor}


class ConsumedGrad(torch.Tensor):
    """What layer-wise mode leaves in ``p.grad`` once the hook has used the gradient.

    A tensor with the gradient's shape, dtype, device and strides but no storage
    (0 bytes): ``p.grad is not None`` stays true, so a whole-model tool that
    reads gradients after backward (``clip_grad_norm_``, ``GradScaler.unscale_``,
    a norm in a logger) reaches it and every operation on it raises
    ``RuntimeError`` explaining why, instead of silently finding no gradients.
    Attributes: ``param_name``, the parameter's name; ``stepped``, True once the
    parameter was stepped with it, False while its gradient waits in an
    accumulator (``grad_accum``). Cleared (``.grad = None``) by
    ``LayerwiseOptimizer.step()``/``zero_grad()``/``remove()``, by
    ``model.zero_grad()``, and, between micro-batches, by the next backward.
    """

    param_name: str
    stepped: bool

    @staticmethod
    def __new__(cls, like: torch.Tensor, name: str, stepped: bool = True) -> ConsumedGrad:
        marker = torch.Tensor._make_wrapper_subclass(
            cls,
            like.shape,
            strides=like.stride(),
            dtype=like.dtype,
            device=like.device,
            requires_grad=False,
        )
        marker.param_name = name
        marker.stepped = stepped
        return marker

    def __init__(self, like: torch.Tensor, name: str, stepped: bool = True) -> None:
        pass

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"ConsumedGrad(param_name={self.param_name!r}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, stepped={self.stepped})"
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        flat, _ = tree_flatten((args, kwargs))
        marker = next(a for a in flat if isinstance(a, ConsumedGrad))
        if func in _ACCUMULATE:
            raise RuntimeError(_second_gradient(marker.param_name))
        where = (
            "used by its optimizer step inside backward and freed"
            if marker.stepped
            else "added to layer-wise mode's accumulator (grad_accum) and freed"
        )
        raise RuntimeError(
            f"layer-wise mode: the gradient of {marker.param_name} was {where}; .grad holds "
            f"a marker without values ({func} was called on it). Whole-model gradient "
            "operations after backward (clip_grad_norm_, GradScaler.unscale_, gradient "
            "norms) cannot work in layer-wise mode: train without them (for logging, "
            "LayerwiseOptimizer.grad_norm() gives the last iteration's norm), or use the "
            "normal optimizer."
        )


def _second_gradient(name: str) -> str:
    return (
        f"layer-wise mode: parameter {name} received a second gradient before "
        "LayerwiseOptimizer.step(). Each parameter is stepped inside backward (the "
        "grad_accum-th backward of an iteration) and its gradient freed, so it cannot take "
        "more gradients until step() ends the iteration (nor can an Int8Linear be called "
        "twice per forward). Call step() once every grad_accum backward passes, raise "
        "grad_accum, or use the normal optimizer."
    )


class LayerwiseOptimizer:
    """Handle returned by ``layerwise``: the per-parameter optimizers and their hooks.

    Attributes:
        optimizers: ``{parameter name: optimizer}``, one optimizer per parameter,
            each built by the factory from a one-parameter group that keeps the
            name (``param_names``) and the options of the group it came from.
        steps: number of completed iterations (``step()`` calls).
        grad_accum: backward passes (micro-batches) per iteration.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        groups: Iterable[dict[str, Any]] | None = None,
        grad_accum: int = 1,
    ) -> None:
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(
                f"layerwise: invalid grad_accum={grad_accum!r}: expected an integer >= 1 "
                "(backward passes per optimizer step)"
            )
        _refuse_data_parallel(model)
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        if groups is None:
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for _, p in trainable], "param_names": [n for n, _ in trainable]}
            ]
        self.optimizers: dict[str, Optimizer] = {}
        self.steps = 0
        self.grad_accum = grad_accum
        self._params: dict[str, torch.Tensor] = {}
        self._stepped: set[str] = set()
        self._handles: list[Any] = []
        # This iteration: backward passes seen per parameter, accumulators (full or, for
        # names in _compact, R = PᵀG), and the squared norm of each stepped gradient.
        self._passes: dict[str, int] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._compact: set[str] = set()
        self._squares: dict[str, tuple[torch.Tensor, bool]] = {}
        self._last_norms: dict[str, tuple[torch.Tensor, bool]] = {}
        # OrderedDict: RemovableHandle keeps a weak reference, which a plain dict refuses.
        self._param_hooks: OrderedDict[int, tuple[ParamStepHook, int]] = OrderedDict()
        self._step_pre_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()
        for group in groups:
            params = list(group["params"])
            names = list(group.get("param_names") or [])
            if names and len(names) != len(params):
                raise ValueError(
                    f"layerwise: a group has {len(params)} params but {len(names)} param_names"
                )
            options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            matrices = [p for p in params if p.ndim >= 2]
            for i, p in enumerate(params):
                name = names[i] if names else names_by_id.get(id(p))
                if name is None:
                    raise ValueError(
                        f"layerwise: parameter #{i} of a group (shape {tuple(p.shape)}) is not "
                        "a parameter of the model and has no param_names entry"
                    )
                if name in self._params or any(q is p for q in self._params.values()):
                    raise ValueError(f"layerwise: parameter {name} is listed twice")
                if not p.requires_grad:
                    raise ValueError(
                        f"layerwise: parameter {name} does not require grad, so its hook "
                        "would never fire; leave it out of the groups"
                    )
                opt = optimizer_factory([{**options, "params": [p], "param_names": [name]}])
                if getattr(opt, "state_budget", None) is not None:
                    raise ValueError(
                        "layerwise: the factory's optimizer has a state_budget, which bounds "
                        "one optimizer's state; layer-wise mode builds one optimizer per "
                        "parameter, so each would hold the whole budget. Use the normal "
                        "optimizer for a state budget"
                    )
                inner = opt.param_groups[0]
                if "stagger_position" in inner and p.ndim >= 2:
                    # ``stagger`` phases by the matrix's place in the group it came from, as
                    # one optimizer over that group would (its own group has one matrix).
                    position = next(j for j, q in enumerate(matrices) if q is p)
                    inner["stagger_position"] = (position, len(matrices))
                self.optimizers[name] = opt
                self._params[name] = p
                if grad_accum > 1:
                    self._handles.append(p.register_hook(self._make_pre_hook(name)))
                self._handles.append(
                    p.register_post_accumulate_grad_hook(self._make_hook(name, opt))
                )
        if not self.optimizers:
            raise ValueError("layerwise: no trainable parameters to step")

    def _make_pre_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        # Runs before autograd accumulates a gradient into p.grad: clears the marker of an
        # earlier micro-batch, so the new gradient lands in an empty .grad.
        def pre_hook(_: torch.Tensor) -> None:
            if name in self._stepped:
                raise RuntimeError(_second_gradient(name))
            p = self._params[name]
            if isinstance(p.grad, ConsumedGrad):
                p.grad = None

        return pre_hook

    def _make_hook(self, name: str, opt: Optimizer) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if name in self._stepped:
                raise RuntimeError(_second_gradient(name))
            passes = self._passes.get(name, 0) + 1
            self._passes[name] = passes
            if self.grad_accum > 1:
                self._accumulate(name, p, opt, passes == 1)
                if passes < self.grad_accum:
                    p.grad = ConsumedGrad(p, name, stepped=False)
                    return
            self._step_param(name, p, opt)

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, p: torch.Tensor, opt: Optimizer, first: bool) -> None:
        """Add ``p.grad`` to ``p``'s accumulator (compact when its optimizer allows) and
        free it. The mode is chosen at the iteration's first gradient: the optimizer's
        answer is a function of its state, which does not change until the step."""
        grad = p.grad
        assert grad is not None
        if first and self._wants_compact(p, opt):
            self._compact.add(name)
        if name in self._compact:
            R = opt.project_gradient(p, grad)  # type: ignore[attr-defined]
            if first:
                self._acc[name] = R
            else:
                self._acc[name].add_(R)
        elif first:
            self._acc[name] = grad  # autograd's tensor becomes the accumulator: no copy
        else:
            self._acc[name].add_(grad)
        p.grad = None

    def _wants_compact(self, p: torch.Tensor, opt: Optimizer) -> bool:
        request = getattr(opt, "gradient_request", None)
        if request is None or request(p) != "compact":
            return False
        # A hook that reads the full gradient (e.g. a spectrum logger) is due this iteration.
        return not any(self.steps % every == 0 for _, every in self._param_hooks.values())

    @torch.no_grad()
    def _step_param(self, name: str, p: torch.Tensor, opt: Optimizer) -> None:
        """Step ``p`` on its gradient (``p.grad``, or its accumulator) and leave a marker."""
        compact = self._acc.pop(name) if name in self._compact else None
        self._compact.discard(name)
        if name in self._acc:  # a full accumulator becomes the gradient
            p.grad = self._acc.pop(name)
        used = compact if compact is not None else p.grad
        assert used is not None
        self._stepped.add(name)
        square = torch.linalg.vector_norm(used, dtype=torch.float32).square()
        self._squares[name] = (square, compact is not None)
        if compact is not None:
            opt.step(compact_grads={p: compact})  # type: ignore[call-overload]
        else:
            for param_hook, every in list(self._param_hooks.values()):
                if self.steps % every == 0:
                    param_hook(name, p, opt)
            opt.step()
        opt.zero_grad(set_to_none=True)
        p.grad = ConsumedGrad(p, name)

    # ------------------------------------------------------------ training

    def step(self, closure: Callable[[], Any] | None = None, *, partial: bool = False) -> Any:
        """End an iteration: the parameters were already stepped during backward.

        With ``closure`` (forward and backward), runs it first and returns its
        value. Under ``grad_accum`` > 1, steps the parameters that received fewer
        than ``grad_accum`` gradients on the sum they have (as ordinary accumulation
        would); fewer backward passes than ``grad_accum`` raise ``RuntimeError``
        unless ``partial=True`` (a shorter last accumulation). Resets the guard
        that refuses more gradients per parameter.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        passes = max(self._passes.values(), default=0)
        if self.grad_accum > 1 and 0 < passes < self.grad_accum and not partial:
            raise RuntimeError(
                f"layer-wise mode: step() after {passes} backward pass(es), but grad_accum="
                f"{self.grad_accum}: call step() once every {self.grad_accum} backward passes "
                "(nothing was stepped yet for the parameters still accumulating), or "
                "step(partial=True) to end a shorter last accumulation"
            )
        for name in list(self._acc):
            self._step_param(name, self._params[name], self.optimizers[name])
        for pre_hook in list(self._step_pre_hooks.values()):
            pre_hook(self, (), {})
        if self._squares:
            self._last_norms, self._squares = self._squares, {}
        self._stepped.clear()
        self._passes.clear()
        self._clear_grads()
        self.steps += 1
        return loss

    def grad_norm(self, part: str = "total") -> float:
        """Norm of the gradient the last iteration's steps used (nan before one).

        ``part``: ``"total"``, ``"full"`` (parameters stepped on their full, summed
        gradient) or ``"compact"`` (matrices stepped on an accumulated ``R = PᵀG``,
        whose ‖R‖_F is exact for what the update uses but, as the projection onto
        the subspace, at most ‖G‖_F for orthonormal P). ``total² = full² + compact²``.
        Only for logging: the norm is known once every parameter has been stepped,
        so it cannot clip that iteration.
        """
        if part not in ("total", "full", "compact"):
            raise ValueError(f"grad_norm: part must be 'total', 'full' or 'compact', got {part!r}")
        if not self._last_norms:
            return math.nan
        squares = [
            sq
            for sq, compact in self._last_norms.values()
            if part == "total" or compact == (part == "compact")
        ]
        return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0

    def accumulator_bytes(self) -> dict[str, int]:
        """Bytes held now by the accumulators of this iteration (``grad_accum`` > 1):
        ``compact`` (the r×n ``R`` of matrices between refreshes), ``full`` (the
        gradients of parameters whose step needs them) and ``total``."""
        out = {"compact": 0, "full": 0}
        for name, acc in self._acc.items():
            out["compact" if name in self._compact else "full"] += acc.numel() * acc.element_size()
        out["total"] = out["compact"] + out["full"]
        return out

    def _clear_grads(self) -> None:
        for p in self._params.values():
            p.grad = None

    def register_param_step_hook(self, hook: ParamStepHook, *, every: int = 1) -> RemovableHandle:
        """Call ``hook(name, param, optimizer)`` inside backward, when ``param.grad`` holds
        the parameter's full gradient (accumulated over the iteration's micro-batches),
        just before ``optimizer`` (its per-parameter optimizer) steps it: the one moment
        a layer-wise gradient can be read, e.g. by a spectrum logger. Called on the
        iterations whose ``steps`` is a multiple of ``every``; on those, every parameter
        accumulates its full gradient (none the compact one), which costs the gradient
        memory of ordinary accumulation. Returns a handle with ``.remove()``."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"register_param_step_hook: invalid every={every!r}: expected an integer >= 1"
            )
        handle = RemovableHandle(self._param_hooks)
        self._param_hooks[handle.id] = (hook, every)
        return handle

    def register_step_pre_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Call ``hook(self, args, kwargs)`` at the start of every ``step()`` (after its
        closure), as ``torch.optim.Optimizer.register_step_pre_hook``: the end of an
        iteration, when every parameter of it has been stepped."""
        handle = RemovableHandle(self._step_pre_hooks)
        self._step_pre_hooks[handle.id] = hook
        return handle

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any gradient left (none after a hooked backward); always sets None. Under
        ``grad_accum``, also discards the accumulation of the parameters not yet
        stepped in this iteration (as ``zero_grad`` discards accumulated ``.grad``)."""
        del set_to_none  # gradients are freed, never zero-filled
        self._acc.clear()
        self._compact.clear()
        self._passes = {n: c for n, c in self._passes.items() if n in self._stepped}
        self._clear_grads()

    def clip_grad_norm_(self, *args: Any, **kwargs: Any) -> None:
        """Always raises: clipping by global norm needs all gradients at once."""
        raise RuntimeError(
            "layer-wise mode does not support gradient clipping by global norm: each "
            "gradient is consumed and freed inside backward (its parameter stepped before "
            "the last gradients exist), so the global norm is never available in time; "
            "train without clipping or use the normal optimizer. For logging, "
            "grad_norm() gives the last iteration's norm"
        )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every per-parameter optimizer's groups (the live dicts: edits apply)."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group, e.g. from a schedule each iteration.

        For a ``torch.optim.lr_scheduler``, build one scheduler per optimizer in
        ``self.optimizers.values()`` and step them all after ``step()``.
        """
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"invalid lr={lr!r}: expected a number >= 0")
        for group in self.param_groups:
            group["lr"] = lr

    def remove(self) -> None:
        """Remove every hook and drop pending accumulators; gradients then accumulate
        normally again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._acc.clear()
        self._compact.clear()
        self._passes.clear()
        self._stepped.clear()
        self._clear_grads()

    # ---------------------------------------------------------- accounting

    def collect(self, method: str) -> dict[str, Any]:
        """Merge ``opt.<method>()`` (a per-name dict, e.g. ``ranks``) over the
        per-parameter optimizers that have it."""
        out: dict[str, Any] = {}
        for opt in self.optimizers.values():
            fn = getattr(opt, method, None)
            if callable(fn):
                out.update(fn())
        return out

    def ranks(self) -> dict[str, int]:
        """Current rank of every low-rank parameter (``AdaRankAdamW.ranks`` merged)."""
        return self.collect("ranks")

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state by kind, summed over all per-parameter optimizers;
        optimizers without ``state_bytes()`` count every state tensor under ``other``."""
        out: dict[str, int] = {"total": 0}
        for opt in self.optimizers.values():
            fn = getattr(opt, "state_bytes", None)
            if callable(fn):
                part = fn()
            else:
                other = sum(
                    v.numel() * v.element_size()
                    for st in opt.state.values()
                    for v in st.values()
                    if isinstance(v, torch.Tensor)
                )
                part = {"other": other, "total": other}
            for kind, nbytes in part.items():
                out[kind] = out.get(kind, 0) + nbytes
        return out

    # ---------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": {name: opt.state_dict()}, "steps": int}``; loads with
        ``torch.load(weights_only=True)`` when each optimizer's state does. Under
        ``grad_accum`` > 1, refused (``RuntimeError``) between an iteration's first
        backward and its ``step()``: the accumulators are not saved, so save after
        ``step()``, from where a resumed run continues bit-identically."""
        if self.grad_accum > 1 and self._passes:
            raise RuntimeError(
                "layer-wise mode: state_dict() in the middle of a gradient accumulation "
                f"(grad_accum={self.grad_accum}; {max(self._passes.values())} backward "
                "pass(es) since the last step()): the accumulated gradients are not part "
                "of a checkpoint; save after step()"
            )
        return {
            "optimizers": {n: opt.state_dict() for n, opt in self.optimizers.items()},
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; the parameter names must match exactly."""
        saved = state_dict.get("optimizers")
        if not isinstance(saved, dict):
            raise ValueError("layerwise: not a LayerwiseOptimizer state_dict (no 'optimizers')")
        missing = sorted(set(self.optimizers) - set(saved))
        unexpected = sorted(set(saved) - set(self.optimizers))
        if missing or unexpected:
            raise ValueError(
                f"layerwise: checkpoint parameters do not match; missing {missing}, "
                f"unexpected {unexpected}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
        self.steps = int(state_dict.get("steps", 0))


def _refuse_data_parallel(model: nn.Module) -> None:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if world > 1 or ddp:
        where = (
            "a DistributedDataParallel model"
            if ddp
            else (f"a torch.distributed job of {world} processes")
        )
        raise ValueError(
            f"layerwise: refused for {where}. Layer-wise mode steps each parameter in its "
            "post-accumulate-grad hook, which fires before DDP all-reduces (or FSDP2 "
            "reduce-scatters) the gradient, so every rank would step on its own local "
            "gradient and the replicas would diverge. Under DDP or FSDP2 use the normal "
            "optimizer (e.g. adarank.AdaRankAdamW) and call step() after backward."
        )


def layerwise(
    model: nn.Module,
    optimizer_factory: OptimizerFactory,
    groups: Iterable[dict[str, Any]] | None = None,
    grad_accum: int = 1,
) -> LayerwiseOptimizer:
    """Step each parameter of ``model`` in its post-accumulate-grad hook.

    Args:
        model: the model; names come from ``named_parameters()`` unless the
            groups carry ``param_names``.
        optimizer_factory: called once per parameter with a one-element list of
            param groups ``[{**group_options, "params": [p], "param_names": [name]}]``
            and returning an optimizer, e.g.
            ``lambda g: adarank.AdaRankAdamW(g, lr=1e-3)``.
        groups: param groups to split (e.g. ``adarank.param_groups(model, ...)``);
            default one group of every trainable parameter and ``Int8Linear``
            weight.
        grad_accum: backward passes (micro-batches) per optimizer step; ≥ 2
            accumulates each parameter's gradient, in the compact space where its
            optimizer allows (see the module docstring), and steps it at its
            ``grad_accum``-th backward. Call ``step()`` once every ``grad_accum``
            backward passes.

    Returns:
        A ``LayerwiseOptimizer``: call its ``step()`` after every backward;
        ``remove()`` detaches the hooks.

    Gradient memory: without this mode all gradients are alive between
    backward and ``step()``; with it, a gradient lives from its accumulation to
    the end of its hook (and, under ``grad_accum``, an accumulator per parameter:
    r×n for a matrix between refreshes). Global-norm clipping is refused (see
    the module docstring), and so is data parallelism: a DDP-wrapped model or a
    ``torch.distributed`` world of more than one process raises ``ValueError``.
    Per-parameter optimizers number their parameter 0,
    so a seeded randomized sketch (``AdaRankAdamW``'s ``torch``/``fbpca``
    backends, seeded by parameter index) draws differently than in one
    optimizer over all parameters; the ``exact`` backend is unaffected.
    """
    return LayerwiseOptimizer(model, optimizer_factory, groups, grad_accum)
