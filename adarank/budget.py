"""A memory budget for the optimizer state: parse it, price a rank, allocate ranks (DESIGN §13).

``state_budget=B`` bounds everything ``state_bytes()`` counts. At a refresh the matrices that
refresh share what the rest of the state leaves of B: each starts at its floor
(``min_rank``) and ranks are handed out one at a time to the matrix whose next rank buys the
most captured energy per byte, ``(σ_k² / ‖G‖_F²) / (bytes(k) − bytes(k−1))``, until the next
rank of every matrix would overflow or reach its cap (η's rank, ``max_rank``, the shape, the
sketch's width). This is greedy water-filling: with a common per-rank cost it fills the
largest normalised σ² first, a water level across the spectra.

Optimality (the problem is a knapsack over chains: rank k of a matrix needs ranks 1..k−1):

- Every rank costing the same c bytes, and each spectrum sorted (σ descending): the greedy is
  optimal. Any allocation holds at most ⌊A/c⌋ ranks above the floors (A the bytes left after
  them); the greedy holds the ⌊A/c⌋ largest gains, or all of them, and a prefix of a sorted
  spectrum is its largest entries, so no allocation captures more.
- Costs that differ between matrices (constant within each, so the ratios fall along each
  chain): the greedy is *not* always optimal, as for any 0/1 knapsack — a cheap low-value rank
  can block a costly high-value one that the optimum takes. What holds: greedy ≥ OPT − v_max,
  v_max the largest single rank's gain. (The fractional relaxation is solved by the same order;
  it exceeds the greedy prefix by at most a fraction of the first rank that did not fit, and
  OPT ≤ that relaxation.) Both statements are tested against brute force.

Byte counts follow ``state.py``'s layout exactly where a tensor exists after a step, and count
the few scalars that appear only later (``overlap``, lazy refresh's record) from the start, so
the model is an upper bound of ``state_bytes()`` by at most a few bytes per matrix.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .projector import side_for
from .quant import is_int8_weight
from .rank import rank_cap

__all__ = [
    "BudgetError",
    "Demand",
    "allocate",
    "allowance",
    "check_budget",
    "committed_bytes",
    "format_bytes",
    "lowrank_bytes",
    "parse_budget",
    "param_bytes",
    "plain_bytes",
    "report",
    "smallest_budget",
]

# KiB/MiB/GiB/TiB are powers of 1024 (IEC); KB/MB/GB/TB powers of 1000 (SI); B is a byte.
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")


def parse_budget(value: Any, name: str = "state_budget") -> int:
    """Bytes from an int (bytes) or a string such as ``"1.5GiB"``, ``"800MB"``, ``"4096"``.

    Units (case-insensitive): ``B``; ``KB``/``MB``/``GB``/``TB`` decimal (10³ⁿ); ``KiB``/
    ``MiB``/``GiB``/``TiB`` binary (2¹⁰ⁿ). A fractional byte count is rounded down, so the
    budget is never exceeded. ``ValueError`` naming ``name`` for anything else or ≤ 0 bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"invalid {name}={value!r}: expected bytes as an int or a string "
            "such as '1.5GiB' or '800MB'"
        )
    if isinstance(value, int):
        count = value
    else:
        match = _BUDGET.match(value)
        unit = match.group(3).lower() if match else ""
        if match is None or unit not in _UNITS and unit != "":
            raise ValueError(
                f"invalid {name}={value!r}: expected a number and a unit, one of "
                "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
            )
        mantissa = match.group(1) + (f"e{match.group(2)}" if match.group(2) else "")
        count = math.floor(float(mantissa) * _UNITS[unit or "b"])
    if count < 1:
        raise ValueError(f"invalid {name}={value!r}: a budget must be at least 1 byte")
    return count


def format_bytes(count: int) -> str:
    """``count`` bytes and its size in MiB, for messages: ``"1048576 bytes (1.00 MiB)"``."""
    return f"{count} bytes ({count / 2**20:.2f} MiB)"


# ------------------------------------------------------------------ pricing


def _projector_bytes(rows: int, rank: int, bits: int, group_size: int) -> int:
    numel = rows * rank
    if bits == 32:
        return 4 * numel
    codes = numel if bits == 8 else (numel + 1) // 2  # INT4: two codes per byte
    return codes + 8 * math.ceil(numel / group_size)  # float32 scale and zero per group


