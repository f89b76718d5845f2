"""Worker for ``tests/test_distributed.py``, run by ``torchrun`` (gloo on CPU).

    torchrun --nproc-per-node 2 tests/dist_workers/worker.py OUT_DIR SCENARIO[,SCENARIO...]

Every rank runs each scenario in turn; rank 0 writes ``OUT_DIR/results.json``
after each one, ``{scenario: {"ok": true, ...measurements}}`` or ``{"ok": false,
"error": traceback}``, so a scenario that fails (or hangs) leaves the verdicts of
the earlier ones. The worker only measures; the test states the tolerances.

Scenarios:

- ``primitives``: ``adarank.distributed`` on row-sharded matrices (unequal and
  empty shards) against the unsharded functions on the gathered matrix.
- ``ddp``: AdaRankAdamW under DistributedDataParallel, every rank against every
  other (bitwise) and against one process on the same global batch; one step
  feeds an Inf to rank 1 only.
- ``checkpoint``: DDP training saved with torch.distributed.checkpoint,
  restored into a fresh model and optimizer, continued; against the
  uninterrupted run (bitwise).
- ``fsdp_shards``: the sharded primitives on real FSDP2 (``fully_shard``)
  gradient shards against the single-process gradient.
- ``fsdp_train``: AdaRankAdamW on an FSDP2 model against one process; per-rank
  optimizer-state bytes.
- ``fsdp_variants``: the same with the residual path, lazy refresh and
  two-sided (``full``) projection.
- ``fsdp_checkpoint``: FSDP2 training saved with torch.distributed.checkpoint on
  every rank, restored into a fresh sharded model and optimizer, continued;
  against the uninterrupted run (bitwise).
- ``fsdp_nan``: a NaN in rank 1's gradient shard only: every rank skips.
- ``ddp_layerwise``: ``adarank.layerwise`` under DDP must be refused.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import adarank
from adarank.distributed import (
    is_dtensor,
    load_checkpoint,
    local_tensor,
    randomized_svd_comm_bytes,
    record_comm,
    row_shard_info,
    save_checkpoint,
    shard_layout,
    sharded_align_signs,
    sharded_all_finite,
    sharded_captured_fraction,
    sharded_fro_sq,
    sharded_matmul_tn,
    sharded_project,
    sharded_projection_norms,
    sharded_qr,
    sharded_randomized_svd,
    sharded_subspace_overlap,
    sharded_track_subspace,
)
from adarank.rsvd import randomized_svd
from adarank.subspace import align_signs, subspace_overlap, track_subspace

GLOBAL_BATCH = 32
NAN_STEP = 5  # the step at which rank 1's half of the batch holds an Inf
OPTIONS = dict(
    lr=1e-2,
    weight_decay=0.01,
    eta=0.8,
    max_rank=8,
    update_gap=3,
    track_every=2,
    check_every=2,
    refresh_below=0.5,
    seed=0,
)


# ------------------------------------------------------------------ helpers


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The full matrix from every rank's block of rows (test-side only)."""
    return torch.cat(gather(local.contiguous()), dim=0)


def splits_to_rows(splits: list[int]) -> slice:
    start = sum(splits[: rank()])
    return slice(start, start + splits[rank()])


