"""Print a comparison table of finished pre-training runs from their ``summary.json``.

    python -m experiments.compare results/cpu_adamw results/cpu_adarank

Columns: validation perplexity (final and best), tokens/s, optimizer-state bytes, peak memory,
and the mean and range of the low-rank optimizers' final per-layer ranks. Every number is read
from the runs' logs; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.runfiles import read_json_lines


def load_run(path: str | Path) -> dict[str, Any]:
    """``summary.json`` of the run in ``path``, with ``best_val_ppl`` from ``metrics.jsonl``."""
    path = Path(path)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: has the run in {path} finished?")
    summary = json.loads(summary_path.read_text())
    evals = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        evals = [r["val_ppl"] for r in read_json_lines(metrics) if r.get("kind") == "eval"]
    summary["best_val_ppl"] = min(evals) if evals else summary["val_ppl"]
    summary["run"] = path.name
    return summary


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _ranks(ranks: dict[str, int] | None) -> str:
    if not ranks:
        return "full"
    values = list(ranks.values())
    return f"{sum(values) / len(values):.1f} ({min(values)}-{max(values)})"


def comparison_table(runs: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per run summary (as returned by `load_run`)."""
    header = (
        "| run | optimizer | val ppl | best val ppl | tokens/s | optimizer state MiB "
        "| peak memory MiB | rank mean (min-max) |"
    )
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        tps = r.get("tokens_per_s")
        rows.append(
            f"| {r['run']} | {r['optimizer']} | {r['val_ppl']:.2f} | {r['best_val_ppl']:.2f} "
            f"| {'-' if tps is None or math.isnan(tps) else f'{tps:.0f}'} "
            f"| {_mib(r['state_bytes']['total'])} | {_mib(r.get('peak_memory_bytes'))} "
            f"| {_ranks(r.get('ranks'))} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description="Compare finished experiments.pretrain runs (their summary.json files).",
    )
    parser.add_argument("runs", nargs="+", help="run directories (the --out of each run)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(comparison_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