def lowrank_bytes(shape: tuple[int, int], rank: int, group: Mapping[str, Any]) -> int:
    """Bytes of a low-rank matrix's state at ``rank`` after a step (``state.py``'s layout).

    ``shape``: (m, n) of the matrix (a k-D kernel as m×(n₁⋯n_k)). Moments M, V and their
    weights are float32: r×n and (r, 1) on the left side, m×r and (1, r) on the right,
    r×r and (r, r) on both. Projectors P (m×r) and Q (n×r) are float32, or at ``proj_bits``
    8 / 4 one / half a byte per element plus 8 bytes per group of ``proj_group_size``.
    Scalars: ``step``, ``captured``, ``overlap`` (4 bytes each), ``residual_norm`` with the
    residual path; lazy refresh adds the leading basis vector and ``lazy_window`` cosines.
    """
    m, n = shape
    side = side_for(shape, group["proj_type"])
    rows = rank if side in ("left", "both") else m
    cols = rank if side in ("right", "both") else n
    weights = (rows if side != "right" else 1) * (cols if side != "left" else 1)
    total = 4 * (2 * rows * cols + 2 * weights)
    bits, size = group["proj_bits"], group["proj_group_size"]
    if side in ("left", "both"):
        total += _projector_bytes(m, rank, bits, size)
    if side in ("right", "both"):
        total += _projector_bytes(n, rank, bits, size)
    total += 4 * 3 + (4 if group["residual"] else 0)
    if group["lazy_refresh"]:
        total += 4 * (m if side != "right" else n) + 4 * group["lazy_window"]
    return total


def plain_bytes(p: torch.Tensor, moment_dtype: torch.dtype | None = None) -> int:
    """Bytes of plain AdamW state for ``p``: M and V like ``p`` (``moment_dtype`` if given,
    e.g. float32 for an INT8 weight's dequantisation) and a float32 ``step``."""
    size = torch.empty((), dtype=moment_dtype or p.dtype).element_size()
    return 2 * p.numel() * size + 4


# --------------------------------------------------------------- allocation


