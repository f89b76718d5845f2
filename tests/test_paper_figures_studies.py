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
    assert "Seeded runs" in text and "not run yet" in text.split("Seeded runs")[1].lower()


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
    found = build.Studies(sweep_root, rank_root, tmp_path / "budget", tmp_path / "genre")
    assert [name for name, _, _ in found.drawable()] == ["lr_sweep"]
    paths = build.build([], out, study=found)
    assert [p.name for p in paths] == ["lr_sweep.png"]
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)
    assert found.markdown(out, out, level=3).count("No run has finished yet.") == 4


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


BERT_LAYERS = [
    ("bert.encoder.layer.0.attention.self.query.weight", "q"),
    ("bert.encoder.layer.0.intermediate.dense.weight", "up"),
]


def _finish_genre_run(
    root: Path,
    optimizer: str,
    lr: float,
    acc: float,
    state: int,
    ranks: list[tuple[int, int]] | None,
    energy: list[float],
) -> None:
    """What a finished `experiments.genre_finetune` run leaves: summary, metrics, spectrum."""
    from experiments import genre_finetune

    d = genre_finetune.run_dir(root, optimizer, lr, 0)
    d.mkdir(parents=True)
    summary = {"optimizer": optimizer, "lr": lr, "steps": 200, "epochs": 4.0,
               "stopped": "patience", "best_val_acc": acc, "best_val_loss": 1.0 - acc,
               "test_acc": acc - 0.1, "state_bytes": {"total": state}}  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    evals = []
    for step, (attention, mlp) in zip((50, 100, 200), ranks or [], strict=False):
        names = [n for n, _ in BERT_LAYERS]
        evals.append(
            {"kind": "eval", "step": step, "ranks": dict(zip(names, (attention, mlp), strict=True))}
        )
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    header = {"layers": [{"name": n, "type": t} for n, t in BERT_LAYERS]}
    with LogWriter(d / "spectrum.jsonl", header) as log:
        for i, value in enumerate(energy):
            values = {"energy_rank_0.9": value, "stable_rank": value / 2}
            log.append({"kind": "record", "step": 20 * i,
                        "layers": {n: values for n, _ in BERT_LAYERS}})  # fmt: skip


def test_genre_table_reports_accuracy_state_ratio_and_rank_path(tmp_path: Path) -> None:
    _finish_genre_run(tmp_path, "adamw", 6e-5, 0.70, 400, None, [10.0, 3.0, 5.0])
    _finish_genre_run(tmp_path, "adarank", 1.8e-4, 0.60, 100, [(8, 8), (6, 7), (2, 5)],
                      [12.0, 2.0, 4.0])  # fmt: skip
    _finish_genre_run(tmp_path, "adarank", 5.4e-4, 0.65, 120, [(8, 8)], [9.0, 9.0, 9.0])
    runs = studies.load_genre(tmp_path)
    assert [(r.optimizer, r.best) for r in runs] == [
        ("adamw", True), ("adarank", False), ("adarank", True)
    ]  # fmt: skip
    np.testing.assert_array_equal(runs[1].rank_steps, [50, 100, 200])
    np.testing.assert_array_equal(runs[1].mean_chosen_rank(studies.MLP), [8, 7, 5])
    text = studies.genre_markdown(runs, "###")
    row = next(line for line in text.splitlines() if "| 0.00018 |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # accuracy not bold (not the best adarank run), state 100 / AdamW's 400, first → low → end.
    assert cells[4] == "0.600" and cells[7] == "0.25×"
    assert cells[8] == "12.0 → 2.0 (20) → 4.0" and cells[10] == "8.0 → 2.0 / 8.0 → 5.0"
    assert "**0.650**" in text and "(3 of 9 runs finished)" in text
    found = build.Studies(tmp_path / "s", tmp_path / "r", tmp_path / "b", tmp_path)
    assert [name for name, _, _ in found.drawable()] == ["genre_ranks"]
    paths = build.build([], tmp_path / "out", study=found)
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)


def _finish_seeded_run(
    root: Path, arm: str, seed: int, ppl: float, ranks: dict[str, list[int]] | None = None
) -> None:
    """A finished seeds-stage run: three evaluations (steps 100-300), ``ranks`` the optimizer's
    rank per layer at each, and a four-record G spectrum."""
    run = sweep.Run("seeds", arm, 0.01, seed, sweep.SEED_STEPS)
    d = run.directory(root)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"lr": run.lr, "seed": seed, "rank": 64}))
    with open(d / "metrics.jsonl", "w") as fh:
        for i, step in enumerate((100, 200, 300)):
            record = {"kind": "eval", "step": step, "val_ppl": ppl + 10 * (2 - i),
                      "state_bytes": {"total": 2**20}}  # fmt: skip
            if ranks:
                record["ranks"] = {name: v[i] for name, v in ranks.items()}
            fh.write(json.dumps(record) + "\n")
    (d / "summary.json").write_text(json.dumps({"val_ppl": ppl, "tokens_per_s": 10.0}))
    _spectrum(d / "spectrum.jsonl", [30.0, 4.0, 9.0, 12.0])


