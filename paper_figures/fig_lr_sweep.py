"""Validation perplexity against learning rate, one line per optimizer (the sweep's lr stage).

Each point is one run of `experiments.sweep` (seed 0, the same tokens for every optimizer); the
ringed point is the optimizer's best, which its seeded runs then use. The sweep grows a grid
past an edge that holds the best, so a finished curve rises on both sides of its ring.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from paper_figures.studies import ARM_COLORS, ARM_LABELS, SweepResult

NAME = "lr_sweep"
TITLE = "Learning-rate sweep"


def figure(result: SweepResult) -> Figure:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    best = result.report["best_lr"]
    for arm, label in ARM_LABELS.items():
        rows = sorted((r for r in result.lr_rows if r["arm"] == arm), key=lambda r: r["lr"])
        if not rows:
            continue
        lrs, ppl = [r["lr"] for r in rows], [r["val_ppl"] for r in rows]
        ax.plot(lrs, ppl, marker="o", color=ARM_COLORS[arm], label=f"{label} ({len(rows)})")
        if arm in best:
            ax.plot([best[arm]], [min(ppl)], marker="o", markersize=12, fillstyle="none",
                    color=ARM_COLORS[arm])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation perplexity")
    ax.grid(True, which="both", alpha=0.3)
    done = len(result.lr_rows)
    ax.set_title(f"{TITLE}: {done} of {result.planned_lr_runs} runs finished", fontsize=11)
    ax.legend(title="optimizer (runs)", fontsize=8, title_fontsize=8)
    return fig
