"""adarank under the Hugging Face ``Trainer``.

- ``create_optimizer(model, args)``: an adarank optimizer whose lr, weight decay, betas and eps
  come from the ``TrainingArguments``, for ``Trainer(optimizers=(optimizer, None))``.
- ``optimizer_cls_and_kwargs(args)``: the same through ``Trainer(optimizer_cls_and_kwargs=...)``,
  which builds the optimizer from the model the Trainer trains (after wrapping it), and which
  also works where ``optimizers=`` is refused (FSDP).
- ``SpectrumCallback(path)``: a ``TrainerCallback`` writing the spectrum log of
  ``adarank.analysis`` and putting the optimizer's ranks, state memory and refreshes into the
  Trainer's logs.

Example::

    from transformers import Trainer, TrainingArguments
    from adarank.integrations.hf import SpectrumCallback, create_optimizer

    args = TrainingArguments("out", learning_rate=1e-3, weight_decay=0.01, max_steps=100)
    trainer = Trainer(model, args, train_dataset=data,
                      optimizers=(create_optimizer(model, args, max_rank=64), None),
                      callbacks=[SpectrumCallback("out/spectrum.jsonl", every=10)])
    trainer.train()
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, ExportableState

from adarank.analysis.hooks import SpectrumLogger
from adarank.groups import DEFAULT_EXCLUDE, _check_options, param_groups
from adarank.integrations.common import check_callback_options, find_optimizer, optimizer_scalars
from adarank.optimizer import AdaRankAdamW, GaLoreAdamW, QGaLoreAdamW

__all__ = [
    "OPTIMIZERS",
    "OptimizerFactory",
    "SpectrumCallback",
    "create_optimizer",
    "optimizer_cls_and_kwargs",
]

OPTIMIZERS: dict[str, type[AdaRankAdamW]] = {
    "adarank": AdaRankAdamW,
    "galore": GaLoreAdamW,
    "qgalore": QGaLoreAdamW,
}
# What create_optimizer reads from TrainingArguments (and so refuses as an option).
_FROM_ARGS = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "betas": "adam_beta1, adam_beta2",
    "eps": "adam_epsilon",
}


# Optimizers made by create_optimizer, for SpectrumCallback: a Trainer that builds its optimizer
# through optimizer_cls_and_kwargs never passes it to callbacks (their `optimizer` is None).
_CREATED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def _optimizer_of(model: torch.nn.Module | None, optimizer: Any) -> torch.optim.Optimizer | None:
    found = find_optimizer(optimizer)
    if found is not None or model is None:
        return found
    ids = {id(p) for p in model.parameters()}
    for candidate in list(_CREATED):
        if any(id(p) in ids for group in candidate.param_groups for p in group["params"]):
            return candidate
    return None


def _optimizer_class(optimizer: str | type[AdaRankAdamW]) -> type[AdaRankAdamW]:
    if isinstance(optimizer, type) and issubclass(optimizer, AdaRankAdamW):
        return optimizer
    if isinstance(optimizer, str) and optimizer in OPTIMIZERS:
        return OPTIMIZERS[optimizer]
    raise ValueError(f"optimizer={optimizer!r} is not known; choose one of {sorted(OPTIMIZERS)}")


def _check_create_options(options: dict[str, Any]) -> None:
    given = sorted(set(options) & set(_FROM_ARGS))
    if given:
        where = ", ".join(f"{key} from TrainingArguments.{_FROM_ARGS[key]}" for key in given)
        raise ValueError(f"create_optimizer takes {where}; set them there, not as options")
    _check_options(options)


def create_optimizer(
    model: torch.nn.Module,
    args: TrainingArguments,
    optimizer: str | type[AdaRankAdamW] = "adarank",
    *,
    target_modules: str | Iterable[str] | None = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    no_decay: bool = True,
    **options: Any,
) -> AdaRankAdamW:
    """An adarank optimizer for ``model``, configured from the Trainer's arguments.

    ``lr``, ``weight_decay``, ``betas`` and ``eps`` are ``args.learning_rate``,
    ``args.weight_decay``, ``(args.adam_beta1, args.adam_beta2)`` and ``args.adam_epsilon``
    (giving them again as options is a ``ValueError``). The groups are
    ``adarank.param_groups(model, target_modules=..., exclude=..., no_decay=...)``:
    ``target_modules`` defaults to ``args.optim_target_modules``, then to every linear layer
    except embeddings, ``lm_head``, task heads and poolers; as the Trainer does by default,
    biases and norm weights get no weight decay (``no_decay``). Parameter names are kept, so
    ``optimizer.ranks()`` is keyed by them.

    Args:
        model: the model the Trainer trains.
        args: its ``TrainingArguments``.
        optimizer: ``"adarank"`` (``AdaRankAdamW``), ``"galore"`` (``GaLoreAdamW``),
            ``"qgalore"`` (``QGaLoreAdamW``), or one of those classes.
        target_modules, exclude, no_decay: as in ``adarank.param_groups``.
        **options: low-rank options of the projected layers (``max_rank=64, eta=0.9``;
            GaLore's ``rank=64, update_proj_gap=200``).

    Use as ``Trainer(model, args, optimizers=(create_optimizer(model, args), None))``; the
    Trainer then builds its own learning-rate schedule on top.
    """
    cls = _optimizer_class(optimizer)
    _check_create_options(options)
    if target_modules is None:
        target_modules = getattr(args, "optim_target_modules", None)
    groups = param_groups(
        model, target_modules=target_modules, exclude=exclude, no_decay=no_decay, **options
    )
    made = cls(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    _CREATED.add(made)
    return made


class OptimizerFactory:
    """What ``Trainer(optimizer_cls_and_kwargs=(OptimizerFactory, kwargs))`` builds: the Trainer
    instantiates it and calls it with the model it trains and ``kwargs``."""

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> AdaRankAdamW:
        return create_optimizer(model, **kwargs)


def optimizer_cls_and_kwargs(
    args: TrainingArguments,
    optimizer: str | type[AdaRankAdamW] = "adarank",
    **options: Any,
) -> tuple[type[OptimizerFactory], dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer calls the factory with the model when it creates its optimizer: after wrapping
    it (FSDP), so the groups hold the parameters that are trained. That path is the one to use
    where the Trainer refuses ``optimizers=`` (FSDP). Options are those of
    :func:`create_optimizer` and are checked here, before training starts.

    Example::

        trainer = Trainer(model, args, train_dataset=data,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, max_rank=64))
    """
    _optimizer_class(optimizer)
    _check_create_options(
        {k: v for k, v in options.items() if k not in ("target_modules", "exclude", "no_decay")}
    )
    try:  # transformers builds a non-Optimizer class as a factory since its 5.x releases
        from transformers.trainer_optimizer import is_optimizer_factory

        builds_factories = is_optimizer_factory(OptimizerFactory)
    except ImportError:
        builds_factories = False
    if not builds_factories:
        raise ValueError(
            "this transformers version does not build optimizer factories; pass "
            "Trainer(optimizers=(create_optimizer(model, args), None)) instead"
        )
    return OptimizerFactory, {"args": args, "optimizer": optimizer, **options}


class SpectrumCallback(TrainerCallback, ExportableState):
    """Spectrum log and flat optimizer scalars for a ``transformers.Trainer`` run.

    Every ``every`` optimizer steps it records, with ``adarank.analysis.SpectrumLogger``, the
    singular values and ranks of each weight's gradient to ``path`` (JSON Lines, read by
    ``adarank-spectrum`` and ``adarank.analysis.load_log``). It records in
    ``on_pre_optimizer_step``: after gradient accumulation and clipping, before the step, so
    the spectra are of the gradient the optimizer receives. The record's loss is the mean
    training loss of the step's micro-batches as the model returned it (``output.loss``; None
    when the model computes none, e.g. a custom ``compute_loss``). The optimizer is found
    inside the Trainer's wrapper (accelerate's ``AcceleratedOptimizer``); with an adarank
    optimizer the record also holds each layer's rank, captured energy and refresh count.

    At every logging step it adds to the Trainer's logs (so TensorBoard, W&B and
    ``trainer.state.log_history`` show them): ``adarank/rank_mean/<type>`` per layer type (q,
    k, v, o, gate, up, down, ...), ``adarank/rank_mean``, ``adarank/state_MiB``,
    ``adarank/refreshes``, and ``adarank/spectrum_seconds`` (time spent recording). To be seen
    by the reporting callbacks, which the Trainer calls before user callbacks, it moves itself
    to the front of the Trainer's callback list when training begins.

    Resuming (``trainer.train(resume_from_checkpoint=...)``) appends to the log, whose reader
    keeps the later record of a step logged twice, and restores the callback's counters from
    the checkpoint's ``trainer_state.json``. Only the main process writes.

    Args:
        path: the spectrum log (JSON Lines); overwritten when a run starts at step 0.
        every: record when ``global_step % every == 0`` (global_step = steps taken so far).
        **logger_options: ``SpectrumLogger`` options (``top_k``, ``include`` as name patterns,
            ``exclude``, ``energy_levels``, ``exact_max_dim``, ``max_probe_rank``, ``seed``,
            ``run_name``, ``meta``), JSON-safe so the checkpoint can store them.
    """

    def __init__(self, path: str | os.PathLike, every: int = 50, **logger_options: Any):
        check_callback_options(every, logger_options)
        if callable(logger_options.get("include")):
            raise ValueError(
                "include must be name patterns (a checkpoint stores them), not a callable"
            )
        self.path = os.fspath(path)
        self.every = every
        self.logger_options = logger_options
        self.records = 0  # records written over the whole run, resumes included
        self.record_seconds = 0.0
        self.logger: SpectrumLogger | None = None
        self._losses: list[torch.Tensor] = []
        self._scaled_losses = False
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    # -- TrainerCallback -------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("SpectrumCallback needs the Trainer's model (got None)")
        self._move_to_front()
        self._close()
        resuming = state.global_step > 0
        if resuming:
            self._restore_counters(state)
        self.logger = SpectrumLogger(
            model,
            self.path,
            every=self.every,
            optimizer=_optimizer_of(model, optimizer),
            resume=resuming,
            **self.logger_options,
        )
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        losses, self._losses = self._losses, []
        if self.logger is None:
            return
        loss = None
        if losses:
            total = torch.stack(losses).sum()
            loss = total if self._scaled_losses else total / len(losses)
        seconds = self.logger.seconds
        if self.logger.record(state.global_step, loss=loss) is not None:
            self.records += 1
            self.record_seconds += self.logger.seconds - seconds

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs:  # training logs only, not eval or the summary
            return
        found = self.logger.optimizer if self.logger is not None else find_optimizer(optimizer)
        scalars = optimizer_scalars(found)
        scalars["adarank/spectrum_seconds"] = self.record_seconds
        logs.update(scalars)
        # Trainer.log stored a copy of these logs in log_history just before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._close()

    # -- ExportableState: stored in each checkpoint's trainer_state.json ---------------------

    def state(self) -> dict[str, Any]:
        return {
            "args": {"path": self.path, "every": self.every, **self.logger_options},
            "attributes": {"records": self.records, "record_seconds": self.record_seconds},
        }

    # -- internals ---------------------------------------------------------------------------

    def _keep_loss(
        self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().float().reshape(()))
            # With num_items_in_batch the model divides by the whole accumulated batch's count:
            # the micro-batch losses then add up to the step's loss instead of averaging to it.
            self._scaled_losses = kwargs.get("num_items_in_batch") is not None

    def _restore_counters(self, state: TrainerState) -> None:
        stored: Any = state.stateful_callbacks or {}
        saved = stored.get(type(self).__name__)
        if isinstance(saved, list):  # one entry per callback of this class
            saved = next((s for s in saved if s.get("args", {}).get("path") == self.path), None)
        if isinstance(saved, dict):
            attributes = saved.get("attributes", {})
            self.records = int(attributes.get("records", self.records))
            self.record_seconds = float(attributes.get("record_seconds", self.record_seconds))

    def _move_to_front(self) -> None:
        # The Trainer calls the reporting callbacks (TensorBoard, W&B, ...) before the ones the
        # user passes, and each reads ``logs`` when it is called: values added later would miss
        # them. Its callback list is the one that holds this callback and DefaultFlowCallback.
        for holder in gc.get_referrers(self):
            if (
                isinstance(holder, list)
                and any(c is self for c in holder)
                and any(isinstance(c, DefaultFlowCallback) for c in holder)
            ):
                position = next(i for i, c in enumerate(holder) if c is self)
                # Removing at i and inserting at 0 leaves every later index as it was, so a
                # loop over the list that is at this callback goes on with the next one.
                holder.insert(0, holder.pop(position))

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None
