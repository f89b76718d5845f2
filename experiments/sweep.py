"""A fair optimizer comparison on the ``cpu`` decoder: a learning-rate sweep, then seeds.

Every run is one ``python -m experiments.pretrain`` process with ``--resume``, so the driver can
be killed and started again at any time: finished runs (``summary.json`` present) are skipped,
unfinished ones continue from their last checkpoint, and the rest start::

    python -m experiments.sweep plan  --stage lr          # what would run, and what is done
    python -m experiments.sweep run   --stage lr --jobs 2 # run it (two processes, one thread each)
    python -m experiments.sweep run   --stage seeds --jobs 2
    python -m experiments.sweep report                    # summary.json and CSV tables

Stages (all on the same tokens: one seed fixes weights, batches and sketches for every optimizer):

- ``lr``: each optimizer of `ARMS` over its three learning rates (`LR_GRID`, spaced ×3), seed 0,
  `LR_STEPS` steps. Where an optimizer's best finished run sits at an edge of its grid, the grid
  grows one step past that edge (up to `MAX_EXTENSIONS` steps), so every best is bracketed by a
  worse learning rate on both sides; ``run --stage lr`` re-plans until nothing is left to add.
- ``seeds``: each optimizer at its best learning rate of the ``lr`` stage (lowest final
  validation perplexity) with seeds 0, 1, 2 for `SEED_STEPS` steps, seed 0 of every optimizer
  first.
- ``equal_memory``: GaLore at the fixed rank whose optimizer state is closest to AdaRankAdamW's
  average state over its seeded runs, at GaLore's best learning rate, seeds 0, 1, 2.

Reported as mean ± std over seeds (sample std, n−1); two optimizers whose means differ by less
than twice the larger std are a tie. Runs write under ``results/sweep/<stage>/<arm>/`` (``--root``
moves it); checkpoints (``ckpt.pt``) are kept for resuming but not committed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

# name -> (experiments.pretrain --optimizer, --lowrank JSON)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "galore": ("galore", {}),
    "qgalore": ("qgalore", {}),
    "adarank": ("adarank", {}),
    "adarank_residual": ("adarank", {"residual": True}),
}
# Three learning rates spaced ×3 around each family's published default (AdamW 1e-3; the
# low-rank optimizers 1e-2 with α = 0.25, arXiv 2403.03507).
LR_GRID: dict[str, tuple[float, ...]] = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "galore": (3e-3, 1e-2, 3e-2),
    "qgalore": (3e-3, 1e-2, 3e-2),
    "adarank": (3e-3, 1e-2, 3e-2),
    "adarank_residual": (3e-3, 1e-2, 3e-2),
}
# Learning rates added past a grid's edge, per optimizer, at most (×3 each: 1e-3 -> 3e-4 -> 1e-4).
MAX_EXTENSIONS = 2
LR_STEPS = 1000
SEED_STEPS = 3000
SEEDS = (0, 1, 2)
MODEL = "cpu"
STAGES = ("lr", "seeds", "equal_memory")
# Settings shared by every run of the sweep (evaluation on 256 fixed windows every 100 steps).
COMMON = {"eval_every": 100, "ckpt_every": 100, "spectrum_every": 100}


@dataclass(frozen=True)
class Run:
    stage: str
    arm: str
    lr: float
    seed: int
    steps: int
    rank: int | None = None  # a fixed GaLore rank (equal-memory stage); None: the default

    def directory(self, root: Path) -> Path:
        rank = f"_r{self.rank}" if self.rank is not None else ""
        return root / self.stage / self.arm / f"lr{self.lr:g}{rank}_seed{self.seed}"

    def command(self, root: Path, threads: int) -> list[str]:
        optimizer, lowrank = ARMS[self.arm]
        cmd = [
            sys.executable, "-m", "experiments.pretrain",
            "--model", MODEL, "--optimizer", optimizer, "--lr", f"{self.lr:g}",
            "--seed", str(self.seed), "--steps", str(self.steps),
            "--lowrank", json.dumps(lowrank), "--out", str(self.directory(root)),
            "--threads", str(threads), "--resume", "--no-progress",
        ]  # fmt: skip
        for key, value in COMMON.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        if self.rank is not None:
            cmd += ["--rank", str(self.rank)]
        return cmd


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ladder_step(lr: float, up: bool) -> float:
    """The next learning rate on the 1, 3, 10, 30, ... ladder (×3 or ×10/3, as the grids)."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    m, e = int(mantissa), int(exponent)
    if m not in (1, 3):
        raise ValueError(f"learning rate {lr:g} is not on the 1-3-10 ladder of the grids")
    if up:
        return float(f"{3 if m == 1 else 1}e{e if m == 1 else e + 1}")
    return float(f"{3 if m == 1 else 1}e{e - 1 if m == 1 else e}")


def _finished_scores(root: Path, arm: str, lrs: Sequence[float]) -> dict[float, float]:
    scores = {}
    for lr in lrs:
        summary = read_summary(Run("lr", arm, lr, 0, LR_STEPS).directory(root))
        if summary is not None:
            scores[lr] = summary["val_ppl"]
    return scores


