"""A memory budget against a fixed rank at equal memory, on the ``cpu`` decoder.

GaLoreAdamW at rank `RANK` against AdaRankAdamW with ``state_budget`` equal to that GaLore's
optimizer state (`BUDGET` bytes, measured after one step by ``sweep.galore_state_bytes``),
each at the three learning rates of the sweep's low-rank grid (spaced ×3), `STEPS` steps,
seed 0, the same tokens. AdaRankAdamW's other options are its defaults (η = 0.9 as a cap per
matrix, max_rank 64 as in every ``cpu`` run), so the budget decides how the ranks are shared
across layers. Every run is one resumable ``experiments.pretrain`` process::

    python -m experiments.budget_study plan
    python -m experiments.budget_study run --jobs 2
    python -m experiments.budget_study report     # results/budget/summary.json

Runs write under ``results/budget/galore32_lr<lr>/`` and ``results/budget/adarank_budget_lr<lr>/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import sweep

RANK = 32
# sweep.galore_state_bytes(32) on the cpu decoder (8k vocabulary): GaLoreAdamW's state after
# one step; a test checks that it still is.
BUDGET = 37_659_916
LRS = sweep.LR_GRID["galore"]
STEPS = sweep.LR_STEPS
ARMS = ("galore32", "adarank_budget")
ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BudgetRun:
    arm: str
    lr: float
    seed: int = 0

    def directory(self, root: Path) -> Path:
        return root / f"{self.arm}_lr{self.lr:g}"

    def command(self, root: Path, threads: int) -> list[str]:
        arm = (
            ["--optimizer", "galore", "--rank", str(RANK)]
            if self.arm == "galore32"
            else ["--optimizer", "adarank", "--state-budget", str(BUDGET)]
        )
        cmd = [
            sys.executable, "-m", "experiments.pretrain", "--model", sweep.MODEL, *arm,
            "--lr", f"{self.lr:g}", "--seed", str(self.seed), "--steps", str(STEPS),
            "--out", str(self.directory(root)), "--threads", str(threads),
            "--resume", "--no-progress",
        ]  # fmt: skip
        for key, value in sweep.COMMON.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        return cmd


def runs() -> list[BudgetRun]:
    # The published default lr first for both arms, then the lower, then the higher.
    order = sorted(LRS)
    return [BudgetRun(arm, order[i]) for i in (1, 0, 2) for arm in ARMS]


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "metrics.jsonl") as fh:
        lines = [json.loads(line) for line in fh]
    return [r for r in lines if r.get("kind") == "eval"]


def mean_rank_by_type(ranks: dict[str, int]) -> dict[str, float]:
    """Mean rank over the attention and the MLP matrices (names as in the ``cpu`` decoder)."""
    out = {}
    for label, kinds in (("attention", ATTENTION), ("mlp", MLP)):
        values = [r for n, r in ranks.items() if any(f".{k}." in n for k in kinds)]
        out[label] = statistics.fmean(values) if values else float("nan")
    return out


def collect(root: Path) -> dict[str, Any]:
    """The finished runs: final perplexity, state (mean and max over evaluations), ranks."""
    rows = []
    for run in runs():
        d = run.directory(root)
        summary = sweep.read_summary(d)
        if summary is None:
            continue
        evals = _evals(d)
        totals = [e["state_bytes"]["total"] for e in evals]
        rows.append(
            {
                "arm": run.arm,
                "lr": run.lr,
                "val_ppl": summary["val_ppl"],
                "state_mean_bytes": statistics.fmean(totals),
                "state_max_bytes": max(totals),
                "ranks_end": mean_rank_by_type(summary["ranks"]),
                "ranks_mean": {
                    k: statistics.fmean(mean_rank_by_type(e["ranks"])[k] for e in evals)
                    for k in ("attention", "mlp")
                },
                "tokens_per_s": summary["tokens_per_s"],
                # Per evaluation: step, validation perplexity, state bytes, mean ranks.
                "curve": [
                    {
                        "step": e["step"],
                        "val_ppl": e["val_ppl"],
                        "state_bytes": e["state_bytes"]["total"],
                        **mean_rank_by_type(e["ranks"]),
                    }
                    for e in evals
                ],
                "threads": json.loads((d / "config.json").read_text())["threads"],
            }
        )
    best = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if len(mine) == len(LRS):
            best[arm] = min(mine, key=lambda r: (r["val_ppl"], r["lr"]))["lr"]
    return {"budget_bytes": BUDGET, "rank": RANK, "steps": STEPS, "runs": rows, "best_lr": best,
            "planned": len(runs())}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.budget_study")
    parser.add_argument("action", choices=("plan", "run", "report"))
    parser.add_argument("--root", type=Path, default=Path("results/budget"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    if args.action == "report":
        report = collect(args.root)
        args.root.mkdir(parents=True, exist_ok=True)
        (args.root / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    if args.action == "plan":
        for run in runs():
            done = "done" if sweep.read_summary(run.directory(args.root)) else "todo"
            print(done, " ".join(run.command(args.root, args.threads)))
        return 0
    return (
        1 if sweep.execute(runs(), args.root, args.jobs, args.threads, "budget study runs") else 0
    )


if __name__ == "__main__":
    sys.exit(main())