def known_spectrum(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """G = U diag(decay^i) Vᵀ, float64 Haar U, V, returned in float32."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    sigma = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * sigma) @ V.T).float()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def snapshot(
    named: Iterable[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer
) -> dict[str, Any]:
    """Parameters and every optimizer-state entry, keyed by parameter name."""
    out: dict[str, Any] = {}
    for name, p in named:
        data = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[f"param/{name}"] = data.detach().clone()
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                value = value.detach().clone()
            out[f"state/{name}/{key}"] = value
    return out


def identical(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Entries that differ in any bit (empty when the snapshots are identical)."""
    diff = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        elif isinstance(x, float) and isinstance(y, float):
            same = x == y or (math.isnan(x) and math.isnan(y))
        else:
            same = type(x) is type(y) and x == y
        if not same:
            diff.append(key)
    return diff


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Largest difference of parameters and of state tensors; state numbers that differ."""
    params = state = 0.0
    numbers = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                numbers.append(key)
            elif key.startswith("param/"):
                params = max(params, max_abs(x, y))
            else:
                state = max(state, max_abs(x, y))
        elif isinstance(x, float):
            if not (
                math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5) or (math.isnan(x) and math.isnan(y))
            ):
                numbers.append(key)
        elif x != y:
            numbers.append(key)
    return {"param_max_diff": params, "state_max_diff": state, "numbers_differ": numbers}


# ------------------------------------------------------ scenario: primitives


def scenario_primitives(out_dir: Path) -> dict[str, Any]:
    del out_dir
    res: dict[str, Any] = {"svd": {}}
    cases = [  # name, m, n, row split over the 2 ranks, k, layout given
        ("tall_uneven", 48, 20, [31, 17], 6, True),
        ("wide_uneven", 20, 48, [13, 7], 6, False),
        ("tall_empty_first", 40, 16, [0, 40], 5, False),
        ("wide_empty_last", 12, 40, [12, 0], 5, True),
        ("square", 24, 24, [12, 12], 4, True),
    ]
    for name, m, n, splits, k, given in cases:
        G = known_spectrum(m, n, 0.7, seed=m * n)
        rows = splits_to_rows(splits)
        layout = (rows.start, m) if given else None
        with record_comm() as stats:
            U_local, S, Vh = sharded_randomized_svd(G[rows], k, seed=11, layout=layout)
        U = gather_rows(U_local)
        U_ref, S_ref, Vh_ref = randomized_svd(G, k, seed=11)
        signs = torch.sign((Vh * Vh_ref).sum(1))
        replicated = gather((S, Vh))
        res["svd"][name] = {
            "S_rel": max_abs(S, S_ref) / float(S_ref[0]),
            "U": max_abs(U * signs, U_ref),
            "Vh": max_abs(Vh * signs[:, None], Vh_ref),
            "U_orth": max_abs(U.T @ U, torch.eye(U.shape[1])),
            "bytes": stats.bytes,
            "bytes_closed_form": randomized_svd_comm_bytes(
                m, n, k, world=world(), layout_known=given
            ),
            "replicated_identical": all(
                torch.equal(S, s) and torch.equal(Vh, v) for s, v in replicated
            ),
        }

    # QR: ill-conditioned (κ = 1e6), dependent columns, zero, one empty shard.
    gen = torch.Generator().manual_seed(5)
    ill = torch.randn(60, 6, generator=gen) @ torch.diag(torch.logspace(0, -6, 6))
    dep = torch.randn(30, 6, generator=gen)
    dep[:, 4] = 2.0 * dep[:, 1] - dep[:, 0]
    res["qr"] = {}
    for name, Y, splits in (
        ("ill_conditioned", ill, [35, 25]),
        ("dependent", dep, [0, 30]),
        ("zero", torch.zeros(20, 5), [9, 11]),
    ):
        rows = splits_to_rows(splits)
        with record_comm() as stats:
            Q_local, R = sharded_qr(Y[rows])
        Q = gather_rows(Q_local)
        entry = {
            "orth": max_abs(Q.T @ Q, torch.eye(Q.shape[1])),
            "residual": max_abs(Q @ R, Y) / max(float(Y.abs().max()), 1e-30),
            "fallback": "fallback" in stats.by_label,
        }
        if name == "ill_conditioned":
            entry["vs_householder"] = max_abs(Q.abs(), torch.linalg.qr(Y).Q.abs())
        res["qr"][name] = entry

    # Projection, captured energy, tracking, signs, finiteness on a tall G.
    G = known_spectrum(40, 12, 0.6, seed=3) + 0.01 * torch.randn(40, 12, generator=gen)
    rows = splits_to_rows([25, 15])
    U_ref, _, Vh_ref = randomized_svd(G, 4, seed=1)
    P, Q = U_ref[:, :3].contiguous(), Vh_ref[:3].T.contiguous()
    G_local, P_local = G[rows], P[rows]
    R_left = sharded_project(G_local, P_local, None)
    R_right = gather_rows(sharded_project(G_local, None, Q))
    R_both = sharded_project(G_local, P_local, Q)
    captured_left = sharded_captured_fraction(R_left, G_local, R_sharded=False)
    captured_right = sharded_captured_fraction(
        sharded_project(G_local, None, Q), G_local, R_sharded=True
    )
    P_new_local, Q_new = sharded_track_subspace(G_local, P_local, Q)
    P_new_ref, Q_new_ref = track_subspace(G, P, Q)
    flipped = P * torch.tensor([1.0, -1.0, 1.0])
    finite_inputs = [torch.ones(3), torch.full((2,), float("nan") if rank() == 1 else 0.0)]
    norm = float(G.norm())
    res["ops"] = {
        "fro_sq_rel": abs(float(sharded_fro_sq(G_local)) - norm**2) / norm**2,
        "project_left": max_abs(R_left, P.T @ G),
        "project_right": max_abs(R_right, G @ Q),
        "project_both": max_abs(R_both, P.T @ G @ Q),
        "captured_left": abs(float(captured_left) - float((P.T @ G).norm()) / norm),
        "captured_right": abs(float(captured_right) - float((G @ Q).norm()) / norm),
        "track_left": max_abs(gather_rows(P_new_local), P_new_ref),
        "track_right": max_abs(Q_new, Q_new_ref),
        "align_signs": max_abs(
            gather_rows(sharded_align_signs(flipped[rows], P_local)), align_signs(flipped, P)
        ),
        "matmul_tn": max_abs(sharded_matmul_tn(P_new_local, P_local), P_new_ref.T @ P),
        "overlap": abs(
            sharded_subspace_overlap(P_local, P_new_local) - subspace_overlap(P, P_new_ref)
        ),
        "norms_right": max_abs(
            torch.stack(
                sharded_projection_norms(sharded_project(G_local, None, Q), G_local, R_sharded=True)
            ),
            torch.stack([(G @ Q).norm(), G.norm()]),
        ),
        "all_finite": sharded_all_finite(finite_inputs),
        "layout": shard_layout(G_local.shape[0]),
    }
    return res


# ------------------------------------------------------------ scenario: DDP


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 8, generator=gen)
    if step == NAN_STEP:
        x[GLOBAL_BATCH - 1, 0] = float("inf")  # a row of rank 1's half only
    return x, y


def train(
    module: nn.Module, opt: torch.optim.Optimizer, steps: Iterable[int], part: int, parts: int
) -> list[float]:
    """Steps on this part (of ``parts`` equal parts) of each global batch."""
    per = GLOBAL_BATCH // parts
    losses = []
    for step in steps:
        x, y = batch(step)
        rows = slice(part * per, (part + 1) * per)
        loss = (module(x[rows]) - y[rows]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def single_process_reference(
    steps: Iterable[int],
) -> tuple[dict[str, Any], nn.Module, torch.optim.Optimizer]:
    net = make_net(0)
    opt = adarank.AdaRankAdamW(adarank.param_groups(net), **OPTIONS)
    train(net, opt, steps, 0, 1)
    return snapshot(net.named_parameters(), opt), net, opt


def scenario_ddp(out_dir: Path) -> dict[str, Any]:
    del out_dir
    from torch.nn.parallel import DistributedDataParallel as DDP

    steps = range(10)
    net = make_net(0)
    model = DDP(net)
    opt = adarank.AdaRankAdamW(adarank.param_groups(net), **OPTIONS)
    train(model, opt, steps, rank(), world())
    mine = snapshot(net.named_parameters(), opt)
    others = gather(mine)
    reference, _, ref_opt = single_process_reference(steps)
    return {
        "differs_across_ranks": [identical(others[0], snap) for snap in others[1:]],
        "vs_single_process": compare(mine, reference),
        "ranks": opt.ranks(),
        "refreshes": opt.refresh_counts(),
        "skips": opt.nonfinite_skips(),
        "reference_skips": ref_opt.nonfinite_skips(),
    }


# ----------------------------------------------------- scenario: checkpoint


def scenario_checkpoint(out_dir: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    path = out_dir / "checkpoint"
    net = make_net(0)
    model = DDP(net)
    opt = adarank.AdaRankAdamW(adarank.param_groups(net), **OPTIONS)
    train(model, opt, range(4), rank(), world())
    save_checkpoint(path, model, opt)
    ranks_at_save = opt.ranks()
    train(model, opt, range(4, 10), rank(), world())
    uninterrupted = snapshot(net.named_parameters(), opt)

    net2 = make_net(123)  # other initial weights: the checkpoint must overwrite them
    model2 = DDP(net2)
    opt2 = adarank.AdaRankAdamW(adarank.param_groups(net2), **OPTIONS)
    load_checkpoint(path, model2, opt2)
    ranks_loaded = opt2.ranks()
    train(model2, opt2, range(4, 10), rank(), world())
    resumed = snapshot(net2.named_parameters(), opt2)
    return {
        "differs": gather(identical(uninterrupted, resumed)),
        "ranks_at_save": ranks_at_save,
        "ranks_loaded": ranks_loaded,
        "refreshes_after": opt2.refresh_counts(),
        "files": sorted(p.name for p in path.iterdir()),
    }


# ------------------------------------------------------ scenario: FSDP2 shards


def make_fsdp_net(seed: int) -> nn.Module:
    # Odd row counts give unequal shards (37 → 19 + 18); a 1-row weight leaves
    # rank 1 an empty shard.
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 37),
        nn.Tanh(),
        nn.Linear(37, 10, bias=False),
        nn.Tanh(),
        nn.Linear(10, 1, bias=False),
    )


def shard(net: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in net:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(net)
    return net


def scenario_fsdp_shards(out_dir: Path) -> dict[str, Any]:
    del out_dir
    reference = make_fsdp_net(0)
    sharded = shard(copy.deepcopy(reference))
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(GLOBAL_BATCH, 16, generator=gen), torch.randn(GLOBAL_BATCH, 1, generator=gen)
    per = GLOBAL_BATCH // world()
    rows = slice(rank() * per, (rank() + 1) * per)
    (sharded(x[rows]) - y[rows]).square().mean().backward()
    (reference(x) - y).square().mean().backward()
    res: dict[str, Any] = {}
    for (name, p), (_, q) in zip(
        sharded.named_parameters(), reference.named_parameters(), strict=True
    ):
        if p.ndim != 2:
            continue
        G_local = p.grad.to_local()
        G = q.grad
        group, (offset, total) = row_shard_info(p)
        k = min(3, *G.shape)
        with record_comm() as stats:
            U_local, S, Vh = sharded_randomized_svd(
                G_local, k, seed=4, layout=(offset, total), group=group
            )
        U_ref, S_ref, Vh_ref = randomized_svd(G, k, seed=4)
        signs = torch.sign((Vh * Vh_ref).sum(1))
        res[name] = {
            "local_rows": gather(G_local.shape[0]),
            "layout_matches": list(shard_layout(G_local.shape[0])) == [offset, total],
            "grad_vs_reference": max_abs(G_local, G[offset : offset + G_local.shape[0]]),
            "fro_sq_rel": abs(float(sharded_fro_sq(G_local)) - float(G.square().sum()))
            / float(G.square().sum()),
            "S_rel": max_abs(S, S_ref) / float(S_ref[0]),
            "U": max_abs(gather_rows(U_local) * signs, U_ref),
            "Vh": max_abs(Vh * signs[:, None], Vh_ref),
            "bytes": stats.bytes,
            "full_gradient_bytes": G.numel() * 4,
        }
    return res


# ------------------------------------------------------ scenario: FSDP2 train


FSDP_OPTIONS = dict(OPTIONS, eta=0.995, max_rank=6)


def fsdp_run(options: dict[str, Any], steps: Iterable[int] = range(8)) -> dict[str, Any]:
    """Parameters, losses, ranks and refreshes against one process; per-rank state bytes.

    Projector and moment signs are not compared: the first refresh fixes each
    basis vector only up to sign, and the weights do not depend on that choice.
    """
    reference = make_fsdp_net(0)
    sharded = shard(copy.deepcopy(reference))
    opt = adarank.AdaRankAdamW(adarank.param_groups(sharded), **options)
    losses = train(sharded, opt, steps, rank(), world())
    ref_opt = adarank.AdaRankAdamW(adarank.param_groups(reference), **options)
    ref_losses = train(reference, ref_opt, steps, 0, 1)
    params = max(
        max_abs(p.full_tensor(), q)
        for p, q in zip(sharded.parameters(), reference.parameters(), strict=True)
    )
    losses = [sum(pair) / world() for pair in zip(*gather(losses), strict=True)]
    return {
        "param_max_diff": params,
        "loss_max_diff": max(
            abs(a - b)
            for a, b in zip(losses, ref_losses, strict=True)
            if math.isfinite(a) and math.isfinite(b)
        ),
        "ranks": opt.ranks(),
        "reference_ranks": ref_opt.ranks(),
        "refreshes": opt.refresh_counts(),
        "reference_refreshes": ref_opt.refresh_counts(),
        "gaps": opt.refresh_gaps(),
        "reference_gaps": ref_opt.refresh_gaps(),
        "skips": opt.nonfinite_skips(),
        "reference_skips": ref_opt.nonfinite_skips(),
        "state_bytes": gather(opt.state_bytes()),
        "reference_state_bytes": ref_opt.state_bytes(),
    }


def scenario_fsdp_train(out_dir: Path) -> dict[str, Any]:
    del out_dir
    return fsdp_run(FSDP_OPTIONS)


def scenario_fsdp_variants(out_dir: Path) -> dict[str, Any]:
    del out_dir
    # lazy_threshold 0 lengthens the gap at every window of 2: the |cos| that
    # decides it is all-reduced for a left basis. Two-sided projection with
    # eps = 1e-6 (GaLore's): at a refresh R = PᵀGQ is diagonal, and with
    # eps = 1e-8 Adam turns its off-diagonal rounding noise into full-size
    # steps (one process moves by 5e-4 when its weights move by 1 ulp).
    lazy = dict(lazy_refresh=True, lazy_window=2, lazy_threshold=0.0)
    return {
        "residual_lazy": fsdp_run(dict(FSDP_OPTIONS, residual=True, **lazy)),
        "full_lazy": fsdp_run(dict(FSDP_OPTIONS, proj_type="full", eps=1e-6, **lazy)),
    }


# ------------------------------------------------- scenario: FSDP2 checkpoint


def dtensor_keys(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: sorted(k for k, v in st.items() if is_dtensor(v))
        for p, st in opt.state.items()
    }


def scenario_fsdp_checkpoint(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "fsdp_checkpoint"
    # Residual and lazy refresh, so every kind of state is saved; NAN_STEP falls
    # after the save, so both continuations skip it.
    options = dict(
        FSDP_OPTIONS, residual=True, lazy_refresh=True, lazy_window=2, lazy_threshold=0.0
    )
    net = shard(make_fsdp_net(0))
    opt = adarank.AdaRankAdamW(adarank.param_groups(net), **options)
    train(net, opt, range(4), rank(), world())
    save_checkpoint(path, net, opt)
    ranks_at_save = opt.ranks()
    train(net, opt, range(4, 9), rank(), world())
    uninterrupted = snapshot(net.named_parameters(), opt)

    net2 = shard(make_fsdp_net(123))  # other initial weights: the checkpoint must overwrite them
    opt2 = adarank.AdaRankAdamW(adarank.param_groups(net2), **options)
    load_checkpoint(path, net2, opt2)
    ranks_loaded = opt2.ranks()
    loaded_dtensors = dtensor_keys(opt2, net2)
    train(net2, opt2, range(4, 9), rank(), world())
    resumed = snapshot(net2.named_parameters(), opt2)
    return {
        "differs": gather(identical(uninterrupted, resumed)),
        "ranks_at_save": ranks_at_save,
        "ranks_loaded": ranks_loaded,
        "dtensor_keys": dtensor_keys(opt, net),
        "loaded_dtensor_keys": loaded_dtensors,
        "skips": opt2.nonfinite_skips(),
        "files": sorted(p.name for p in path.iterdir()),
    }


# ------------------------------------------------ scenario: FSDP2 NaN shard


def scenario_fsdp_nan(out_dir: Path) -> dict[str, Any]:
    """A NaN written into rank 1's shard of one gradient, after backward."""
    del out_dir
    net = shard(make_fsdp_net(0))
    opt = adarank.AdaRankAdamW(adarank.param_groups(net), **FSDP_OPTIONS)
    target = dict(net.named_parameters())["0.weight"]
    unchanged, moved = [], []
    for step in range(4):
        x, y = batch(step + 100)  # no Inf in these batches
        per = GLOBAL_BATCH // world()
        rows = slice(rank() * per, (rank() + 1) * per)
        opt.zero_grad()
        (net(x[rows]) - y[rows]).square().mean().backward()
        if step == 2 and rank() == 1:
            target.grad.to_local()[0, 0] = float("nan")
        before = [local_tensor(p).detach().clone() for p in net.parameters()]
        opt.step()
        after = [local_tensor(p) for p in net.parameters()]
        if step == 2:
            unchanged = [torch.equal(a, b) for a, b in zip(before, after, strict=True)]
            moved = [
                name
                for (name, _), a, b in zip(net.named_parameters(), before, after, strict=True)
                if a.numel() and not torch.equal(a, b)
            ]
    return {
        "skips": gather(opt.nonfinite_skips()),
        "target_unchanged": gather(unchanged[0]),
        "moved_at_nan_step": gather(moved),
        "params_finite": all(bool(torch.isfinite(p.full_tensor()).all()) for p in net.parameters()),
        "steps": gather({n: int(opt.state[p]["step"]) for n, p in net.named_parameters()}),
    }


def scenario_fsdp_refusals(out_dir: Path) -> dict[str, Any]:
    """Backends that need the full gradient are refused under FSDP2, on every rank."""
    del out_dir
    net = shard(make_fsdp_net(0))
    x, y = batch(0)
    (net(x) - y).square().mean().backward()
    messages = {}
    for backend in ("exact", "fbpca"):
        opt = adarank.AdaRankAdamW(adarank.param_groups(net), backend=backend)
        try:
            opt.step()
        except ValueError as error:
            messages[backend] = str(error)
    return {"messages": gather(messages)}


# ------------------------------------------------- scenario: DDP layer-wise


def scenario_ddp_layerwise(out_dir: Path) -> dict[str, Any]:
    """``adarank.layerwise`` under DDP: refused, for the inner module and the wrapper."""
    del out_dir
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = make_net(0)
    model = DDP(net)
    messages = []
    for target in (net, model):
        try:
            adarank.layerwise(
                target,
                lambda groups: adarank.AdaRankAdamW(groups, **OPTIONS),
                groups=adarank.param_groups(net),
            )
        except ValueError as error:
            messages.append(str(error))
        else:
            messages.append(None)
    return {"messages": messages}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "primitives": scenario_primitives,
    "ddp": scenario_ddp,
    "checkpoint": scenario_checkpoint,
    "fsdp_shards": scenario_fsdp_shards,
    "fsdp_train": scenario_fsdp_train,
    "fsdp_variants": scenario_fsdp_variants,
    "fsdp_checkpoint": scenario_fsdp_checkpoint,
    "fsdp_nan": scenario_fsdp_nan,
    "fsdp_refusals": scenario_fsdp_refusals,
    "ddp_layerwise": scenario_ddp_layerwise,
}


def main(argv: list[str]) -> int:
    out_dir, names = Path(argv[0]), argv[1].split(",")
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        for name in names:
            try:
                results[name] = {"ok": True, **SCENARIOS[name](out_dir)}
            except Exception:  # recorded for the test, and shown in torchrun's output
                results[name] = {"ok": False, "error": traceback.format_exc()}
                print(
                    f"[rank {rank()}] scenario {name} failed:\n{results[name]['error']}",
                    file=sys.stderr,
                    flush=True,
                )
            dist.barrier()
            if rank() == 0:
                (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
