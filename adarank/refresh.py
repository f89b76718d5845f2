"""A subspace change: the refresh (sketch, grow to η, rank, install, move the moments) and
the online tracking step (DESIGN §3.1–3.3, §3.5).

Both work on ``Item``\\ s, a group's low-rank parameters of one step. A refresh takes a
list of them: items of one shape and sketch width are stacked and decomposed by one
batched SVD, their singular values and ‖G‖_F reach the host in one transfer (the only
synchronisation of a batch); an item whose sketch fell short of η goes round again,
wider. Without batching (``foreach=False``, a sharded parameter, the fbpca backend)
every batch holds one matrix: the same code on batches of one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .budget import Demand, allocate, lowrank_bytes
from .projector import projector_from_svd, side_for
from .quant import is_int8_weight, requantize_
from .rank import RANK_RULES, clamp_rank, rank_cap
from .rows import LOCAL, RowOps, local_tensor
from .rsvd import mix_seed
from .schedule import update_lazy_gap
from .state import BIAS_KEYS, MOMENT_KEYS, projectors, set_projectors
from .subspace import align_signs, transfer_moments

__all__ = ["BATCHED_BACKENDS", "REFRESH_BATCH_BYTES", "Item", "refresh", "track"]

# Backends whose refresh runs as one batched SVD per shape (fbpca goes one matrix at a time).
BATCHED_BACKENDS = ("torch", "exact")
# At most this many bytes of stacked float32 gradients per batched SVD: a refresh
# must not need a float32 copy of every gradient at once.
REFRESH_BATCH_BYTES = 256 * 2**20


def gradient_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient the optimizer uses: ``p.grad`` (an INT8 weight's too)."""
    return p.grad


class Item:
    """One low-rank parameter in one step: its global index (part of its sketch's seed),
    state, row operations and the whole matrix's shape (m, n)."""

    __slots__ = ("R", "compact", "group", "index", "ops", "param", "shape", "state")

    def __init__(
        self,
        index: int,
        param: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        ops: RowOps = LOCAL,
    ) -> None:
        self.index = index
        self.group = group
        self.param = param
        self.state = state
        self.ops = ops
        self.shape = (param.shape[0], math.prod(param.shape[1:]))
        # The staleness test's compact gradient, reused by the step if P stays; or the
        # step's only gradient (``compact``: accumulated in the compact space, no G).
        self.R: torch.Tensor | None = None
        self.compact = False

    def gradient(self) -> torch.Tensor | None:
        """G as a float32 matrix (this rank's rows): a view of a float32 gradient, else a
        fresh conversion on every call, so no float32 copies of all gradients live at
        once. ``flatten(1)``, not ``reshape(m, -1)``, which fails on an empty shard.
        None for a ``compact`` item, whose step has only ``R``."""
        return None if self.compact else self.full_gradient()

    def full_gradient(self) -> torch.Tensor:
        """``gradient()`` where the step needs G (a refresh, a tracking step, a test)."""
        if self.compact:
            raise RuntimeError("a compact item has no full gradient")
        grad = gradient_of(self.param)
        assert grad is not None
        return local_tensor(grad).flatten(1).to(torch.float32)

    def projectors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return projectors(self.state)

    def load_weight(self) -> torch.Tensor:
        """The tensor an update is applied to: this rank's block of the parameter, or an
        INT8 weight's float32 dequantisation (re-quantised by ``store_weight``)."""
        if is_int8_weight(self.param):
            return self.param.dequantized()
        return local_tensor(self.param)

    def store_weight(self, W: torch.Tensor) -> None:
        """Write an updated INT8 weight back (nothing to do for other parameters). The
        rounding noise is drawn from a stream derived from (seed, parameter, step), so a
        resumed run rounds identically."""
        if not is_int8_weight(self.param):
            return
        group = self.group
        gen = torch.Generator(device=W.device)
        gen.manual_seed(mix_seed(group["seed"], self.index, int(self.state["step"]), 0x1A7))
        requantize_(self.param, W, stochastic=group["stochastic_rounding"], generator=gen)


def first_sketch(state: dict[str, Any], group: dict[str, Any], cap: int) -> int:
    """Sketch width of a refresh's first attempt: the cap for a fixed rank or an exact
    SVD, else twice the previous rank (16 at first), grown on demand."""
    if group["rank_rule"] == "fixed" or group["backend"] == "exact":
        return cap
    previous = state["rank"]
    return min(cap, max(group["min_rank"], 2 * previous if previous else 16))


