"""Optimizer-step benchmark: AdamW vs GaLoreAdamW vs AdaRankAdamW on LLaMA-shaped weights.

Builds the seven matrices of one LLaMA decoder layer (``q/k/v/o_proj`` d×d,
``gate/up_proj`` ffn×d, ``down_proj`` d×ffn; ``--layers K`` replicates them) for
one of the GaLore paper's shapes, gives each a fixed synthetic gradient with a
decaying spectrum, and times the optimizer step alone: no forward or backward.

Measured for each optimizer, in one process (DESIGN §8, §10):

- ``step_s``: mean time of a step without a refresh (the refresh gap is set out
  of reach); the median over ``--repeats`` blocks of ``--steps`` steps each. For
  AdaRankAdamW the blocks include its periodic tracking and staleness checks
  (every 10 steps by default), so a block length that is a multiple of 10 gives
  their amortised cost.
- ``refresh_s``: one step in which every matrix refreshes its subspace at once
  (forced by a refresh gap of 1 for that step); median over ``--refresh-repeats``.
  For AdamW, which has no refresh, this is its step time.
- ``amortised_s``: ``(refresh_s + (T − 1)·step_s) / T`` for ``T = --refresh-gap``
  (GaLore's default 200).
- ``step_cpu_s``, ``refresh_cpu_s``: the same medians in CPU seconds of the
  process; with ``--threads 1`` they measure the work even when other processes
  share the cores and inflate wall time.
- ``state_bytes``: optimizer-state bytes; ``optimizer.state_bytes()`` for the
  low-rank optimizers, the sum of AdamW's state tensors for AdamW.

Ratios are to AdamW. Usage::

    python -m experiments.bench_optimizer                      # 60m, CPU, float32
    python -m experiments.bench_optimizer --shape 350m --json bench_350m.json
    python -m experiments.bench_optimizer --shape 1b --device cuda --dtype bfloat16

The table goes to stdout (markdown), progress to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import adarank
from experiments import measure, optim
from experiments.model import CONFIGS, LLAMA_MATRICES, PAPER_RANKS
from experiments.runfiles import emit

# (d_model, ffn_dim) of the GaLore paper's LLaMA shapes (`PAPER_RANKS`); "tiny" is for tests.
SHAPES: dict[str, tuple[int, int]] = {
    "tiny": (64, 172),
    **{name: (CONFIGS[name].d_model, CONFIGS[name].ffn_dim) for name in PAPER_RANKS},
}
# GaLore's ranks for those shapes (DESIGN §10); AdaRankAdamW's max_rank is the same.
GALORE_RANKS: dict[str, int] = {"tiny": 16, **PAPER_RANKS}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPTIMIZERS = ("AdamW", "GaLoreAdamW", "QGaLoreAdamW", "AdaRankAdamW", "AdaRankAdamW-INT4")

# Synthetic gradient spectrum: σ_i ∝ i^(−SPECTRUM_EXPONENT) on a signal of rank
# SIGNAL_FRACTION·min(m, n), plus isotropic Gaussian noise carrying NOISE_ENERGY
# of ‖G‖_F². With η = 0.9 the energy rank lands at ≈ 0.7 of the signal rank:
# below GaLore's rank, above 1, as in early training.
SPECTRUM_EXPONENT = 0.5
SIGNAL_FRACTION = 0.25
NOISE_ENERGY = 0.05
# A refresh gap no benchmark reaches: no scheduled refresh while timing steps.
NEVER = 10**9
LR = 1e-3
ETA = 0.9


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_optimizer",
        description="Time the optimizer step and measure optimizer state of AdamW, "
        "GaLoreAdamW and AdaRankAdamW on LLaMA-shaped weights with synthetic gradients.",
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="60m",
        help="LLaMA shape of the decoder layer (default: 60m)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=1,
        help="number of decoder layers (7 matrices each; default: 1)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the weights and gradients (projection math is float32)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="steps per timed block of non-refresh steps (default: 20)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed blocks; the median block mean is reported (default: 5)",
    )
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps after the first (default: 5)"
    )
    p.add_argument(
        "--refresh-repeats",
        type=int,
        default=3,
        help="forced all-layer refreshes timed; the median is reported (default: 3)",
    )
    p.add_argument(
        "--refresh-gap",
        type=int,
        default=200,
        help="T used to amortise one refresh (default: 200, GaLore's)",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="GaLore rank and AdaRankAdamW max_rank (default: GaLore's for the shape)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic gradients")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for key in ("layers", "steps", "repeats", "refresh_repeats", "refresh_gap"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.rank is not None and args.rank < 1:
        p.error(f"--rank must be >= 1, got {args.rank}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


# ---------------------------------------------------------------- the weights


def build_layers(
    d: int, ffn: int, layers: int, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Bias-free linear layers named as in a LLaMA decoder (``layers.0.self_attn.q_proj``),
    so ``adarank.param_groups`` treats them as it would a real model's."""
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(layers):
        layer = nn.Module()
        layer.self_attn = nn.ModuleDict(
            {name: nn.Linear(d, d, bias=False) for name in LLAMA_MATRICES[:4]}
        )
        layer.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(d, ffn, bias=False),
                "up_proj": nn.Linear(d, ffn, bias=False),
                "down_proj": nn.Linear(ffn, d, bias=False),
            }
        )
        model.layers.append(layer)
    return model.to(device=device, dtype=dtype)


