"""``adarank-spectrum``: tables and plots of gradient-spectrum logs, and a demo run that makes one.

    adarank-spectrum record --optimizer adarank --out runs/adarank.jsonl
    adarank-spectrum summary runs/adarank.jsonl [--json]
    adarank-spectrum plot runs/adarank.jsonl --out figures/
    adarank-spectrum compare runs/galore.jsonl runs/adarank.jsonl --out figures/

A missing, empty or corrupt log is reported in one line on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from adarank.analysis.io import LogError, SpectrumLog, load_log

PROG = "adarank-spectrum"


# -- summary ------------------------------------------------------------------------------------


def _summary_measures(log: SpectrumLog) -> list[str]:
    present = log.quantities
    energy = [q for q in present if q.startswith("energy_rank_")]
    wanted = ["stable_rank", "effective_rank", *energy, "optimizer_rank"]
    return [q for q in wanted if q in present]


def _first_last_min(values: np.ndarray) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"first": None, "last": None, "min": None}
    return {"first": float(finite[0]), "last": float(finite[-1]), "min": float(finite.min())}


def summarize(log: SpectrumLog) -> dict[str, Any]:
    """Per layer and measure: the first, last and smallest logged value (None if never logged)."""
    if len(log.steps) == 0:
        raise LogError(f"{log.path}: the log has a header but no records yet")
    measures = _summary_measures(log)
    shapes = {layer["name"]: layer.get("matrix_shape") for layer in log.header.get("layers", [])}
    layers = [
        {
            "name": name,
            "type": log.layer_type(name),
            "shape": shapes.get(name),
            "measures": {m: _first_last_min(log.stack(m, [name])[0]) for m in measures},
        }
        for name in log.layer_names
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # steps where no layer has a value
        means = {m: _first_last_min(np.nanmean(log.stack(m), axis=0)) for m in measures}
    optimizer = log.header.get("optimizer") or {}
    return {
        "path": log.path,
        "run": log.label,
        "model": (log.header.get("model") or {}).get("class"),
        "optimizer": optimizer.get("class"),
        "records": len(log.steps),
        "first_step": int(log.steps[0]),
        "last_step": int(log.steps[-1]),
        "measures": measures,
        "layers": layers,
        "mean_over_layers": means,
    }


_SHORT = {"stable_rank": "stable", "effective_rank": "effective", "optimizer_rank": "optimizer"}


def _cell(stats: dict[str, float | None], integer: bool) -> str:
    def number(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.0f}" if integer and float(value).is_integer() else f"{value:.1f}"

    return "/".join(number(stats[key]) for key in ("first", "last", "min"))


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table, one row per layer plus the mean over layers."""
    measures = summary["measures"]
    titles = [_SHORT.get(m, m.replace("energy_rank_", "E")) for m in measures]
    integer = {m: m.startswith("energy_rank_") or m == "optimizer_rank" for m in measures}
    rows = []
    for layer in summary["layers"]:
        shape = "x".join(str(d) for d in layer["shape"]) if layer["shape"] else "?"
        cells = [_cell(layer["measures"][m], integer[m]) for m in measures]
        rows.append([layer["name"], layer["type"], shape, *cells])
    means = [_cell(summary["mean_over_layers"][m], False) for m in measures]
    rows.append(["mean over layers", "", "", *means])
    header = ["layer", "type", "shape", *titles]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        left = [str(c).ljust(w) for c, w in zip(row[:3], widths[:3], strict=True)]
        right = [str(c).rjust(w) for c, w in zip(row[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line(header))
    intro = (
        f"run {summary['run']!r}: {summary['model']} with {summary['optimizer'] or 'no optimizer'}"
        f", {summary['records']} record{'s' * (summary['records'] != 1)}"
        f", steps {summary['first_step']}-{summary['last_step']}"
    )
    note = (
        "each cell: first/last/min over the logged steps; E<η>: energy rank, the fewest singular "
        "values holding a fraction η of ‖G‖_F²; '-': not logged"
    )
    return "\n".join(
        [intro, rule, line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]), "", note]
    )


# -- commands -----------------------------------------------------------------------------------


