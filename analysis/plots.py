"""Plots of a spectrum log: spectra, rank trajectories, a layer × step heatmap, captured energy.

Helpers named ``plot_*`` draw on a given matplotlib ``ax`` and return the artists they made;
``*_figure`` functions compose them into a ``matplotlib.figure.Figure``; :func:`write_plots` and
:func:`write_comparison` save the standard set to a folder. Figures are built without pyplot
(rendered by Agg when saved), so importing this module never changes a notebook's backend, and
saved files carry no timestamp or version metadata: the same log gives the same bytes.

Colours are fixed per layer type (q, k, v, o, gate, up, down, ...) in every figure of one run,
and per run (in the order given) in comparisons.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from adarank.analysis.io import SpectrumLog
from adarank.analysis.layer_types import type_sort_key

__all__ = [
    "comparison_figure",
    "default_measure",
    "heatmap_figure",
    "measure_label",
    "overview_figure",
    "plot_captured_energy",
    "plot_measures",
    "plot_rank_by_type",
    "plot_rank_heatmap",
    "plot_rank_trajectories",
    "plot_spectra",
    "save_figure",
    "spectra_figure",
    "trajectories_figure",
    "captured_figure",
    "write_comparison",
    "write_plots",
]

# Tableau colours, one per canonical type; other types take the spare ones in name order.
_TYPE_COLORS = {
    "q": "#1f77b4",
    "k": "#ff7f0e",
    "v": "#2ca02c",
    "qkv": "#17becf",
    "o": "#d62728",
    "gate": "#9467bd",
    "up": "#8c564b",
    "down": "#e377c2",
}
_SPARE_COLORS = ("#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
# Runs in comparisons (ColorBrewer Dark2): distinct from one another on white.
_RUN_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
# Early steps dark, late steps bright; viridis without its last, hard-to-see yellow.
_STEP_CMAP = LinearSegmentedColormap.from_list(
    "steps", ["#440154", "#3b528b", "#21918c", "#5ec962", "#b5de2b"]
)
_MEASURE_LABELS = {
    "stable_rank": r"stable rank $\|G\|_F^2/\|G\|_2^2$",
    "effective_rank": r"effective rank $e^{H(\sigma/\Sigma\sigma)}$",
    "optimizer_rank": "optimizer's rank",
    "captured_energy": r"captured $\|P^\top G\|_F/\|G\|_F$",
    "fro_norm": r"$\|G\|_F$",
    "refresh_count": "refreshes",
    "subspace_overlap": "subspace overlap at refresh",
}


def measure_label(quantity: str) -> str:
    """Axis label of a logged quantity: ``"energy_rank_0.9"`` -> ``"energy rank (η = 0.9)"``."""
    if quantity.startswith("energy_rank_"):
        return f"energy rank (η = {quantity.removeprefix('energy_rank_')})"
    return _MEASURE_LABELS.get(quantity, quantity.replace("_", " "))


def default_measure(log: SpectrumLog) -> str:
    """The rank measure plotted unless told otherwise: energy rank at η = 0.9, else the first."""
    energy = [q for q in log.quantities if q.startswith("energy_rank_")]
    if "energy_rank_0.9" in energy:
        return "energy_rank_0.9"
    return energy[0] if energy else "stable_rank"


def short_name(name: str) -> str:
    """``"model.layers.3.self_attn.q_proj.weight"`` -> ``"3.q_proj"``: block indices + module."""
    parts = name.removesuffix(".weight").split(".")
    numbers = [part for part in parts if part.isdigit()]
    words = [part for part in parts if not part.isdigit()]
    return ".".join([*numbers, words[-1]]) if words else name


def _types(log: SpectrumLog) -> dict[str, list[str]]:
    """Layer names grouped by type, types in canonical order."""
    groups: dict[str, list[str]] = {}
    for name in log.layer_names:
        groups.setdefault(log.layer_type(name), []).append(name)
    return {kind: groups[kind] for kind in sorted(groups, key=type_sort_key)}


def _type_colors(kinds: Iterable[str]) -> dict[str, str]:
    spare = iter(_SPARE_COLORS * 4)
    others = sorted(kind for kind in kinds if kind not in _TYPE_COLORS)
    return {**_TYPE_COLORS, **{kind: next(spare) for kind in others}}


def _nanmean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN, quietly
        return np.nanmean(values, axis=axis)


def _nanextreme(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmin(values, axis=axis), np.nanmax(values, axis=axis)


def _has(log: SpectrumLog, quantity: str) -> bool:
    return any(np.isfinite(layer.get(quantity, np.nan)).any() for layer in log.layers.values())


def _marker(log: SpectrumLog) -> dict[str, Any]:
    """Dots on the lines when records are few, so sparse logs (and single records) show."""
    return {"marker": "o", "markersize": 3.5} if len(log.steps) <= 20 else {}


def _legend_above(
    ax: Axes, *args: Any, ncol: int, title: str | None = None, **kwargs: Any
) -> Legend:
    """A legend across the top of ``ax``, the y range raised (from 0) so it hides no data."""
    handles = args[0] if args else ax.get_legend_handles_labels()[0]
    rows = -(-len(handles) // ncol) + (title is not None)
    covered = min(0.5, 0.05 + 0.06 * rows)  # fraction of the axes height the legend takes
    top = ax.dataLim.y1 if np.isfinite(ax.dataLim.y1) else 1.0
    ax.set_ylim(0, 1.04 * top / (1 - covered))
    return ax.legend(
        *args, loc="upper center", ncol=ncol, title=title, fontsize=8, title_fontsize=8, **kwargs
    )


def _style(ax: Axes, xlabel: str, ylabel: str, title: str) -> None:
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3, linewidth=0.6)


# -- helpers on one ax ---------------------------------------------------------------------------


def plot_spectra(
    ax: Axes, log: SpectrumLog, layer: str, *, steps: Sequence[int] | None = None, count: int = 5
) -> list[Artist]:
    """Singular values σ_i of one layer's gradient against i, at several steps, on a log scale.

    Args:
        steps: the logged steps to draw (nearest logged step to each); default ``count`` steps
            evenly spaced from the first to the last record.
    """
    sv = log.layers[layer].get("sv")
    if sv is None or not np.isfinite(sv).any():
        return [ax.text(0.5, 0.5, "no spectrum logged", ha="center", transform=ax.transAxes)]
    rows = np.flatnonzero(np.isfinite(sv).any(axis=1))
    if steps is None:
        spaced = np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)
        picks = rows[np.unique(spaced)]
    else:
        picks = np.unique([rows[np.argmin(np.abs(log.steps[rows] - s))] for s in steps])
    artists: list[Artist] = []
    for order, row in enumerate(picks):
        values = np.where(sv[row] > 0, sv[row], np.nan)
        color = _STEP_CMAP(order / max(len(picks) - 1, 1))
        (line,) = ax.plot(
            np.arange(1, len(values) + 1),
            values,
            color=color,
            linewidth=1.6,
            label=f"step {log.steps[row]}",
        )
        artists.append(line)
    ax.set_yscale("log")
    _style(
        ax,
        "index i",
        r"singular value $\sigma_i$",
        f"{short_name(layer)} ({log.layer_type(layer)})",
    )
    artists.append(ax.legend(fontsize=8, title="gradient at", title_fontsize=8))
    return artists


def plot_rank_trajectories(
    ax: Axes, log: SpectrumLog, measure: str, *, layers: Iterable[str] | None = None
) -> list[Artist]:
    """One line per layer of ``measure`` against step, coloured by layer type."""
    names = list(log.layer_names if layers is None else layers)
    colors = _type_colors(log.layer_type(name) for name in names)
    artists: list[Artist] = []
    legend: dict[str, Line2D] = {}
    for name in names:
        kind = log.layer_type(name)
        (line,) = ax.plot(
            log.steps,
            log.stack(measure, [name])[0],
            color=colors[kind],
            linewidth=1.1,
            alpha=0.75,
            **_marker(log),
        )
        artists.append(line)
        legend.setdefault(kind, line)
    _style(ax, "step", measure_label(measure), f"{measure_label(measure)}, per layer")
    kinds = sorted(legend, key=type_sort_key)
    artists.append(_legend_above(ax, [legend[k] for k in kinds], kinds, ncol=4, title="layer type"))
    return artists


def plot_rank_by_type(
    ax: Axes,
    log: SpectrumLog,
    measure: str,
    *,
    band: bool = True,
    linestyle: str = "-",
    legend: bool = True,
) -> list[Artist]:
    """Mean of ``measure`` over the layers of each type against step; min-max band shaded."""
    groups = _types(log)
    colors = _type_colors(groups)
    artists: list[Artist] = []
    lines: list[Line2D] = []
    for kind, names in groups.items():
        values = log.stack(measure, names)
        if not np.isfinite(values).any():
            continue
        (line,) = ax.plot(
            log.steps,
            _nanmean(values),
            color=colors[kind],
            linewidth=1.8,
            linestyle=linestyle,
            label=f"{kind} ({len(names)})",
            **_marker(log),
        )
        lines.append(line)
        artists.append(line)
        if band and len(names) > 1:
            low, high = _nanextreme(values)
            artists.append(
                ax.fill_between(log.steps, low, high, color=colors[kind], alpha=0.12, linewidth=0)
            )
    _style(ax, "step", measure_label(measure), f"{measure_label(measure)}, mean by layer type")
    if legend and lines:
        artists.append(
            _legend_above(
                ax,
                lines,
                [line.get_label() for line in lines],
                ncol=4,
                title="layer type (number of layers)",
            )
        )
    return artists


def plot_measures(ax: Axes, log: SpectrumLog) -> list[Artist]:
    """Every rank measure averaged over layers; the optimizer's rank dashed, when logged."""
    measures = [q for q in log.quantities if q.startswith("energy_rank_")]
    measures += ["effective_rank", "stable_rank"]
    shades = dict(
        zip(measures, ("#08306b", "#2171b5", "#6baed6", "#238b45", "#74c476"), strict=False)
    )
    artists: list[Artist] = []
    for measure in measures:
        if _has(log, measure):
            (line,) = ax.plot(
                log.steps,
                _nanmean(log.stack(measure)),
                linewidth=1.8,
                color=shades.get(measure, "#999999"),
                label=measure_label(measure),
                **_marker(log),
            )
            artists.append(line)
    if _has(log, "optimizer_rank"):
        (line,) = ax.plot(
            log.steps,
            _nanmean(log.stack("optimizer_rank")),
            color="black",
            linewidth=2.0,
            linestyle="--",
            label="optimizer's rank",
            **_marker(log),
        )
        artists.append(line)
    _style(ax, "step", "rank (mean over layers)", "gradient rank measures, mean over layers")
    artists.append(_legend_above(ax, ncol=2))
    return artists