def synthetic_gradient(
    m: int, n: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """An m×n float32 gradient of known shape of spectrum (see ``SPECTRUM_EXPONENT``).

    ``U diag(σ) Vᵀ`` with orthonormal random U (m×k), V (n×k), σ_i = i^(−1/2)·c,
    plus Gaussian noise scaled so it holds ``NOISE_ENERGY`` of the expected energy.
    Drawn on the CPU from ``generator`` so every device sees the same matrix.
    """
    k = max(1, int(SIGNAL_FRACTION * min(m, n)))
    U = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32).pow(-SPECTRUM_EXPONENT)
    signal_energy = float(sigma.square().sum())
    noise_std = math.sqrt(NOISE_ENERGY / (1.0 - NOISE_ENERGY) * signal_energy / (m * n))
    G = (U * sigma) @ V.T + noise_std * torch.randn(m, n, generator=generator)
    # Gradient scale of an LLM layer early in training; irrelevant to timing.
    return (1e-3 * G).to(device)


def set_gradients(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        G = synthetic_gradient(p.shape[0], p.shape[1], generator, p.device)
        p.grad = G.to(p.dtype)


def reference_ranks(model: nn.Module, eta: float) -> dict[str, int]:
    """Exact energy rank at ``eta`` of the first layer's gradients (float64 SVD
    values): what an unbiased rank rule would choose with a full spectrum."""
    out = {}
    for name, p in model.layers[0].named_parameters():
        s = torch.linalg.svdvals(p.grad.to(torch.float64))
        out[name.split(".")[1]] = adarank.energy_rank(s, eta)
    return out


# ------------------------------------------------------------------- timing


# Each row: (experiments.optim name, low-rank group options). Q-GaLore's lazy refresh changes
# how often a refresh happens, not what one costs, so it is off; INT8 weights need Int8Linear
# modules (see bench_gpu).
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "AdamW": ("adamw", {}),
    "GaLoreAdamW": ("galore", {}),
    "QGaLoreAdamW": ("qgalore", {"lazy_refresh": False}),
    "AdaRankAdamW": ("adarank", {}),
    "AdaRankAdamW-INT4": ("adarank", {"proj_bits": 4}),
}


def make_optimizer(name: str, model: nn.Module, rank: int) -> torch.optim.Optimizer:
    if name not in ROWS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    kind, options = ROWS[name]
    if kind == "adamw":
        # torch's default weight decay (0.01), as the committed tables were measured.
        return optim.build_optimizer(kind, model, lr=LR, weight_decay=0.01)
    return optim.build_optimizer(
        kind, model, lr=LR, rank=rank, eta=ETA, update_gap=NEVER, group_options=options
    )


def _refresh_step(opt: torch.optim.Optimizer) -> None:
    with optim.refreshing_all(opt, gap_after=NEVER):
        opt.step()


def bench_one(
    name: str, model: nn.Module, args: argparse.Namespace, rank: int, device: torch.device
) -> dict[str, Any]:
    """Time one optimizer on ``model`` (gradients already set); see the module docstring."""
    opt = make_optimizer(name, model, rank)
    lowrank = bool(optim.lowrank_groups(opt))
    total = 1 + args.warmup + args.steps * args.repeats + (args.refresh_repeats if lowrank else 0)
    measure.reset_peak(device)
    with tqdm(
        total=total, desc=f"{name:>12}", disable=args.no_progress, file=sys.stderr, leave=False
    ) as bar:
        # The first step allocates the state and, for low-rank ones, refreshes from scratch.
        first, _ = measure.timed(opt.step, device)
        bar.update()
        for _ in range(args.warmup):
            opt.step()
            bar.update()
        blocks, blocks_cpu = [], []
        for _ in range(args.repeats):

            def block() -> None:
                for _ in range(args.steps):
                    opt.step()

            wall, cpu = measure.timed(block, device)
            blocks.append(wall / args.steps)
            blocks_cpu.append(cpu / args.steps)
            bar.update(args.steps)
        refreshes, refreshes_cpu = [], []
        if lowrank:
            for _ in range(args.refresh_repeats):
                wall, cpu = measure.timed(lambda: _refresh_step(opt), device)
                refreshes.append(wall)
                refreshes_cpu.append(cpu)
                bar.update()
    step = statistics.median(blocks)
    refresh = statistics.median(refreshes) if refreshes else step
    T = args.refresh_gap
    out: dict[str, Any] = {
        "step_s": step,
        "step_s_blocks": blocks,
        "refresh_s": refresh,
        "refresh_s_repeats": refreshes,
        "first_step_s": first,
        # Process CPU seconds (all threads). With --threads 1 on the CPU, a measure of the
        # work that other processes sharing the cores do not inflate, unlike wall time.
        "step_cpu_s": statistics.median(blocks_cpu),
        "refresh_cpu_s": statistics.median(refreshes_cpu or blocks_cpu),
        "amortised_s": (refresh + (T - 1) * step) / T,
        "peak_bytes": measure.peak_cuda_bytes(device),
        "state_bytes": measure.state_bytes(opt),
    }
    if isinstance(opt, adarank.AdaRankAdamW):
        out["ranks"] = opt.ranks()
        counts = opt.refresh_counts()
        out["refresh_counts"] = counts
        # Refreshes beyond the first step and the forced ones were triggered by the
        # staleness test inside the "non-refresh" blocks, which they then inflate.
        out["unplanned_refreshes"] = sum(counts.values()) - len(counts) * (1 + len(refreshes))
    return out


