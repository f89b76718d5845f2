"""experiments.budget_study: its budget is GaLore's state, its commands, its report and table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import budget_study, sweep
from paper_figures import fig_budget, studies


def test_budget_is_galore_rank_32_state_on_the_cpu_decoder():
    assert sweep.galore_state_bytes(budget_study.RANK) == budget_study.BUDGET


def test_runs_cover_both_arms_at_three_learning_rates_and_resume():
    runs = budget_study.runs()
    assert {(r.arm, r.lr) for r in runs} == {
        (a, lr) for a in budget_study.ARMS for lr in sweep.LR_GRID["galore"]
    }
    assert runs[0].lr == runs[1].lr == 1e-2  # the published default first
    root = Path("results/budget")
    galore = " ".join(runs[0].command(root, 1))
    adarank = " ".join(runs[1].command(root, 1))
    assert "--optimizer galore --rank 32" in galore and "--resume" in galore
    assert f"--optimizer adarank --state-budget {budget_study.BUDGET}" in adarank
    assert "--out results/budget/adarank_budget_lr0.01" in adarank


def _finish(run: budget_study.BudgetRun, root: Path, ppl: float, ranks: dict[str, int]):
    d = run.directory(root)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"threads": 1}))
    evals = [
        {"kind": "eval", "step": step, "val_ppl": ppl + 50 - step / 10,
         "state_bytes": {"total": total}, "ranks": ranks}
        for step, total in ((100, 100), (500, 300))
    ]  # fmt: skip
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in evals) + "\n")
    summary = {"val_ppl": ppl, "tokens_per_s": 5.0, "ranks": ranks}
    (d / "summary.json").write_text(json.dumps(summary))


def test_report_and_table_from_finished_runs(tmp_path: Path):
    ranks = {
        "layers.0.self_attn.q_proj.weight": 4,
        "layers.0.self_attn.k_proj.weight": 6,
        "layers.0.mlp.up_proj.weight": 40,
    }
    for run in budget_study.runs():
        if run.arm == "galore32":
            _finish(run, tmp_path, 100.0 - 10 * run.lr, ranks)
    report = budget_study.collect(tmp_path)
    assert len(report["runs"]) == 3 and report["best_lr"] == {"galore32": 0.03}
    row = report["runs"][0]
    assert row["state_mean_bytes"] == 200 and row["state_max_bytes"] == 300
    assert row["ranks_end"] == {"attention": 5.0, "mlp": 40.0}
    text = studies.budget_markdown(report, "###")
    assert "(3 of 6 runs finished)" in text and "**99.70**" in text
    assert "5.0 → 5.0" in text and "40.0 → 40.0" in text
    assert studies.budget_markdown(budget_study.collect(tmp_path / "none"), "###").endswith(
        "No run has finished yet.\n"
    )
    fig = fig_budget.figure(report)
    left, right = fig.axes
    assert len(left.lines) == 3 and len(right.lines) == 6  # per run; attention and MLP
    assert list(right.lines[1].get_ydata()) == [40.0, 40.0]
    assert list(left.lines[0].get_xdata()) == [100, 500]


@pytest.mark.parametrize("bad", [["--jobs", "0"], ["--threads", "0"]])
def test_bad_counts_are_refused(bad):
    with pytest.raises(SystemExit):
        budget_study.main(["plan", *bad])
