"""Layer-wise updates: each parameter stepped inside backward, its gradient freed at once.

``layerwise(model, optimizer_factory)`` builds one optimizer per trainable
parameter (``Int8Linear`` weights included) and registers a post-accumulate-grad
hook on it. When backward has finished accumulating a parameter's gradient the
hook steps that parameter's optimizer and frees ``p.grad`` (leaving a
``ConsumedGrad`` marker, see below), so at most the gradients of the parameters
autograd is working on exist at any moment, never all of them (the per-layer
weight updates of GaLore, arXiv 2403.03507; PyTorch's "optimizer step in
backward" recipe).

What this mode cannot do, by construction:

- **Gradient accumulation** over several backward passes: the first backward
  already steps. A parameter whose hook fires a second time before
  ``LayerwiseOptimizer.step()`` raises ``RuntimeError``; call ``step()`` once
  after every backward (it only marks the end of an iteration).
- **Clipping by global norm**: the norm needs every gradient at once, and no
  gradient survives backward. So that no tool silently sees "no gradients"
  (``torch.nn.utils.clip_grad_norm_`` would return 0 and clip nothing, a
  ``GradScaler`` would unscale nothing), the hook leaves in ``p.grad`` a
  ``ConsumedGrad``: a marker of the gradient's shape, dtype and device that
  holds no memory and raises ``RuntimeError`` on any operation. Clipping,
  unscaling, norms or any read of the values then fail with an explanation.
  ``LayerwiseOptimizer.step()`` and ``zero_grad()`` (and ``model.zero_grad()``,
  which sets ``.grad`` to None) clear the markers; a backward pass that runs
  before that meets a marker while accumulating and raises too (see below).
  A gradient consumed without a step (a future accumulation step) must leave
  None, not a marker: only a stepped parameter carries one.
- A parameter updated in place while autograd still needs its old value (one
  tensor feeding two places whose backward runs after its own hook) makes
  autograd raise its in-place modification error.
- **Data parallelism** (DDP, FSDP2, any ``torch.distributed`` job of more than
  one process): the hook fires when autograd has accumulated the *local*
  gradient, before DDP's all-reduce (or FSDP2's reduce-scatter) has averaged it
  across ranks, so each rank would step on its own gradient and the replicas
  would drift apart. ``layerwise`` refuses a DDP-wrapped model and any process
  group of world size > 1 (``ValueError``); use the normal optimizer there.

Usage::

    lw = adarank.layerwise(model, lambda groups: adarank.GaLoreAdamW(groups, lr=1e-2),
                           groups=adarank.param_groups(model, rank=128))
    for x, y in batches:
        loss_fn(model(x), y).backward()   # parameters are stepped here
        lw.step()                         # end of the iteration (bookkeeping)
"""

from __future__ import annotations

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
    """What layer-wise mode leaves in ``p.grad`` once the hook has stepped ``p``.

    A tensor with the gradient's shape, dtype, device and strides but no storage
    (0 bytes): ``p.grad is not None`` stays true, so a whole-model tool that
    reads gradients after backward (``clip_grad_norm_``, ``GradScaler.unscale_``,
    a norm in a logger) reaches it and every operation on it raises
    ``RuntimeError`` explaining why, instead of silently finding no gradients.
    Attributes: ``param_name``, the parameter's name. Cleared (``.grad = None``) by
    ``LayerwiseOptimizer.step()``/``zero_grad()``/``remove()`` and by
    ``model.zero_grad()``.
    """

    param_name: str

    @staticmethod
    def __new__(cls, like: torch.Tensor, name: str) -> ConsumedGrad:
        marker = torch.Tensor._make_wrapper_subclass(
            cls,
            like.shape,
            strides=like.stride(),
            dtype=like.dtype,
            device=like.device,
            requires_grad=False,
        )
        marker.param_name = name
        return marker

    def __init__(self, like: torch.Tensor, name: str) -> None:
        pass

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"ConsumedGrad(param_name={self.param_name!r}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype})"
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        flat, _ = tree_flatten((args, kwargs))
        marker = next(a for a in flat if isinstance(a, ConsumedGrad))
        if func in _ACCUMULATE:
            raise RuntimeError(
                f"layer-wise mode: parameter {marker.param_name} received a second gradient before "
                "LayerwiseOptimizer.step(). Each parameter is stepped inside backward and its "
                "gradient freed, so gradients cannot be accumulated over several backward "
                "passes. Call step() after every backward, or use the normal optimizer."
            )
        raise RuntimeError(
            f"layer-wise mode: the gradient of {marker.param_name} was used by its optimizer step "
            f"inside backward and freed; .grad holds a marker without values ({func} was "
            "called on it). Whole-model gradient operations after backward (clip_grad_norm_, "
            "GradScaler.unscale_, gradient norms) cannot work in layer-wise mode: train "
            "without them or use the normal optimizer."
        )


