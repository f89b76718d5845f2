"""The studies beside the comparisons: the learning-rate sweep, the rank study, the equal-memory
budget study and the MiniLM genre fine-tuning.

Each is read from its result folder (``results/sweep``, ``results/rank_study``,
``results/budget``, ``results/finetune_genre``) as far as
they have finished: a study with no finished run is left out of the figures and the text says
so; a finished run whose files are unreadable is an `InputError`. The tables say how many of the
planned runs each number rests on, so a partial study is never mistaken for a whole one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adarank.analysis import LogError, SpectrumLog, load_log
from adarank.analysis.layer_types import layer_type
from experiments import budget_study, genre_finetune, rank_study, sweep
from paper_figures.common import REPO, InputError, shown

SWEEP_ROOT = REPO / "results" / "sweep"
RANK_ROOT = REPO / "results" / "rank_study"
BUDGET_ROOT = REPO / "results" / "budget"
GENRE_ROOT = REPO / "results" / "finetune_genre"
ARM_LABELS = {
    "adamw": "AdamW",
    "galore": "GaLore",
    "qgalore": "Q-GaLore",
    "adarank": "AdaRankAdamW",
    "adarank_residual": "AdaRankAdamW + residual",
}
ARM_COLORS = {
    "adamw": "#4d4d4d",
    "galore": "#d95f02",
    "qgalore": "#7570b3",
    "adarank": "#1b9e77",
    "adarank_residual": "#e7298a",
}
ATTENTION, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")
RANK_BUDGETS = ("short", "long")


def arm_label(arm: str, rank: int | None) -> str:
    """An optimizer's name in the sweep's tables and figures, with its fixed rank if it has one."""
    return ARM_LABELS[arm] + (f" rank {rank}" if rank else "")


def read_evals(path: Path) -> list[dict[str, Any]]:
    """The ``kind: eval`` records of a run's ``metrics.jsonl``, one per step (a step logged twice,
    as a resumed run may, keeps its last record), in step order."""
    try:
        with open(path) as fh:
            records = [r for r in map(json.loads, fh) if r.get("kind") == "eval"]
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{shown(path)}: unreadable ({err})") from err
    by_step = {r["step"]: r for r in records}
    return [by_step[k] for k in sorted(by_step)]


def optional_spectrum(path: Path) -> SpectrumLog | None:
    """The spectrum log at ``path``, or None where the run logged none."""
    if not path.is_file():
        return None
    try:
        return load_log(path)
    except LogError as err:
        raise InputError(str(err)) from err


def chosen_ranks(evals: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """layer -> (E,) the optimizer's rank at each evaluation (0 before its first refresh)."""
    ranks: dict[str, list[float]] = {}
    for record in evals:
        for name, rank in record.get("ranks", {}).items():
            ranks.setdefault(name, []).append(rank)
    return {name: np.asarray(v, dtype=float) for name, v in ranks.items() if len(v) == len(evals)}


def mean_rank(ranks: dict[str, np.ndarray], kinds: tuple[str, ...], count: int) -> np.ndarray:
    """(count,) the chosen rank averaged over the layers whose type is in ``kinds``."""
    rows = [v for name, v in ranks.items() if layer_type(name) in kinds]
    return np.mean(rows, axis=0) if rows else np.full(count, np.nan)


@dataclass
class SeededRun:
    """One finished run of the sweep's ``seeds`` or ``equal_memory`` stage."""

    stage: str
    arm: str
    lr: float
    rank: int | None  # the fixed GaLore rank of the equal-memory stage; None otherwise
    seed: int
    steps: np.ndarray  # (E,) evaluation steps
    val_ppl: np.ndarray  # (E,) validation perplexity at those steps
    ranks: dict[str, np.ndarray]  # layer -> (E,) the optimizer's rank (low-rank optimizers)
    spectrum: SpectrumLog | None  # G's spectra over the run

    @property
    def label(self) -> str:
        return arm_label(self.arm, self.rank)

    @property
    def key(self) -> tuple[str, str, float, int | None]:
        """What its seeds share: one row of the seeded table."""
        return self.stage, self.arm, self.lr, self.rank

    def mean_chosen_rank(self, kinds: tuple[str, ...]) -> np.ndarray:
        return mean_rank(self.ranks, kinds, len(self.steps))