def arm_lrs(arm: str, root: Path | None = None) -> list[float]:
    """The arm's learning rates, ascending: `LR_GRID`, grown past an edge that holds the best.

    Without ``root`` (nothing finished yet) this is the base grid. With it, while the lowest
    finished perplexity is at the lowest (highest) learning rate planned, one more learning rate
    a ladder step lower (higher) is planned, `MAX_EXTENSIONS` times at most.
    """
    lrs = sorted(LR_GRID[arm])
    if root is None:
        return lrs
    for _ in range(MAX_EXTENSIONS):
        scores = _finished_scores(root, arm, lrs)
        if not scores:
            break
        best = min(scores, key=lambda lr: (scores[lr], lr))
        if best == lrs[0]:
            lrs.insert(0, _ladder_step(best, up=False))
        elif best == lrs[-1]:
            lrs.append(_ladder_step(best, up=True))
        else:
            break
    return lrs


def best_lrs(root: Path) -> dict[str, float]:
    """Each arm's learning rate with the lowest final validation perplexity in the lr stage.

    Raises ValueError while an arm's lr stage (its extensions included) is unfinished.
    """
    best: dict[str, float] = {}
    for arm in ARMS:
        lrs = arm_lrs(arm, root)
        scores = _finished_scores(root, arm, lrs)
        for lr in lrs:
            if lr not in scores:
                run_dir = Run("lr", arm, lr, 0, LR_STEPS).directory(root)
                raise ValueError(f"lr stage unfinished: {run_dir} has no summary")
        best[arm] = min(scores, key=lambda lr: (scores[lr], lr))
    return best


def lr_stage(root: Path | None = None) -> list[Run]:
    """The lr stage's runs: the base grids, then the learning rates added past their edges.

    Every arm's middle (published-default) learning rate comes first, then the lower, then the
    higher one: a sweep cut short still has every optimizer in it.
    """
    runs = [Run("lr", arm, sorted(LR_GRID[arm])[i], 0, LR_STEPS) for i in (1, 0, 2) for arm in ARMS]
    for arm in ARMS:
        runs += [
            Run("lr", arm, lr, 0, LR_STEPS) for lr in arm_lrs(arm, root) if lr not in LR_GRID[arm]
        ]
    return runs


def seed_stage(root: Path) -> list[Run]:
    best = best_lrs(root)
    return [Run("seeds", arm, best[arm], seed, SEED_STEPS) for seed in SEEDS for arm in ARMS]


def mean_state_bytes(run_dir: Path) -> float:
    """AdaRank's optimizer state averaged over the run's evaluation points."""
    values = []
    with open(run_dir / "metrics.jsonl") as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("kind") == "eval":
                values.append(record["state_bytes"]["total"])
    if not values:
        raise ValueError(f"{run_dir}/metrics.jsonl has no eval lines")
    return statistics.fmean(values)