def test_seeded_table_reports_mean_std_ranks_and_two_std_verdicts(tmp_path: Path) -> None:
    # AdamW 81 ± 1, GaLore 85 ± 1, AdaRank 82 ± 0.5 (sample std over three seeds).
    chosen = {LAYERS[0][0]: [0, 4, 8], LAYERS[1][0]: [0, 10, 20]}
    for seed, (a, g, r) in enumerate([(80, 84, 81.5), (81, 85, 82.0), (82, 86, 82.5)]):
        _finish_seeded_run(tmp_path, "adamw", seed, a)
        _finish_seeded_run(tmp_path, "galore", seed, g, chosen)
        _finish_seeded_run(tmp_path, "adarank", seed, r, chosen)
    result = studies.load_sweep(tmp_path)
    assert [(r.arm, r.seed) for r in result.seeded][:4] == [
        ("adamw", 0),
        ("adamw", 1),
        ("adamw", 2),
        ("galore", 0),
    ]
    np.testing.assert_array_equal(result.seeded[0].steps, [100, 200, 300])
    text = studies.seeded_markdown(result, "###")
    assert f"(9 of {len(sweep.ARMS) * len(sweep.SEEDS)} runs finished" in text
    assert "81.00 ± 1.00" in text and "85.00 ± 1.00" in text and "82.00 ± 0.50" in text
    # Chosen rank after the first refresh (step 100 has none): q (4 + 8) / 2 → 8, up 15 → 20.
    assert "| 6.0 → 8.0 / 15.0 → 20.0 |" in text
    # G's energy rank: lowest 4.0 at step 1 of the spectrum, 12.0 at the end, per layer type.
    assert "| 4.0 (1) → 12.0 / 4.0 (1) → 12.0 |" in text
    # 2 × larger std is 2.00 for every pair here: +4 is a difference, +1 is a tie.
    assert "| GaLore vs AdamW | +4.00 | 2.00 | higher (worse) |" in text
    assert "| AdaRankAdamW vs AdamW | +1.00 | 2.00 | tie |" in text
    assert "| AdaRankAdamW vs GaLore | -3.00 | 2.00 | lower (better) |" in text


def test_seeded_verdicts_wait_for_every_seed(tmp_path: Path) -> None:
    for seed in (0, 1):
        _finish_seeded_run(tmp_path, "adamw", seed, 80.0 + seed)
        _finish_seeded_run(tmp_path, "galore", seed, 90.0 + seed)
    text = studies.seeded_markdown(studies.load_sweep(tmp_path), "###")
    assert "80.50 ± 0.71" in text
    assert "vs AdamW" not in text and "No comparison yet" in text


def test_read_evals_keeps_the_last_record_of_a_step_in_step_order(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "eval", "step": 200, "val_ppl": 9.0}, {"kind": "train", "step": 150},
             {"kind": "eval", "step": 100, "val_ppl": 8.0},
             {"kind": "eval", "step": 200, "val_ppl": 7.0}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    evals = studies.read_evals(path)
    assert [(r["step"], r["val_ppl"]) for r in evals] == [(100, 8.0), (200, 7.0)]
    path.write_text("{not json\n")
    with pytest.raises(studies.InputError, match="metrics.jsonl: unreadable"):
        studies.read_evals(path)


def test_seeded_figure_is_drawn_once_a_seeded_run_has_finished(tmp_path: Path) -> None:
    sweep_root, out = tmp_path / "sweep", tmp_path / "out"
    _finish_seeded_run(sweep_root, "adamw", 0, 80.0)
    _finish_seeded_run(sweep_root, "adarank", 0, 82.0, {LAYERS[0][0]: [0, 4, 8]})
    _finish_seeded_run(sweep_root, "adarank", 1, 83.0, {LAYERS[0][0]: [0, 6, 8]})
    found = build.Studies(sweep_root, tmp_path / "rank", tmp_path / "budget", tmp_path / "genre")
    assert [name for name, _, _ in found.drawable()] == ["seeds"]
    (path,) = build.build([], out, study=found)
    assert path.name == "seeds.png" and path.read_bytes().startswith(PNG_SIGNATURE)
    assert "studies/seeds.png" in found.markdown(out, out, level=3)


def test_seeded_run_without_its_eval_fields_is_an_input_error(tmp_path: Path) -> None:
    _finish_seeded_run(tmp_path, "adamw", 0, 80.0)
    d = sweep.Run("seeds", "adamw", 0.01, 0, sweep.SEED_STEPS).directory(tmp_path)
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 100}) + "\n")
    with pytest.raises(studies.InputError, match="lacks 'val_ppl'"):
        studies.load_seeded(tmp_path)
