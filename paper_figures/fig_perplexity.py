"""Validation perplexity against optimizer step and against training tokens, and the training loss
beside them, one line per optimizer (all runs see the same batches in the same order).
"""

from __future__ import annotations

import sys

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from paper_figures.common import Comparison, Run

NAME = "perplexity"
TITLE = "Validation perplexity and training loss"
SMOOTHING_POINTS = 25  # the training loss is averaged over len/25 steps (at least 1)


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each index (fewer at the start); no look-ahead."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_val_ppl(ax: Axes, run: Run, *, x: str = "step") -> list[Artist]:
    """Validation perplexity of ``run`` at its evaluations against ``x``: step or tokens."""
    steps, ppl = run.series("eval", "val_ppl")
    xs = steps if x == "step" else run.series("eval", "tokens")[1]
    marker = {"marker": "o", "markersize": 3.5} if len(xs) <= 30 else {}
    (line,) = ax.plot(xs, ppl, color=run.color, linewidth=1.8, label=run.label, **marker)
    return [line]


def plot_train_loss(ax: Axes, run: Run, *, window: int) -> list[Artist]:
    """Training loss per step (faint) and its trailing mean over ``window`` steps."""
    steps, loss = run.series("train", "loss")
    artists: list[Artist] = []
    if window > 1:
        (raw,) = ax.plot(steps, loss, color=run.color, linewidth=0.6, alpha=0.3)
        artists.append(raw)
    (line,) = ax.plot(
        steps, trailing_mean(loss, window), color=run.color, linewidth=1.8, label=run.label
    )
    artists.append(line)
    return artists


def figure(comparison: Comparison) -> Figure:
    runs = comparison.runs
    fig = Figure(figsize=(14, 4.4), layout="constrained")
    by_step, by_tokens, loss_ax = fig.subplots(1, 3)
    window = max(1, max(len(run.train) for run in runs) // SMOOTHING_POINTS)
    for run in runs:
        plot_val_ppl(by_step, run, x="step")
        plot_val_ppl(by_tokens, run, x="tokens")
        plot_train_loss(loss_ax, run, window=window)
    for ax in (by_step, by_tokens):
        ax.set_yscale("log")
        # 1-2-5 ticks written as plain numbers: perplexities read better than 10^k.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("validation perplexity (log scale)")
    by_step.set_xlabel("optimizer step")
    by_step.set_title("validation perplexity against step", fontsize=11)
    by_tokens.set_xlabel("training tokens")
    by_tokens.set_title("validation perplexity against tokens", fontsize=11)
    by_tokens.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (nats/token)")
    smoothing = f", mean over {window} steps" if window > 1 else ""
    loss_ax.set_title(f"training loss{smoothing}", fontsize=11)
    for ax in (by_step, by_tokens, loss_ax):
        ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
        ax.legend(fontsize=8)
    for ax in (by_step, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{TITLE} — {comparison.name}", fontsize=12)
    return fig


if __name__ == "__main__":
    from paper_figures.build import main

    sys.exit(main(["--figure", NAME, "--no-readme", *sys.argv[1:]]))