class BudgetError(ValueError):
    """The floors alone do not fit: ``needed`` is the smallest budget that would work."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class Demand:
    """One refreshing matrix, as the allocation sees it.

    Attributes:
        energies: σ_k² for k = 1, 2, … (the sketch's singular values squared, descending).
        total_energy: the exact ‖G‖_F² (the gains are σ_k² / ‖G‖_F², DESIGN §3.2).
        bytes_at: bytes of this matrix's state at a rank (increasing in the rank).
        min_rank: the floor.
        max_rank: the cap (η's rank, ``max_rank``, the shape); ranks beyond
            ``len(energies)`` are never given.
    """

    energies: Sequence[float]
    total_energy: float
    bytes_at: Callable[[int], int]
    min_rank: int
    max_rank: int

    def bounds(self) -> tuple[int, int]:
        """(floor, cap) after clamping to the energies given (at least rank 1)."""
        cap = max(1, min(self.max_rank, len(self.energies)))
        return min(max(1, self.min_rank), cap), cap

    def gain(self, rank: int) -> float:
        """Captured energy rank ``rank`` adds: σ_rank² / ‖G‖_F² (0 for a zero gradient)."""
        if self.total_energy <= 0.0:
            return 0.0
        return float(self.energies[rank - 1]) / float(self.total_energy)


def allocate(demands: Sequence[Demand], available: int) -> list[int]:
    """Ranks for ``demands`` whose state bytes sum to at most ``available``.

    Greedy water-filling: from the floors, repeatedly give the next rank to the matrix with
    the largest gain per byte ``gain(k) / (bytes_at(k) − bytes_at(k − 1))`` (ties: the
    earlier matrix), skipping a matrix for good once its next rank no longer fits, until
    nothing can grow. Optimal for equal per-rank costs and sorted spectra; within one rank's
    gain of the optimum otherwise (module docstring). Deterministic: the same inputs give the
    same ranks, so a resumed run allocates as the uninterrupted one did.

    Raises:
        BudgetError: when the floors alone need more than ``available``.
    """
    bounds = [d.bounds() for d in demands]
    ranks = [floor for floor, _ in bounds]
    used = sum(d.bytes_at(r) for d, r in zip(demands, ranks, strict=True))
    if used > available:
        raise BudgetError(
            f"the floors (min_rank) of {len(demands)} matrices need {format_bytes(used)}, "
            f"{format_bytes(available)} are available",
            used,
        )
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        k = ranks[i] + 1
        if k <= bounds[i][1]:
            cost = demands[i].bytes_at(k) - demands[i].bytes_at(k - 1)
            ratio = demands[i].gain(k) / cost if cost > 0 else math.inf
            heapq.heappush(heap, (-ratio, i))

    for i in range(len(demands)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        d, k = demands[i], ranks[i] + 1
        cost = d.bytes_at(k) - d.bytes_at(k - 1)
        if used + cost > available:
            continue  # this matrix stops here; cheaper ranks of others may still fit
        ranks[i], used = k, used + cost
        push(i)
    return ranks


# ------------------------------------------------------------- the optimizer


def _matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    return p.shape[0], math.prod(p.shape[1:])


def floor_rank(p: torch.Tensor, group: Mapping[str, Any]) -> int:
    """The smallest rank a low-rank matrix may hold: ``min_rank`` clamped to its cap."""
    return min(group["min_rank"], rank_cap(group["max_rank"], _matrix_shape(p)))


def param_bytes(
    p: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any], rank: int | None = None
) -> int:
    """The byte model's count for one parameter after a step: a low-rank matrix at
    ``rank`` (default: its current rank, or its floor before its first refresh), plain
    AdamW state otherwise (float32 moments for an INT8 weight)."""
    if group["lowrank"] and p.ndim >= 2:
        if rank is None:
            rank = int(state.get("rank", 0)) or floor_rank(p, group)
        return lowrank_bytes(_matrix_shape(p), rank, group)
    return plain_bytes(p, torch.float32 if is_int8_weight(p) else None)


def committed_bytes(optimizer: Any, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of every parameter's state but ``exclude``'s, as ``param_bytes`` counts them:
    a parameter that has no state yet is reserved for (plain state, or its floor rank),
    so one that first gets a gradient later always fits."""
    skip = {id(p) for p in exclude}
    return sum(
        param_bytes(p, group, optimizer.state.get(p, {}))
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) not in skip
    )


def smallest_budget(optimizer: Any) -> int:
    """The smallest budget that holds plain state and every matrix at its floor rank."""
    return sum(
        param_bytes(p, group, {}, floor_rank(p, group) if p.ndim >= 2 else None)
        for group in optimizer.param_groups
        for p in group["params"]
    )


def check_budget(optimizer: Any) -> None:
    """``ValueError`` when ``optimizer.state_budget`` cannot hold the floors."""
    needed = smallest_budget(optimizer)
    if needed > optimizer.state_budget:
        raise ValueError(
            f"invalid state_budget={optimizer.state_budget}: plain AdamW state and every "
            f"matrix at min_rank need {format_bytes(needed)}; give at least that, lower "
            "min_rank or leave more parameters out of the optimizer"
        )


def allowance(optimizer: Any, items: Sequence[Any], refresh: list[Any]) -> tuple[list[Any], int]:
    """The refresh set and the bytes its matrices may share at this step.

    ``items``: the group's low-rank ``refresh.Item``\\ s of this step; ``refresh``: those
    the schedule refreshes. When the rest of the state and the floors of ``refresh`` do not
    fit (a state saved under a larger budget, say), every item of the group joins the
    refresh, so that its rank can be cut; if even that does not fit, ``ValueError``.
    """
    budget = optimizer.state_budget
    chosen = {id(it) for it in refresh}
    for attempt in range(2):
        others = committed_bytes(optimizer, [it.param for it in refresh])
        floors = sum(
            param_bytes(it.param, it.group, {}, floor_rank(it.param, it.group)) for it in refresh
        )
        if others + floors <= budget:
            return refresh, budget - others
        if attempt == 0:
            extra = [it for it in items if id(it) not in chosen]
            for it in extra:
                it.R = None  # a staleness test's R belongs to the subspace being replaced
            refresh = refresh + extra
    raise ValueError(
        f"state_budget={budget} cannot hold the optimizer state: the other parameters hold "
        f"{format_bytes(others)} and the refreshing matrices need {format_bytes(floors)} at "
        "min_rank; load state saved under this budget, or raise it"
    )


def layer_kind(name: str) -> str:
    """A parameter's module name without block indices: ``layers.3.mlp.up.weight`` → ``up``."""
    parts = [q for q in name.split(".") if q and not q.isdigit() and q != "weight"]
    return parts[-1] if parts else name


def report(optimizer: Any) -> dict[str, Any]:
    """``budget``, ``used`` (``state_bytes()["total"]``), ``reserved`` (the byte model's
    count, parameters without state included; ``used ≤ reserved ≤ budget``), ``smallest``
    (the least budget that would work) and ``ranks``: per layer kind, the ranks of its
    matrices in parameter order (0 before a matrix's first refresh)."""
    ranks: dict[str, list[int]] = {}
    for name, rank in optimizer.ranks().items():
        ranks.setdefault(layer_kind(str(name)), []).append(int(rank))
    return {
        "budget": optimizer.state_budget,
        "used": optimizer.state_bytes()["total"],
        "reserved": committed_bytes(optimizer),
        "smallest": smallest_budget(optimizer),
        "ranks": ranks,
    }
