"""When does a gradient's rank decay? The spectra of the ``cpu`` decoder's gradients over a run.

Three runs at one token budget (`BUDGETS`: ``long``, about two passes of the training split, or
``short``, a third of it) whose batch differs ×1, ×4, ×16 through gradient accumulation, so
the larger batches take 4× and 16× fewer steps. Each logs, at about `POINTS` evenly spread
steps, two spectra of every attention and MLP matrix (`experiments.pretrain --spectrum-ema`):

- ``spectrum.jsonl``: the mini-batch gradient G, what AdaRankAdamW's rank rule sees;
- ``spectrum_ema.jsonl``: Ĝ, the bias-corrected moving average of G with β = `EMA_BETA` (Adam's
  β1, so this is the direction Adam's first moment follows): the signal with much of the
  sampling noise of a batch averaged away.

If the rank of G is set by noise, it falls with a larger batch and Ĝ's rank sits below G's; if
it is set by the signal, neither changes much. The optimizer is AdamW, so the trajectory is not
shaped by any projection. Commands::

    python -m experiments.rank_study plan
    python -m experiments.rank_study run --jobs 2     # resumable, like experiments.sweep
    python -m experiments.rank_study run --budget short
    python -m experiments.rank_study report          # results/rank_study/summary.json

The runs write under ``results/rank_study/<budget>/batch_x<K>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments import sweep

# Run order: the two ends first, so a study cut short still spans the range.
BATCH_MULTIPLIERS = (1, 16, 4)
MICRO_BATCH, SEQ_LEN = 8, 128  # the cpu model's defaults
# Token budgets, in micro-batches (divisible by 16, so every batch size sees the same tokens):
# "long" is two passes of the training split (3072, 768, 192 steps); "short" a third of it.
BUDGETS = {"long": 3072, "short": 1024}
POINTS = 60
EMA_BETA = 0.9
LR = 1e-3
ENERGY = "0.9"


@dataclass(frozen=True)
class StudyRun:
    multiplier: int
    budget: str = "long"
    lr: float = LR
    seed: int = 0

    @property
    def tokens(self) -> int:
        return BUDGETS[self.budget] * MICRO_BATCH * SEQ_LEN

    @property
    def steps(self) -> int:
        return BUDGETS[self.budget] // self.multiplier

    def directory(self, root: Path) -> Path:
        return root / self.budget / f"batch_x{self.multiplier}"

    def command(self, root: Path, threads: int) -> list[str]:
        every = max(1, self.steps // POINTS)
        return [
            sys.executable, "-m", "experiments.pretrain",
            "--model", sweep.MODEL, "--optimizer", "adamw", "--lr", f"{self.lr:g}",
            "--seed", str(self.seed), "--steps", str(self.steps),
            "--batch-size", str(MICRO_BATCH), "--seq-len", str(SEQ_LEN),
            "--grad-accum", str(self.multiplier),
            "--spectrum-every", str(every), "--spectrum-ema", str(EMA_BETA),
            "--eval-every", str(max(1, self.steps // 10)),
            "--ckpt-every", str(max(1, self.steps // 30)),
            "--out", str(self.directory(root)), "--threads", str(threads),
            "--resume", "--no-progress",
        ]  # fmt: skip


def runs(budget: str = "long") -> list[StudyRun]:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    return [StudyRun(k, budget) for k in BATCH_MULTIPLIERS]


def energy_rank_by_type(
    path: Path, level: str = ENERGY
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The logged steps, and per layer type the mean energy rank at ``level`` at each of them."""
    from adarank.analysis.io import load_log

    log = load_log(path)
    names: dict[str, list[str]] = {}
    for name in log.layer_names:
        names.setdefault(log.layer_type(name), []).append(name)
    quantity = f"energy_rank_{level}"
    return log.steps, {
        kind: np.nanmean(log.stack(quantity, layers), axis=0) for kind, layers in names.items()
    }


def report(root: Path, budget: str = "long") -> dict[str, Any]:
    """Energy rank (η = 0.9) of G and Ĝ per layer type: after the early collapse and at the end."""
    out: dict[str, Any] = {"energy_level": float(ENERGY), "ema_beta": EMA_BETA, "runs": []}
    for run in runs(budget):
        d = run.directory(root)
        if sweep.read_summary(d) is None:
            continue
        row: dict[str, Any] = {"multiplier": run.multiplier, "steps": run.steps}
        for quantity, name in (("gradient", "spectrum.jsonl"), ("ema", "spectrum_ema.jsonl")):
            steps, ranks = energy_rank_by_type(d / name)
            tenth = max(1, len(steps) // 10)
            row[quantity] = {
                kind: {
                    "min": float(np.nanmin(series)),
                    "step_of_min": int(steps[int(np.nanargmin(series))]),
                    "at_10pct": float(series[tenth]),
                    "final": float(series[-1]),
                }
                for kind, series in ranks.items()
            }
        out["runs"].append(row)
    (root / budget).mkdir(parents=True, exist_ok=True)
    (root / budget / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rank_study")
    parser.add_argument("action", choices=("plan", "run", "report"))
    parser.add_argument("--root", type=Path, default=Path("results/rank_study"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="long",
        help="tokens per run: long (3.1M, two passes) or short (1.0M)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    if args.action == "report":
        print(json.dumps(report(args.root, args.budget), indent=2))
        return 0
    if args.action == "plan":
        for run in runs(args.budget):
            done = "done" if sweep.read_summary(run.directory(args.root)) else "todo"
            print(done, " ".join(run.command(args.root, args.threads)))
        return 0
    return (
        1
        if sweep.execute(runs(args.budget), args.root, args.jobs, args.threads, "rank study runs")
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
