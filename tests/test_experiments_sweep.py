"""The sweep driver: the plan of each stage, the choice of learning rate, the report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from experiments import sweep


def _finish(run: sweep.Run, root: Path, ppl: float, states: list[int], tok_s: float = 1e3) -> None:
    """Write what a finished pretrain run leaves behind (config, eval lines, summary)."""
    d = run.directory(root)
    d.mkdir(parents=True)
    cfg = {"lr": run.lr, "seed": run.seed, "rank": run.rank or 64, "steps": run.steps}
    (d / "config.json").write_text(json.dumps(cfg))
    evals = [{"kind": "eval", "state_bytes": {"total": s}} for s in states]
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (d / "summary.json").write_text(json.dumps({"val_ppl": ppl, "tokens_per_s": tok_s}))


def test_seed_stage_waits_for_the_whole_lr_stage(tmp_path: Path) -> None:
    runs = sweep.lr_stage()
    assert len(runs) == sum(len(g) for g in sweep.LR_GRID.values()) and len(runs) >= 15
    for run in runs[:-1]:
        _finish(run, tmp_path, 100.0, [1])
    with pytest.raises(ValueError, match="lr stage unfinished"):
        sweep.plan("seeds", tmp_path)


def test_best_lr_is_the_lowest_final_perplexity_and_seeds_rerun_it(tmp_path: Path) -> None:
    for run in sweep.lr_stage():
        # A U-shaped curve in log lr with its minimum at each grid's middle value.
        middle = sorted(sweep.LR_GRID[run.arm])[1]
        _finish(run, tmp_path, 100.0 + abs(run.lr - middle) * 1e3, [1])
    best = sweep.best_lrs(tmp_path)
    assert best == {arm: sorted(grid)[1] for arm, grid in sweep.LR_GRID.items()}
    seeds = sweep.plan("seeds", tmp_path)
    assert {(r.arm, r.lr) for r in seeds} == set(best.items())
    assert sorted(r.seed for r in seeds if r.arm == "adamw") == list(sweep.SEEDS)
    assert all(r.steps == sweep.SEED_STEPS >= 3000 for r in seeds)
    assert sweep.report(tmp_path)["best_at_grid_edge"] == []


def test_report_gives_mean_and_sample_std_over_seeds_and_state_ratio(tmp_path: Path) -> None:
    for run in sweep.lr_stage():
        middle = sorted(sweep.LR_GRID[run.arm])[1]
        _finish(run, tmp_path, 100.0 + abs(run.lr - middle), [1])
    ppl = {"adamw": [30.0, 31.0, 32.5], "adarank": [29.0, 29.5, 31.0]}
    for arm, values in ppl.items():
        lr = sweep.best_lrs(tmp_path)[arm]
        for seed, value in zip(sweep.SEEDS, values, strict=True):
            states = [400, 400] if arm == "adamw" else [100, 140]
            _finish(sweep.Run("seeds", arm, lr, seed, sweep.SEED_STEPS), tmp_path, value, states)
    rows = {r["arm"]: r for r in sweep.report(tmp_path)["seeds"]}
    assert rows["adamw"]["val_ppl_mean"] == pytest.approx(statistics.fmean(ppl["adamw"]))
    assert rows["adamw"]["val_ppl_std"] == pytest.approx(statistics.stdev(ppl["adamw"]))
    assert rows["adarank"]["state_ratio_to_adamw"] == pytest.approx(120 / 400)
    # 31.17 vs 29.83 with stds 1.26 and 1.04: inside 2 std, a tie.
    assert sweep.is_tie(rows["adamw"], rows["adarank"])
    assert (tmp_path / "seeds.csv").read_text().startswith("stage,arm,lr")


def test_plan_commands_resume_and_name_every_setting(tmp_path: Path) -> None:
    run = sweep.Run("lr", "adarank_residual", 0.01, 0, sweep.LR_STEPS)
    cmd = run.command(tmp_path, threads=1)
    assert "--resume" in cmd and cmd[cmd.index("--lowrank") + 1] == '{"residual": true}'
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "lr/adarank_residual/lr0.01_seed0")
    assert sweep.main(["plan", "--stage", "lr", "--root", str(tmp_path)]) == 0


def test_a_run_locked_by_another_process_is_skipped(tmp_path: Path) -> None:
    import fcntl

    run = sweep.Run("lr", "adamw", 1e-3, 0, sweep.LR_STEPS)
    run.directory(tmp_path).mkdir(parents=True)
    with open(run.directory(tmp_path) / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Nothing is started (it would fail: no corpus arguments), so no failure is counted.
        assert sweep.execute([run], tmp_path, jobs=1, threads=1) == 0
    assert not (run.directory(tmp_path) / "run.log").exists()


def test_lr_stage_puts_every_arms_default_first() -> None:
    first = sweep.lr_stage()[: len(sweep.ARMS)]
    assert [r.arm for r in first] == list(sweep.ARMS)
    assert all(r.lr == sorted(sweep.LR_GRID[r.arm])[1] for r in first)


def test_ladder_steps_follow_the_grids_spacing() -> None:
    assert sweep._ladder_step(1e-3, up=False) == 3e-4
    assert sweep._ladder_step(3e-4, up=False) == 1e-4
    assert sweep._ladder_step(3e-2, up=True) == 1e-1
    assert sweep._ladder_step(1e-2, up=True) == 3e-2
    with pytest.raises(ValueError, match="ladder"):
        sweep._ladder_step(2e-3, up=True)


def test_a_best_at_the_grids_edge_grows_the_grid_until_it_is_bracketed(tmp_path: Path) -> None:
    # AdamW's perplexity falls all the way down to lr 1e-4: two extensions below its grid.
    def ppl(run: sweep.Run) -> float:
        return 100.0 + 1e4 * abs(run.lr - (1e-4 if run.arm == "adamw" else 1e-2))

    base = sweep.lr_stage(tmp_path)
    assert base == sweep.lr_stage()  # nothing finished: the base grids
    for run in base:
        _finish(run, tmp_path, ppl(run), [1])
    added = [r for r in sweep.lr_stage(tmp_path) if r not in base]
    assert [(r.arm, r.lr) for r in added] == [("adamw", 3e-4)]
    with pytest.raises(ValueError, match="lr stage unfinished"):
        sweep.best_lrs(tmp_path)  # the seeds wait for the added run
    _finish(added[0], tmp_path, ppl(added[0]), [1])
    added = [r for r in sweep.lr_stage(tmp_path) if r not in base]
    assert [(r.arm, r.lr) for r in added] == [("adamw", 1e-4), ("adamw", 3e-4)]
    _finish(added[0], tmp_path, ppl(added[0]), [1])
    # The cap: 1e-4 is still the best and at the edge, but the grid grows no further.
    assert len(sweep.lr_stage(tmp_path)) == len(base) + sweep.MAX_EXTENSIONS
    assert sweep.best_lrs(tmp_path)["adamw"] == 1e-4
    report = sweep.report(tmp_path)
    assert report["best_at_grid_edge"] == ["adamw"]
    assert report["grid"]["adamw"] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert len(report["lr_sweep"]) == len(base) + 2


def test_seed_stage_runs_seed_0_of_every_arm_first(tmp_path: Path) -> None:
    for run in sweep.lr_stage():
        middle = sorted(sweep.LR_GRID[run.arm])[1]
        _finish(run, tmp_path, 100.0 + abs(run.lr - middle) * 1e3, [1])
    first = sweep.plan("seeds", tmp_path)[: len(sweep.ARMS)]
    assert [r.arm for r in first] == list(sweep.ARMS) and {r.seed for r in first} == {0}


def test_run_stops_when_another_driver_holds_the_only_unfinished_run(tmp_path: Path) -> None:
    import fcntl

    # AdamW's highest lr is held elsewhere; its best finished run is the middle one, so no run
    # is added past an edge and nothing is left for this driver to start.
    held = next(
        r for r in sweep.lr_stage() if r.arm == "adamw" and r.lr == max(sweep.LR_GRID["adamw"])
    )
    for run in sweep.lr_stage():
        if run != held:
            middle = sorted(sweep.LR_GRID[run.arm])[1]
            _finish(run, tmp_path, 100.0 + abs(run.lr - middle), [1])
    assert [r for r in sweep.lr_stage(tmp_path) if r.directory(tmp_path).exists() is False] == [
        held
    ]
    held.directory(tmp_path).mkdir(parents=True)
    with open(held.directory(tmp_path) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Skipped, not retried in a loop, and no failure: the other driver will finish it.
        assert sweep.main(["run", "--stage", "lr", "--root", str(tmp_path), "--jobs", "1"]) == 0
