"""The seeded 3,000-step runs of the sweep: perplexity and gradient rank against step.

Left: validation perplexity, the mean over the finished seeds of each optimizer at its best
learning rate, with a band of ± one sample std (dashed: the equal-memory GaLore row); the inset
shows the last third of the run on a linear scale. Middle and right: the mini-batch gradient's
energy rank at η = 0.9, mean over the attention (q, k, v, o) or MLP (gate, up, down) matrices and
over seeds (solid); dotted, AdaRankAdamW's arms only: the rank the optimizer chose, from its
first refresh on (GaLore's is fixed at its rank).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from paper_figures.studies import (
    ARM_COLORS,
    ATTENTION,
    MLP,
    SweepResult,
    align,
    energy_rank_over_seeds,
    seed_groups,
)

NAME = "seeds"
TITLE = "Seeded runs"


def figure(result: SweepResult) -> Figure:
    fig = Figure(figsize=(13.0, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    zoom = axes[0].inset_axes((0.42, 0.42, 0.55, 0.53))  # the last third of the run, linear y
    for group in seed_groups(result.seeded):
        first = group[0]
        color = ARM_COLORS[first.arm]
        style = "--" if first.stage == "equal_memory" else "-"
        label = f"{first.label} ({len(group)} seeds)"
        steps, ppl = align([(r.steps, r.val_ppl) for r in group])
        mean = ppl.mean(axis=0)
        late = steps >= steps[-1] * 2 / 3
        std = ppl.std(axis=0, ddof=1) if len(group) > 1 else np.zeros_like(mean)
        for ax, keep in ((axes[0], slice(None)), (zoom, late)):
            ax.plot(steps[keep], mean[keep], style, color=color, label=label)
            ax.fill_between(steps[keep], (mean - std)[keep], (mean + std)[keep], color=color,
                            alpha=0.2)  # fmt: skip
        for ax, kinds in ((axes[1], ATTENTION), (axes[2], MLP)):
            found = energy_rank_over_seeds(group, kinds)
            if found is not None:
                at, ranks = found
                ax.plot(at, np.nanmean(ranks, axis=0), style, color=color, label=f"{label}: G")
            if first.arm.startswith("adarank") and all(r.ranks for r in group):
                at, chosen = align([(r.steps, r.mean_chosen_rank(kinds)) for r in group])
                keep = (chosen > 0).all(axis=0)  # not before any seed's first refresh (no rank)
                if keep.any():
                    ax.plot(at[keep], chosen[:, keep].mean(axis=0), ":", marker=".",
                            color=color, label=f"{label}: chosen rank")  # fmt: skip
    axes[0].set_yscale("log")
    axes[0].set_ylabel("validation perplexity (mean ± std over seeds)")
    axes[0].set_title("validation perplexity", fontsize=10)
    axes[0].legend(fontsize=7, loc="lower left")
    zoom.tick_params(labelsize=7)
    zoom.grid(True, alpha=0.3)
    zoom.set_title("last third", fontsize=8)
    for ax, name in ((axes[1], "attention"), (axes[2], "MLP")):
        ax.set_title(f"{name} matrices: energy rank (η = 0.9)", fontsize=10)
    axes[1].set_ylabel("rank (mean over matrices and seeds)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle(f"{TITLE}: `cpu` model, each optimizer at its best lr", fontsize=12)
    return fig
