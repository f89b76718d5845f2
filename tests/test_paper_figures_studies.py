"""The studies' part of ``python -m paper_figures``: partial studies are drawn and labelled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adarank.analysis.io import LogWriter
from experiments import rank_study, sweep
from paper_figures import build, studies

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = [("layers.0.self_attn.q_proj.weight", "q"), ("layers.0.mlp.up_proj.weight", "up")]


def _finish_sweep_run(run: sweep.Run, root: Path, ppl: float) -> None:
    d = run.directory(root)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"lr": run.lr, "seed": run.seed, "rank": 64}))
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "state_bytes": {"total": 8}}))
    (d / "summary.json").write_text(json.dumps({"val_ppl": ppl, "tokens_per_s": 10.0}))


def _spectrum(path: Path, ranks: list[float]) -> None:
    header = {"layers": [{"name": n, "type": t} for n, t in LAYERS]}
    with LogWriter(path, header) as log:
        for step, rank in enumerate(ranks):
            values = {"energy_rank_0.9": rank, "stable_rank": rank / 2}
            log.append({"kind": "record", "step": step, "layers": {n: values for n, _ in LAYERS}})


def _finish_study_run(run: rank_study.StudyRun, root: Path, g: list[float], ema: list[float]):
    d = run.directory(root)
    d.mkdir(parents=True)
    (d / "summary.json").write_text("{}")
    _spectrum(d / "spectrum.jsonl", g)
    _spectrum(d / "spectrum_ema.jsonl", ema)


def test_partial_sweep_table_says_what_has_not_run(tmp_path: Path) -> None:
    first = sweep.lr_stage()[0]
    _finish_sweep_run(first, tmp_path, 123.456)
    text = studies.sweep_markdown(studies.load_sweep(tmp_path), "###")
    assert f"(1 of {len(sweep.lr_stage())} runs finished)" in text
    assert "123.46" in text and "not run yet" in text
    assert "Seeded runs" in text and "not run yet" in text.split("Seeded runs")[1]


def test_rank_study_table_reports_low_point_and_end_per_type(tmp_path: Path) -> None:
    run = rank_study.runs()[0]
    _finish_study_run(run, tmp_path, [30.0, 4.0, 9.0, 12.0], [20.0, 3.0, 2.0, 2.5])
    loaded = studies.load_rank_study(tmp_path)
    assert [r.multiplier for r in loaded] == [run.multiplier]
    np.testing.assert_allclose(studies.mean_over(loaded[0].gradient, "stable_rank", ("q",)),
                               [15.0, 2.0, 4.5, 6.0])  # fmt: skip
    text = studies.rank_study_markdown(loaded, "###")
    assert "4.0 (1) → 12.0" in text and "2.0 → 2.5" in text
    assert f"(1 of {len(rank_study.runs())} runs finished)" in text


def test_build_draws_only_the_studies_that_have_runs(tmp_path: Path) -> None:
    sweep_root, rank_root, out = tmp_path / "sweep", tmp_path / "rank", tmp_path / "out"
    _finish_sweep_run(sweep.lr_stage()[0], sweep_root, 99.0)
    found = build.Studies(sweep_root, rank_root, tmp_path / "budget")
    assert [name for name, _, _ in found.drawable()] == ["lr_sweep"]
    paths = build.build([], out, study=found)
    assert [p.name for p in paths] == ["lr_sweep.png"]
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)
    assert found.markdown(out, out, level=3).count("No run has finished yet.") == 3


def test_unreadable_finished_study_run_is_an_input_error(tmp_path: Path) -> None:
    run = rank_study.runs()[0]
    d = run.directory(tmp_path)
    d.mkdir(parents=True)
    (d / "summary.json").write_text("{}")
    (d / "spectrum.jsonl").write_text("not json\n")
    with pytest.raises(studies.InputError):
        studies.load_rank_study(tmp_path)


def test_rank_study_compares_runs_at_equal_steps(tmp_path: Path) -> None:
    # 70 records (steps 0..69): steps 16 and 64 exist, 256 and 1024 do not ("–").
    run = rank_study.runs()[0]
    ranks = [float(i) for i in range(70)]
    _finish_study_run(run, tmp_path, ranks, ranks)
    (run.directory(tmp_path) / "summary.json").write_text(json.dumps({"val_ppl": 123.45}))
    text = studies.rank_study_markdown(studies.load_rank_study(tmp_path), "###")
    row = next(line for line in text.splitlines() if line.startswith(f"| ×{run.multiplier} | 16."))
    assert row == f"| ×{run.multiplier} | 16.0 / 16.0 (16) | 64.0 / 64.0 (64) | – | – | 123.5 |"
