"""Resuming ``experiments.pretrain``: a run interrupted between checkpoints and resumed with
``--resume`` ends with the weights, optimizer state and log lines of an uninterrupted run, for
every optimizer (Q-GaLore's INT8 weights and stochastic rounding included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("tokenizers")

from experiments import data, pretrain, runfiles  # noqa: E402

try:
    data.corpus_dir()
except data.CorpusNotFoundError:
    pytest.skip(f"corpus not installed; run: {data.INSTALL_COMMAND}", allow_module_level=True)

STEPS = 7
# The interruption comes after this step's train line is written: past the checkpoint of step 4
# (so resuming must cut the log back) and before the one of step 6.
KILLED_AFTER = 5
# Wall-clock quantities, the only ones allowed to differ between the two runs.
TIMING = {"step_seconds", "tokens_per_s", "train_seconds", "peak_memory_bytes"}


class _Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    data.prepare(data.DataConfig(vocab_size=512, max_works=6), path)
    return path


def _args(cache: Path, out: Path, optimizer: str, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--max-works", "6", "--vocab-size", "512", "--data-cache", str(cache),
        "--eval-windows", "4", "--no-progress", "--threads", "1", "--out", str(out),
        "--optimizer", optimizer, "--steps", str(STEPS), "--ckpt-every", "2", "--eval-every", "3",
        "--update-gap", "3", "--spectrum-every", "0", *extra,
    ]  # fmt: skip


def _lines(path: Path) -> list[dict[str, Any]]:
    """The log's records without timings; the header's config without its ``out``."""
    records = [
        {k: v for k, v in r.items() if k not in TIMING} for r in runfiles.read_json_lines(path)
    ]
    records[0]["config"].pop("out")
    return records


def _tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if not isinstance(tree, (dict, list, tuple)):
        return {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


@pytest.mark.parametrize("optimizer", pretrain.OPTIMIZERS)
def test_interrupted_run_resumes_to_the_uninterrupted_weights_state_and_log(
    optimizer: str, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert pretrain.main(_args(cache, reference, optimizer)) == 0

    write = runfiles.JsonLines.write

    def write_then_interrupt(self: runfiles.JsonLines, record: dict[str, Any]) -> None:
        write(self, record)
        if record["kind"] == "train" and record["step"] == KILLED_AFTER:
            raise _Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(runfiles.JsonLines, "write", write_then_interrupt)
        with pytest.raises(_Interrupted):
            pretrain.main(_args(cache, resumed, optimizer))
    assert not (resumed / "summary.json").exists()
    assert torch.load(resumed / pretrain.CHECKPOINT, weights_only=True)["step"] == 4
    logged = [r["step"] for r in _lines(resumed / "metrics.jsonl") if r["kind"] == "train"]
    assert logged == list(range(1, KILLED_AFTER + 1))

    assert pretrain.main(_args(cache, resumed, optimizer, "--resume")) == 0
    assert _lines(resumed / "metrics.jsonl") == _lines(reference / "metrics.jsonl")
    want = json.loads((reference / "summary.json").read_text())
    got = json.loads((resumed / "summary.json").read_text())
    assert {k: v for k, v in got.items() if k not in TIMING} == {
        k: v for k, v in want.items() if k not in TIMING
    }
    want_ckpt = torch.load(reference / pretrain.CHECKPOINT, weights_only=True)
    got_ckpt = torch.load(resumed / pretrain.CHECKPOINT, weights_only=True)
    for part in ("model", "optimizer", "rng"):
        want_t, got_t = _tensors(want_ckpt[part]), _tensors(got_ckpt[part])
        assert got_t.keys() == want_t.keys(), part
        for name, tensor in want_t.items():
            assert torch.equal(got_t[name], tensor), f"{part}{name}"
    assert got_ckpt["optimizer"]["param_groups"] == want_ckpt["optimizer"]["param_groups"]
    assert got_ckpt["sampler"] == want_ckpt["sampler"] and got_ckpt["step"] == STEPS
