"""The rank study: energy rank and stable rank of G and of its moving average Ĝ against tokens.

Columns: attention (q, k, v, o) and MLP (gate, up, down) matrices, each line the mean over those
layers. Rows: the energy rank at η = 0.9 (the smallest k with Σ_{i≤k} σᵢ² ≥ 0.9‖·‖_F²) and the
stable rank ‖·‖_F²/‖·‖₂². Colour: tokens per step (batch ×1, ×4, ×16 at one token budget);
solid: the mini-batch gradient G; dashed: Ĝ = EMA_0.9(G), bias-corrected.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from paper_figures.studies import ATTENTION, MLP, StudyRun, mean_over

NAME = "rank_study"
TITLE = "Gradient rank against batch size and averaging"
COLORS = {1: "#1b9e77", 4: "#d95f02", 16: "#7570b3"}


def figure(runs: Sequence[StudyRun]) -> Figure:
    fig = Figure(figsize=(10.0, 7.0), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    rows = (("energy_rank_0.9", "energy rank (η = 0.9)"), ("stable_rank", "stable rank"))
    for row, (quantity, ylabel) in enumerate(rows):
        for col, (kinds, name) in enumerate(((ATTENTION, "attention"), (MLP, "MLP"))):
            ax = axes[row][col]
            for run in runs:
                color = COLORS.get(run.multiplier, "black")
                for log, style, what in ((run.gradient, "-", "G"), (run.ema, "--", "Ĝ")):
                    tokens = (log.steps + 1) * run.tokens_per_step / 1e6
                    label = f"×{run.multiplier} ({run.tokens_per_step} tok/step), {what}"
                    values = mean_over(log, quantity, kinds)
                    ax.plot(tokens, values, style, color=color, label=label)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{name} matrices", fontsize=10)
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 1:
                ax.set_xlabel("tokens seen (millions)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{TITLE} (AdamW run; solid: mini-batch G, dashed: EMA Ĝ)", fontsize=12)
    return fig
