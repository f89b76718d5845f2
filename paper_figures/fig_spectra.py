"""Singular-value spectra of the gradient over training: one row per optimizer, one column per
representative layer (the middle q_proj and down_proj of the model), early steps dark, late bright.
"""

from __future__ import annotations

import sys

import numpy as np
from matplotlib.figure import Figure

from adarank.analysis.plots import plot_spectra
from paper_figures.common import Comparison, representative_layer

NAME = "spectra"
TITLE = "Gradient singular values over training"
LAYER_TYPES = ("q", "down")
STEP_COUNT = 4


def spectrum_steps(comparison: Comparison, count: int = STEP_COUNT) -> list[int]:
    """``count`` logged steps, evenly spaced from the first to the last, taken from the first run;
    `plot_spectra` draws the nearest logged step of each run, so all rows show the same times."""
    steps = comparison.runs[0].spectrum.steps
    picks = np.unique(np.linspace(0, len(steps) - 1, min(count, len(steps))).round().astype(int))
    return [int(steps[i]) for i in picks]


def figure(comparison: Comparison) -> Figure:
    runs = comparison.runs
    steps = spectrum_steps(comparison)
    fig = Figure(
        figsize=(4.6 * len(LAYER_TYPES) + 0.4, 3.1 * len(runs) + 0.7), layout="constrained"
    )
    axes = fig.subplots(len(runs), len(LAYER_TYPES), sharex="col", sharey="col", squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        for ax, kind in zip(row, LAYER_TYPES, strict=True):
            layer = representative_layer(run.spectrum, kind)
            if layer is None:
                ax.text(0.5, 0.5, f"no {kind} layer logged", ha="center", transform=ax.transAxes)
                continue
            plot_spectra(ax, run.spectrum, layer, steps=steps)
            ax.set_title(f"{run.label}: {ax.get_title()}", fontsize=10, color=run.color)
    for ax in axes[:-1].ravel():
        ax.set_xlabel("")
    for ax in axes[1:].ravel():  # the same steps in the same colours: one legend per column
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.suptitle(f"{TITLE} — {comparison.name}", fontsize=12)
    return fig


if __name__ == "__main__":
    from paper_figures.build import main

    sys.exit(main(["--figure", NAME, "--no-readme", *sys.argv[1:]]))
