"""SpectrumLogger: record the gradient spectra of a model's weight matrices during training."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, cast

import numpy as np
import torch

from adarank.analysis import metrics
from adarank.analysis.io import LogWriter
from adarank.analysis.layer_types import layer_type
from adarank.layerwise import ConsumedGrad, LayerwiseOptimizer

__all__ = ["SpectrumLogger"]

# What an adarank optimizer reports per parameter (its method), under the log's quantity names.
# captured_energy is the unsquared fraction ‖PᵀG‖_F/‖G‖_F, as of the optimizer's last step.
_PER_LAYER = {
    "optimizer_rank": "ranks",
    "captured_energy": "captured_energy",
    "refresh_count": "refresh_counts",
    "subspace_overlap": "subspace_overlaps",
}

Include = Callable[[str, torch.nn.Parameter], bool] | Iterable[str] | None


class SpectrumLogger:
    """Log, every ``every`` steps, the spectrum of each tracked weight's gradient G.

    Call :meth:`record` after ``loss.backward()`` and before ``optimizer.zero_grad()`` (or let
    :meth:`attach` call it from the optimizer's step pre-hook). For every tracked weight it writes
    the top ``top_k`` singular values of G, ‖G‖_F, the stable rank, the effective rank and the
    energy ranks at ``energy_levels`` (definitions in :mod:`analysis.metrics`); with an adarank
    optimizer (anything with ``ranks()``/``captured_energy()``) also the rank it is using, the
    fraction ‖PᵀG‖_F/‖G‖_F it last captured, its refresh count, and its state memory. Those are
    as of the optimizer's last ``step()`` (this step's has not run yet); a weight it has not yet
    stepped has no rank (null). With gradient accumulation, record after the last backward.
    A call that finds no gradient on any tracked weight (after ``zero_grad``, say) writes an empty
    record and warns.

    Layer-wise training (``adarank.layerwise``): gradients exist only inside backward, so pass the
    ``LayerwiseOptimizer`` as ``optimizer``; the logger then measures each tracked weight in the
    optimizer's per-parameter hook, just before that parameter's step, on iterations whose
    ``LayerwiseOptimizer.steps`` is a multiple of ``every``. Call ``record(lw.steps, loss=...)``
    after backward (before or after ``lw.step()``: the step is that of the backward), or
    ``attach()``; ``force`` cannot measure an iteration off the grid. The ranks and captured
    energy are as of each parameter's previous step, as above; ``state_bytes`` is read at
    ``record`` time, after this iteration's steps. Without the optimizer, ``record`` raises
    ``ValueError`` (the gradients it would read are consumed markers).

    Example::

        logger = SpectrumLogger(model, "runs/spectrum.jsonl", every=50, optimizer=optimizer)
        for step, batch in enumerate(loader):
            loss = model(batch).loss
            loss.backward()
            logger.record(step, loss=loss)
            optimizer.step()
            optimizer.zero_grad()
        logger.close()

    Tracked weights: every parameter with ``ndim >= 2`` that requires grad (a conv kernel is seen
    as the matrix out × in·kh·kw), filtered by ``include`` then ``exclude``.

    Cost: matrices whose smaller side is at most ``exact_max_dim`` get an exact SVD (all singular
    values); larger ones a randomized SVD of rank ``top_k`` from :func:`adarank.rsvd.randomized_svd`
    (8 oversamples, 2 power iterations, sketch seeded by (seed, layer, step)), doubled while the
    highest energy level is not reached, up to ``max_probe_rank``. For those, an energy rank still
    beyond it is logged as null, and the effective rank is that of the values computed. Steps
    that are not a multiple of ``every`` return at once.

    Args:
        model: the ``torch.nn.Module`` being trained.
        path: the log file (JSON Lines; see :mod:`analysis.io`). Overwritten unless ``resume``.
        every: record when ``step % every == 0``.
        top_k: how many leading singular values to store per weight.
        optimizer: optional; its class and hyper-parameters go into the header, and adarank
            optimizers' ranks into each record.
        include: None (every matrix), a callable ``(name, param) -> bool``, or parameter-name
            patterns (fnmatch globs, or substrings when they hold no wildcard).
        exclude: name substrings never tracked; embeddings and the output head by default, as
            in ``adarank.param_groups``.
        energy_levels: the η of the energy ranks, each in (0, 1].
        exact_max_dim: largest min(m, n) given an exact SVD.
        max_probe_rank: largest randomized-SVD rank tried for the energy ranks.
        seed: base seed of the randomized sketches.
        run_name: a label for plots and tables (default: the optimizer's class name).
        meta: extra JSON-safe facts stored in the header (data set, learning-rate schedule, ...).
        resume: append to an existing log (after restoring a checkpoint); records of steps
            logged again replace the earlier ones when the log is loaded.

    Under ``torch.distributed`` only global rank 0 writes (gradients are identical across DDP
    ranks after the all-reduce); other ranks' ``record`` does nothing.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        path: str | os.PathLike,
        *,
        every: int = 50,
        top_k: int = 64,
        optimizer: torch.optim.Optimizer | None = None,
        include: Include = None,
        exclude: Iterable[str] = ("embed", "lm_head"),
        energy_levels: Iterable[float] = (0.9, 0.95, 0.99),
        exact_max_dim: int = 512,
        max_probe_rank: int = 256,
        seed: int = 0,
        run_name: str | None = None,
        meta: Mapping[str, Any] | None = None,
        resume: bool = False,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        self.energy_levels = tuple(float(eta) for eta in energy_levels)
        if not self.energy_levels or not all(0 < eta <= 1 for eta in self.energy_levels):
            raise ValueError(f"energy_levels must be in (0, 1], got {self.energy_levels}")
        if exact_max_dim < 0 or max_probe_rank < 1:
            raise ValueError("exact_max_dim must be >= 0 and max_probe_rank >= 1")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.top_k = top_k
        self.exact_max_dim = int(exact_max_dim)
        self.max_probe_rank = int(max_probe_rank)
        self.seed = int(seed)
        self.seconds = 0.0  # wall time spent inside record(), the logger's whole overhead
        self._tracked = _select(model, include, tuple(exclude))
        self._t_start = time.perf_counter()
        self._writer: LogWriter | None = None
        if _is_writing_rank():
            self._writer = LogWriter(path, self._header(run_name, meta), resume=resume)
        # Layer-wise: measurements taken inside backward, waiting for record(step).
        self._layerwise = isinstance(optimizer, LayerwiseOptimizer)
        self._pending: dict[str, dict[str, Any]] = {}
        self._pending_step: int | None = None
        self._pending_seconds = 0.0
        self._hook_handle = None
        self._index_of: dict[int, int] = {}
        if isinstance(optimizer, LayerwiseOptimizer) and self._writer is not None:
            self._index_of = {id(param): i for i, (_, param) in enumerate(self._tracked)}
            self._hook_handle = optimizer.register_param_step_hook(
                self._measure_in_backward, every=self.every
            )

    # -- public ------------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self._tracked]

    def record(
        self, step: int, *, loss: float | torch.Tensor | None = None, force: bool = False
    ) -> dict[str, Any] | None:
        """Measure the current gradients and append a record, if ``step % every == 0`` or ``force``.

        Args:
            step: the training step (the number of optimizer steps already taken).
            loss: optional loss of this step, stored with the record for loss curves.
            force: record even off the ``every`` grid (e.g. the last step).

        Returns:
            The record written (a dict), or None when nothing was recorded.
        """
        if self._writer is None or (step % self.every and not force):
            return None
        started = time.perf_counter()
        if self._layerwise:
            layers = self._take_pending(step)
        else:
            layers = {}
            with torch.no_grad():
                for index, (name, param) in enumerate(self._tracked):
                    grad = _grad_of(param)
                    if isinstance(grad, ConsumedGrad):
                        raise ValueError(
                            f"SpectrumLogger.record: the gradient of {name} was consumed inside "
                            "backward by a layer-wise optimizer (adarank.layerwise); pass "
                            "optimizer=<the LayerwiseOptimizer> to SpectrumLogger so that it "
                            "measures the gradients there"
                        )
                    if grad is not None and grad.layout == torch.strided:
                        layers[name] = self._measure(grad, index, step)
        if self._tracked and not layers:
            warnings.warn(
                f"SpectrumLogger.record(step={step}): none of the {len(self._tracked)} tracked "
                "weights has a gradient, so the record holds no layers; call record() after "
                "backward() and before zero_grad()",
                stacklevel=2,
            )
        record: dict[str, Any] = {
            "kind": "record",
            "step": int(step),
            "time": started - self._t_start,
            "loss": None if loss is None else float(torch.as_tensor(loss).detach()),
        }
        record.update(self._optimizer_facts(layers))
        record["layers"] = layers
        measured_in_backward, self._pending_seconds = self._pending_seconds, 0.0
        record["record_seconds"] = time.perf_counter() - started + measured_in_backward
        self._writer.append(record)
        self.seconds += time.perf_counter() - started + measured_in_backward
        return record

    def attach(
        self, optimizer: torch.optim.Optimizer | None = None, *, start_step: int | None = None
    ):
        """Record automatically just before every ``optimizer.step()``, when gradients are final.

        Steps count optimizer steps from ``start_step`` (default 0); no loss is stored. For a
        ``LayerwiseOptimizer`` (which must be the logger's own ``optimizer``) the step is its
        ``steps`` count and ``start_step``, if given, must equal it. Returns the hook handle
        (``handle.remove()`` detaches).
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise ValueError("attach() needs an optimizer (pass one here or to SpectrumLogger)")
        if isinstance(optimizer, LayerwiseOptimizer):
            return self._attach_layerwise(optimizer, start_step)
        step = 0 if start_step is None else start_step

        def before_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            nonlocal step
            self.record(step)
            step += 1

        return optimizer.register_step_pre_hook(before_step)

    def _attach_layerwise(self, optimizer: LayerwiseOptimizer, start_step: int | None):
        if optimizer is not self.optimizer:
            raise ValueError(
                "attach(): a LayerwiseOptimizer must be the one passed to "
                "SpectrumLogger(optimizer=...), which measures its gradients inside backward"
            )
        if start_step is not None and start_step != optimizer.steps:
            raise ValueError(
                f"attach(): start_step={start_step}, but layer-wise steps are counted by the "
                f"LayerwiseOptimizer, now at steps={optimizer.steps}; leave start_step out"
            )

        def before_step(lw: LayerwiseOptimizer, _args: Any, _kwargs: Any) -> None:
            self.record(lw.steps)

        return optimizer.register_step_pre_hook(before_step)

    def close(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> SpectrumLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- measurement -------------------------------------------------------------------------

    def _measure_in_backward(
        self, _name: str, param: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> None:
        """LayerwiseOptimizer hook: measure ``param``'s gradient before its step, if due."""
        step = cast(LayerwiseOptimizer, self.optimizer).steps
        index = self._index_of.get(id(param))
        if step % self.every or index is None:
            return
        started = time.perf_counter()
        if self._pending_step != step:
            self._pending, self._pending_step = {}, step
        grad = _grad_of(param)
        if grad is not None and grad.layout == torch.strided:
            with torch.no_grad():
                out = self._measure(grad, index, step)
            for quantity, method in _PER_LAYER.items():
                values = getattr(optimizer, method)() if hasattr(optimizer, method) else {}
                if len(values) == 1:  # one parameter per optimizer
                    out[quantity] = _fact(quantity, next(iter(values.values())))
            self._pending[self._tracked[index][0]] = out
        self._pending_seconds += time.perf_counter() - started

    def _take_pending(self, step: int) -> dict[str, dict[str, Any]]:
        if self._pending_step != step:
            raise ValueError(
                f"SpectrumLogger.record(step={step}): in layer-wise mode gradients are measured "
                "inside backward, on iterations whose LayerwiseOptimizer.steps is a multiple of "
                f"every={self.every}, and none were measured for step {step} (the optimizer is "
                f"at steps={cast(LayerwiseOptimizer, self.optimizer).steps}). Call "
                "record(lw.steps) after each backward, or use attach()"
            )
        layers, self._pending, self._pending_step = self._pending, {}, None
        return layers

    def _measure(self, grad: torch.Tensor, index: int, step: int) -> dict[str, Any]:
        G = grad.detach().reshape(grad.shape[0], -1).float()
        energy = float(torch.linalg.vector_norm(G, dtype=torch.float64) ** 2)
        out: dict[str, Any] = {"fro_norm": energy**0.5}
        if not np.isfinite(energy):
            return out  # a NaN/Inf gradient has no spectrum; the norm says so
        if energy == 0:
            s = np.zeros(min(self.top_k, min(G.shape)))
        elif min(G.shape) <= self.exact_max_dim:
            s = torch.linalg.svdvals(G).cpu().double().numpy()
        else:
            s = self._randomized_spectrum(G, energy, index, step)
        out["sv"] = s[: self.top_k]
        out["stable_rank"] = energy / s[0] ** 2 if s[0] > 0 else 0.0
        out["effective_rank"] = metrics.effective_rank(s)
        for eta in self.energy_levels:
            out[f"energy_rank_{eta:g}"] = metrics.energy_rank(s, eta, total_energy=energy)
        return out

    def _randomized_spectrum(self, G: torch.Tensor, energy: float, index: int, step: int):
        largest = min(min(G.shape), max(self.max_probe_rank, self.top_k))
        rank = min(self.top_k, largest)
        seed = int(np.random.SeedSequence([self.seed, index, step]).generate_state(1)[0])
        while True:
            s = _top_singular_values(G, rank, seed)
            enough = metrics.energy_rank(s, max(self.energy_levels), total_energy=energy)
            if enough is not None or rank >= largest:
                return s
            rank = min(2 * rank, largest)

    # -- optimizer and header ----------------------------------------------------------------

    def _optimizer_names(self) -> dict[str, str]:
        """Map the optimizer's parameter keys (group ``param_names`` or global index) to ours."""
        by_id = {id(param): name for name, param in self.model.named_parameters()}
        keys: dict[str, str] = {}
        if self.optimizer is None:
            return keys
        index = 0
        for group in self.optimizer.param_groups:
            names = group.get("param_names")
            for position, param in enumerate(group["params"]):
                key = names[position] if names and position < len(names) else str(index)
                if id(param) in by_id:
                    keys[str(key)] = by_id[id(param)]
                index += 1
        return keys

    def _optimizer_facts(self, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Per-layer rank/captured energy/refresh count from an adarank optimizer, plus memory."""
        optimizer = self.optimizer
        if optimizer is None:
            return {}
        found = {q: getattr(optimizer, m)() for q, m in _PER_LAYER.items() if hasattr(optimizer, m)}
        if found and not self._layerwise:  # layer-wise: taken inside backward
            names = self._optimizer_names()
            for quantity, values in found.items():
                for key, value in values.items():
                    name = names.get(str(key))
                    if name in layers:
                        layers[name][quantity] = _fact(quantity, value)
        facts: dict[str, Any] = {}
        if hasattr(optimizer, "state_bytes"):
            facts["state_bytes"] = dict(optimizer.state_bytes())
        if getattr(optimizer, "state_budget", None) is not None:
            # The allocation: the ranks are in the layers; the budget and its use here.
            report = cast(Any, optimizer).budget_report()
            facts["budget"] = {k: report[k] for k in ("budget", "used", "reserved")}
        return facts

    def _header(self, run_name: str | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        model = self.model
        params = list(model.parameters())
        layers = []
        for name, param in self._tracked:
            rows, cols = param.shape[0], param[0].numel()
            layers.append(
                {
                    "name": name,
                    "type": layer_type(name),
                    "shape": list(param.shape),
                    "matrix_shape": [rows, cols],
                    "svd": "exact" if min(rows, cols) <= self.exact_max_dim else "randomized",
                }
            )
        return {
            "run_name": run_name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "class": type(model).__name__,
                "module": type(model).__module__,
                "num_parameters": sum(p.numel() for p in params),
                "dtype": str(params[0].dtype) if params else None,
                "device": str(params[0].device) if params else None,
            },
            "layers": layers,
            "optimizer": _describe_optimizer(self.optimizer),
            "settings": {
                "every": self.every,
                "top_k": self.top_k,
                "energy_levels": list(self.energy_levels),
                "exact_max_dim": self.exact_max_dim,
                "max_probe_rank": self.max_probe_rank,
                "seed": self.seed,
            },
            "versions": _versions(),
            "meta": dict(meta or {}),
        }


def _select(
    model: torch.nn.Module, include: Include, exclude: tuple[str, ...]
) -> list[tuple[str, torch.nn.Parameter]]:
    if include is None:
        wanted: Callable[[str, torch.nn.Parameter], bool] = lambda name, param: True  # noqa: E731
    elif callable(include):
        wanted = include
    else:
        patterns = [include] if isinstance(include, str) else list(include)

        def wanted(name: str, param: torch.nn.Parameter) -> bool:
            return any(
                fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name
                for p in patterns
            )

    return [
        (name, param)
        for name, param in model.named_parameters()
        if param.ndim >= 2
        and param.requires_grad
        and wanted(name, param)
        and not any(word in name for word in exclude)
    ]


def _grad_of(param: torch.Tensor) -> torch.Tensor | None:
    return param.grad  # an INT8 weight (adarank.Int8Linear) too has a float .grad


def _fact(quantity: str, value: Any) -> Any:
    # adarank reports rank 0 for a weight it has not stepped yet: no subspace.
    return None if quantity == "optimizer_rank" and value == 0 else value


def _top_singular_values(G: torch.Tensor, rank: int, seed: int) -> np.ndarray:
    from adarank.rsvd import randomized_svd

    _, S, _ = randomized_svd(G, rank, oversample=8, power_iters=2, seed=seed)
    return S.cpu().double().numpy()


def _describe_optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    if isinstance(optimizer, LayerwiseOptimizer):
        inner = _describe_optimizer(next(iter(optimizer.optimizers.values())))
        assert inner is not None
        return {
            **inner,
            "class": type(optimizer).__name__,
            "module": type(optimizer).__module__,
            "inner_class": inner["class"],
            "groups": [
                group
                for opt in optimizer.optimizers.values()
                for group in _describe_optimizer(opt)["groups"]
            ],
        }
    skip = ("params", "param_names")
    groups = []
    for group in optimizer.param_groups:
        described = {key: value for key, value in group.items() if key not in skip}
        described["num_params"] = len(group["params"])
        if group.get("param_names"):
            described["param_names"] = list(group["param_names"])
        groups.append(described)
    return {
        "class": type(optimizer).__name__,
        "module": type(optimizer).__module__,
        "defaults": {k: v for k, v in optimizer.defaults.items() if k not in skip},
        "groups": groups,
        "reports_ranks": hasattr(optimizer, "ranks"),
    }


def _versions() -> dict[str, str | None]:
    def installed(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "adarank": installed("adarank"),
        "platform": platform.platform(),
    }


def _is_writing_rank() -> bool:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return True
