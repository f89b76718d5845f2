"""adarank under torch.distributed (DESIGN §9): 2 processes, gloo on CPU, launched by torchrun.

One ``torchrun --nproc-per-node 2`` run of ``dist_workers/worker.py`` (module
fixture; 6–15 s on 2 CPU cores) executes every scenario; the tests below read
its verdicts. Tolerances are stated where they are used; measured on this CPU:

- sharded rSVD vs ``randomized_svd`` on the gathered matrix (same seed):
  singular vectors ≤ 1.7e-6 after aligning each pair's sign, values ≤ 4e-7
  relative; replicated outputs bitwise equal on both ranks;
- DDP vs one process on the same global batch, 10 steps: parameters ≤ 1.4e-7,
  optimizer-state tensors ≤ 1.4e-6, ranks, refresh and skip counts equal; the
  two DDP ranks bitwise equal; a DCP checkpoint round trip bitwise equal;
- FSDP2 (the integration prototype on the sharded primitives) vs one process,
  8 steps: parameters ≤ 1.2e-7, losses ≤ 1.2e-7, ranks and refreshes equal.

Single-process tests of the same primitives (no process group: collectives are
skipped) come first and take well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from adarank.distributed import (
    randomized_svd_comm_bytes,
    record_comm,
    shard_layout,
    sharded_captured_fraction,
    sharded_project,
    sharded_qr,
    sharded_randomized_svd,
    sharded_track_subspace,
    world_size,
)
from adarank.rsvd import randomized_svd
from adarank.subspace import track_subspace

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_workers" / "worker.py"
SCENARIOS = ("primitives", "ddp", "checkpoint", "fsdp_shards", "fsdp_prototype",
             "ddp_layerwise", "fsdp_train")
TIMEOUT_S = 150
# Float32 work on matrices of well-separated spectra: agreement to a few ulps of 1.
TOL = 1e-5


def _unavailable() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build"
    return None


needs_dist = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


# ------------------------------------------------------- single process


def _spectrum(m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return ((U * 0.7 ** torch.arange(k, dtype=torch.float64)) @ V.T).float()


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (24, 24)])
def test_sharded_rsvd_on_one_process_equals_randomized_svd(shape):
    assert world_size() == 1
    G = _spectrum(*shape)
    U, S, Vh = sharded_randomized_svd(G, 5, seed=3)
    U_ref, S_ref, Vh_ref = randomized_svd(G, 5, seed=3)
    signs = torch.sign((Vh * Vh_ref).sum(1))  # an SVD fixes each pair up to sign
    torch.testing.assert_close(S, S_ref, rtol=TOL, atol=TOL)
    torch.testing.assert_close(U * signs, U_ref, rtol=0, atol=TOL)
    torch.testing.assert_close(Vh * signs[:, None], Vh_ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("m, n, k, p, q", [(96, 40, 6, 8, 2), (40, 96, 6, 8, 2),
                                           (64, 64, 10, 4, 0), (30, 12, 20, 8, 1)])
def test_comm_counter_matches_closed_form(m, n, k, p, q):
    G = torch.randn(m, n)
    with record_comm() as outer, record_comm() as inner:
        sharded_randomized_svd(G, k, oversample=p, power_iters=q, seed=0)
    expected = randomized_svd_comm_bytes(m, n, k, oversample=p, power_iters=q, world=1,
                                         layout_known=False)
    assert outer.bytes == inner.bytes == expected
    assert outer.by_label["layout"] == 8


@pytest.mark.parametrize("Y", [torch.zeros(12, 4), torch.ones(12, 4),
                               torch.randn(12, 4) @ torch.diag(torch.tensor([1, 1e-4, 1e-8, 0.]))],
                         ids=["zero", "rank_one", "ill_conditioned"])
def test_sharded_qr_orthonormal_on_rank_deficient_input(Y):
    Q, R = sharded_qr(Y)
    assert torch.isfinite(Q).all() and torch.isfinite(R).all()
    torch.testing.assert_close(Q.T @ Q, torch.eye(4), rtol=0, atol=TOL)
    torch.testing.assert_close(Q @ R, Y, rtol=0, atol=TOL)


def test_sharded_qr_refuses_wide_matrix():
    with pytest.raises(ValueError, match="at least as many rows"):
        sharded_qr(torch.randn(3, 5))


def test_sharded_rsvd_requires_seed():
    with pytest.raises(ValueError, match="seed is required"):
        sharded_randomized_svd(torch.randn(8, 6), 2, seed=None)


def test_tracking_and_projection_match_unsharded_on_one_process():
    G = _spectrum(30, 12) + 0.01 * torch.randn(30, 12)
    U, _, Vh = randomized_svd(G, 3, seed=0)
    P, Q = U.contiguous(), Vh.T.contiguous()
    for got, want in zip(sharded_track_subspace(G, P, Q), track_subspace(G, P, Q), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    R = sharded_project(G, P, None)
    captured = sharded_captured_fraction(R, G, R_sharded=False)
    assert abs(float(captured) - float((P.T @ G).norm() / G.norm())) < TOL
    assert shard_layout(30) == (0, 30)


# ---------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every scenario under ``torchrun --nproc-per-node 2``; rank 0's verdicts."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out), ",".join(SCENARIOS)]
    # Own session, so a hung run is stopped with its workers (by this group's id only).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log = f"torchrun timed out after {TIMEOUT_S} s\n{log}"
    path = out / "results.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    found["_log"] = log[-6000:]
    return found


def _scenario(results: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in results:
        pytest.fail(f"scenario {name!r} left no verdict; torchrun output:\n{results['_log']}")
    entry = results[name]
    assert entry["ok"], entry.get("error")
    return entry


@needs_dist
def test_sharded_rsvd_agrees_with_gathered_randomized_svd(results):
    svd = _scenario(results, "primitives")["svd"]
    assert set(svd) == {"tall_uneven", "wide_uneven", "tall_empty_first", "wide_empty_last",
                        "square"}
    for name, case in svd.items():
        assert case["S_rel"] < TOL, name
        assert case["U"] < TOL and case["Vh"] < TOL, (name, case)
        assert case["U_orth"] < TOL, name
        assert case["replicated_identical"], f"{name}: S or Vh differ across ranks"
        assert case["bytes"] == case["bytes_closed_form"], name


@needs_dist
def test_sharded_qr_orthonormal_across_ranks(results):
    qr = _scenario(results, "primitives")["qr"]
    for name, case in qr.items():
        assert case["orth"] < TOL and case["residual"] < TOL, (name, case)
    assert not qr["ill_conditioned"]["fallback"]  # κ = 1e6 stays on CholeskyQR2
    assert qr["ill_conditioned"]["vs_householder"] < TOL  # same Q up to column signs
    assert qr["dependent"]["fallback"] and qr["zero"]["fallback"]


@needs_dist
def test_sharded_projection_tracking_and_flags_agree(results):
    ops = _scenario(results, "primitives")["ops"]
    for key in ("fro_sq_rel", "project_left", "project_right", "project_both", "captured_left",
                "captured_right", "track_left", "track_right", "align_signs", "matmul_tn",
                "overlap", "norms_right"):
        assert ops[key] < TOL, (key, ops[key])
    # A NaN in rank 1's shard only is seen by rank 0 too.
    assert ops["all_finite"] == [True, False]
    assert ops["layout"] == [0, 40]


@needs_dist
def test_ddp_ranks_identical_and_equal_to_one_process(results):
    ddp = _scenario(results, "ddp")
    assert ddp["differs_across_ranks"] == [[]], "DDP ranks hold different parameters or state"
    single = ddp["vs_single_process"]
    assert single["numbers_differ"] == [], single  # ranks, refreshes, counters
    assert single["param_max_diff"] < 1e-5
    assert single["state_max_diff"] < 1e-4
    # The run exercised what could diverge: refreshes, and an Inf on rank 1 only.
    assert min(ddp["refreshes"].values()) >= 2
    assert ddp["skips"] == ddp["reference_skips"] and sum(ddp["skips"].values()) >= 1


@needs_dist
def test_distributed_checkpoint_round_trip_continues_identically(results):
    ck = _scenario(results, "checkpoint")
    assert ck["differs"] == [[], []], "the resumed run differs from the uninterrupted one"
    assert ck["ranks_loaded"] == ck["ranks_at_save"]
    assert ".metadata" in ck["files"]


@needs_dist
def test_sharded_rsvd_on_fsdp2_gradient_shards(results):
    shards = _scenario(results, "fsdp_shards")
    assert shards["0.weight"]["local_rows"] == [19, 18]  # unequal
    assert shards["4.weight"]["local_rows"] == [1, 0]  # an empty shard
    for name, case in shards.items():
        if name == "ok":
            continue
        assert case["layout_matches"], name  # row_shard_info's chunk rule = the real layout
        assert case["grad_vs_reference"] < 1e-6, name
        assert case["fro_sq_rel"] < TOL and case["S_rel"] < TOL, (name, case)
        assert case["U"] < TOL and case["Vh"] < TOL, (name, case)


def _check_fsdp_run(run: dict[str, Any]) -> None:
    assert run["param_max_diff"] < 1e-5
    assert run["loss_max_diff"] < 1e-5
    assert run["ranks"] == run["reference_ranks"]
    assert run["refreshes"] == run["reference_refreshes"]
    assert run["skips"] == run["reference_skips"]
    # Sharded moments and projectors: every rank holds less than one process does.
    assert max(run["state_bytes"]) < run["reference_state_bytes"]


@needs_dist
def test_fsdp2_prototype_on_sharded_primitives_matches_one_process(results):
    # The integration plan (dist_workers/fsdp_prototype.py) end to end.
    _check_fsdp_run(_scenario(results, "fsdp_prototype"))


@needs_dist
@pytest.mark.xfail(strict=True, reason="AdaRankAdamW is not FSDP2-aware yet (step() calls "
                   ".tolist() on DTensor gradients); remove this mark when optimizer.py uses "
                   "adarank.distributed on the local shards")
def test_fsdp2_training_matches_one_process(results):
    _check_fsdp_run(_scenario(results, "fsdp_train"))


@needs_dist
@pytest.mark.xfail(strict=True, reason="adarank.layerwise steps inside the post-accumulate-grad "
                   "hook, before DDP has all-reduced the gradient, so each rank steps on its "
                   "own local gradient; remove this mark when layer-wise mode refuses or "
                   "supports DDP")
def test_layerwise_under_ddp_keeps_ranks_identical(results):
    run = _scenario(results, "ddp_layerwise")
    assert run["param_max_diff_across_ranks"] == 0.0
