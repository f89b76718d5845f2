"""A prototype of AdaRankAdamW on FSDP2 shards, to check the integration plan end to end.

Not library code: a blueprint for the integration in ``adarank/optimizer.py``
(which owns it), used by the ``fsdp_prototype`` scenario of ``worker.py`` to
measure how close a 2-process FSDP2 run comes to one process. It overrides the
methods that touch the full gradient and replaces each full-matrix operation by
its ``adarank.distributed`` counterpart on the local rows:

- ``step``: local shards of DTensor parameters and gradients; the finiteness
  flags are all-reduced (``sharded_all_finite``) so every rank skips together;
- ``_subspace_is_stale``: ``sharded_project`` + ``sharded_projection_norms``;
- ``_refresh``: global shape for the side and the cap, ``sharded_fro_sq``,
  ``sharded_randomized_svd``, ``sharded_align_signs``, ``sharded_subspace_overlap``,
  moments of ``m_local`` rows on the right side;
- ``_track``: ``sharded_track_subspace``; ``_change_subspace``: ``C_left`` by
  ``sharded_matmul_tn``;
- the compact Adam step with ``R`` from ``sharded_project`` (the functional
  ``lowrank_adam_step_`` projects on its own, which for a left projector would
  be a partial sum).

Out of scope here: the residual path, lazy refresh, INT8 weights, quantised
projectors, DTensor-typed state for ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from adarank import AdaRankAdamW
from adarank.distributed import (
    row_shard_info,
    sharded_align_signs,
    sharded_all_finite,
    sharded_captured_fraction,
    sharded_fro_sq,
    sharded_matmul_tn,
    sharded_project,
    sharded_projection_norms,
    sharded_randomized_svd,
    sharded_subspace_overlap,
    sharded_track_subspace,
)
from adarank.functional import adam_direction, apply_update_, update_moments_
from adarank.optimizer import _BIAS_KEYS, _MOMENT_KEYS, _projectors, _set_projectors
from adarank.projector import project_back, projector_from_svd, side_for
from adarank.rank import RANK_RULES
from adarank.rsvd import mix_seed
from adarank.subspace import align_signs, subspace_overlap, transfer_moments


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedAdaRankAdamW(AdaRankAdamW):
    """AdaRankAdamW whose matrix steps run on FSDP2 row shards (prototype)."""

    # Set per parameter during step(): its shard group and (row offset, rows).
    _pg: dist.ProcessGroup | None = None
    _layout: tuple[int, int] = (0, 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            if group["residual"] or group["lazy_refresh"] or group["backend"] != "torch":
                raise ValueError("prototype: residual, lazy_refresh and backend != 'torch' "
                                 "are not supported")
            params = group["params"]
            with_grad = [(index + i, p) for i, p in enumerate(params) if p.grad is not None]
            index += len(params)
            if not with_grad:
                continue
            # All parameters of one FSDP2 model share the mesh: one group for the flags.
            pg, _ = row_shard_info(with_grad[0][1])
            finite = sharded_all_finite([_local(p.grad) for _, p in with_grad], pg)
            for (i, p), ok in zip(with_grad, finite, strict=True):
                state = self.state[p]
                if not ok:
                    state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
                    continue
                if group["lowrank"] and p.ndim >= 2:
                    self._pg, self._layout = row_shard_info(p)
                    self._lowrank_param_step(_local(p), _local(p.grad), state, group, i)
                else:
                    self._plain_param_step(_local(p), _local(p.grad), state, group)
        return loss

    def _lowrank_param_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict,
                            group: dict, index: int) -> None:
        # flatten(1), not reshape(rows, -1): an empty shard has 0 rows.
        G = grad.flatten(1).to(torch.float32)  # local rows
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            for key, value in (("rank", 0), ("since_refresh", 0), ("refreshes", 0),
                               ("overlap", float("nan"))):
                state[key] = value
            state.setdefault("nonfinite_skips", 0)
        refresh = "exp_avg" not in state or state["since_refresh"] >= group["update_gap"]
        check = group["check_every"]
        if not refresh and check and state["since_refresh"] % check == 0:
            refresh = self._subspace_is_stale(G, state, group)
        if refresh:
            self._refresh(G, state, group, index)
        elif group["track_every"] and state["since_refresh"] % group["track_every"] == 0:
            self._track(G, state, group)
        state["step"] += 1
        state["since_refresh"] += 1
        beta1, beta2 = group["betas"]
        P, Q = _projectors(state)
        R = sharded_project(G, P, Q, self._pg)
        update_moments_(R, state["exp_avg"], state["exp_avg_sq"], beta1, beta2)
        state["bias1"].mul_(beta1).add_(1.0 - beta1)
        state["bias2"].mul_(beta2).add_(1.0 - beta2)
        N = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["bias1"],
                           state["bias2"], group["eps"], self._convention)
        apply_update_(p, project_back(N, P, Q).mul_(group["scale"]), group["lr"],
                      group["weight_decay"], self._convention)
        state["captured"] = sharded_captured_fraction(R, G, R_sharded=P is None, group=self._pg)

    def _subspace_is_stale(self, G: torch.Tensor, state: dict, group: dict) -> bool:
        P, Q = _projectors(state)
        R = sharded_project(G, P, Q, self._pg)
        r_norm, g_norm = (float(x) for x in sharded_projection_norms(
            R, G, R_sharded=P is None, group=self._pg))
        if g_norm == 0.0:
            return False
        return r_norm / g_norm < group["refresh_below"] or r_norm <= group["converge_tol"]

    def _refresh(self, G: torch.Tensor, state: dict, group: dict, index: int) -> None:
        offset, m = self._layout
        n = G.shape[1]
        side = side_for((m, n), group["proj_type"])
        cap = max(1, min(group["max_rank"], m, n))
        previous = state["rank"]
        seed = mix_seed(group["seed"], index, state["refreshes"])
        rule = RANK_RULES[group["rank_rule"]]
        if group["rank_rule"] == "fixed":
            sketch = cap
        else:
            sketch = min(cap, max(group["min_rank"], 2 * previous if previous else 16))
        total_energy = float(sharded_fro_sq(G, self._pg))
        while True:
            U, S, Vh = sharded_randomized_svd(
                G, sketch, oversample=group["oversample"], power_iters=group["power_iters"],
                seed=mix_seed(seed, sketch), group=self._pg, layout=(offset, m))
            rank, satisfied = rule(S, total_energy, group, previous)
            if satisfied or sketch >= cap:
                break
            sketch = min(2 * sketch, cap)
        rank = max(1, min(rank, cap, S.numel()))
        P_new, Q_new = projector_from_svd(U, Vh, rank, side)
        P_old, Q_old = _projectors(state)
        if P_new is not None:
            P_new = sharded_align_signs(P_new, P_old, self._pg)
        if Q_new is not None:
            Q_new = align_signs(Q_new, Q_old)
        if "exp_avg" in state:
            self._change_subspace(state, group, P_new, Q_new)
            state["overlap"] = (sharded_subspace_overlap(P_old, P_new, self._pg)
                                if P_new is not None else subspace_overlap(Q_old, Q_new))
        else:
            shape = (rank if P_new is not None else G.shape[0], rank if Q_new is not None else n)
            state["exp_avg"] = G.new_zeros(shape)
            state["exp_avg_sq"] = G.new_zeros(shape)
            weight_shape = (shape[0] if P_new is not None else 1,
                            shape[1] if Q_new is not None else 1)
            state["bias1"] = G.new_zeros(weight_shape)
            state["bias2"] = G.new_zeros(weight_shape)
            _set_projectors(state, group, P_new, Q_new)
        state["rank"] = rank
        state["refreshes"] += 1
        state["since_refresh"] = 0

    def _track(self, G: torch.Tensor, state: dict, group: dict) -> None:
        P_new, Q_new = sharded_track_subspace(G, *_projectors(state), self._pg)
        self._change_subspace(state, group, P_new, Q_new)

    def _change_subspace(self, state: dict, group: dict, P_new: torch.Tensor | None,
                         Q_new: torch.Tensor | None) -> None:
        P_old, Q_old = _projectors(state)
        C_left = None if P_new is None else sharded_matmul_tn(P_new, P_old, self._pg)
        C_right = None if Q_new is None else Q_new.T @ Q_old
        moments = transfer_moments(*(state[k] for k in _MOMENT_KEYS + _BIAS_KEYS),
                                   C_left, C_right, group["moments"])
        for key, value in zip(_MOMENT_KEYS + _BIAS_KEYS, moments, strict=True):
            state[key] = value
        _set_projectors(state, group, P_new, Q_new)


def local_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer-state tensors this rank holds (local shards of DTensors)."""
    return sum(math.prod(_local(v).shape) * v.element_size()
               for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