class LayerwiseOptimizer:
    """Handle returned by ``layerwise``: the per-parameter optimizers and their hooks.

    Attributes:
        optimizers: ``{parameter name: optimizer}``, one optimizer per parameter,
            each built by the factory from a one-parameter group that keeps the
            name (``param_names``) and the options of the group it came from.
        steps: number of completed iterations (``step()`` calls).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        groups: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        _refuse_data_parallel(model)
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        if groups is None:
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for _, p in trainable], "param_names": [n for n, _ in trainable]}
            ]
        self.optimizers: dict[str, Optimizer] = {}
        self.steps = 0
        self._params: dict[str, torch.Tensor] = {}
        self._stepped: set[str] = set()
        self._handles: list[Any] = []
        # OrderedDict: RemovableHandle keeps a weak reference, which a plain dict refuses.
        self._param_hooks: OrderedDict[int, ParamStepHook] = OrderedDict()
        self._step_pre_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()
        for group in groups:
            params = list(group["params"])
            names = list(group.get("param_names") or [])
            if names and len(names) != len(params):
                raise ValueError(
                    f"layerwise: a group has {len(params)} params but {len(names)} param_names"
                )
            options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
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
                self.optimizers[name] = opt
                self._params[name] = p
                self._handles.append(
                    p.register_post_accumulate_grad_hook(self._make_hook(name, opt))
                )
        if not self.optimizers:
            raise ValueError("layerwise: no trainable parameters to step")

    def _make_hook(self, name: str, opt: Optimizer) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if name in self._stepped:
                raise RuntimeError(
                    f"layer-wise mode: parameter {name} received a second gradient before "
                    "LayerwiseOptimizer.step(). Each parameter is stepped inside backward and "
                    "its gradient freed, so gradients cannot be accumulated over several "
                    "backward passes (nor can an Int8Linear be called twice per forward). "
                    "Call step() after every backward, or use the normal optimizer."
                )
            self._stepped.add(name)
            for param_hook in list(self._param_hooks.values()):
                param_hook(name, p, opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            p.grad = ConsumedGrad(p, name)

        return hook

    # ------------------------------------------------------------ training

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """End an iteration: the parameters were already stepped during backward.

        With ``closure`` (forward and backward), runs it first and returns its
        value. Resets the guard that refuses a second gradient per parameter.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for pre_hook in list(self._step_pre_hooks.values()):
            pre_hook(self, (), {})
        self._stepped.clear()
        self._clear_grads()
        self.steps += 1
        return loss

    def _clear_grads(self) -> None:
        for p in self._params.values():
            p.grad = None

    def register_param_step_hook(self, hook: ParamStepHook) -> RemovableHandle:
        """Call ``hook(name, param, optimizer)`` inside backward, when ``param.grad`` holds
        the parameter's full gradient, just before ``optimizer`` (its per-parameter
        optimizer) steps it: the one moment a layer-wise gradient can be read, e.g. by
        a spectrum logger. Returns a handle with ``.remove()``."""
        handle = RemovableHandle(self._param_hooks)
        self._param_hooks[handle.id] = hook
        return handle

    def register_step_pre_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Call ``hook(self, args, kwargs)`` at the start of every ``step()`` (after its
        closure), as ``torch.optim.Optimizer.register_step_pre_hook``: the end of an
        iteration, when every parameter of it has been stepped."""
        handle = RemovableHandle(self._step_pre_hooks)
        self._step_pre_hooks[handle.id] = hook
        return handle

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any gradient left (none after a hooked backward); always sets None."""
        del set_to_none  # gradients are freed, never zero-filled
        self._clear_grads()

    def clip_grad_norm_(self, *args: Any, **kwargs: Any) -> None:
        """Always raises: clipping by global norm needs all gradients at once."""
        raise RuntimeError(
            "layer-wise mode does not support gradient clipping by global norm: each "
            "gradient is consumed and freed inside backward, so the global norm is never "
            "available; train without clipping or use the normal optimizer"
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
        """Remove every hook; gradients then accumulate normally again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
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
        ``torch.load(weights_only=True)`` when each optimizer's state does."""
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

    Returns:
        A ``LayerwiseOptimizer``: call its ``step()`` after every backward;
        ``remove()`` detaches the hooks.

    Gradient memory: without this mode all gradients are alive between
    backward and ``step()``; with it, a gradient lives from its accumulation to
    the end of its hook. Accumulation and global-norm clipping are refused (see
    the module docstring), and so is data parallelism: a DDP-wrapped model or a
    ``torch.distributed`` world of more than one process raises ``ValueError``.
    Per-parameter optimizers number their parameter 0,
    so a seeded randomized sketch (``AdaRankAdamW``'s ``torch``/``fbpca``
    backends, seeded by parameter index) draws differently than in one
    optimizer over all parameters; the ``exact`` backend is unaffected.
    """
    return LayerwiseOptimizer(model, optimizer_factory, groups)