def sketch_seed(group: dict[str, Any], index: int, state: dict[str, Any], sketch: int) -> int:
    """The sketch's random stream: (seed, parameter index, refresh count, width)."""
    return mix_seed(mix_seed(group["seed"], index, state["refreshes"]), sketch)


def refresh(
    group: dict[str, Any], items: list[Item], *, batched: bool, budget: int | None = None
) -> None:
    """New subspaces for ``items`` (DESIGN §3.1–3.2): a truncated SVD of each G whose
    width grows until the rank rule is satisfied (a fixed-accuracy range finder), the
    rank by ``group["rank_rule"]``, then ``install``. ``batched``: stack unsharded
    matrices of one shape (at most ``REFRESH_BATCH_BYTES`` of float32 gradients).
    ``budget``: bytes the items' states may hold together; the rule's ranks become caps
    and ``budget.allocate`` chooses the ranks once every spectrum is known (DESIGN §13)."""
    rule = RANK_RULES[group["rank_rule"]]
    deferred: list[tuple[Any, ...]] | None = None if budget is None else []
    stack = batched and group["backend"] in BATCHED_BACKENDS
    pending = []
    for it in items:
        cap = rank_cap(group["max_rank"], it.shape)
        pending.append((it, cap, first_sketch(it.state, group, cap)))
    while pending:
        batches: dict[tuple[Any, ...], list[tuple[Item, int, int]]] = {}
        for entry in pending:
            it, _, sketch = entry
            alone = not stack or it.ops.sharded
            key = (id(it),) if alone else (it.shape, sketch)
            batches.setdefault(key, []).append(entry)
        pending = []
        for members in batches.values():
            m, n = members[0][0].shape
            sketch = members[0][2]
            per_batch = max(1, REFRESH_BATCH_BYTES // (4 * m * n))
            for start in range(0, len(members), per_batch):
                batch = members[start : start + per_batch]
                pending += _refresh_batch(group, rule, batch, sketch, deferred)
    if deferred:
        assert budget is not None
        demands = [
            Demand(energies, total, _bytes_at(it, group), group["min_rank"], rank)
            for it, _, _, rank, _, energies, total in deferred
        ]
        ranks = allocate(demands, budget)
        for (it, U, Vh, _, local_rows, _, _), rank in zip(deferred, ranks, strict=True):
            install(it, group, U, Vh, rank, local_rows)


def _bytes_at(it: Item, group: dict[str, Any]) -> Any:
    return lambda rank: lowrank_bytes(it.shape, rank, group)


def _refresh_batch(
    group: dict[str, Any],
    rule: Any,
    batch: list[tuple[Item, int, int]],
    sketch: int,
    deferred: list[tuple[Any, ...]] | None = None,
) -> list[tuple[Item, int, int]]:
    """One batched SVD; installs the satisfied items (or, under a budget, appends them to
    ``deferred`` with their rule's rank and σ²), returns the others, wider."""
    ops = batch[0][0].ops
    Gs = torch.stack([it.full_gradient() for it, _, _ in batch])
    local_rows = Gs.shape[1]
    seeds = [sketch_seed(group, it.index, it.state, sketch) for it, _, _ in batch]
    U, S, Vh = ops.truncated_svd_batched(
        Gs,
        sketch,
        group["backend"],
        seeds=seeds,
        oversample=group["oversample"],
        power_iters=group["power_iters"],
    )
    norms = ops.fro_norms(Gs)
    del Gs
    host = torch.cat([norms[:, None], S.to(norms.dtype)], dim=1).cpu()
    again = []
    for j, (it, cap, _) in enumerate(batch):
        if host[j, 0] == 0 and "exp_avg" in it.state:
            # An all-zero G has no dominant subspace (its SVD is an arbitrary basis): keep
            # the current one; the refresh is due again at the next step.
            continue
        total_energy = float(host[j, 0]) ** 2
        rank, satisfied = rule(host[j, 1:], total_energy, group, it.state["rank"])
        if satisfied or sketch >= cap:
            rank = clamp_rank(rank, cap, S.shape[1])
            if deferred is None:
                install(it, group, U[j], Vh[j], rank, local_rows)
            else:
                energies = host[j, 1 : rank + 1].double().square().tolist()
                deferred.append((it, U[j], Vh[j], rank, local_rows, energies, total_energy))
        else:
            again.append((it, cap, min(2 * sketch, cap)))
    return again


def install(
    it: Item, group: dict[str, Any], U: torch.Tensor, Vh: torch.Tensor, rank: int, local_rows: int
) -> None:
    """Make the top-``rank`` singular vectors of a refresh the subspace: align signs,
    carry the moments over (or create them), update the counters. ``local_rows``: this
    rank's rows of the matrix."""
    state, ops = it.state, it.ops
    side = side_for(it.shape, group["proj_type"])
    P_new, Q_new = projector_from_svd(U, Vh, rank, side)
    P_old, Q_old = projectors(state)
    if group["align_signs"]:
        P_new = None if P_new is None else ops.align_rows(P_new, P_old)
        Q_new = None if Q_new is None else align_signs(Q_new, Q_old)
    if "exp_avg" in state:
        change_subspace(state, group, P_new, Q_new, ops)
        state["overlap"] = (
            ops.overlap(P_old, P_new, rows=True)
            if P_new is not None
            else ops.overlap(Q_old, Q_new, rows=False)
        )
    else:
        # Right side: moments have G's rows (this rank's local_rows of them).
        rows = rank if P_new is not None else local_rows
        cols = rank if Q_new is not None else it.shape[1]
        moments_rows = P_new is None
        for key in MOMENT_KEYS:
            zeros = U.new_zeros(rows, cols)
            state[key] = ops.wrap_rows(zeros) if moments_rows else zeros
        # One accumulated weight per compact coordinate (see transfer_moments).
        weight_shape = (rows if P_new is not None else 1, cols if Q_new is not None else 1)
        for key in BIAS_KEYS:
            state[key] = U.new_zeros(weight_shape)
        set_projectors(state, group, P_new, Q_new, ops)
    state["rank"] = rank
    if group["lazy_refresh"]:
        basis, basis_rows = (P_new, True) if P_new is not None else (Q_new, False)
        assert basis is not None
        lead = basis[:, 0].clone()
        cosine = None
        if "lead_vector" in state:
            dot = ops.dot_rows if basis_rows else torch.dot
            cosine = dot(lead, local_tensor(state["lead_vector"])).abs()
        update_lazy_gap(state, group, cosine)
        state["lead_vector"] = ops.wrap_rows(lead) if basis_rows else lead
    state["refreshes"] += 1
    state["since_refresh"] = 0


def track(group: dict[str, Any], it: Item) -> None:
    """One online subspace step (DESIGN §3.3), moments carried across. On an all-zero G
    (whose power step is an arbitrary basis) the subspace stays, without a host sync."""
    G = it.full_gradient()
    P, Q = projectors(it.state)
    P_new, Q_new = it.ops.track(G, P, Q)
    moved = it.ops.norm(G, rows=True) > 0
    P_new = P_new if P_new is None or P is None else torch.where(moved, P_new, P)
    Q_new = Q_new if Q_new is None or Q is None else torch.where(moved, Q_new, Q)
    change_subspace(it.state, group, P_new, Q_new, it.ops)


def change_subspace(
    state: dict[str, Any],
    group: dict[str, Any],
    P_new: torch.Tensor | None,
    Q_new: torch.Tensor | None,
    ops: RowOps = LOCAL,
) -> None:
    """Move M, V and their weights into the new coordinates (``group["moments"]``) and
    store the new projectors."""
    P_old, Q_old = projectors(state)
    # A side in use has an old and a new basis (the side of a matrix never changes).
    C_left = None if P_new is None or P_old is None else ops.matmul_tn(P_new, P_old)
    C_right = None if Q_new is None or Q_old is None else Q_new.T @ Q_old
    keys = MOMENT_KEYS + BIAS_KEYS
    M, V, W1, W2 = (local_tensor(state[key]) for key in keys)
    moved = transfer_moments(M, V, W1, W2, C_left, C_right, group["moments"])
    for key, value in zip(keys, moved, strict=True):
        # Moments keep G's rows on the right side (no left projector).
        rows = key in MOMENT_KEYS and P_new is None
        state[key] = ops.wrap_rows(value) if rows else value
    set_projectors(state, group, P_new, Q_new, ops)
