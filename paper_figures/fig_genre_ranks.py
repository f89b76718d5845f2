"""The gradient's energy rank while MiniLM fine-tunes to convergence (the genre task).

Columns: attention (q, k, v, o) and MLP (up, down) matrices of the encoder; each line is one
finished run of `experiments.genre_finetune`, the mean over those matrices of G's energy rank at
η = 0.9 (the smallest k with Σ_{i≤k} σᵢ² ≥ 0.9‖G‖_F²). Dotted, AdaRankAdamW runs only: the rank
the optimizer chose at each evaluation (capped at 8), from the first refresh on. The x axis is
in epochs, so runs that stop early end early.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from experiments.genre_finetune import LR_GRID
from paper_figures.studies import ATTENTION, MLP, GenreRun, mean_over

NAME = "genre_ranks"
TITLE = "Gradient rank while fine-tuning MiniLM"
COLORS = {"adamw": "#4d4d4d", "galore": "#d95f02", "adarank": "#1b9e77"}
# Line style by the lr's place in the optimizer's grid (low, middle, high); dotted is kept for
# the chosen rank.
STYLES = ("-", "--", "-.")


def figure(runs: Sequence[GenreRun]) -> Figure:
    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for col, (kinds, name) in enumerate(((ATTENTION, "attention"), (MLP, "MLP"))):
        ax = axes[col]
        for run in runs:
            grid = sorted(LR_GRID.get(run.optimizer, ()))
            style = STYLES[grid.index(run.summary["lr"]) % 3] if run.summary["lr"] in grid else "-"
            color = COLORS.get(run.optimizer, "black")
            per_epoch = run.summary["steps"] / max(run.summary["epochs"], 1e-9)
            width = 2.2 if run.best else 1.0
            if run.spectrum is not None:
                epochs = run.spectrum.steps / per_epoch
                values = mean_over(run.spectrum, "energy_rank_0.9", kinds)
                ax.plot(epochs, values, style, color=color, linewidth=width,
                        label=f"{run.label}: G")  # fmt: skip
            if run.optimizer == "adarank" and len(run.rank_steps):
                chosen = run.mean_chosen_rank(kinds)
                chosen[chosen <= 0] = np.nan  # evaluations before the first refresh (no rank)
                ax.plot(run.rank_steps / per_epoch, chosen, ":",
                        marker=".", color=color, linewidth=width,
                        label=f"{run.label}: chosen rank")  # fmt: skip
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{name} matrices", fontsize=10)
        ax.set_xlabel("epoch")
        if col == 0:
            ax.set_ylabel("energy rank (η = 0.9)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle(f"{TITLE} (thick: each optimizer's best run)", fontsize=12)
    return fig
