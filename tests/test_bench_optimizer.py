"""Smoke test of the optimizer benchmark on the tiny shape (a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import bench_optimizer as bench


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _expected_lowrank_bytes(d: int, ffn: int, ranks: dict[str, int]) -> tuple[int, int]:
    """(moment bytes, projector bytes) of float32 compact moments r×max(m, n) and a
    projector min(m, n)×r per matrix ("std" projection on the smaller side)."""
    shapes = {
        "q_proj": (d, d),
        "k_proj": (d, d),
        "v_proj": (d, d),
        "o_proj": (d, d),
        "gate_proj": (ffn, d),
        "up_proj": (ffn, d),
        "down_proj": (d, ffn),
    }
    moments = projectors = 0
    for name, r in ranks.items():
        m, n = shapes[name.split(".")[-2]]
        moments += 2 * 4 * r * max(m, n)
        projectors += 4 * r * min(m, n)
    return moments, projectors


def test_tiny_benchmark_reports_times_ranks_and_state_ratios(
    tmp_path: Path, restore_threads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = "--shape tiny --steps 2 --repeats 2 --warmup 1 --refresh-repeats 1 --threads 1"
    report = bench.main([*argv.split(), "--no-progress", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"config", "environment", "reference_ranks", "results"}
    results = report["results"]
    assert list(results) == list(bench.OPTIMIZERS)
    for name, r in results.items():
        timings = ("step_s", "refresh_s", "first_step_s", "amortised_s")
        for key in (*timings, "state_ratio", "step_ratio", "amortised_ratio"):
            assert r[key] > 0, (name, key)
        assert set(r["state_bytes"]) == {"total", "moments", "projectors", "other"}
        assert r["state_bytes"]["total"] == sum(
            r["state_bytes"][k] for k in ("moments", "projectors", "other")
        )

    d, ffn = bench.SHAPES["tiny"]
    numel = 4 * d * d + 3 * d * ffn
    adamw = results["AdamW"]
    assert adamw["state_ratio"] == 1.0
    assert adamw["step_ratio"] == 1.0
    assert adamw["state_bytes"]["moments"] == 2 * 4 * numel  # two float32 moments

    rank = report["config"]["rank"]
    assert results["GaLoreAdamW"]["ranks"] == {k: rank for k in results["GaLoreAdamW"]["ranks"]}
    for name in ("GaLoreAdamW", "AdaRankAdamW"):
        r = results[name]
        assert r["state_ratio"] < 1.0, name
        assert len(r["ranks"]) == 7
        assert all(1 <= k <= rank for k in r["ranks"].values())
        # The first step and the one forced refresh; none triggered while timing steps.
        assert all(c == 2 for c in r["refresh_counts"].values()), name
        assert r["unplanned_refreshes"] == 0
        moments, projectors = _expected_lowrank_bytes(d, ffn, r["ranks"])
        assert r["state_bytes"]["moments"] == moments, name
        assert r["state_bytes"]["projectors"] == projectors, name

    table = capsys.readouterr().out
    for name in bench.OPTIMIZERS:
        assert f"| {name} |" in table