def load_seeded(root: Path = SWEEP_ROOT) -> list[SeededRun]:
    """Every finished seeds and equal-memory run under ``root``, by stage, optimizer and seed."""
    runs = []
    for stage in ("seeds", "equal_memory"):
        for path in sorted((root / stage).glob("*/*/summary.json")):
            d = path.parent
            try:
                cfg = json.loads((d / "config.json").read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise InputError(f"{shown(d / 'config.json')}: unreadable ({err})") from err
            evals = read_evals(d / "metrics.jsonl")
            spectrum = optional_spectrum(d / "spectrum.jsonl")
            try:
                runs.append(SeededRun(
                    stage, d.parent.name, cfg["lr"],
                    cfg["rank"] if stage == "equal_memory" else None, cfg["seed"],
                    np.asarray([r["step"] for r in evals]),
                    np.asarray([r["val_ppl"] for r in evals], dtype=float), chosen_ranks(evals),
                    spectrum,
                ))  # fmt: skip
            except KeyError as err:
                raise InputError(f"{shown(d)}: config or eval record lacks {err}") from err
    order = list(ARM_LABELS)
    return sorted(runs, key=lambda r: (r.stage != "seeds", order.index(r.arm), r.seed))


@dataclass
class SweepResult:
    """What ``experiments.sweep.collect`` finds, the number of runs planned, and the finished
    seeded runs' curves."""

    report: dict[str, Any]
    planned_lr_runs: int
    seeded: list[SeededRun] = field(default_factory=list)

    @property
    def lr_rows(self) -> list[dict[str, Any]]:
        return list(self.report["lr_sweep"])


def load_sweep(root: Path = SWEEP_ROOT) -> SweepResult:
    try:
        report = sweep.collect(root)
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise InputError(f"{shown(root)}: unreadable sweep results ({err})") from err
    return SweepResult(report, len(sweep.lr_stage(root)), load_seeded(root))


@dataclass
class StudyRun:
    """One finished rank-study run: its batch multiplier and both spectrum logs."""

    multiplier: int
    tokens_per_step: int
    gradient: SpectrumLog
    ema: SpectrumLog
    val_ppl: float | None = None  # the run's final validation perplexity (summary.json)


def load_rank_study(root: Path = RANK_ROOT, budget: str = "long") -> list[StudyRun]:
    """The finished runs of one budget, by batch multiplier."""
    runs = []
    for planned in rank_study.runs(budget):
        d = planned.directory(root)
        if sweep.read_summary(d) is None:
            continue
        try:
            logs = [load_log(d / name) for name in ("spectrum.jsonl", "spectrum_ema.jsonl")]
        except LogError as err:
            raise InputError(str(err)) from err
        tokens = planned.multiplier * rank_study.MICRO_BATCH * rank_study.SEQ_LEN
        ppl = sweep.read_summary(d).get("val_ppl")  # type: ignore[union-attr]
        runs.append(StudyRun(planned.multiplier, tokens, *logs, val_ppl=ppl))
    return sorted(runs, key=lambda r: r.multiplier)


def mean_over(log: SpectrumLog, quantity: str, kinds: tuple[str, ...]) -> np.ndarray:
    """(R,) mean of a per-step ``quantity`` over the layers whose type is in ``kinds``."""
    names = [n for n in log.layer_names if log.layer_type(n) in kinds]
    if not names:
        return np.full(len(log.steps), np.nan)
    return np.nanmean(log.stack(quantity, names), axis=0)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def sweep_markdown(result: SweepResult, heading: str) -> str:
    """The lr-stage table (perplexity per optimizer and lr) and the seeded table, as Markdown."""
    rows = result.lr_rows
    parts = [
        f"{heading} Learning-rate sweep: `cpu` model, {sweep.LR_STEPS} steps, seed 0 "
        f"({len(rows)} of {result.planned_lr_runs} runs finished)",
        "Final validation perplexity; **bold**: the optimizer's best, rerun with seeds. "
        "Command: `python -m experiments.sweep run --stage lr`.",
    ]
    grid = result.report["grid"]  # each arm's learning rates, grown past an edge holding its best
    lrs = sorted({lr for arm_lrs in grid.values() for lr in arm_lrs})
    table = ["| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|" + "---:|" * len(lrs)]  # fmt: skip
    best = result.report["best_lr"]
    for arm, label in ARM_LABELS.items():
        cells = []
        for lr in lrs:
            found = [r["val_ppl"] for r in rows if r["arm"] == arm and r["lr"] == lr]
            if lr not in grid[arm]:
                cells.append("")
            elif not found:
                cells.append("not run yet")
            else:
                text = _fmt(found[0], 2)
                cells.append(f"**{text}**" if best.get(arm) == lr else text)
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    parts.append("\n".join(table))
    if result.report["best_at_grid_edge"]:
        edge = ", ".join(ARM_LABELS[a] for a in result.report["best_at_grid_edge"])
        parts.append(
            f"Best still at the edge of its grid after {sweep.MAX_EXTENSIONS} added learning "
            f"rates (not bracketed): {edge}."
        )
    parts.append(seeded_markdown(result, heading))
    return "\n\n".join(parts) + "\n"


def align(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-run ``(steps, values)`` series on the steps every run has: ``(steps (K,), (R, K))``."""
    common = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in series)))
    stacked = []
    for steps, values in series:
        index = {int(k): i for i, k in enumerate(steps)}
        stacked.append([values[index[k]] for k in common])
    return np.asarray(common), np.asarray(stacked, dtype=float).reshape(len(series), len(common))


def seed_groups(runs: Sequence[SeededRun]) -> list[list[SeededRun]]:
    """The runs grouped by stage, optimizer, lr and fixed rank (the seeds of one table row)."""
    groups: dict[tuple[str, str, float, int | None], list[SeededRun]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    return list(groups.values())


def seed_group(result: SweepResult, row: dict[str, Any]) -> list[SeededRun]:
    """The finished runs behind one row of the seeded table."""
    key = (row["stage"], row["arm"], row["lr"], row["rank"])
    return [r for r in result.seeded if r.key == key]


def _chosen_cell(runs: Sequence[SeededRun]) -> str:
    """Chosen rank (attention / MLP), mean over the evaluations after the first refresh → end."""
    if not all(r.ranks for r in runs):
        return "–"
    cells = []
    for kinds in (ATTENTION, MLP):
        series = [r.mean_chosen_rank(kinds) for r in runs]
        refreshed = [v[v > 0] for v in series]  # before the first refresh there is no rank
        if not all(len(v) for v in refreshed):
            return "–"
        mean = np.mean([v.mean() for v in refreshed])
        cells.append(f"{_fmt(mean)} → {_fmt(np.mean([v[-1] for v in refreshed]))}")
    return " / ".join(cells)


def energy_rank_over_seeds(
    runs: Sequence[SeededRun], kinds: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray] | None:
    """G's energy rank at η = 0.9, mean over the ``kinds`` matrices, on the steps every run
    logged: ``(steps (K,), (R, K))``; None unless every run has a spectrum."""
    spectra = [r.spectrum for r in runs]
    if not all(log is not None and len(log.steps) for log in spectra):
        return None
    return align([
        (np.asarray(log.steps), mean_over(log, "energy_rank_0.9", kinds))
        for log in spectra if log is not None
    ])  # fmt: skip


def _energy_cell(runs: Sequence[SeededRun]) -> str:
    """G's mean energy rank (attention / MLP), mean over seeds: lowest (step) → end."""
    cells = []
    for kinds in (ATTENTION, MLP):
        found = energy_rank_over_seeds(runs, kinds)
        if found is None:
            return "–"
        steps, stacked = found
        mean = np.nanmean(stacked, axis=0)
        low = int(np.nanargmin(mean))
        cells.append(f"{_fmt(mean[low])} ({int(steps[low])}) → {_fmt(mean[-1])}")
    return " / ".join(cells)


def _verdicts(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Table lines: each optimizer against AdamW, and AdaRankAdamW against both GaLore rows, for
    the rows whose seeds have all finished."""
    complete = [r for r in rows if r["n_seeds"] == len(sweep.SEEDS)]

    def find(stage: str, arm: str) -> dict[str, Any] | None:
        return next((r for r in complete if (r["stage"], r["arm"]) == (stage, arm)), None)

    pairs = [(r, find("seeds", "adamw")) for r in complete if r["arm"] != "adamw"]
    for arm in ("adarank", "adarank_residual"):
        pairs += [(find("seeds", arm), find("seeds", "galore")),
                  (find("seeds", arm), find("equal_memory", "galore"))]  # fmt: skip
    lines = []
    for a, b in pairs:
        if a is None or b is None:
            continue
        delta = a["val_ppl_mean"] - b["val_ppl_mean"]
        spread = 2 * max(a["val_ppl_std"], b["val_ppl_std"])
        word = (
            "tie" if sweep.is_tie(a, b) else ("lower (better)" if delta < 0 else "higher (worse)")
        )
        first, second = arm_label(a["arm"], a["rank"]), arm_label(b["arm"], b["rank"])
        lines.append(f"| {first} vs {second} | {delta:+.2f} | {spread:.2f} | {word} |")
    return lines


def seeded_markdown(result: SweepResult, heading: str) -> str:
    """The seeded 3,000-step runs: mean ± std per optimizer, state, ranks, and the verdicts."""
    rows = result.report["seeds"]
    planned = len(sweep.ARMS) * len(sweep.SEEDS)
    done = sum(r["n_seeds"] for r in rows if r["stage"] == "seeds")
    equal = sum(r["n_seeds"] for r in rows if r["stage"] == "equal_memory")
    parts = [
        f"{heading} Seeded runs: `cpu` model, {sweep.SEED_STEPS} steps, seeds "
        f"{min(sweep.SEEDS)}–{max(sweep.SEEDS)} at each optimizer's best lr ({done} of {planned} "
        f"runs finished; equal-memory GaLore: {equal} of {len(sweep.SEEDS)})",
        "Final validation perplexity, mean ± sample std over the finished seeds. State: the "
        "optimizer's state, mean over the evaluations (every 100 steps). Chosen rank: the "
        "optimizer's rank, mean over the attention (q, k, v, o) or MLP (gate, up, down) "
        "matrices, averaged over the evaluations from the first refresh → at the end. G energy "
        "rank: the mini-batch "
        "gradient's mean energy rank at η = 0.9 over the same matrices (logged every 100 "
        "steps), lowest (step) → end. Means over seeds. Tokens/s: wall clock with two or three "
        "runs side by side on a shared 2-core machine, so not comparable between rows (the "
        "equal-memory runs shared it three ways). The equal-memory row is GaLore at the fixed "
        "rank whose state is closest to AdaRankAdamW's mean state. Commands: "
        "`python -m experiments.sweep run --stage seeds`, then `--stage equal_memory`.",
    ]
    if not rows:
        when = (
            "the lr stage has finished, so they can start"
            if result.report["best_lr"]
            else "they start when the lr stage has finished"
        )
        parts.append(f"Not run yet; {when}.")
        return "\n\n".join(parts)
    table = [
        "| optimizer | stage | lr | seeds | val ppl (mean ± std) | state MiB | state / AdamW "
        "| chosen rank, attention / MLP: mean → end | G energy rank, attention / MLP | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in rows:
        group = seed_group(result, row)
        label = arm_label(row["arm"], row["rank"])
        r = row["state_ratio_to_adamw"]
        ratio = "–" if r is None else f"{r:.2f}×"
        table.append(
            f"| {label} | {row['stage']} | {row['lr']:g} | {row['n_seeds']} "
            f"| {_fmt(row['val_ppl_mean'], 2)} ± {_fmt(row['val_ppl_std'], 2)} "
            f"| {_fmt(row['mean_state_mib'], 2)} | {ratio} "
            f"| {_chosen_cell(group) if row['arm'] != 'adamw' else '–'} | {_energy_cell(group)} "
            f"| {_fmt(row['tokens_per_s_mean'], 0)} |"
        )
    parts.append("\n".join(table))
    verdicts = _verdicts(rows)
    if verdicts:
        parts.append("\n".join([
            "Differences in mean final validation perplexity (first − second), for the rows "
            f"with all {len(sweep.SEEDS)} seeds; a tie: closer than twice the larger std.",
            "",
            "| comparison | Δ val ppl | 2 × larger std | verdict |",
            "|---|---:|---:|---|",
            *verdicts,
        ]))  # fmt: skip
    else:
        parts.append(f"No comparison yet: it needs two rows with all {len(sweep.SEEDS)} seeds.")
    return "\n\n".join(parts)


def rank_study_markdown(runs: list[StudyRun], heading: str, budget: str = "long") -> str:
    """Per batch size: the energy rank (η = 0.9) of G and Ĝ, at its low point and at the end."""
    planned = rank_study.runs(budget)
    parts = [
        f"{heading} Rank study ({budget} budget): AdamW on the `cpu` model, "
        f"{planned[0].tokens:,} tokens per run ({len(runs)} of {len(planned)} runs finished)",
        "Mean energy rank at η = 0.9 over the attention (q, k, v, o) and MLP (gate, up, down) "
        "matrices: its lowest value (at which step) and its value at the end, for the mini-batch "
        f"gradient G and its moving average Ĝ (β = {rank_study.EMA_BETA}). "
        f"Command: `python -m experiments.rank_study run --budget {budget}`.",
    ]
    if not runs:
        parts.append("No run has finished yet.")
        return "\n\n".join(parts) + "\n"
    table = [
        "| batch | tokens/step | steps | attention G: low (step) → end | attention Ĝ: low → end "
        "| MLP G: low (step) → end | MLP Ĝ: low → end |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for run in runs:
        cells = []
        for kinds in (ATTENTION, MLP):
            for log, with_step in ((run.gradient, True), (run.ema, False)):
                series = mean_over(log, "energy_rank_0.9", kinds)
                low = int(np.nanargmin(series))
                where = f" ({int(log.steps[low])})" if with_step else ""
                cells.append(f"{_fmt(series[low])}{where} → {_fmt(series[-1])}")
        steps = int(run.gradient.steps[-1]) + 1
        table.append(f"| ×{run.multiplier} | {run.tokens_per_step} | {steps} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    parts.append("\n".join(table))
    parts.append(_equal_steps_table(runs))
    return "\n\n".join(parts) + "\n"


# Steps at which the rank-study runs are compared step for step (each run's record nearest).
EQUAL_STEPS = (16, 64, 256, 1024)


def _equal_steps_table(runs: list[StudyRun]) -> str:
    """G's energy rank (η = 0.9; attention / MLP) at equal optimizer steps: the larger batches
    take fewer steps for the same tokens, so this separates "how many steps" from "how many
    tokens per step"."""
    lines = [
        "At equal steps instead of equal tokens: G's mean energy rank (attention / MLP) at the "
        "record nearest each step, and the final validation perplexity.",
        "",
        "| batch | " + " | ".join(f"step {s}" for s in EQUAL_STEPS) + " | final val ppl |",
        "|---|" + "---|" * len(EQUAL_STEPS) + "---:|",
    ]
    for run in runs:
        steps = np.asarray(run.gradient.steps)
        attention = mean_over(run.gradient, "energy_rank_0.9", ATTENTION)
        mlp = mean_over(run.gradient, "energy_rank_0.9", MLP)
        cells = []
        for target in EQUAL_STEPS:
            if target > steps[-1] + 1:
                cells.append("–")
                continue
            i = int(np.argmin(np.abs(steps - target)))
            cells.append(f"{_fmt(attention[i])} / {_fmt(mlp[i])} ({int(steps[i])})")
        cells.append(_fmt(run.val_ppl, 1))
        lines.append(f"| ×{run.multiplier} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_budget(root: Path = BUDGET_ROOT) -> dict[str, Any]:
    try:
        return budget_study.collect(root)
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise InputError(f"{shown(root)}: unreadable budget-study results ({err})") from err


def budget_markdown(report: dict[str, Any], heading: str) -> str:
    """GaLore at a fixed rank against AdaRankAdamW under that GaLore's state as its budget."""
    rows = report["runs"]
    budget_mib = report["budget_bytes"] / 2**20
    parts = [
        f"{heading} Equal memory: GaLore rank {report['rank']} vs AdaRankAdamW with "
        f"`state_budget` = that state ({len(rows)} of {report['planned']} runs finished)",
        f"`cpu` model, {report['steps']} steps, seed 0, the same tokens; budget "
        f"{report['budget_bytes']:,} bytes ({budget_mib:.2f} MiB, GaLore rank "
        f"{report['rank']}'s state after one step). State: mean and largest over the "
        "evaluations (every 100 steps). Ranks: mean over the attention (q, k, v, o) and MLP "
        "(gate, up, down) matrices, averaged over the evaluations and at the end. One seed: "
        "a difference is a lead, not a result. Tokens/s is wall clock on a shared 2-core "
        "machine, not comparable between runs. Command: "
        "`python -m experiments.budget_study run`.",
    ]
    if not rows:
        parts.append("No run has finished yet.")
        return "\n\n".join(parts) + "\n"
    labels = {"galore32": f"GaLore rank {report['rank']}", "adarank_budget": "AdaRankAdamW, budget"}
    table = [
        "| optimizer | lr | val ppl | state MiB (mean / max) | attention rank (mean → end) "
        "| MLP rank (mean → end) | tokens/s |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for row in rows:
        best = report["best_lr"].get(row["arm"]) == row["lr"]
        ppl = _fmt(row["val_ppl"], 2)
        cells = [
            labels[row["arm"]],
            f"{row['lr']:g}",
            f"**{ppl}**" if best else ppl,
            f"{row['state_mean_bytes'] / 2**20:.2f} / {row['state_max_bytes'] / 2**20:.2f}",
            f"{_fmt(row['ranks_mean']['attention'])} → {_fmt(row['ranks_end']['attention'])}",
            f"{_fmt(row['ranks_mean']['mlp'])} → {_fmt(row['ranks_end']['mlp'])}",
            _fmt(row["tokens_per_s"], 0),
        ]
        table.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(table))
    if report["best_lr"]:
        parts.append("**Bold**: the optimizer's best learning rate of the three.")
    return "\n\n".join(parts) + "\n"


# -- the genre fine-tuning ------------------------------------------------------------------------

GENRE_LABELS = {"adamw": "AdamW", "galore": "GaLore", "adarank": "AdaRankAdamW"}


@dataclass
class GenreRun:
    """One finished MiniLM genre run: its summary, spectrum log and AdaRank's chosen ranks."""

    summary: dict[str, Any]
    spectrum: SpectrumLog | None
    rank_steps: np.ndarray  # (E,) steps of the evaluations that logged the optimizer's ranks
    ranks: dict[str, np.ndarray]  # layer -> (E,) chosen rank at those evaluations
    best: bool  # the optimizer's best run on validation accuracy

    @property
    def optimizer(self) -> str:
        return str(self.summary["optimizer"])

    @property
    def label(self) -> str:
        return f"{GENRE_LABELS.get(self.optimizer, self.optimizer)}, lr {self.summary['lr']:.1e}"

    def mean_chosen_rank(self, kinds: tuple[str, ...]) -> np.ndarray:
        """(E,) the optimizer's rank averaged over the layers whose type is in ``kinds``."""
        return mean_rank(self.ranks, kinds, len(self.rank_steps))


def load_genre(root: Path = GENRE_ROOT) -> list[GenreRun]:
    """The finished runs of `experiments.genre_finetune` under ``root``, by optimizer and lr."""
    try:
        found = genre_finetune.collect(root)
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise InputError(f"{shown(root)}: unreadable fine-tuning results ({err})") from err
    runs = []
    for summary in found["runs"]:
        d = Path(summary["dir"])
        spectrum = optional_spectrum(d / "spectrum.jsonl")
        evals = [r for r in read_evals(d / "metrics.jsonl") if "ranks" in r]
        steps = np.asarray([r["step"] for r in evals])
        best = found["best"].get(summary["optimizer"]) is summary
        runs.append(GenreRun(summary, spectrum, steps, chosen_ranks(evals), best))
    order = list(GENRE_LABELS)
    return sorted(runs, key=lambda r: (order.index(r.optimizer), r.summary["lr"]))


def _rank_path(log: SpectrumLog | None, kinds: tuple[str, ...]) -> str:
    """Mean energy rank (η = 0.9) of G: at the first record, its lowest (step), at the end."""
    if log is None or not len(log.steps):
        return "–"
    series = mean_over(log, "energy_rank_0.9", kinds)
    low = int(np.nanargmin(series))
    return f"{_fmt(series[0])} → {_fmt(series[low])} ({int(log.steps[low])}) → {_fmt(series[-1])}"


def genre_markdown(runs: list[GenreRun], heading: str) -> str:
    """Accuracy, state and the rank trajectory of every finished fine-tuning run."""
    planned = sum(len(lrs) for lrs in genre_finetune.LR_GRID.values())
    parts = [
        f"{heading} Fine-tuning MiniLM on First Folio genres ({len(runs)} of {planned} runs "
        "finished)",
        "`all-MiniLM-L6-v2` (22.7M parameters) classifies 128-token passages as comedy, history "
        "or tragedy; plays are split whole between train, validation and test. Each run stops "
        "when validation accuracy has not improved for 4 evaluations (half an epoch apart); "
        "test accuracy is that of the best validation checkpoint (192 test passages from 6 "
        "plays, so one passage is 0.5 points). The low-rank optimizers project the 36 encoder "
        "matrices at rank ≤ 8; the embeddings, pooler and head get plain AdamW in every run. "
        "Energy rank: G's mean over the attention (q, k, v, o) or MLP (up, down) matrices at "
        "η = 0.9, first record → lowest (step) → last. One seed each. Command: "
        "`python -m experiments.genre_finetune sweep --threads 1`.",
    ]
    if not runs:
        parts.append("No run has finished yet.")
        return "\n\n".join(parts) + "\n"
    adamw = next((r for r in runs if r.optimizer == "adamw"), None)
    table = [
        "| optimizer | lr | steps (epochs) | stopped | best val acc | test acc | state MiB "
        "| state / AdamW | attention energy rank | MLP energy rank | chosen rank, first → end "
        "(attn / MLP) |",
        "|---|---:|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for run in runs:
        s = run.summary
        state = s["state_bytes"]["total"]
        ratio = state / adamw.summary["state_bytes"]["total"] if adamw else None
        acc = f"{s['best_val_acc']:.3f}"
        chosen = "–"
        if run.optimizer == "adarank" and run.ranks:
            paths = []
            for kinds in (ATTENTION, MLP):
                series = run.mean_chosen_rank(kinds)
                refreshed = series[series > 0]  # evaluations before the first refresh: no rank
                if len(refreshed):
                    paths.append(f"{_fmt(refreshed[0])} → {_fmt(refreshed[-1])}")
            chosen = " / ".join(paths) or "–"
        cells = [
            GENRE_LABELS.get(run.optimizer, run.optimizer),
            f"{s['lr']:g}",
            f"{s['steps']} ({s['epochs']:.1f})",
            s["stopped"],
            f"**{acc}**" if run.best else acc,
            f"{s['test_acc']:.3f}",
            f"{state / 2**20:.1f}",
            "–" if ratio is None else f"{ratio:.2f}×",
            _rank_path(run.spectrum, ATTENTION),
            _rank_path(run.spectrum, MLP),
            chosen,
        ]
        table.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(table))
    parts.append("**Bold**: the optimizer's best run on validation accuracy.")
    return "\n\n".join(parts) + "\n"
