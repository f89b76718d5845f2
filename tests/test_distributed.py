"""adarank under torch.distributed (DESIGN §9): 2 processes, gloo on CPU, launched by torchrun.

One ``torchrun --nproc-per-node 2`` run of ``dist_workers/worker.py`` (module
fixture; 10–20 s on 2 CPU cores) executes every scenario; the tests below read
its verdicts. Tolerances are stated where they are used; measured on this CPU:

- sharded rSVD vs ``randomized_svd`` on the gathered matrix (same seed):
  singular vectors ≤ 1.7e-6 after aligning each pair's sign, values ≤ 4e-7
  relative; replicated outputs bitwise equal on both ranks;
- DDP vs one process on the same global batch, 10 steps: parameters ≤ 1.4e-7,
  optimizer-state tensors ≤ 1.4e-6, ranks, refresh and skip counts equal; the
  two DDP ranks bitwise equal; a DCP checkpoint round trip bitwise equal;
- FSDP2 (``AdaRankAdamW`` on ``fully_shard`` row shards, unequal and empty)
  vs one process, 8 steps, float32 projectors: parameters ≤ 1.2e-7, losses
  ≤ 1.2e-7 (also with the residual path and lazy refresh); two-sided
  projection (``proj_type="full"``, eps = 1e-6) parameters ≤ 4.7e-5, losses
  ≤ 1.6e-6: at a refresh R = PᵀGQ is diagonal and Adam turns the rounding noise
  of its off-diagonal entries into steps (one process moves by 9e-6 when its
  initial weights move by 1 ulp; by 5e-4 with eps = 1e-8). Ranks, refreshes,
  gaps and skips equal in every case. A DCP checkpoint saved on 2 ranks and
  resumed: bitwise equal to the uninterrupted run.
- Quantised projectors (not tested for equality): the quantisation groups
  restart at the shard boundary, so FSDP2 differs from one process by
  quantisation error (measured 2.4e-3 at 8 bits, 7.3e-3 at 4 bits, group 16).

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
    UNSHARDED,
    ShardContext,
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
from adarank.projector import project
from adarank.rsvd import randomized_svd, truncated_svd
from adarank.subspace import align_signs, subspace_overlap, track_subspace

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_workers" / "worker.py"
SCENARIOS = (
    "primitives",
    "ddp",
    "checkpoint",
    "fsdp_shards",
    "fsdp_train",
    "fsdp_variants",
    "fsdp_checkpoint",
    "fsdp_nan",
    "fsdp_refusals",
    "ddp_layerwise",
)
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


@pytest.mark.parametrize(
    "m, n, k, p, q", [(96, 40, 6, 8, 2), (40, 96, 6, 8, 2), (64, 64, 10, 4, 0), (30, 12, 20, 8, 1)]
)
def test_comm_counter_matches_closed_form(m, n, k, p, q):
    G = torch.randn(m, n)
    with record_comm() as outer, record_comm() as inner:
        sharded_randomized_svd(G, k, oversample=p, power_iters=q, seed=0)
    expected = randomized_svd_comm_bytes(
        m, n, k, oversample=p, power_iters=q, world=1, layout_known=False
    )
    assert outer.bytes == inner.bytes == expected
    assert outer.by_label["layout"] == 8


@pytest.mark.parametrize(
    "Y",
    [
        torch.zeros(12, 4),
        torch.ones(12, 4),
        torch.randn(12, 4) @ torch.diag(torch.tensor([1, 1e-4, 1e-8, 0.0])),
    ],
    ids=["zero", "rank_one", "ill_conditioned"],
)
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


def test_shard_context_of_a_plain_tensor_is_the_single_process_path():
    # The unsharded context must compute bit for bit what optimizer.py computed
    # before FSDP2 support (the single-process path is unchanged).
    G = _spectrum(30, 12) + 0.01 * torch.randn(30, 12)
    ctx = ShardContext.of(torch.nn.Parameter(G.clone()))
    assert ctx is UNSHARDED and not ctx.sharded and ctx.rows(G) == 30
    U, S, Vh = ctx.truncated_svd(G, 4, "torch", seed=5, oversample=8, power_iters=2)
    for got, want in zip((U, S, Vh), truncated_svd(G, 4, "torch", seed=5), strict=True):
        assert torch.equal(got, want)
    P, Q = U[:, :3].contiguous(), Vh[:3].T.contiguous()
    assert torch.equal(ctx.project(G, P, None), project(G, P, None))
    # ‖G‖_F² via one norm reduction (no m×n temporary): float64 reference, rtol 1e-6.
    assert ctx.fro_sq(G) == pytest.approx(float(G.double().square().sum()), rel=1e-6)
    assert torch.equal(ctx.matmul_tn(P, P), P.T @ P)
    assert torch.equal(ctx.align_rows(-P, P), align_signs(-P, P))
    assert ctx.overlap_rows(P, P) == subspace_overlap(P, P)
    for got, want in zip(ctx.track(G, P, Q), track_subspace(G, P, Q), strict=True):
        assert torch.equal(got, want)
    assert ctx.wrap_rows(P) is P


# ---------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every scenario under ``torchrun --nproc-per-node 2``; rank 0's verdicts."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(WORKER),
        str(out),
        ",".join(SCENARIOS),
    ]
    # Own session, so a hung run is stopped with its workers (by this group's id only).
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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
    assert set(svd) == {
        "tall_uneven",
        "wide_uneven",
        "tall_empty_first",
        "wide_empty_last",
        "square",
    }
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
    for key in (
        "fro_sq_rel",
        "project_left",
        "project_right",
        "project_both",
        "captured_left",
        "captured_right",
        "track_left",
        "track_right",
        "align_signs",
        "matmul_tn",
        "overlap",
        "norms_right",
    ):
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


def _check_fsdp_run(run: dict[str, Any], param_tol: float, loss_tol: float) -> None:
    assert run["param_max_diff"] < param_tol
    assert run["loss_max_diff"] < loss_tol
    assert run["ranks"] == run["reference_ranks"]
    assert run["refreshes"] == run["reference_refreshes"]
    assert run["gaps"] == run["reference_gaps"]
    assert run["skips"] == run["reference_skips"]
    # Sharded moments and projectors: every rank holds less than one process does.
    assert max(b["total"] for b in run["state_bytes"]) < run["reference_state_bytes"]["total"]


@needs_dist
def test_fsdp2_training_matches_one_process(results):
    # Float32 projectors: 8 steps agree to float32 rounding (measured ≤ 1.2e-7).
    _check_fsdp_run(_scenario(results, "fsdp_train"), param_tol=1e-5, loss_tol=1e-5)


@needs_dist
def test_fsdp2_residual_lazy_and_two_sided_match_one_process(results):
    variants = _scenario(results, "fsdp_variants")
    _check_fsdp_run(variants["residual_lazy"], param_tol=1e-5, loss_tol=1e-5)
    # Two-sided: Adam amplifies rounding on R's off-diagonal (see module docstring).
    _check_fsdp_run(variants["full_lazy"], param_tol=5e-4, loss_tol=5e-5)
    # The lazy gap grew, from |cos| all-reduced over the row-sharded left bases.
    assert min(variants["residual_lazy"]["gaps"].values()) > 3


@needs_dist
def test_fsdp2_checkpoint_round_trip_continues_identically(results):
    ck = _scenario(results, "fsdp_checkpoint")
    assert ck["differs"] == [[], []], "the resumed FSDP2 run differs from the uninterrupted one"
    assert ck["ranks_loaded"] == ck["ranks_at_save"]
    # Row-sharded state is saved and restored as DTensors (each rank writes its rows).
    assert ck["loaded_dtensor_keys"] == ck["dtensor_keys"]
    assert ck["dtensor_keys"]["0.weight"] == ["exp_avg", "exp_avg_sq"]  # right side
    assert ck["dtensor_keys"]["2.weight"] == ["lead_vector", "proj_left"]  # left side
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(ck["files"])
    assert ck["skips"] == {"0.weight": 1}  # the Inf step after the save was skipped


@needs_dist
def test_fsdp2_nan_in_one_shard_skips_on_every_rank(results):
    nan = _scenario(results, "fsdp_nan")
    assert nan["skips"] == [{"0.weight": 1}, {"0.weight": 1}]
    assert nan["target_unchanged"] == [True, True]
    # The other parameters stepped (4.weight has no rows on rank 1).
    assert nan["moved_at_nan_step"] == [["0.bias", "2.weight", "4.weight"], ["0.bias", "2.weight"]]
    assert nan["params_finite"]
    assert (
        nan["steps"][0]
        == nan["steps"][1]
        == {"0.weight": 3, "0.bias": 4, "2.weight": 4, "4.weight": 4}
    )


@needs_dist
def test_fsdp2_refuses_backends_that_need_the_full_gradient(results):
    messages = _scenario(results, "fsdp_refusals")["messages"]
    for per_rank in messages:  # every rank raises (no rank left in a collective)
        assert set(per_rank) == {"exact", "fbpca"}
        for backend, message in per_rank.items():
            assert f"backend={backend!r}" in message and "FSDP2" in message


@needs_dist
def test_layerwise_refuses_ddp(results):
    # Its hooks would step on each rank's local gradient, before DDP's all-reduce.
    messages = _scenario(results, "ddp_layerwise")["messages"]
    assert len(messages) == 2  # the inner module (world size 2) and the DDP wrapper
    assert all(m is not None and "layerwise: refused" in m for m in messages)
    assert "DistributedDataParallel" in messages[1]
