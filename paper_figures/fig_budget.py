"""Equal memory: GaLore at a fixed rank against AdaRankAdamW under that state as its budget.

Left: validation perplexity against step for every finished run of `experiments.budget_study`
(colour: optimizer; line style: learning rate). Right: the mean rank of the attention and MLP
matrices against step, as each run's optimizer chose it (GaLore's is its fixed rank).
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from paper_figures.studies import ARM_COLORS

NAME = "budget"
TITLE = "Equal memory: fixed rank vs state budget"
STYLES = ("-", "--", ":")
LABELS = {"galore32": ("GaLore rank 32", ARM_COLORS["galore"]),
          "adarank_budget": ("AdaRankAdamW, budget", ARM_COLORS["adarank"])}  # fmt: skip


def figure(report: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    lrs = sorted({row["lr"] for row in report["runs"]})
    labelled: set[str] = set()
    for row in report["runs"]:
        label, color = LABELS[row["arm"]]
        style = STYLES[lrs.index(row["lr"]) % len(STYLES)]
        steps = [c["step"] for c in row["curve"]]
        left.plot(steps, [c["val_ppl"] for c in row["curve"]], style, color=color,
                  label=f"{label}, lr {row['lr']:g}")  # fmt: skip
        for kind, marker in (("attention", "o"), ("mlp", "s")):
            # One legend entry per optimizer; line styles are the left panel's lrs.
            first = row["arm"] not in labelled
            labelled.add(row["arm"])
            right.plot(steps, [c[kind] for c in row["curve"]], style, color=color,
                       marker=marker, markersize=3,
                       label=label if first else None)  # fmt: skip
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("validation perplexity")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    right.set_xlabel("step")
    right.set_ylabel("mean rank (○ attention, □ MLP)")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8, loc="center right")
    budget = report["budget_bytes"] / 2**20
    fig.suptitle(f"{TITLE} ({budget:.2f} MiB): {len(report['runs'])} of "
                 f"{report['planned']} runs finished", fontsize=11)  # fmt: skip
    return fig