def plot_rank_heatmap(ax: Axes, log: SpectrumLog, measure: str) -> list[Artist]:
    """Layers (rows, in model order) × logged steps (columns), coloured by ``measure``.

    Returns the mesh first (pass it to ``fig.colorbar``). Cells not logged are grey.
    """
    values = np.ma.masked_invalid(log.stack(measure))
    steps = log.steps.astype(float)
    if len(steps) > 1:
        middles = (steps[1:] + steps[:-1]) / 2
        first, last = 2 * steps[0] - middles[0], 2 * steps[-1] - middles[-1]
        edges = np.concatenate([[first], middles, [last]])
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    cmap = _STEP_CMAP.with_extremes(bad="#dddddd")
    mesh = ax.pcolormesh(
        edges, np.arange(len(log.layer_names) + 1), values, cmap=cmap, shading="flat"
    )
    ax.set_ylim(len(log.layer_names), 0)
    names = [short_name(name) for name in log.layer_names]
    every = max(1, int(np.ceil(len(names) / 40)))  # at most ~40 readable labels
    ax.set_yticks(np.arange(0, len(names), every) + 0.5, names[::every], fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title(f"{measure_label(measure)}, layer × step", fontsize=11)
    return [mesh]


def _top_fraction(sv: np.ndarray, fro: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """‖G_r‖_F/‖G‖_F for the best rank-r approximation; NaN where r exceeds the stored values."""
    out = np.full(len(fro), np.nan)
    energy = np.nancumsum(sv**2, axis=1) if sv.size else np.zeros((len(fro), 0))
    for row, (r, total) in enumerate(zip(ranks, fro**2, strict=True)):
        if np.isfinite(r) and 1 <= r <= energy.shape[1] and total > 0:
            out[row] = np.sqrt(min(energy[row, int(r) - 1] / total, 1.0))
    return out


def plot_captured_energy(
    ax: Axes, log: SpectrumLog, *, ranks: Sequence[int] = (1, 4, 16)
) -> list[Artist]:
    """Fraction of ‖G‖_F the low-rank subspace captures, against step.

    With an adarank optimizer: its measured ‖PᵀG‖_F/‖G‖_F per layer type (thin), the mean over
    layers (thick), and, dotted, the best any rank-r subspace could do at the same ranks (the top
    r singular directions of the logged gradient), so a stale subspace shows as a gap. Without one:
    the best fraction at each fixed rank in ``ranks``, mean over layers.
    """
    artists: list[Artist] = []
    if _has(log, "captured_energy"):
        groups = _types(log)
        colors = _type_colors(groups)
        for kind, names in groups.items():
            values = log.stack("captured_energy", names)
            if np.isfinite(values).any():
                (line,) = ax.plot(
                    log.steps,
                    _nanmean(values),
                    color=colors[kind],
                    linewidth=1.0,
                    alpha=0.8,
                    label=kind,
                    **_marker(log),
                )
                artists.append(line)
        (line,) = ax.plot(
            log.steps,
            _nanmean(log.stack("captured_energy")),
            color="black",
            linewidth=2.2,
            label="mean over layers",
            **_marker(log),
        )
        artists.append(line)
        best = [
            _top_fraction(
                layer.get("sv", np.zeros((len(log.steps), 0))),
                layer["fro_norm"],
                layer.get("optimizer_rank", np.full(len(log.steps), np.nan)),
            )
            for layer in log.layers.values()
            if "fro_norm" in layer
        ]
        if best and np.isfinite(best).any():
            (line,) = ax.plot(
                log.steps,
                _nanmean(np.stack(best)),
                color="black",
                linewidth=1.8,
                linestyle=":",
                label="best at same rank (mean)",
                **_marker(log),
            )
            artists.append(line)
        title = "captured gradient norm by the optimizer's subspace"
    else:
        for order, r in enumerate(ranks):
            best = [
                _top_fraction(layer["sv"], layer["fro_norm"], np.full(len(log.steps), r))
                for layer in log.layers.values()
                if "sv" in layer and "fro_norm" in layer
            ]
            if best:
                (line,) = ax.plot(
                    log.steps,
                    _nanmean(np.stack(best)),
                    linewidth=1.8,
                    color=_STEP_CMAP(order / max(len(ranks) - 1, 1)),
                    label=f"top {r} direction{'s' if r > 1 else ''}",
                    **_marker(log),
                )
                artists.append(line)
        title = "gradient norm captured by the top singular directions"
    _style(ax, "step", r"fraction of $\|G\|_F$ captured", title)
    ax.set_ylim(0, 1.02)
    if artists:
        artists.append(ax.legend(fontsize=8, ncol=2, loc="lower right"))
    return artists


# -- figures -------------------------------------------------------------------------------------


def _check_records(log: SpectrumLog) -> None:
    if len(log.steps) == 0:
        raise ValueError(f"{log.path}: the log has a header but no records yet")


def _suptitle(fig: Figure, log: SpectrumLog, what: str) -> None:
    model = (log.header.get("model") or {}).get("class", "model")
    fig.suptitle(
        f"{what} — run {log.label!r} ({model}, {len(log.layer_names)} matrices, "
        f"steps {log.steps[0]}–{log.steps[-1]})",
        fontsize=12,
    )


def _representative_layers(log: SpectrumLog) -> list[str]:
    """One layer per type: the middle one of its kind, so the panels show a typical block."""
    return [names[len(names) // 2] for names in _types(log).values()]


def overview_figure(log: SpectrumLog, *, measure: str | None = None) -> Figure:
    """The decay figure: rank by layer type, all measures, a spectrum over time, the heatmap."""
    _check_records(log)
    measure = measure or default_measure(log)
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    if _has(log, "optimizer_rank"):
        # Dashed first, so the legend (drawn by the solid call) makes room for both.
        plot_rank_by_type(
            axes[0, 0], log, "optimizer_rank", band=False, linestyle="--", legend=False
        )
    plot_rank_by_type(axes[0, 0], log, measure)
    if _has(log, "optimizer_rank"):
        axes[0, 0].set_ylabel("rank (mean over the type's layers)")
        axes[0, 0].set_title(
            f"{measure_label(measure)} (solid) and optimizer's rank (dashed)", fontsize=11
        )
    plot_measures(axes[0, 1], log)
    layers = _representative_layers(log)
    plot_spectra(axes[1, 0], log, layers[0])
    mesh = plot_rank_heatmap(axes[1, 1], log, measure)[0]
    fig.colorbar(cast(ScalarMappable, mesh), ax=axes[1, 1], label=measure_label(measure))
    _suptitle(fig, log, "Gradient rank over training")
    return fig


def spectra_figure(log: SpectrumLog, *, steps: Sequence[int] | None = None) -> Figure:
    """Spectra at several steps for one layer of each type (the middle one of its kind)."""
    _check_records(log)
    layers = _representative_layers(log)
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    fig = Figure(figsize=(3.6 * columns + 0.6, 3.2 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax, layer in zip(axes, layers, strict=False):
        plot_spectra(ax, log, layer, steps=steps)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    _suptitle(fig, log, "Gradient singular values")
    return fig


def trajectories_figure(log: SpectrumLog, *, measure: str | None = None) -> Figure:
    """``measure`` per layer (left) and mean by layer type (right)."""
    _check_records(log)
    measure = measure or default_measure(log)
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    plot_rank_by_type(right, log, measure)
    plot_rank_trajectories(left, log, measure)  # last: its legend sets the shared y range
    _suptitle(fig, log, "Rank trajectories")
    return fig


def heatmap_figure(log: SpectrumLog, *, measure: str | None = None) -> Figure:
    _check_records(log)
    measure = measure or default_measure(log)
    fig = Figure(figsize=(9, 2.2 + 0.18 * min(len(log.layer_names), 40)), layout="constrained")
    ax = fig.subplots()
    mesh = plot_rank_heatmap(ax, log, measure)[0]
    fig.colorbar(cast(ScalarMappable, mesh), ax=ax, label=measure_label(measure))
    _suptitle(fig, log, "Rank by layer")
    return fig


def captured_figure(log: SpectrumLog) -> Figure:
    _check_records(log)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    plot_captured_energy(fig.subplots(), log)
    _suptitle(fig, log, "Captured gradient")
    return fig


def _comparison_inputs(
    logs: Sequence[SpectrumLog], labels: Sequence[str] | None, measure: str | None
) -> tuple[list[str], str]:
    """Check every log has records; the runs' labels and the measure (defaults from the logs)."""
    for log in logs:
        _check_records(log)
    labels = list(labels) if labels else [log.label for log in logs]
    return labels, measure or default_measure(logs[0])


def _plot_run(
    ax: Axes, log: SpectrumLog, index: int, y: np.ndarray, label: str, linewidth: float = 1.8
) -> list:
    """Run number ``index``'s line in a comparison: its colour and its log's markers."""
    return ax.plot(
        log.steps,
        y,
        linewidth=linewidth,
        label=label,
        color=_RUN_COLORS[index % len(_RUN_COLORS)],
        **_marker(log),
    )


def comparison_figure(
    logs: Sequence[SpectrumLog], *, labels: Sequence[str] | None = None, measure: str | None = None
) -> Figure:
    """Several runs on the same axes: gradient rank, optimizer rank, captured norm, loss."""
    labels, measure = _comparison_inputs(logs, labels, measure)
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = (
        (axes[0, 0], measure, f"gradient {measure_label(measure)}, mean over layers"),
        (axes[0, 1], "optimizer_rank", "optimizer's rank, mean over low-rank layers"),
        (axes[1, 0], "captured_energy", "captured gradient norm, mean over layers"),
    )
    for ax, quantity, title in panels:
        drawn = False
        for index, (log, label) in enumerate(zip(logs, labels, strict=True)):
            if _has(log, quantity):
                _plot_run(ax, log, index, _nanmean(log.stack(quantity)), label)
                drawn = True
        _style(ax, "step", measure_label(quantity), title)
        if drawn:
            ax.legend(fontsize=9)
        else:
            ax.text(
                0.5,
                0.5,
                "not logged by these runs",
                ha="center",
                transform=ax.transAxes,
                color="#777777",
            )
    axes[0, 0].set_ylim(bottom=0)
    axes[0, 1].set_ylim(bottom=0)
    axes[1, 0].set_ylim(0, 1.02)
    ax = axes[1, 1]
    for index, (log, label) in enumerate(zip(logs, labels, strict=True)):
        loss = log.scalars.get("loss")
        if loss is not None and np.isfinite(loss).any():
            _plot_run(ax, log, index, loss, label)
    _style(ax, "step", "training loss", "training loss at the logged steps")
    if ax.lines:
        ax.legend(fontsize=9)
    fig.suptitle(f"Comparison of {len(logs)} runs: " + ", ".join(labels), fontsize=12)
    return fig


def comparison_by_type_figure(
    logs: Sequence[SpectrumLog], *, labels: Sequence[str] | None = None, measure: str | None = None
) -> Figure:
    """One panel per layer type, each run a line: ``measure`` mean over that type's layers."""
    labels, measure = _comparison_inputs(logs, labels, measure)
    kinds = sorted({k for log in logs for k in _types(log)}, key=type_sort_key)
    columns = min(4, len(kinds))
    rows = -(-len(kinds) // columns)
    fig = Figure(figsize=(3.6 * columns + 0.6, 3.0 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, kind in zip(axes, kinds, strict=False):
        for index, (log, label) in enumerate(zip(logs, labels, strict=True)):
            names = _types(log).get(kind)
            if names:
                _plot_run(ax, log, index, _nanmean(log.stack(measure, names)), label, linewidth=1.6)
        _style(ax, "step", measure_label(measure), f"type {kind}")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    for ax in axes[len(kinds) :]:
        ax.set_visible(False)
    fig.suptitle(f"{measure_label(measure)} by layer type: " + ", ".join(labels), fontsize=12)
    return fig


# -- saving --------------------------------------------------------------------------------------

_FORMATS = ("png", "pdf", "svg")


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix) with no timestamp or version metadata."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in _FORMATS:
        raise ValueError(f"unsupported figure format {fmt!r}; use one of {_FORMATS}")
    metadata: dict[str, Any] = {
        "png": {"Software": None},
        "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
        "svg": {"Creator": None, "Date": None},
    }[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata=metadata, facecolor="white")
    return path


def write_plots(
    log: SpectrumLog,
    out_dir: str | os.PathLike,
    *,
    fmt: str = "png",
    measure: str | None = None,
    steps: Sequence[int] | None = None,
) -> list[Path]:
    """Write the standard figures of one run to ``out_dir``; returns their paths.

    ``overview`` (the decay figure), ``spectra``, ``ranks`` (per layer and by type), ``heatmap``,
    ``captured``.
    """
    out = Path(out_dir)
    figures = {
        "overview": overview_figure(log, measure=measure),
        "spectra": spectra_figure(log, steps=steps),
        "ranks": trajectories_figure(log, measure=measure),
        "heatmap": heatmap_figure(log, measure=measure),
        "captured": captured_figure(log),
    }
    return [save_figure(fig, out / f"{name}.{fmt}") for name, fig in figures.items()]


def write_comparison(
    logs: Sequence[SpectrumLog],
    out_dir: str | os.PathLike,
    *,
    fmt: str = "png",
    labels: Sequence[str] | None = None,
    measure: str | None = None,
) -> list[Path]:
    """Write ``compare`` (four panels) and ``compare_by_type`` for several runs to ``out_dir``."""
    out = Path(out_dir)
    figures = {
        "compare": comparison_figure(logs, labels=labels, measure=measure),
        "compare_by_type": comparison_by_type_figure(logs, labels=labels, measure=measure),
    }
    return [save_figure(fig, out / f"{name}.{fmt}") for name, fig in figures.items()]