def galore_state_bytes(rank: int) -> int:
    """GaLoreAdamW's state on the ``cpu`` decoder at a fixed rank, after one step."""
    import torch

    import adarank
    from experiments.model import Decoder, get_config

    torch.manual_seed(0)
    model = Decoder(get_config(MODEL, vocab_size=8192))
    groups = adarank.param_groups(model, exclude=("embed", "lm_head"), rank=rank)
    opt = adarank.GaLoreAdamW(groups, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return int(opt.state_bytes()["total"])


def equal_memory_rank(root: Path) -> int:
    """The GaLore rank whose state is closest to AdaRankAdamW's mean state over its seeds."""
    best = best_lrs(root)
    target = statistics.fmean(
        mean_state_bytes(Run("seeds", "adarank", best["adarank"], s, SEED_STEPS).directory(root))
        for s in SEEDS
    )
    lo, hi = 1, 256  # the state grows monotonically with the rank: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if galore_state_bytes(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    below = max(1, lo - 1)
    return min((below, lo), key=lambda r: abs(galore_state_bytes(r) - target))


def equal_memory_stage(root: Path) -> list[Run]:
    rank = equal_memory_rank(root)
    lr = best_lrs(root)["galore"]
    return [Run("equal_memory", "galore", lr, s, SEED_STEPS, rank=rank) for s in SEEDS]


def plan(stage: str, root: Path) -> list[Run]:
    if stage == "lr":
        return lr_stage(root)
    if stage == "seeds":
        return seed_stage(root)
    if stage == "equal_memory":
        return equal_memory_stage(root)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def execute(
    runs: Sequence[Any], root: Path, jobs: int, threads: int, desc: str = "sweep runs"
) -> int:
    """Run what is unfinished, ``jobs`` processes at a time; returns the number that failed."""
    todo = [r for r in runs if read_summary(r.directory(root)) is None]
    failed = 0
    active: list[tuple[Run, subprocess.Popen[bytes], Any]] = []
    with tqdm(total=len(runs), initial=len(runs) - len(todo), desc=desc) as bar:
        while todo or active:
            while todo and len(active) < jobs:
                run = todo.pop(0)
                run_dir = run.directory(root)
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = open(run_dir / ".lock", "w")
                try:  # a second driver never runs the same directory at the same time
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    lock.close()
                    tqdm.write(f"skipped, running in another process: {run_dir}")
                    bar.update(1)
                    continue
                log = open(run_dir / "run.log", "ab")
                log.write(
                    f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} load {os.getloadavg()}\n".encode()
                )
                log.flush()
                # The child inherits the lock and holds it until it exits, even if we die.
                proc = subprocess.Popen(
                    run.command(root, threads), stdout=log, stderr=log, pass_fds=(lock.fileno(),)
                )
                lock.close()
                active.append((run, proc, log))
            time.sleep(2)
            for item in list(active):
                run, proc, log = item
                if proc.poll() is None:
                    continue
                active.remove(item)
                log.close()
                if proc.returncode != 0:
                    failed += 1
                    tqdm.write(f"failed ({proc.returncode}): {run.directory(root)}/run.log")
                bar.update(1)
    return failed


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def collect(root: Path) -> dict[str, Any]:
    """Every finished run under ``root``: the lr stage's perplexities, each arm's best lr, and
    the seeded rows (mean ± std over seeds, state, tokens/s). Reads only."""
    lr_rows = []
    for run in lr_stage(root):
        s = read_summary(run.directory(root))
        if s is not None:
            lr_rows.append({"arm": run.arm, "lr": run.lr, "val_ppl": s["val_ppl"]})
    grid = {arm: arm_lrs(arm, root) for arm in ARMS}
    out: dict[str, Any] = {"lr_sweep": lr_rows, "seeds": [], "grid": grid}
    try:
        best = best_lrs(root)
    except ValueError:
        best = {}
    out["best_lr"] = best
    # Still at an edge once the grid has grown MAX_EXTENSIONS steps: not bracketed.
    out["best_at_grid_edge"] = sorted(
        a for a, lr in best.items() if lr in (min(grid[a]), max(grid[a]))
    )
    groups: dict[tuple[str, str, float, int | None], list[dict[str, Any]]] = {}
    for stage_dir in ("seeds", "equal_memory"):
        for path in sorted((root / stage_dir).glob("*/*/summary.json")):
            s = json.loads(path.read_text())
            cfg = json.loads((path.parent / "config.json").read_text())
            arm = path.parent.parent.name
            groups.setdefault(
                (stage_dir, arm, cfg["lr"], cfg["rank"] if stage_dir == "equal_memory" else None),
                [],
            ).append({**s, "seed": cfg["seed"], "mean_state_bytes": mean_state_bytes(path.parent)})
    adamw_state = None
    for (stage_dir, arm, lr, rank), runs in groups.items():
        ppl_mean, ppl_std = _mean_std([r["val_ppl"] for r in runs])
        state = statistics.fmean(r["mean_state_bytes"] for r in runs)
        row = {
            "stage": stage_dir, "arm": arm, "lr": lr, "rank": rank, "n_seeds": len(runs),
            "val_ppl_mean": ppl_mean, "val_ppl_std": ppl_std,
            "mean_state_mib": state / 2**20,
            "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in runs),
        }  # fmt: skip
        if arm == "adamw":
            adamw_state = state
        out["seeds"].append(row)
    out["seeds"].sort(key=lambda r: (r["stage"] != "seeds", list(ARMS).index(r["arm"])))
    for row in out["seeds"]:
        row["state_ratio_to_adamw"] = (
            row["mean_state_mib"] * 2**20 / adamw_state if adamw_state else None
        )
    return out


def report(root: Path) -> dict[str, Any]:
    """`collect`, written to ``summary.json``, ``lr_sweep.csv`` and ``seeds.csv`` in ``root``."""
    out = collect(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    _write_csv(root / "lr_sweep.csv", out["lr_sweep"])
    _write_csv(root / "seeds.csv", out["seeds"])
    return out


def is_tie(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Means closer than twice the larger of the two stds: not a measured difference."""
    spread = max(a["val_ppl_std"], b["val_ppl_std"])
    return abs(a["val_ppl_mean"] - b["val_ppl_mean"]) < 2 * spread


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("plan", "run", "report"))
    parser.add_argument("--stage", choices=STAGES, default="lr")
    parser.add_argument("--root", type=Path, default=Path("results/sweep"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    try:
        if args.action == "report":
            print(json.dumps(report(args.root)["best_lr"], indent=2))
            return 0
        runs = plan(args.stage, args.root)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.action == "plan":
        try:
            for run in runs:
                done = "done" if read_summary(run.directory(args.root)) else "todo"
                print(done, " ".join(run.command(args.root, args.threads)))
        except BrokenPipeError:  # `plan | head`
            sys.stderr.close()
        return 0
    while True:
        if execute(runs, args.root, args.jobs, args.threads):
            return 1
        if args.stage != "lr":
            return 0
        # Finished lr runs may have put a best at a grid's edge: plan what that adds. Runs
        # still unfinished after this pass (held by another driver) are not retried here.
        done = set(runs)
        runs = [
            r
            for r in plan(args.stage, args.root)
            if r not in done and read_summary(r.directory(args.root)) is None
        ]
        if not runs:
            return 0


if __name__ == "__main__":
    sys.exit(main())