def _load(path: str) -> SpectrumLog:
    """load_log, with its torn-line warning printed as one line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = load_log(path)
    for warning in caught:
        print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
    if len(log.steps) == 0:
        raise LogError(f"{path}: the log has a header but no records yet")
    return log


def _json_default(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _cmd_summary(args: argparse.Namespace) -> int:
    summary = summarize(_load(args.log))
    if args.json:
        print(json.dumps(summary, indent=1, default=_json_default))
    else:
        print(format_summary(summary))
    return 0


def _check_measure(log: SpectrumLog, measure: str | None) -> None:
    if measure is not None and measure not in log.quantities:
        raise LogError(f"{log.path}: no quantity {measure!r}; logged: {', '.join(log.quantities)}")


def _cmd_plot(args: argparse.Namespace) -> int:
    from adarank.analysis.plots import write_plots

    log = _load(args.log)
    _check_measure(log, args.measure)
    for path in write_plots(log, args.out, fmt=args.format, measure=args.measure, steps=args.steps):
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from adarank.analysis.plots import write_comparison

    logs = [_load(path) for path in args.logs]
    if args.labels and len(args.labels) != len(logs):
        raise LogError(f"--labels gives {len(args.labels)} names for {len(logs)} logs")
    for log in logs:
        _check_measure(log, args.measure)
    for path in write_comparison(
        logs, args.out, fmt=args.format, labels=args.labels, measure=args.measure
    ):
        print(path)
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    from adarank.analysis.demo import DemoConfig, train

    config = DemoConfig(
        optimizer=args.optimizer,
        steps=args.steps,
        every=args.every,
        lr=args.lr,
        rank=args.rank,
        update_gap=args.update_gap,
        eta=args.eta,
        seed=args.seed,
    )
    result = train(config, args.out)
    logging = result["record_seconds"]
    training = result["train_seconds"] - logging
    print(
        f"wrote {args.out}: {result['records']} records over {config.steps} steps "
        f"({config.optimizer}); loss {result['initial_loss']:.2f} -> {result['final_loss']:.2f}"
    )
    print(
        f"time: training {training:.2f} s, spectrum logging {logging:.3f} s "
        f"= {100 * logging / training:.1f}% overhead at every={config.every}"
    )
    return 0


# -- parser -------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Gradient spectra and rank trajectories from a spectrum log written by "
        "analysis.SpectrumLogger (a JSON Lines file).",
        epilog="Run '%(prog)s COMMAND --help' for the options of each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    summary = commands.add_parser(
        "summary",
        help="table of first/last/min rank per layer and measure",
        description="Print, for every logged layer and every rank measure (stable, effective, "
        "energy ranks, the optimizer's rank), its first, last and minimum value over the run.",
    )
    summary.add_argument("log", metavar="LOG", help="spectrum log (.jsonl)")
    summary.add_argument("--json", action="store_true", help="machine-readable JSON instead")
    summary.set_defaults(run=_cmd_summary)

    formats = ("png", "pdf", "svg")
    plot = commands.add_parser(
        "plot",
        help="figures of one run",
        description="Write overview (the rank-decay figure), spectra, ranks (per layer and by "
        "layer type), heatmap (layer x step) and captured (captured gradient norm) to DIR.",
    )
    plot.add_argument("log", metavar="LOG", help="spectrum log (.jsonl)")
    plot.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    plot.add_argument("--format", choices=formats, default="png", help="file format (png)")
    plot.add_argument(
        "--measure",
        help="rank measure to plot, e.g. energy_rank_0.99, stable_rank (default: energy_rank_0.9)",
    )
    plot.add_argument(
        "--steps",
        type=int,
        nargs="+",
        metavar="STEP",
        help="steps whose spectra to draw (default: 5 evenly spaced)",
    )
    plot.set_defaults(run=_cmd_plot)

    compare = commands.add_parser(
        "compare",
        help="several runs on the same axes",
        description="Write compare (gradient rank, optimizer rank, captured norm and loss, one "
        "line per run) and compare_by_type (one panel per layer type) to DIR.",
    )
    compare.add_argument("logs", nargs="+", metavar="LOG", help="spectrum logs, one per run")
    compare.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    compare.add_argument(
        "--labels",
        nargs="+",
        metavar="NAME",
        help="run names, one per LOG (default: each log's run name)",
    )
    compare.add_argument("--format", choices=formats, default="png", help="file format (png)")
    compare.add_argument("--measure", help="rank measure to compare (default: energy_rank_0.9)")
    compare.set_defaults(run=_cmd_compare)

    record = commands.add_parser(
        "record",
        help="train a small built-in model on CPU and log its spectra",
        description="Train a 2-block LLaMA-style character-level language model (0.4M "
        "parameters) on Python's own documentation text, logging gradient spectra to LOG, and "
        "report the time spent logging. 300 steps take about 10-20 s on 2 CPU cores.",
    )
    record.add_argument("--out", required=True, metavar="LOG", help="log file to write")
    record.add_argument(
        "--optimizer",
        choices=("adamw", "galore", "adarank"),
        default="adarank",
        help="torch AdamW, GaLore (fixed rank) or AdaRankAdamW (default)",
    )
    record.add_argument("--steps", type=_positive, default=300, help="training steps (300)")
    record.add_argument("--every", type=_positive, default=10, help="log every N steps (10)")
    record.add_argument("--lr", type=float, help="learning rate (3e-3 adamw, 1e-2 otherwise)")
    record.add_argument(
        "--rank",
        type=_positive,
        default=16,
        help="GaLore rank; AdaRankAdamW's max_rank is 4x this (16)",
    )
    record.add_argument(
        "--update-gap", type=_positive, default=50, help="steps between subspace refreshes, T (50)"
    )
    record.add_argument("--eta", type=float, default=0.9, help="AdaRankAdamW energy η (0.9)")
    record.add_argument("--seed", type=int, default=0, help="seed of weights and batches (0)")
    record.set_defaults(run=_cmd_record)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adarank-spectrum``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader left early (`summary --json | head`): stop quietly. Output still buffered
        # would fail again when Python flushes stdout at exit, so stdout goes to devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (LogError, ValueError, OSError, RuntimeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
