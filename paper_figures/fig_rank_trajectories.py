"""Rank over training by layer type: gradient energy rank (solid), optimizer rank (dashed).

One panel per optimizer, on a shared rank axis: the mean over the layers of each type (q, k, v,
o, gate, up, down) of the energy rank at AdaRankAdamW's η (the smallest k with
Σ_{i≤k} σᵢ² ≥ η‖G‖_F²), min-max over the type's layers shaded; dashed, the rank the optimizer
projected onto (AdaRankAdamW's adaptive choice, GaLore's fixed one), where it reports one.
"""

from __future__ import annotations

import sys

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from adarank.analysis.plots import default_measure, measure_label, plot_rank_by_type
from paper_figures.common import Comparison, has_quantity

NAME = "rank_trajectories"
TITLE = "Gradient energy rank and optimizer rank over training, by layer type"


def energy_measure(comparison: Comparison) -> str:
    """``energy_rank_<η>`` at the adarank run's η when every log has it, else the default."""
    quantities = [set(run.spectrum.quantities) for run in comparison.runs]
    for run in comparison.runs:
        eta = run.header.get("config", {}).get("eta")
        wanted = f"energy_rank_{eta}"
        if run.optimizer == "adarank" and all(wanted in q for q in quantities):
            return wanted
    return default_measure(comparison.runs[0].spectrum)


def figure(comparison: Comparison) -> Figure:
    runs = comparison.runs
    measure = energy_measure(comparison)
    fig = Figure(figsize=(4.0 * len(runs) + 0.4, 4.6), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    type_handles: dict[str, Line2D] = {}
    any_dashed = False
    for ax, run in zip(axes, runs, strict=True):
        log = run.spectrum
        if has_quantity(log, "optimizer_rank"):
            plot_rank_by_type(ax, log, "optimizer_rank", band=False, linestyle="--", legend=False)
            any_dashed = True
        for artist in plot_rank_by_type(ax, log, measure, legend=False):
            if isinstance(artist, Line2D):
                type_handles.setdefault(str(artist.get_label()), artist)
        ax.set_title(run.label, fontsize=11, color=run.color, fontweight="bold")
        ax.set_ylabel("")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("rank (mean over the type's layers)")
    styles = f"solid: gradient {measure_label(measure)}"
    if any_dashed:
        styles += ";  dashed: the optimizer's rank"
    handles = list(type_handles.values())
    fig.legend(
        handles=handles,
        labels=[str(h.get_label()) for h in handles],
        loc="outside lower center",
        ncol=len(handles),
        fontsize=8,
        title=f"layer type (number of layers).  {styles}",
        title_fontsize=8,
    )
    fig.suptitle(
        f"{TITLE} — {comparison.name} (shaded: min-max over the type's layers)", fontsize=12
    )
    return fig


if __name__ == "__main__":
    from paper_figures.build import main

    sys.exit(main(["--figure", NAME, "--no-readme", *sys.argv[1:]]))