# ------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for parsed ``args``; returns the results (see ``--json``)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    d, ffn = SHAPES[args.shape]
    rank = args.rank if args.rank is not None else GALORE_RANKS[args.shape]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(args.seed)
    model = build_layers(d, ffn, args.layers, device, dtype)
    set_gradients(model, args.seed)
    results = {}
    for name in OPTIMIZERS:
        results[name] = bench_one(name, model, args, rank, device)
    base = results["AdamW"]
    for r in results.values():
        r["state_ratio"] = r["state_bytes"]["total"] / base["state_bytes"]["total"]
        r["step_ratio"] = r["step_s"] / base["step_s"]
        r["amortised_ratio"] = r["amortised_s"] / base["amortised_s"]
    return {
        "config": {
            "shape": args.shape,
            "d_model": d,
            "ffn_dim": ffn,
            "layers": args.layers,
            "matrices": 7 * args.layers,
            "device": args.device,
            "dtype": args.dtype,
            "rank": rank,
            "eta": ETA,
            "lr": LR,
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "refresh_repeats": args.refresh_repeats,
            "refresh_gap": args.refresh_gap,
            "seed": args.seed,
            "gradient": {
                "spectrum_exponent": SPECTRUM_EXPONENT,
                "signal_fraction": SIGNAL_FRACTION,
                "noise_energy": NOISE_ENERGY,
            },
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
        },
        "reference_ranks": reference_ranks(model, ETA),
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """The results as a markdown table, with a header line and the chosen ranks."""
    c, env = report["config"], report["environment"]
    ms = 1e3
    lines = [
        f"### Optimizer step, LLaMA-{c['shape']} (d={c['d_model']}, ffn={c['ffn_dim']}), "
        f"{c['layers']} layer(s) = {c['matrices']} matrices, {c['device']} "
        f"({env['device_name']}, {env['threads']} threads), {c['dtype']}, torch {env['torch']}",
        "",
        f"Load average (1 min) before/after: {env['load_average_before']:.2f}/"
        f"{env['load_average_after']:.2f} on {env['cpus']} CPUs.",
        "",
        f"| optimizer | rank | state MiB | state ratio | step ms | step ratio | refresh ms "
        f"| amortised ms (T={c['refresh_gap']}) | amortised ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        if name == "AdamW":
            rank = "full"
        elif "GaLore" in name:
            rank = str(c["rank"])
        else:
            rank = f"≤{c['rank']}, η={c['eta']}"
        refresh = "–" if name == "AdamW" else f"{r['refresh_s'] * ms:.1f}"
        lines.append(
            f"| {name} | {rank} | {r['state_bytes']['total'] / 2**20:.2f} "
            f"| {r['state_ratio']:.3f} | {r['step_s'] * ms:.2f} | {r['step_ratio']:.2f} "
            f"| {refresh} | {r['amortised_s'] * ms:.2f} | {r['amortised_ratio']:.2f} |"
        )
    ada = report["results"]["AdaRankAdamW"]
    ref = report["reference_ranks"]
    lines += [
        "",
        f"AdaRankAdamW ranks: {optim.rank_summary(ada['ranks'], LLAMA_MATRICES)}",
        "Exact energy ranks at η (layer 0, float64 SVD): "
        + ", ".join(f"{k} {ref[k]}" for k in LLAMA_MATRICES if k in ref),
        f"Step: median over {c['repeats']} blocks of {c['steps']} steps without a scheduled "
        f"refresh; refresh: median of {c['refresh_repeats']} steps in which all matrices "
        "refresh; amortised = (refresh + (T−1)·step)/T.",
    ]
    if c["device"] == "cpu":
        lines.append(
            "Process CPU time per step / refresh (ms): "
            + ", ".join(
                f"{name} {r['step_cpu_s'] * ms:.2f} / {r['refresh_cpu_s'] * ms:.1f}"
                for name, r in report["results"].items()
            )
        )
    if ada["unplanned_refreshes"]:
        lines.append(
            f"Note: {ada['unplanned_refreshes']} refreshes triggered by the staleness "
            "test during the timed steps."
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
