"""The pre-training entry point: smoke runs, configuration handling, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("tokenizers")

from experiments import compare, data, pretrain  # noqa: E402

try:
    data.corpus_dir()
except data.CorpusNotFoundError:
    pytest.skip(f"corpus not installed; run: {data.INSTALL_COMMAND}", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    data.prepare(data.DataConfig(vocab_size=512, max_works=6), path)
    return path


def _tiny_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--max-works", "6", "--vocab-size", "512",
        "--data-cache", str(cache), "--eval-windows", "8", "--no-progress",
        "--out", str(out), *extra,
    ]  # fmt: skip


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("optimizer", pretrain.OPTIMIZERS)
def test_two_step_run_writes_config_metrics_spectrum_and_checkpoint(
    optimizer: str, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / optimizer
    args = _tiny_args(cache, out, "--optimizer", optimizer, "--steps", "2", "--eval-every", "1")
    assert pretrain.main([*args, "--spectrum-every", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == optimizer and config["lr"] == pretrain.DEFAULT_LR[optimizer]
    lines = _lines(out / "metrics.jsonl")
    kinds = [line["kind"] for line in lines]
    assert kinds == ["header", "train", "eval", "train", "eval", "final"]
    final = lines[-1]
    assert final == json.loads((out / "summary.json").read_text())
    assert final["val_ppl"] > 1 and final["tokens_per_s"] > 0 and final["peak_memory_bytes"] > 0
    assert final["state_bytes"]["total"] > 0
    if optimizer != "adamw":
        assert final["ranks"] and all(r >= 1 for r in final["ranks"].values())
    spectrum = (out / "spectrum.jsonl").read_text().splitlines()
    assert json.loads(spectrum[0])["kind"] == "header" and len(spectrum) == 3
    ckpt = torch.load(out / pretrain.CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["sampler"]["position"] == 2


def test_low_rank_state_is_smaller_than_adamw(cache: Path, tmp_path: Path) -> None:
    totals = {}
    for optimizer in ("adamw", "galore"):
        out = tmp_path / optimizer
        pretrain.main(_tiny_args(cache, out, "--optimizer", optimizer, "--steps", "1",
                                 "--rank", "4", "--spectrum-every", "0"))  # fmt: skip
        totals[optimizer] = json.loads((out / "summary.json").read_text())["state_bytes"]["total"]
    assert totals["galore"] < totals["adamw"]


def test_compare_tabulates_finished_runs(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = []
    for optimizer in ("adamw", "adarank"):
        runs.append(str(tmp_path / optimizer))
        pretrain.main(_tiny_args(cache, tmp_path / optimizer, "--optimizer", optimizer,
                                 "--steps", "2", "--spectrum-every", "0"))  # fmt: skip
    capsys.readouterr()
    assert compare.main(runs) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and "| adamw |" in table[2] and "| adarank |" in table[3]
    assert compare.main([str(tmp_path / "missing")]) == 2


def test_unknown_flag_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        pretrain.config_from_args(["--optimiser", "adamw"])
    assert exc.value.code == 2
    assert "--optimiser" in capsys.readouterr().err


def test_unknown_key_in_config_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "tiny", "learning_rate": 0.1}))
    with pytest.raises(ValueError, match="learning_rate"):
        pretrain.config_from_args(["--config", str(path)])


def test_flags_override_the_config_file_and_defaults_resolve(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "60m", "optimizer": "galore", "steps": 1000}))
    c = pretrain.config_from_args(
        ["--config", str(path), "--steps", "10", "--eval-windows", "none"]
    )
    assert (c.model, c.steps, c.eval_windows) == ("60m", 10, None)
    assert (c.rank, c.update_gap, c.lr, c.warmup_steps) == (128, 200, 1e-2, 1)
    assert c.out == "results/60m_galore"


def test_existing_run_is_not_overwritten_without_a_flag(cache: Path, tmp_path: Path) -> None:
    args = _tiny_args(cache, tmp_path / "run", "--optimizer", "adamw", "--steps", "1")
    assert pretrain.main(args) == 0
    assert pretrain.main(args) == 2
    assert pretrain.main([*args, "--overwrite"]) == 0


def test_resume_with_changed_settings_is_refused(cache: Path, tmp_path: Path) -> None:
    args = _tiny_args(cache, tmp_path / "run", "--optimizer", "adamw", "--steps", "2")
    assert pretrain.main(args) == 0
    with pytest.raises(ValueError, match="lr=0.5"):
        pretrain.config_from_args([*args, "--resume", "--lr", "0.5"])
    resumed = pretrain.config_from_args(["--out", str(tmp_path / "run"), "--resume"])
    assert resumed.model == "tiny" and resumed.steps == 2


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    factors = [pretrain.lr_factor(s, steps=100, warmup_steps=10, min_lr_ratio=0.1)
               for s in range(100)]  # fmt: skip
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def _comparable(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Everything but wall-clock timings must agree between the runs.
    timing = {"step_seconds", "tokens_per_s", "train_seconds", "peak_memory_bytes"}
    return [{k: v for k, v in line.items() if k not in timing} for line in lines
            if line["kind"] != "header"]  # fmt: skip


def test_run_killed_mid_way_resumes_to_the_uninterrupted_result(
    cache: Path, tmp_path: Path
) -> None:
    steps = 48
    extra = ("--optimizer", "adarank", "--steps", str(steps), "--ckpt-every", "5",
             "--eval-every", "10", "--spectrum-every", "8", "--update-gap", "6")  # fmt: skip
    reference = tmp_path / "reference"
    assert pretrain.main(_tiny_args(cache, reference, *extra)) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "experiments.pretrain", *_tiny_args(cache, killed, *extra)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        logged = metrics.read_text().count('"kind": "train"') if metrics.exists() else 0
        if logged >= 17:  # past three checkpoints, and between two of them
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.json").exists()
    killed_at = torch.load(killed / pretrain.CHECKPOINT, weights_only=True)["step"]
    assert 0 < killed_at < steps

    assert pretrain.main(_tiny_args(cache, killed, *extra, "--resume")) == 0
    assert _comparable(_lines(killed / "metrics.jsonl")) == _comparable(
        _lines(reference / "metrics.jsonl")
    )
    want = torch.load(reference / pretrain.CHECKPOINT, weights_only=True)
    got = torch.load(killed / pretrain.CHECKPOINT, weights_only=True)
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()


def test_gradient_ema_equals_the_bias_corrected_average_and_restores_grads() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    ema = pretrain.GradientEMA({"w": weight}, beta=0.8)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(5)]
    for g in grads:
        weight.grad = g.float()
        ema.update()
    # Closed form: Σ_t (1−β) β^{T−t} G_t / (1 − β^T), in float64.
    want = sum(0.2 * 0.8 ** (4 - t) * g for t, g in enumerate(grads)) / (1 - 0.8**5)
    last = weight.grad
    with ema.swapped():
        torch.testing.assert_close(weight.grad.double(), want, rtol=1e-6, atol=1e-6)
    assert weight.grad is last


def _spectrum_records(path: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """(step, layer) -> the logged quantities, without wall times."""
    out = {}
    for line in _lines(path):
        if line["kind"] == "record":
            for layer, values in line["layers"].items():
                out[(line["step"], layer)] = values
    return out


def test_spectrum_ema_log_is_written_and_survives_a_resume(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ("--optimizer", "adamw", "--steps", "6", "--spectrum-every", "2",
             "--spectrum-ema", "0.9", "--ckpt-every", "2", "--eval-every", "4")  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert pretrain.main(_tiny_args(cache, whole, *extra)) == 0
    header = _lines(whole / "spectrum_ema.jsonl")[0]
    assert header["meta"]["measured"] == "gradient EMA, beta=0.9"
    plain = _spectrum_records(whole / "spectrum.jsonl")
    ema = _spectrum_records(whole / "spectrum_ema.jsonl")
    assert plain.keys() == ema.keys() and {step for step, _ in ema} == {0, 2, 4, 5}
    for (step, layer), values in ema.items():
        same = values["fro_norm"] == pytest.approx(plain[(step, layer)]["fro_norm"], rel=1e-5)
        # At step 0 the bias-corrected average is the gradient itself; later it is not.
        assert same == (step == 0), (step, layer)

    # Crash in the 5th update (after the checkpoint of step 4), then resume.
    real_update = pretrain.GradientEMA.update

    def crash_at_five(self: pretrain.GradientEMA) -> None:
        if self.count == 4:
            raise RuntimeError("simulated crash")
        real_update(self)

    monkeypatch.setattr(pretrain.GradientEMA, "update", crash_at_five)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.main(_tiny_args(cache, cut, *extra))
    assert torch.load(cut / pretrain.CHECKPOINT, weights_only=True)["gradient_ema"]["count"] == 4
    monkeypatch.setattr(pretrain.GradientEMA, "update", real_update)
    assert pretrain.main(_tiny_args(cache, cut, *extra, "--resume")) == 0
    assert _spectrum_records(cut / "spectrum_ema.jsonl") == ema


def test_state_budget_reaches_the_optimizer_and_bounds_its_state(cache: Path) -> None:
    import adarank.budget

    config = pretrain.config_from_args(
        _tiny_args(cache, Path("unused"), "--optimizer", "adarank", "--state-budget", "1MiB")
    )
    model = pretrain.Decoder(pretrain.get_config("tiny", vocab_size=512))
    optimizer = pretrain.build_optimizer(model, config)
    assert optimizer.budget_report()["budget"] == adarank.budget.parse_budget("1MiB") == 2**20
    with pytest.raises(ValueError, match="state_budget"):
        pretrain.config_from_args(["--optimizer", "adamw", "--state-budget", "1MiB"])
