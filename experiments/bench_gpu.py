"""Training-step benchmark: AdamW vs GaLore (the reference package and ours) vs AdaRankAdamW
(with its multi-tensor fast paths and one matrix at a time) on a whole LLaMA-shaped decoder.

Rows (``DESCRIPTIONS``): ``GaLore-reference`` needs ``galore_torch`` (``pip install --no-deps
galore-torch`` plus transformers and bitsandbytes) and is skipped, with a note, where it does
not import; its forced refresh sets its projectors' own ``update_proj_gap``.

Where ``bench_optimizer`` times the optimizer step alone on synthetic gradients, this script
trains `experiments.model.Decoder` (random token batches, no data loading; vocabulary 32000 by
default, as in the GaLore paper) and measures, for each optimizer in one process, each on a fresh
model built from the same seed (Issue 7; DESIGN §10):

- ``step_s``: mean wall time of one training step (forward + backward + optimizer step) over
  ``--steps`` steps without a scheduled refresh (the refresh gap is set out of reach), measured
  with a device synchronisation before and after the block. For AdaRankAdamW the block includes
  its periodic tracking and staleness checks (every 10 steps by default).
- ``optimizer_step_s``: median time of ``optimizer.step()`` alone inside those steps (CUDA events
  on the GPU, so the loop is never synchronised; ``time.perf_counter`` on the CPU).
- ``refresh_s``: ``optimizer.step()`` alone in a step where every low-rank matrix refreshes its
  subspace at once (a refresh gap of 1 for that step); ``refresh_step_s``: that whole training
  step. Medians over ``--refresh-repeats``. AdamW has no refresh: its values are its step's.
- ``avg_step_s``: ``step_s + (refresh_step_s − step_s)/T`` for ``T = --gap`` (GaLore's 200).
- ``tokens_per_s`` = batch·seq_len / step_s, and ``avg_tokens_per_s`` from ``avg_step_s``.
- ``state_bytes``: optimizer state; ``optimizer.state_bytes()`` for the low-rank optimizers, the
  sum of AdamW's state tensors for AdamW.
- ``peak_bytes``: ``torch.cuda.max_memory_allocated`` from the model's creation to the end
  (weights, gradients, activations, state, refresh temporaries), after
  ``reset_peak_memory_stats``; ``None`` on the CPU, which has no per-run allocator statistics.
- ``bytes_moved``: the traffic the optimizer step cannot avoid, from the tensors it holds: read
  the gradient, read and write the weight, read and write each moment, read each projector twice
  (projection, back-projection). Compact intermediates (PᵀG, the Adam direction) and the periodic
  tracking are left out, so this is a lower bound; ``bandwidth`` = bytes_moved /
  optimizer_step_s, compared with the card's (from its memory clock and bus width, or
  ``--peak-bandwidth``) and with a measured device-to-device copy.

Ratios are to AdamW (``ratios`` in the JSON; AdamW's are exactly 1). Usage::

    python -m experiments.bench_gpu --model 1b --device cuda --dtype bfloat16 --json b1.json
    python -m experiments.bench_gpu --model cpu --device cpu --batch 2 --seq-len 64 --threads 1

The table goes to stdout (markdown), progress to stderr.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import adarank
from experiments import measure, optim
from experiments.measure import StepClock, sync
from experiments.model import CONFIGS, LLAMA_MATRICES, PAPER_RANKS, Decoder, ModelConfig, get_config
from experiments.runfiles import emit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPTIMIZERS = ("AdamW", "GaLore-reference", "GaLoreAdamW", "AdaRankAdamW", "AdaRankAdamW-loop")
# What each row is (the table's notes).
DESCRIPTIONS = {
    "AdamW": "torch.optim.AdamW",
    "GaLore-reference": "the reference package galore_torch (one exact SVD per matrix)",
    "GaLoreAdamW": "adarank.GaLoreAdamW (exact SVD, batched per shape)",
    "AdaRankAdamW": "adarank.AdaRankAdamW (randomized SVD batched per shape, foreach Adam)",
    "AdaRankAdamW-loop": "adarank.AdaRankAdamW(foreach=False): one matrix at a time",
}
# A refresh gap no benchmark reaches: no scheduled refresh while timing steps.
NEVER = 10**9
LR = 1e-3
# Distinct random batches cycled through by the steps (generated once, shared by all optimizers).
N_BATCHES = 4
# Bytes of the buffer copied to measure the device's achievable bandwidth.
COPY_BYTES = {"cuda": 2**30, "cpu": 2**26}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_gpu",
        description="Time training steps, refreshes and memory of AdamW, GaLoreAdamW and "
        "AdaRankAdamW on a LLaMA-shaped decoder with random tokens.",
    )
    p.add_argument("--model", choices=sorted(CONFIGS), default="60m", help="shape (default: 60m)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights and activations (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: 32000)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps after the first (default: 3)"
    )
    p.add_argument(
        "--refresh-repeats",
        type=int,
        default=1,
        help="forced all-layer refresh steps timed; the median is reported (default: 1)",
    )
    p.add_argument(
        "--gap", type=int, default=200, help="T used to amortise one refresh (default: 200)"
    )
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="GaLore rank and AdaRankAdamW max_rank (default: the paper's, else d_model/4)",
    )
    p.add_argument("--eta", type=float, default=0.9, help="AdaRankAdamW's η (default: 0.9)")
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated subset of {','.join(OPTIMIZERS)}; AdamW is always run",
    )
    p.add_argument(
        "--peak-bandwidth",
        type=float,
        default=None,
        help="the card's memory bandwidth in GB/s (default: from its clock and bus width)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the tokens")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for key in ("batch", "seq_len", "vocab", "steps", "refresh_repeats", "gap"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.rank is not None and args.rank < 1:
        p.error(f"--rank must be >= 1, got {args.rank}")
    if not 0.0 < args.eta <= 1.0:
        p.error(f"--eta must be in (0, 1], got {args.eta}")
    if args.peak_bandwidth is not None and args.peak_bandwidth <= 0:
        p.error(f"--peak-bandwidth must be > 0, got {args.peak_bandwidth}")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        p.error(f"--optimizers: unknown {unknown}; choose from {list(OPTIMIZERS)}")
    # Fixed order, AdamW first: it is the baseline of every ratio.
    args.optimizers = [n for n in OPTIMIZERS if n == "AdamW" or n in names]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


# ------------------------------------------------------------- model and data


def model_config(args: argparse.Namespace) -> ModelConfig:
    return get_config(args.model, vocab_size=args.vocab, max_seq_len=args.seq_len)


def default_rank(name: str, config: ModelConfig) -> int:
    """GaLore's rank for the paper's shapes (`PAPER_RANKS`), d_model // 4 for the others."""
    return PAPER_RANKS.get(name, max(1, config.d_model // 4))


def random_batches(
    args: argparse.Namespace, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``N_BATCHES`` (inputs, targets) pairs of uniform random token ids, (batch, seq_len) each,
    drawn on the CPU from ``--seed`` so every device and optimizer sees the same tokens."""
    generator = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(N_BATCHES):
        tokens = torch.randint(args.vocab, (args.batch, args.seq_len + 1), generator=generator)
        out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return out


def reference_galore() -> Any | None:
    """The reference GaLore package's ``GaLoreAdamW`` (``pip install galore-torch``; it
    imports transformers and bitsandbytes), or ``None`` where it cannot be imported."""
    try:
        import galore_torch
    except Exception:  # an optional baseline: any import failure means "not installed"
        return None
    return galore_torch.GaLoreAdamW


# Our rows: (experiments.optim name, constructor options, the word on the kernel).
ROWS: dict[str, tuple[str, dict[str, Any], str]] = {
    "GaLoreAdamW": ("galore", {}, "exact SVD"),
    "AdaRankAdamW": ("adarank", {}, "randomized SVD"),
    "AdaRankAdamW-loop": ("adarank", {"foreach": False}, "randomized SVD"),
}


def make_optimizer(
    name: str, model: nn.Module, rank: int, eta: float
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and a word on its kernel (AdamW: ``fused`` where the device has it, else
    ``foreach``). Low-rank optimizers get a refresh gap no run reaches."""
    if name == "GaLore-reference":
        cls = reference_galore()
        if cls is None:
            raise ValueError("GaLore-reference needs the galore-torch package")
        lowrank, plain = [], []
        for group in adarank.param_groups(model):
            (lowrank if group["lowrank"] else plain).extend(group["params"])
        groups = [
            {"params": plain},
            {"params": lowrank, "rank": rank, "update_proj_gap": NEVER, "scale": 0.25,
             "proj_type": "std"},
        ]  # fmt: skip
        return cls(groups, lr=LR), "exact SVD"
    if name == "AdamW":
        # torch's default weight decay (0.01), as the committed tables were measured.
        try:
            opt = optim.build_optimizer("adamw", model, lr=LR, weight_decay=0.01, fused=True)
            return opt, "fused"
        except (RuntimeError, ValueError):
            opt = optim.build_optimizer("adamw", model, lr=LR, weight_decay=0.01, foreach=True)
            return opt, "foreach"
    if name not in ROWS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    kind, options, kernel = ROWS[name]
    opt = optim.build_optimizer(kind, model, lr=LR, rank=rank, eta=eta, update_gap=NEVER, **options)
    return opt, kernel


# ------------------------------------------------------------------- timing


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    clock: StepClock | None = None,
) -> None:
    """Forward, backward, optimizer step (timed alone by ``clock``), gradients freed."""
    inputs, targets = batch
    model(inputs, targets).backward()
    if clock is None:
        opt.step()
    else:
        clock.time(opt.step)
    opt.zero_grad(set_to_none=True)


def step_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Lower bound on the bytes one optimizer step moves (see the module docstring):
    ``gradients`` (read), ``weights`` (read and write), ``moments`` (read and write),
    ``projectors`` (read twice), and their ``total``."""
    out = {"gradients": 0, "weights": 0, "moments": 0, "projectors": 0}
    for p in opt.state:
        size = p.numel() * p.element_size()
        out["gradients"] += size
        out["weights"] += 2 * size
    for key, value in measure.state_tensors(opt):
        nbytes = value.numel() * value.element_size()
        if key in ("exp_avg", "exp_avg_sq"):
            out["moments"] += 2 * nbytes
        elif key.startswith(("proj_left", "proj_right")):
            out["projectors"] += 2 * nbytes
    out["total"] = sum(out.values())
    return out


def spec_bandwidth(device: torch.device) -> float | None:
    """The card's memory bandwidth in bytes/s from its memory clock (kHz) and bus width
    (bits), double data rate; ``None`` where torch does not report them (or on the CPU)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def copy_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Achieved bandwidth in bytes/s of copying a ``COPY_BYTES`` buffer on the device (each
    copy reads and writes it); the best of ``repeats``."""
    n = COPY_BYTES[device.type] // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 4 / best


def bench_one(
    name: str,
    args: argparse.Namespace,
    config: ModelConfig,
    rank: int,
    device: torch.device,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    """Train a fresh model with optimizer ``name`` and time it; see the module docstring."""
    measure.reset_peak(device)
    torch.manual_seed(args.seed)
    model = Decoder(config).to(device=device, dtype=DTYPES[args.dtype])
    opt, kernel = make_optimizer(name, model, rank, args.eta)
    refreshes = args.refresh_repeats if name != "AdamW" else 0
    total = 1 + args.warmup + args.steps + refreshes
    peaks: list[int | None] = []
    batch = iter(batches * (total // len(batches) + 1))
    with tqdm(
        total=total, desc=f"{name:>12}", disable=args.no_progress, file=sys.stderr, leave=False
    ) as bar:
        # The first step allocates the state and, for the low-rank ones, refreshes from scratch.
        sync(device)
        t0 = time.perf_counter()
        train_step(model, opt, next(batch))
        sync(device)
        first = time.perf_counter() - t0
        bar.update()
        for _ in range(args.warmup):
            train_step(model, opt, next(batch))
            bar.update()
        peaks.append(measure.peak_cuda_bytes(device))

        measure.reset_peak(device)
        refreshes_before = optim.refresh_count(opt)
        clock = StepClock(device)
        sync(device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            train_step(model, opt, next(batch), clock)
            bar.update()
        sync(device)
        step = (time.perf_counter() - t0) / args.steps
        # Process CPU seconds (all threads): with --threads 1 on the CPU, the work itself,
        # which other processes sharing the cores do not inflate, unlike wall time.
        step_cpu = (time.process_time() - cpu0) / args.steps
        opt_steps = clock.seconds()
        timed_refreshes = optim.refresh_count(opt) - refreshes_before
        peaks.append(measure.peak_cuda_bytes(device))
        bytes_moved = step_bytes(opt)

        measure.reset_peak(device)
        refresh_clock = StepClock(device)
        refresh_steps = []
        for _ in range(refreshes):
            with optim.refreshing_all(opt, gap_after=NEVER):
                sync(device)
                t0 = time.perf_counter()
                train_step(model, opt, next(batch), refresh_clock)
                sync(device)
                refresh_steps.append(time.perf_counter() - t0)
            bar.update()
        refresh_opt = refresh_clock.seconds()
        peaks.append(measure.peak_cuda_bytes(device))

    opt_step = statistics.median(opt_steps)
    refresh_step = statistics.median(refresh_steps) if refresh_steps else step
    tokens = args.batch * args.seq_len
    avg_step = step + (refresh_step - step) / args.gap
    out: dict[str, Any] = {
        "kernel": kernel,
        "first_step_s": first,
        "step_s": step,
        "step_cpu_s": step_cpu,
        "optimizer_step_s": opt_step,
        "optimizer_step_s_all": opt_steps,
        "refresh_s": statistics.median(refresh_opt) if refresh_opt else opt_step,
        "refresh_s_repeats": refresh_opt,
        "refresh_step_s": refresh_step,
        "avg_step_s": avg_step,
        "tokens_per_s": tokens / step,
        "avg_tokens_per_s": tokens / avg_step,
        "peak_bytes": None if None in peaks else max(peaks),
        "peak_step_bytes": peaks[1],
        "peak_refresh_bytes": peaks[2] if refreshes else None,
        "bytes_moved": bytes_moved,
        "bandwidth": bytes_moved["total"] / opt_step,
        "state_bytes": measure.state_bytes(opt),
    }
    if isinstance(opt, adarank.AdaRankAdamW):
        out["ranks"] = opt.ranks()
        counts = opt.refresh_counts()
        out["refresh_counts"] = counts
        # Refreshes beyond the first step and the forced ones came from the staleness test
        # inside the warm-up or the timed steps, which they then inflate.
        out["unplanned_refreshes"] = sum(counts.values()) - len(counts) * (1 + refreshes)
        out["timed_refreshes"] = timed_refreshes
    return out


# ------------------------------------------------------------------- report

# The results given as ratios to AdamW; for tokens/s and bandwidth, higher is better.
RATIO_KEYS = (
    "step_s",
    "optimizer_step_s",
    "refresh_s",
    "refresh_step_s",
    "avg_step_s",
    "tokens_per_s",
    "avg_tokens_per_s",
    "state_bytes",
    "peak_bytes",
    "bytes_moved",
    "bandwidth",
)


def _scalar(r: dict[str, Any], key: str) -> float | None:
    value = r[key]
    return value["total"] if isinstance(value, dict) else value


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Give every result ``ratios``: each of `RATIO_KEYS` over AdamW's (``None`` where either
    is missing)."""
    base = results["AdamW"]
    for r in results.values():
        ratios: dict[str, float | None] = {}
        for key in RATIO_KEYS:
            value, ref = _scalar(r, key), _scalar(base, key)
            ratios[key] = value / ref if value is not None and ref else None
        r["ratios"] = ratios


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for parsed ``args``; returns the results (see ``--json``)."""
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = model_config(args)
    rank = args.rank if args.rank is not None else default_rank(args.model, config)
    load_before = os.getloadavg()
    copy_bw = copy_bandwidth(device)
    card_bw = args.peak_bandwidth * 1e9 if args.peak_bandwidth else spec_bandwidth(device)
    batches = random_batches(args, device)
    counts = {"total": 0, "lowrank": 0, "lowrank_matrices": 0}
    with torch.device("meta"):
        meta = Decoder(config)
    for group in adarank.param_groups(meta):
        n = sum(p.numel() for p in group["params"])
        counts["total"] += n
        if group["lowrank"]:
            counts["lowrank"] += n
            counts["lowrank_matrices"] += len(group["params"])
    del meta
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in args.optimizers:
        if name == "GaLore-reference" and reference_galore() is None:
            skipped[name] = "galore_torch not importable (pip install galore-torch)"
            continue
        results[name] = bench_one(name, args, config, rank, device, batches)
        # The model and optimizer died with bench_one's frame; return their memory.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(results)
    return {
        "config": {
            "model": args.model,
            "d_model": config.d_model,
            "n_layers": config.n_layers,
            "n_heads": config.n_heads,
            "ffn_dim": config.ffn_dim,
            "vocab_size": config.vocab_size,
            "parameters": counts,
            "device": args.device,
            "dtype": args.dtype,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "tokens_per_step": args.batch * args.seq_len,
            "rank": rank,
            "eta": args.eta,
            "lr": LR,
            "steps": args.steps,
            "warmup": args.warmup,
            "refresh_repeats": args.refresh_repeats,
            "gap": args.gap,
            "seed": args.seed,
            "optimizers": list(args.optimizers),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            # Other processes on the same cores distort CPU timings; judge by these.
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
            "device_name": (
                torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or platform.machine()
            ),
            "card_bandwidth": card_bw,
            "copy_bandwidth": copy_bw,
        },
        "results": results,
        "skipped": skipped,
    }


def _cell(value: float | None, ratio: float | None, fmt: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:{fmt}} ({ratio:.2f}×)"


def format_table(report: dict[str, Any]) -> str:
    """The results as a markdown table with ratios to AdamW, then notes."""
    c, env, results = report["config"], report["environment"], report["results"]
    ms, mib, gbs = 1e3, 2**20, 1e9
    params = c["parameters"]
    lines = [
        f"### Training step, LLaMA-{c['model']} (d={c['d_model']}, {c['n_layers']} layers, "
        f"ffn={c['ffn_dim']}, vocab {c['vocab_size']}, {params['total'] / 1e6:.1f}M parameters, "
        f"{params['lowrank_matrices']} low-rank matrices), {c['device']} ({env['device_name']}, "
        f"{env['threads']} threads), {c['dtype']}, {c['batch']}×{c['seq_len']} = "
        f"{c['tokens_per_step']} tokens/step, torch {env['torch']}",
        "",
        f"Load average (1 min) before/after: {env['load_average_before']:.2f}/"
        f"{env['load_average_after']:.2f} on {env['cpus']} CPUs.",
        "",
        f"| optimizer | rank | step ms | optimizer ms | refresh ms | avg step ms (T={c['gap']}) "
        "| tokens/s | state MiB | peak MiB | optimizer GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        q = r["ratios"]
        if name == "AdamW":
            rank = f"full ({r['kernel']})"
        elif name in ("GaLoreAdamW", "GaLore-reference"):
            rank = str(c["rank"])
        else:
            rank = f"≤{c['rank']}, η={c['eta']}"
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / mib
        lines.append(
            f"| {name} | {rank} | {_cell(r['step_s'] * ms, q['step_s'], '.2f')} "
            f"| {_cell(r['optimizer_step_s'] * ms, q['optimizer_step_s'], '.2f')} "
            f"| {_cell(r['refresh_s'] * ms, q['refresh_s'], '.1f')} "
            f"| {_cell(r['avg_step_s'] * ms, q['avg_step_s'], '.2f')} "
            f"| {_cell(r['tokens_per_s'], q['tokens_per_s'], ',.0f')} "
            f"| {_cell(r['state_bytes']['total'] / mib, q['state_bytes'], '.1f')} "
            f"| {_cell(peak, q['peak_bytes'], ',.0f')} "
            f"| {_cell(r['bandwidth'] / gbs, q['bandwidth'], '.1f')} |"
        )
    card = env["card_bandwidth"]
    card_text = f"card {card / gbs:,.0f} GB/s, " if card else "card's peak unknown, "
    lines += [
        "",
        f"Step: forward+backward+optimizer, mean of {c['steps']} steps without a scheduled "
        f"refresh after {c['warmup']} warm-up steps; optimizer: median of optimizer.step() "
        f"alone in those steps; refresh: optimizer.step() when all matrices refresh (median "
        f"of {c['refresh_repeats']}); avg step = step + (refresh step − step)/T.",
        f"Optimizer GB/s: lower-bound bytes moved per step / optimizer time ({card_text}"
        f"measured device copy {env['copy_bandwidth'] / gbs:,.0f} GB/s): "
        + ", ".join(
            f"{name} {r['bytes_moved']['total'] / mib:,.1f} MiB, "
            + (
                f"{r['bandwidth'] / card:.0%} of card"
                if card
                else f"{r['bandwidth'] / env['copy_bandwidth']:.0%} of copy"
            )
            for name, r in results.items()
        )
        + ".",
    ]
    lines.append("Rows: " + "; ".join(f"{n}: {DESCRIPTIONS[n]}" for n in results) + ".")
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"Skipped {name}: {reason}.")
    if "AdaRankAdamW" in results:
        ada = results["AdaRankAdamW"]
        for name in ("GaLore-reference", "GaLoreAdamW"):
            if name in results:
                lines.append(
                    f"Refresh of all low-rank matrices, {name} / AdaRankAdamW at the same rank "
                    f"budget: {results[name]['refresh_s'] / ada['refresh_s']:.1f}×."
                )
        if "AdaRankAdamW-loop" in results:
            loop = results["AdaRankAdamW-loop"]
            lines.append(
                "AdaRankAdamW fast paths vs one matrix at a time: optimizer step "
                f"{loop['optimizer_step_s'] / ada['optimizer_step_s']:.2f}× faster, refresh "
                f"{loop['refresh_s'] / ada['refresh_s']:.2f}× faster."
            )
    if "AdaRankAdamW" in results:
        ada = results["AdaRankAdamW"]
        lines.append(f"AdaRankAdamW ranks: {optim.rank_summary(ada['ranks'], LLAMA_MATRICES)}.")
        if ada["unplanned_refreshes"]:
            lines.append(
                f"Note: {ada['unplanned_refreshes']} matrix refreshes triggered by the "
                f"staleness test, {ada['timed_refreshes']} of them in the timed steps, "
                "which they inflate."
            )
    if c["device"] == "cpu":
        lines.append(
            "Peak memory: n/a on the CPU (no per-run allocator statistics). Process CPU time "
            "per step (ms): "
            + ", ".join(f"{name} {r['step_cpu_s'] * ms:.1f}" for name, r in results.items())
            + "."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the report it printed (and wrote, with ``--json``)."""
    args = parse_args(argv)
    report = run(args)
    emit(report, format_table(report), args.json)
    return report


if __name__ == "__main__":
    main()
