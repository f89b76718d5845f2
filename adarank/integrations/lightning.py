"""adarank under Lightning: ``SpectrumCallback``, the spectrum log and flat optimizer scalars.

The optimizer is the one ``configure_optimizers`` returns, built as anywhere else::

    class Model(lightning.LightningModule):
        def configure_optimizers(self):
            return adarank.AdaRankAdamW(adarank.param_groups(self, no_decay=True), lr=1e-3,
                                        weight_decay=0.01, max_rank=64)

    trainer = lightning.Trainer(max_steps=100,
                                callbacks=[SpectrumCallback("out/spectrum.jsonl", every=10)])
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from adarank.analysis.hooks import SpectrumLogger
from adarank.integrations.common import (
    check_callback_options,
    find_optimizer,
    optimizer_scalars,
    reports_ranks,
)

__all__ = ["SpectrumCallback"]


class SpectrumCallback(pl.Callback):
    """Spectrum log and flat optimizer scalars for a ``lightning.Trainer`` run.

    Every ``every`` optimizer steps it records, with ``adarank.analysis.SpectrumLogger``, each
    weight's gradient spectrum and ranks to ``path`` (JSON Lines), in
    ``on_before_optimizer_step``: after gradient accumulation, before the step. Lightning calls
    that hook *before* it clips gradients, so with ``gradient_clip_val`` the logged norms and
    singular values are those of the unclipped gradient (clipping by norm scales every σ by one
    factor and leaves the ranks as they are). The record's loss is the step's training loss:
    the sum of the losses Lightning passes to ``backward`` (each already divided by
    ``accumulate_grad_batches``). The optimizer is the first of ``trainer.optimizers`` that is
    adarank's (else the first); with several, only its steps are recorded.

    On every training batch it logs through ``LightningModule.log_dict`` (so any Lightning
    logger shows them, every ``log_every_n_steps``): ``adarank/rank_mean/<type>`` per layer
    type, ``adarank/rank_mean``, ``adarank/state_MiB``, ``adarank/refreshes`` and
    ``adarank/spectrum_seconds``.

    Resuming (``trainer.fit(model, ckpt_path=...)``) appends to the log and restores the
    callback's counters from the checkpoint. Only global rank 0 writes.

    Args:
        path: the spectrum log; overwritten when a run starts at step 0.
        every: record when ``trainer.global_step % every == 0`` (steps taken so far).
        **logger_options: ``SpectrumLogger`` options (``top_k``, ``include``, ``exclude``,
            ``energy_levels``, ``exact_max_dim``, ``max_probe_rank``, ``seed``, ``run_name``,
            ``meta``).
    """

    def __init__(self, path: str | os.PathLike, every: int = 50, **logger_options: Any):
        check_callback_options(every, logger_options)
        self.path = os.fspath(path)
        self.every = every
        self.logger_options = logger_options
        self.records = 0
        self.record_seconds = 0.0
        self.logger: SpectrumLogger | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._losses: list[torch.Tensor] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path)

    # -- hooks -------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        optimizers = [find_optimizer(o) for o in trainer.optimizers]
        chosen = next((o for o in optimizers if reports_ranks(o)), None)
        self.optimizer = chosen if chosen is not None else (optimizers or [None])[0]
        self.logger = SpectrumLogger(
            pl_module,
            self.path,
            every=self.every,
            optimizer=self.optimizer,
            resume=trainer.global_step > 0,
            **self.logger_options,
        )

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if loss.numel() == 1:
            self._losses.append(loss.detach().float().reshape(()))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.logger is None or find_optimizer(optimizer) is not self.optimizer:
            return
        losses, self._losses = self._losses, []
        loss = torch.stack(losses).sum() if losses else None
        seconds = self.logger.seconds
        if self.logger.record(trainer.global_step, loss=loss) is not None:
            self.records += 1
            self.record_seconds += self.logger.seconds - seconds

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        scalars = optimizer_scalars(self.optimizer)
        if scalars:
            scalars["adarank/spectrum_seconds"] = self.record_seconds
            pl_module.log_dict(scalars, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    # -- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records, "record_seconds": self.record_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = int(state_dict["records"])
        self.record_seconds = float(state_dict["record_seconds"])

    def _close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None
