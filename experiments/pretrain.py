"""Pre-train a LLaMA-style decoder on the Shakespeare corpus with AdamW, GaLore or AdaRankAdamW.

One command per run; the resolved configuration is written next to the results::

    python -m experiments.pretrain --optimizer adarank --model cpu --steps 300 \\
        --out results/cpu_adarank
    python -m experiments.pretrain --config experiments/configs/gpu_60m.json --optimizer galore

Flags are the fields of `TrainConfig` (``--batch-size`` or ``--batch_size``); ``--config`` reads
a JSON object of the same fields first, and flags given on the command line override it. An
unknown flag or key is an error. Defaults left as ``None`` are resolved from the model (see
`MODEL_DEFAULTS`) and the optimizer (`DEFAULT_LR`) and written to ``config.json`` resolved.

Comparisons are fair by construction: for one seed every optimizer starts from the same weights,
sees the same batches in the same order (`experiments.data.BatchSampler`) and follows the same
warm-up + cosine schedule. The low-rank optimizers project the attention and MLP matrices
(``adarank.param_groups(model, exclude=("embed", "lm_head"))``); embeddings, the output layer
and the norms get plain AdamW inside the same optimizer, as in the GaLore paper.

Outputs in ``--out`` (default ``results/<model>_<optimizer>``):

- ``config.json``: the resolved `TrainConfig`.
- ``metrics.jsonl``: a ``header`` line (parameter counts, data card, versions), then one
  ``train`` line per step (``step`` = optimizer steps taken, ``loss``, ``lr``, ``tokens``,
  ``step_seconds``, ``tokens_per_s``), an ``eval`` line every ``eval_every`` steps and at the end
  (``val_loss``, ``val_ppl``, ``state_bytes``, ``peak_memory_bytes``, ``ranks``), and a ``final``
  line that repeats ``summary.json``.
- ``spectrum.jsonl``: the `analysis.SpectrumLogger` log (when ``spectrum_every`` > 0).
- ``spectrum_ema.jsonl``: with ``spectrum_ema`` = β > 0, the same log at the same steps for the
  bias-corrected exponential moving average of the raw gradient, Ĝ_t = EMA_β(G)/(1 − βᵗ): the
  gradient's signal with most of the mini-batch sampling noise averaged out (the rank study).
- ``ckpt.pt``: model, optimizer, scheduler, sampler position and RNG state, every
  ``ckpt_every`` steps; ``torch.load(..., weights_only=True)`` reads it.

Resuming: run the same command with ``--resume`` (or only ``--out DIR --resume``). The run
continues from ``ckpt.pt`` and produces the same weights and log lines as an uninterrupted one;
``metrics.jsonl`` is cut back to the checkpoint, so steps re-run after a kill are not logged twice.
With ``--resume`` and no checkpoint yet the run starts from scratch. Without it, an ``--out`` that
already holds a run is an error unless ``--overwrite``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's maximum resident
set size (``ru_maxrss``), which includes Python and the torch libraries (about 0.3 GB here) and so
compares optimizers only by its differences.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import clip_grad_norm_

from experiments import data as data_mod
from experiments import measure, runconfig, runfiles
from experiments.model import CONFIGS, PAPER_RANKS, Decoder, count_parameters, get_config
from experiments.optim import EXCLUDE
from experiments.optim import build_optimizer as build_named_optimizer
from experiments.runconfig import option

OPTIMIZERS = ("adamw", "galore", "qgalore", "adarank")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Learning rates of the GaLore paper: AdamW 1e-3; GaLore 1e-2 with α = 0.25 (arXiv 2403.03507).
DEFAULT_LR = {"adamw": 1e-3, "galore": 1e-2, "qgalore": 1e-2, "adarank": 1e-2}

# Per-model defaults for the fields left as None: sequence length, batch size, and the refresh gap
# T (GaLore's 200 for the paper shapes; shorter for the CPU models, which train only hundreds of
# steps, so that the rank trajectory has more than two points).
MODEL_DEFAULTS: dict[str, dict[str, int]] = {
    "tiny": {"seq_len": 64, "batch_size": 4, "update_gap": 10},
    "cpu": {"seq_len": 128, "batch_size": 8, "update_gap": 50},
    "60m": {"seq_len": 256, "batch_size": 64, "update_gap": 200},
    "130m": {"seq_len": 256, "batch_size": 64, "update_gap": 200},
    "350m": {"seq_len": 256, "batch_size": 32, "update_gap": 200},
    "1b": {"seq_len": 256, "batch_size": 16, "update_gap": 200},
}

CHECKPOINT = "ckpt.pt"
# The files of a run: an --out holding any of them is a run (see runfiles.prepare_out_dir).
PRODUCTS = ("config.json", "metrics.jsonl", "spectrum.jsonl", "summary.json", CHECKPOINT)
# The data card's fields copied into the metrics header.
DATA_CARD_KEYS = (
    "source",
    "licence",
    "vocab_size",
    "train_tokens",
    "val_tokens",
    "train_files",
    "val_files",
    "key",
)
# Fields that may differ between a run and its resumption: they do not change the result.
RUNTIME_FIELDS = ("resume", "overwrite", "progress", "threads", "out", "data_cache")


@dataclass
class TrainConfig:
    """Every setting of a pre-training run (flags of the command line; ``None``: resolved)."""

    model: str = field(default="cpu", metadata={"help": f"model shape: {', '.join(CONFIGS)}"})
    optimizer: str = field(
        default="adarank", metadata={"help": "adamw | galore | qgalore (INT8 weights) | adarank"}
    )
    out: str | None = option("output directory (default results/<model>_<optimizer>)")
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int | None = option("sequences per micro-batch (default: per model)")
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int | None = option("tokens per sequence (default: per model)")
    lr: float | None = option("peak learning rate (default: 1e-3 adamw, 1e-2 galore/adarank)")
    warmup_steps: int | None = option("linear warm-up steps (default: 10%% of steps)")
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr (cosine)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "Adam β1"})
    beta2: float = field(default=0.999, metadata={"help": "Adam β2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    rank: int | None = option("GaLore rank / AdaRank max rank (default: paper's, else d/4)")
    update_gap: int | None = option("refresh gap T in steps (default: per model)")
    scale: float = field(default=0.25, metadata={"help": "back-projection scale α"})
    eta: float = field(default=0.9, metadata={"help": "AdaRank energy threshold η"})
    lowrank: str = field(
        default="{}",
        metadata={"help": 'JSON of further low-rank options, e.g. \'{"moments": "reset"}\''},
    )
    state_budget: str | None = option(
        "optimizer-state budget of the low-rank optimizers, bytes or e.g. 36MiB (default: none)"
    )
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size"})
    max_works: int | None = option("use only the first n works (smoke tests)")
    data_cache: str | None = option(
        f"token cache dir (default ${data_mod.CACHE_ENV} or data_cache/)"
    )
    eval_every: int = field(default=50, metadata={"help": "steps between validations"})
    eval_windows: int | None = field(
        default=256, metadata={"help": "validation windows, evenly spread (none: all disjoint)"}
    )
    ckpt_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    spectrum_every: int = field(default=25, metadata={"help": "steps between spectra (0: off)"})
    spectrum_ema: float = field(
        default=0.0,
        metadata={
            "help": "β of a gradient moving average also logged (spectrum_ema.jsonl; 0: off)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of weights, batches and sketches"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 (weights)"})
    threads: int | None = option("torch CPU threads (default: torch's)")
    resume: bool = field(default=False, metadata={"help": "continue from out/ckpt.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run in out"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in and every value checked."""
        if self.model not in CONFIGS:
            raise ValueError(f"model must be one of {sorted(CONFIGS)}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:i], got {self.device!r}")
        shape = CONFIGS[self.model]
        per_model = MODEL_DEFAULTS[self.model]
        c = dataclasses.replace(self)
        c.out = c.out or f"results/{c.model}_{c.optimizer}"
        for name in ("batch_size", "seq_len", "update_gap"):
            if getattr(c, name) is None:
                setattr(c, name, per_model[name])
        if c.lr is None:
            c.lr = DEFAULT_LR[c.optimizer]
        if c.warmup_steps is None:
            c.warmup_steps = max(1, c.steps // 10)
        if c.rank is None:
            c.rank = PAPER_RANKS.get(c.model, shape.d_model // 4)
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "rank", "update_gap"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        for name in ("eval_every", "ckpt_every"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        if c.spectrum_every < 0 or c.warmup_steps < 0:
            raise ValueError("spectrum_every and warmup_steps must be >= 0")
        if not 0.0 <= c.spectrum_ema < 1.0:
            raise ValueError(f"spectrum_ema must be in [0, 1) (0: off), got {c.spectrum_ema}")
        if c.spectrum_ema > 0 and c.spectrum_every <= 0:
            raise ValueError("spectrum_ema needs spectrum_every > 0 (it logs at the same steps)")
        if c.eval_windows is not None and c.eval_windows < 1:
            raise ValueError(f"eval_windows must be >= 1 or none, got {c.eval_windows}")
        if not 0.0 <= c.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}")
        if c.lr <= 0:
            raise ValueError(f"lr must be > 0, got {c.lr}")
        if c.state_budget is not None and c.optimizer == "adamw":
            raise ValueError("state_budget is an option of the low-rank optimizers, not adamw")
        extra = json.loads(c.lowrank)
        if not isinstance(extra, dict):
            raise ValueError(f"lowrank must be a JSON object, got {c.lowrank!r}")
        return c


# ----------------------------------------------------------------------------- command line

CHOICES = {"model": list(CONFIGS), "optimizer": OPTIMIZERS, "dtype": list(DTYPES)}
PROG = "python -m experiments.pretrain"
DESCRIPTION = (
    "Pre-train a LLaMA-style decoder on Shakespeare with AdamW, GaLore or "
    "AdaRankAdamW; writes config.json, metrics.jsonl, spectrum.jsonl and ckpt.pt in --out."
)


def build_parser() -> argparse.ArgumentParser:
    return runconfig.build_parser(TrainConfig, prog=PROG, description=DESCRIPTION, choices=CHOICES)


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line (and ``--config``) into a resolved `TrainConfig`.

    With ``--resume`` and a ``config.json`` in the output directory, that file is the base and
    the flags given must agree with it (except `RUNTIME_FIELDS`).
    """
    values = runconfig.parse_values(
        TrainConfig, argv, prog=PROG, description=DESCRIPTION, choices=CHOICES
    )
    if values.get("resume"):
        wanted = asdict(TrainConfig(**values).resolved())
        saved_path = Path(wanted["out"]) / "config.json"
        if saved_path.is_file():
            saved = runconfig.read_settings(TrainConfig, saved_path)
            runconfig.refuse_changes(
                saved, wanted, keys=values, where=str(saved_path), allowed=RUNTIME_FIELDS
            )
            values = {**saved, **{k: values[k] for k in RUNTIME_FIELDS if k in values}}
    return TrainConfig(**values).resolved()


# ----------------------------------------------------------------------------- building blocks


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


class _Schedule:
    """Picklable lr multiplier for ``LambdaLR`` (a closure would not survive its state_dict)."""

    def __init__(self, steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.steps, self.warmup_steps, self.min_lr_ratio = steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(
            step, steps=self.steps, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio
        )


def build_optimizer(model: torch.nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer (`experiments.optim.build_optimizer` with its settings)."""
    return build_named_optimizer(
        c.optimizer,
        model,
        lr=c.lr,
        rank=c.rank,
        eta=c.eta,
        update_gap=c.update_gap,
        scale=c.scale,
        seed=c.seed,
        betas=(c.beta1, c.beta2),
        weight_decay=c.weight_decay,
        group_options=json.loads(c.lowrank),
        **({} if c.state_budget is None else {"state_budget": c.state_budget}),
    )


def logged_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Optimizer state bytes as the logs hold them: adarank's by kind, AdamW's total only (its
    runs have logged the total alone from the start; a resumed run's lines stay alike)."""
    sizes = measure.state_bytes(optimizer)
    return sizes if hasattr(optimizer, "state_bytes") else {"total": sizes["total"]}


def _make_spectrum_logger(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    c: TrainConfig,
    resume: bool,
    *,
    ema: bool = False,
) -> Any:
    if c.spectrum_every <= 0 or (ema and c.spectrum_ema <= 0):
        return None
    try:
        from adarank.analysis.hooks import SpectrumLogger
    except ImportError:
        print("analysis.SpectrumLogger not importable; spectrum log skipped", file=sys.stderr)
        return None
    return SpectrumLogger(
        model,
        Path(c.out) / ("spectrum_ema.jsonl" if ema else "spectrum.jsonl"),
        every=c.spectrum_every,
        optimizer=optimizer,
        seed=c.seed,
        run_name=f"{c.model}-{c.optimizer}" + (f"-ema{c.spectrum_ema:g}" if ema else ""),
        resume=resume,
        meta={
            "model": c.model,
            "optimizer": c.optimizer,
            "steps": c.steps,
            "lr": c.lr,
            "schedule": "linear warm-up + cosine",
            "data": "shakespeare",
            "tokens_per_step": c.batch_size * c.seq_len * c.grad_accum,
            "measured": f"gradient EMA, beta={c.spectrum_ema:g}" if ema else "gradient",
        },
    )


class GradientEMA:
    """Ĝ = EMA_β(G) / (1 − βᵗ) of the named weights' raw gradients, for the spectrum log.

    ``update()`` after each step's last backward; ``swapped()`` puts Ĝ into ``.grad`` for the
    duration of a logger's ``record`` and puts the real gradients back afterwards.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], beta: float) -> None:
        self.params, self.beta, self.count = params, beta, 0
        self.average = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def update(self) -> None:
        self.count += 1
        for name, p in self.params.items():
            if p.grad is not None:
                self.average[name].lerp_(p.grad.float(), 1.0 - self.beta)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        saved = {name: p.grad for name, p in self.params.items()}
        correction = 1.0 - self.beta**self.count
        try:
            for name, p in self.params.items():
                p.grad = (self.average[name] / correction).to(p.dtype)
            yield
        finally:
            for name, p in self.params.items():
                p.grad = saved[name]

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "average": dict(self.average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        for name, value in state["average"].items():
            self.average[name].copy_(value)


def _header(c: TrainConfig, model: torch.nn.Module, model_config: Any, corpus: Any) -> dict:
    """The first line of ``metrics.jsonl``: what the run is, on what data and software."""
    device = torch.device(c.device)
    return {
        "kind": "header",
        "config": asdict(c),
        "model_config": asdict(model_config),
        "parameters": count_parameters(model),
        "data": {k: corpus.meta[k] for k in DATA_CARD_KEYS},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- the run


def train(c: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one pre-training run; returns the summary also written to summary.json."""
    c = c.resolved()
    if c.threads:
        torch.set_num_threads(c.threads)
    device = torch.device(c.device)
    if device.type == "cuda":
        measure.reset_peak(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs; bf16 is unaffected
    out = Path(c.out)
    resuming = runfiles.prepare_out_dir(
        out, PRODUCTS, checkpoint=CHECKPOINT, resume=c.resume, overwrite=c.overwrite
    )
    if resuming and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text())
        runconfig.refuse_changes(
            saved, asdict(c), keys=saved, where=str(out / "config.json"), allowed=RUNTIME_FIELDS
        )
    runfiles.write_json(out / "config.json", asdict(c))

    corpus = data_mod.prepare(
        data_mod.DataConfig(vocab_size=c.vocab_size, max_works=c.max_works), c.data_cache
    )
    train_tokens, val_tokens = corpus.train(), corpus.val()

    torch.manual_seed(c.seed)
    model_config = get_config(
        c.model,
        vocab_size=corpus.vocab_size,
        max_seq_len=max(c.seq_len, CONFIGS[c.model].max_seq_len),
    )
    model = Decoder(model_config).to(device=device, dtype=DTYPES[c.dtype])
    if c.optimizer == "qgalore":
        # Q-GaLore keeps the projected layers' weights in INT8 (adarank.Int8Linear).
        import adarank

        adarank.quantize_linears(model, exclude=EXCLUDE)
    optimizer = build_optimizer(model, c)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Schedule(c.steps, c.warmup_steps, c.min_lr_ratio)
    )
    sampler = data_mod.BatchSampler(train_tokens, c.batch_size, c.seq_len, seed=c.seed)

    start_step, train_seconds, tokens = 0, 0.0, 0
    metrics_offset = None
    last_eval: dict[str, Any] = {}
    if resuming:
        ckpt = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["sampler"])
        runfiles.set_rng_state(ckpt["rng"], device)
        start_step, train_seconds, tokens = ckpt["step"], ckpt["train_seconds"], ckpt["tokens"]
        metrics_offset = ckpt["metrics_offset"]
        last_eval = ckpt["last_eval"]
    metrics = runfiles.JsonLines(out / "metrics.jsonl", metrics_offset)
    if not resuming:
        metrics.write(_header(c, model, model_config, corpus))
    spectrum = _make_spectrum_logger(model, optimizer, c, resume=resuming)
    spectrum_ema = _make_spectrum_logger(model, optimizer, c, resume=resuming, ema=True)
    gradient_ema = None
    if spectrum_ema is not None:
        named = dict(model.named_parameters())
        gradient_ema = GradientEMA({n: named[n] for n in spectrum_ema.layer_names}, c.spectrum_ema)
        if resuming:
            gradient_ema.load_state_dict(ckpt["gradient_ema"])
    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum

    def evaluate(step: int) -> dict[str, Any]:
        val_loss = data_mod.evaluate(
            model,
            val_tokens,
            c.seq_len,
            batch_size=c.batch_size,
            n_windows=c.eval_windows,
            device=device,
        )
        record = {
            "kind": "eval",
            "step": step,
            "tokens": tokens,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss),
            "state_bytes": logged_state_bytes(optimizer),
            "peak_memory_bytes": measure.peak_memory_bytes(device),
            "tokens_per_s": tokens / train_seconds if train_seconds else None,
        }
        if hasattr(optimizer, "ranks"):
            record["ranks"] = optimizer.ranks()
        metrics.write(record)
        return record

    from tqdm.auto import tqdm

    bar = tqdm(
        total=c.steps,
        initial=start_step,
        desc=f"{c.model}/{c.optimizer}",
        disable=not c.progress,
        dynamic_ncols=True,
    )
    model.train()
    try:
        for step in range(start_step, c.steps):
            started = time.perf_counter()
            loss_sum = 0.0
            for _ in range(c.grad_accum):
                x, y = sampler.next()
                loss = model(x.to(device), y.to(device)) / c.grad_accum
                loss.backward()
                loss_sum += loss.item()
            # The spectrum is measured on the raw gradient (before clipping); its cost is kept
            # out of the step time so tokens/s compares the optimizers alone.
            paused = time.perf_counter()
            if spectrum is not None:
                spectrum.record(step, loss=loss_sum, force=step == c.steps - 1)
            if gradient_ema is not None:
                gradient_ema.update()
                with gradient_ema.swapped():
                    spectrum_ema.record(step, loss=loss_sum, force=step == c.steps - 1)
            resumed = time.perf_counter()
            if c.grad_clip > 0:
                clip_grad_norm_(model.parameters(), c.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            measure.sync(device)
            step_seconds = time.perf_counter() - started - (resumed - paused)
            train_seconds += step_seconds
            tokens += tokens_per_step
            done = step + 1
            metrics.write(
                {
                    "kind": "train",
                    "step": done,
                    "loss": loss_sum,
                    "lr": lr,
                    "tokens": tokens,
                    "step_seconds": step_seconds,
                    "tokens_per_s": tokens_per_step / step_seconds,
                }
            )
            if done % c.eval_every == 0 or done == c.steps:
                last_eval = evaluate(done)
                bar.set_postfix(
                    loss=f"{loss_sum:.3f}",
                    val_ppl=f"{last_eval['val_ppl']:.1f}",
                    tok_s=f"{tokens / train_seconds:.0f}",
                )
            elif done % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / train_seconds:.0f}")
            if done % c.ckpt_every == 0 or done == c.steps:
                runfiles.save_atomic(
                    {
                        "step": done,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "sampler": sampler.state_dict(),
                        "rng": runfiles.rng_state(device),
                        **(
                            {"gradient_ema": gradient_ema.state_dict()}
                            if gradient_ema is not None
                            else {}
                        ),
                        "train_seconds": train_seconds,
                        "tokens": tokens,
                        "metrics_offset": metrics.offset(),
                        "last_eval": last_eval,
                        "config": asdict(c),
                    },
                    out / CHECKPOINT,
                )
            bar.update(1)
    finally:
        bar.close()
        if spectrum is not None:
            spectrum.close()
        if spectrum_ema is not None:
            spectrum_ema.close()

    summary = {
        "kind": "final",
        "model": c.model,
        "optimizer": c.optimizer,
        "steps": c.steps,
        "tokens": tokens,
        "val_loss": last_eval["val_loss"],
        "val_ppl": last_eval["val_ppl"],
        "tokens_per_s": tokens / train_seconds if train_seconds else None,
        "train_seconds": train_seconds,
        "state_bytes": logged_state_bytes(optimizer),
        "peak_memory_bytes": measure.peak_memory_bytes(device),
        "parameters": count_parameters(model),
        "ranks": optimizer.ranks() if hasattr(optimizer, "ranks") else None,
    }
    metrics.write(summary)
    metrics.close()
    runfiles.write_json(out / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
        summary = train(config)
    except (ValueError, FileExistsError, data_mod.CorpusNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state_mib = summary["state_bytes"]["total"] / 2**20
    print(
        f"{summary['model']}/{summary['optimizer']}: val ppl {summary['val_ppl']:.2f}, "
        f"{summary['tokens_per_s']:.0f} tokens/s, optimizer state {state_mib:.2f} MiB, "
        f"peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB -> {config.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
