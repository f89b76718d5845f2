"""Memory and throughput per optimizer: optimizer-state MiB, peak memory MiB and training tokens/s,
each bar labelled with its value and its ratio to AdamW's (all from the runs' ``summary.json``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from paper_figures.common import Comparison, Run

NAME = "memory"
TITLE = "Memory and throughput"
MIB = 2**20


def state_mib(run: Run) -> float:
    return run.summary["state_bytes"]["total"] / MIB


def peak_mib(run: Run) -> float:
    value = run.summary.get("peak_memory_bytes")
    return math.nan if value is None else value / MIB


def tokens_per_s(run: Run) -> float:
    value = run.summary.get("tokens_per_s")
    return math.nan if value is None else float(value)


def ratio(run: Run, reference: Run | None, quantity: Callable[[Run], float]) -> float | None:
    """``quantity(run) / quantity(reference)``; None without a reference or a usable value."""
    if reference is None:
        return None
    base, value = quantity(reference), quantity(run)
    if not (math.isfinite(base) and math.isfinite(value)) or base == 0:
        return None
    return value / base


def plot_bars(
    ax: Axes, comparison: Comparison, quantity: Callable[[Run], float], *, unit: str, digits: int
) -> list[Artist]:
    """One bar per run of ``quantity``, annotated ``value`` and ``× AdamW`` where there is one."""
    runs = comparison.runs
    values = [quantity(run) for run in runs]
    positions = range(len(runs))
    bars = ax.bar(
        positions,
        [0 if math.isnan(v) else v for v in values],
        width=0.6,
        color=[run.color for run in runs],
        edgecolor="black",
        linewidth=0.6,
    )
    artists: list[Artist] = list(bars)
    for bar, run, value in zip(bars, runs, values, strict=True):
        if math.isnan(value):
            text = "not logged"
        else:
            text = f"{value:,.{digits}f} {unit}"
            scale = ratio(run, comparison.reference, quantity)
            if scale is not None:
                text += f"\n{scale:.2f}× AdamW"
        artists.append(
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        )
    ax.set_xticks(list(positions), [run.label for run in runs], fontsize=9)
    finite = [v for v in values if math.isfinite(v)]
    ax.set_ylim(0, 1.25 * max(finite) if finite and max(finite) > 0 else 1)
    ax.grid(True, axis="y", alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)
    return artists


def figure(comparison: Comparison) -> Figure:
    devices = sorted({str(run.header.get("device", "cpu")) for run in comparison.runs})
    on_cpu = devices == ["cpu"]
    fig = Figure(
        figsize=(max(10.5, 1.3 * 3 * len(comparison.runs) + 1.5), 4.4), layout="constrained"
    )
    state_ax, peak_ax, speed_ax = fig.subplots(1, 3)
    plot_bars(state_ax, comparison, state_mib, unit="MiB", digits=2)
    state_ax.set_title("optimizer state (all tensors in optimizer.state)", fontsize=10)
    state_ax.set_ylabel("MiB")
    plot_bars(peak_ax, comparison, peak_mib, unit="MiB", digits=0)
    peak_ax.set_title(
        "peak memory (process max RSS, incl. Python + torch)"
        if on_cpu
        else "peak memory (torch.cuda.max_memory_allocated)",
        fontsize=10,
    )
    peak_ax.set_ylabel("MiB")
    plot_bars(speed_ax, comparison, tokens_per_s, unit="", digits=0)
    speed_ax.set_title("training tokens/s (steps only, no eval)", fontsize=10)
    speed_ax.set_ylabel("tokens / s")
    fig.suptitle(f"{TITLE} — {comparison.name} (device: {', '.join(devices)})", fontsize=12)
    return fig


if __name__ == "__main__":
    from paper_figures.build import main

    sys.exit(main(["--figure", NAME, "--no-readme", *sys.argv[1:]]))
