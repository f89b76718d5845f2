"""Loading the runs of a comparison, and what every figure shares (labels, colours, checks).

A run is the output directory of one `experiments.pretrain` run: ``summary.json``,
``metrics.jsonl`` and ``spectrum.jsonl`` must all be there; anything missing or unreadable raises
:class:`InputError` naming the file, before any figure is drawn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adarank.analysis import LogError, SpectrumLog, load_log
from experiments.compare import load_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = REPO / "paper_figures" / "runs.json"
DEFAULT_OUT = REPO / "paper_figures" / "out"
DEFAULT_README = REPO / "README.md"

REQUIRED_FILES = ("summary.json", "metrics.jsonl", "spectrum.jsonl")

# One colour per optimizer in every figure; AdamW, the reference, in neutral grey.
_OPTIMIZERS = {
    "adamw": ("AdamW", "#4d4d4d"),
    "galore": ("GaLore", "#d95f02"),
    "adarank": ("AdaRankAdamW", "#1b9e77"),
    "qgalore": ("Q-GaLore", "#7570b3"),
}
_SPARE_COLORS = ("#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4")
REFERENCE = "adamw"


class InputError(Exception):
    """A runs file, run directory or log that is missing or unreadable; the message names it."""


def shown(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it, else as given."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


@dataclass
class Run:
    """One pre-training run: its logs, parsed, and how the figures draw it.

    Attributes:
        key: its name in ``runs.json`` (``"adamw"``).
        source: its directory as written in ``runs.json`` (kept for provenance lines).
        path: that directory, resolved against the repository root.
        summary: `experiments.compare.load_run`'s dict (``summary.json`` + ``best_val_ppl``).
        header: the ``header`` line of ``metrics.jsonl`` (config, parameters, device, ...).
        train: the ``train`` lines, in step order.
        evals: the ``eval`` lines, in step order.
        spectrum: the spectrum log.
        label, color: legend text and colour, fixed per optimizer.
    """

    key: str
    source: str
    path: Path
    summary: dict[str, Any]
    header: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    spectrum: SpectrumLog
    label: str = ""
    color: str = ""

    @property
    def optimizer(self) -> str:
        return str(self.summary["optimizer"])

    def series(self, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``key`` over the ``train`` or ``eval`` lines, as float arrays."""
        records = self.train if kind == "train" else self.evals
        steps = np.array([r["step"] for r in records], dtype=float)
        values = np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)
        return steps, values


@dataclass
class Comparison:
    """Runs compared on the same model and tokens, in the order ``runs.json`` lists them."""

    name: str
    runs: list[Run]

    @property
    def reference(self) -> Run | None:
        """The AdamW run that ratios are taken against, if the comparison has one."""
        return next((run for run in self.runs if run.optimizer == REFERENCE), None)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{shown(path)}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{shown(path)}: not valid JSON ({err})") from err


def _read_metrics(path: Path) -> tuple[dict[str, Any], list[dict], list[dict]]:
    header: dict[str, Any] = {}
    train: list[dict] = []
    evals: list[dict] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{shown(path)}:{number}: not valid JSON ({err})") from err
        kind = record.get("kind")
        if kind == "header":
            header = record
        elif kind == "train":
            train.append(record)
        elif kind == "eval":
            evals.append(record)
    if not train or not evals:
        raise InputError(f"{shown(path)}: no train or eval lines (is the run finished?)")
    return header, train, evals


def load_run_dir(key: str, source: str) -> Run:
    """Read the run in ``source`` (relative to the repository root, or absolute)."""
    path = REPO / source
    if not path.is_dir():
        raise InputError(f"{shown(path)}: no such run directory (named {key!r} in the runs file)")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise InputError(f"{shown(path / name)}: no such file (run {key!r} is incomplete)")
    try:
        summary = load_run(path)
    except (json.JSONDecodeError, KeyError) as err:
        raise InputError(f"{shown(path / 'summary.json')}: unreadable summary ({err})") from err
    header, train, evals = _read_metrics(path / "metrics.jsonl")
    try:
        spectrum = load_log(path / "spectrum.jsonl")
    except LogError as err:
        raise InputError(str(err)) from err
    if len(spectrum.steps) == 0:
        raise InputError(f"{shown(path / 'spectrum.jsonl')}: no records")
    return Run(key, source, path, summary, header, train, evals, spectrum)


def _dress(runs: list[Run]) -> None:
    """Labels and colours: by optimizer, with the runs-file key added when one is used twice."""
    optimizers = [run.optimizer for run in runs]
    spare = iter(_SPARE_COLORS * 4)
    for run in runs:
        name, color = _OPTIMIZERS.get(run.optimizer, (run.optimizer, ""))
        run.label = name if optimizers.count(run.optimizer) == 1 else f"{name} ({run.key})"
        run.color = color if color and optimizers.count(run.optimizer) == 1 else next(spare)


def load_comparisons(runs_file: str | os.PathLike) -> list[Comparison]:
    """Every comparison of ``runs_file``, each run fully read (so errors surface up front)."""
    path = Path(runs_file)
    spec = _read_json(path)
    if (
        not isinstance(spec, dict)
        or not spec
        or not all(
            isinstance(runs, dict) and runs and all(isinstance(p, str) for p in runs.values())
            for runs in spec.values()
        )
    ):
        raise InputError(
            f"{shown(path)}: expected {{comparison: {{run name: run directory, ...}}, ...}}"
        )
    comparisons = []
    for name, runs in spec.items():
        loaded = [load_run_dir(key, source) for key, source in runs.items()]
        _dress(loaded)
        comparisons.append(Comparison(name, loaded))
    return comparisons


def has_quantity(log: SpectrumLog, quantity: str) -> bool:
    """Whether any layer logged a finite ``quantity`` at any step."""
    return any(np.isfinite(layer.get(quantity, np.nan)).any() for layer in log.layers.values())


def representative_layer(log: SpectrumLog, kind: str) -> str | None:
    """The middle layer of type ``kind`` in model order (a typical block), or None."""
    names = [name for name in log.layer_names if log.layer_type(name) == kind]
    return names[len(names) // 2] if names else None
