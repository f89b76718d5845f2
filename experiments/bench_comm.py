"""Communication of a subspace refresh under FSDP2: sharded rSVD vs gathering the gradient.

Under FSDP2 every weight's gradient G (m×n) is sharded on rows over W ranks.
adarank's sharded randomized SVD (``adarank.distributed.sharded_randomized_svd``)
never gathers G: it all-reduces (q+1) panels of n×l float32 and 2(q+1) Gram
matrices (upper triangle, float64) for l = r + p columns. The alternative,
all-gathering G to run the unsharded rSVD, moves the whole m×n matrix.

For the LLaMA-1B shapes of the GaLore paper (d = 2048, ffn = 5461, 24 layers;
q/k/v/o_proj d×d, gate/up_proj ffn×d, down_proj d×ffn, as ``nn.Linear``
weights) this script prints, per matrix and for a refresh of all 168 matrices:

- the all-reduce payload per rank of one refresh, in closed form
  (``randomized_svd_comm_bytes``), and the full gradient an all-gather would
  assemble (m·n·4 bytes);
- their ratio, and the ratio of bytes each rank sends with ring algorithms
  (all-reduce of S bytes: 2(W−1)/W·S; all-gather of m·n·4 bytes: (W−1)/W·m·n·4),
  which is ``2S / (4mn)`` whatever W;
- the per-step traffic of the left projection ``R = PᵀG`` (an r×n all-reduce,
  only for matrices projected on the left, i.e. the wide down_proj);
- optimizer-state bytes per rank for W = 1, 2, 8 (row-sharded moments and
  projectors shrink, replicated ones do not).

Before the table the closed form is checked against the payload counted by
``record_comm`` on small matrices (both orientations, several p and q).

``--measure`` also times one refresh per matrix shape on ``--device``: the sharded
rSVD on this rank's rows against all-gathering G and running the unsharded
rSVD; run it under ``torchrun`` to include real communication::

    python -m experiments.bench_comm                       # the table (CPU, instant)
    python -m experiments.bench_comm --rank 256 --power-iters 1
    torchrun --nproc-per-node 2 -m experiments.bench_comm --measure --rank 64   # gloo, CPU
    torchrun --nproc-per-node 8 -m experiments.bench_comm --measure --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.distributed as dist

from adarank.distributed import (
    randomized_svd_comm_bytes,
    record_comm,
    sharded_randomized_svd,
    world_size,
)
from adarank.projector import side_for
from adarank.rsvd import randomized_svd

D_MODEL, FFN, LAYERS = 2048, 5461, 24
MATRICES: dict[str, tuple[int, int]] = {  # nn.Linear weight shapes (out × in)
    "q_proj": (D_MODEL, D_MODEL),
    "k_proj": (D_MODEL, D_MODEL),
    "v_proj": (D_MODEL, D_MODEL),
    "o_proj": (D_MODEL, D_MODEL),
    "gate_proj": (FFN, D_MODEL),
    "up_proj": (FFN, D_MODEL),
    "down_proj": (D_MODEL, FFN),
}
MIB = 2**20


def check_closed_form() -> list[tuple[int, int, int, int, int, int, int]]:
    """Payload counted by ``record_comm`` against ``randomized_svd_comm_bytes``
    on small matrices; raises ``AssertionError`` on a mismatch. Returns the rows
    ``(m, n, k, p, q, counted, closed_form)``."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k, p, q in (
        (96, 40, 6, 8, 2),
        (40, 96, 6, 8, 2),
        (64, 64, 10, 4, 0),
        (50, 120, 3, 0, 3),
        (30, 12, 20, 8, 1),
    ):
        G = torch.randn(m, n, generator=gen)
        with record_comm() as stats:
            sharded_randomized_svd(G, k, oversample=p, power_iters=q, seed=1, layout=(0, m))
        expected = randomized_svd_comm_bytes(m, n, k, oversample=p, power_iters=q)
        if stats.bytes != expected:
            raise AssertionError(
                f"{m}×{n} k={k} p={p} q={q}: counted {stats.bytes} B, closed form {expected} B"
            )
        rows.append((m, n, k, p, q, stats.bytes, expected))
    return rows


def state_bytes_per_rank(m: int, n: int, r: int, world: int) -> int:
    """Float32 optimizer state of one projected matrix on one rank, rows sharded
    over ``world`` ranks (``std`` projection): moments, projector, bias weights."""
    rows = -(-m // world)  # FSDP2's torch.chunk: the largest shard
    if side_for((m, n), "std") == "right":
        # Q (n×r) replicated; moments M, V (m×r) and their rows sharded.
        return 4 * (n * r + 2 * rows * r + 2 * r)
    # P (m×r) row-sharded; moments M, V (r×n) replicated (R = PᵀG is all-reduced).
    return 4 * (rows * r + 2 * r * n + 2 * r)


def closed_form_table(r: int, p: int, q: int, world: int) -> str:
    lines = [
        f"Refresh of LLaMA-1B (d={D_MODEL}, ffn={FFN}, {LAYERS} layers) under FSDP2, "
        f"rank r={r}, oversampling p={p}, power iterations q={q}, W={world} ranks; "
        "payloads per rank in MiB.",
        "",
        "| matrix | m×n | side | l | rSVD all-reduce | all-gather G | payload ratio "
        "| ring bytes/rank ratio | left projection per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total_rsvd = total_full = total_step = 0
    for name, (m, n) in MATRICES.items():
        width = min(r + p, m, n)
        rsvd = randomized_svd_comm_bytes(m, n, r, oversample=p, power_iters=q)
        full = 4 * m * n
        side = side_for((m, n), "std")
        step = 4 * min(r, m, n) * n if side == "left" else 0
        total_rsvd += rsvd
        total_full += full
        total_step += step
        lines.append(
            f"| {name} | {m}×{n} | {side} | {width} | {rsvd / MIB:.2f} | {full / MIB:.2f} "
            f"| {rsvd / full:.3f} | {2 * rsvd / full:.3f} | {step / MIB:.2f} |"
        )
    lines.append(
        f"| all {7 * LAYERS} matrices | | | | {LAYERS * total_rsvd / MIB:.1f} "
        f"| {LAYERS * total_full / MIB:.1f} | {total_rsvd / total_full:.3f} "
        f"| {2 * total_rsvd / total_full:.3f} | {LAYERS * total_step / MIB:.1f} |"
    )
    lines += [
        "",
        "ratios < 1: the sharded rSVD moves less than gathering G. Ring bytes per rank: "
        "all-reduce 2(W−1)/W·S, all-gather (W−1)/W·4mn, so the ratio is 2S/(4mn) for any W.",
        "",
        f"All {7 * LAYERS} matrices by rank (adaptive ranks fall over training), p={p}, q={q}:",
        "",
        "| r | rSVD all-reduce (MiB) | all-gather G (MiB) | payload ratio "
        "| ring bytes/rank ratio |",
        "|---|---|---|---|---|",
    ]
    for rank in sorted({1, 8, 32, 128, 256, 512, r}):
        rsvd = LAYERS * sum(
            randomized_svd_comm_bytes(m, n, rank, oversample=p, power_iters=q)
            for m, n in MATRICES.values()
        )
        lines.append(
            f"| {rank} | {rsvd / MIB:.1f} | {LAYERS * total_full / MIB:.1f} "
            f"| {rsvd / (LAYERS * total_full):.4f} "
            f"| {2 * rsvd / (LAYERS * total_full):.4f} |"
        )
    lines += [
        "",
        f"Optimizer state of the {7 * LAYERS} projected matrices per rank (float32, "
        "GiB; moments of left-projected matrices replicated):",
        "",
        "| W | state per rank | of W=1 |",
        "|---|---|---|",
    ]
    base = None
    for w in sorted({1, 2, 8, world}):
        per_rank = LAYERS * sum(state_bytes_per_rank(m, n, r, w) for m, n in MATRICES.values())
        base = base or per_rank
        lines.append(f"| {w} | {per_rank / 2**30:.3f} | {per_rank / base:.2f} |")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather_rows(G_local: torch.Tensor, row_counts: list[int]) -> torch.Tensor:
    """The full G from every rank's rows, padded to equal blocks as FSDP2 does."""
    block = max(row_counts)
    padded = G_local.new_zeros(block, G_local.shape[1])
    padded[: G_local.shape[0]] = G_local
    parts = [torch.empty_like(padded) for _ in row_counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:rows] for part, rows in zip(parts, row_counts, strict=True)])


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if world_size() > 1:
            dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(r: int, p: int, q: int, device: torch.device, repeats: int) -> str:
    """Median wall time of one refresh per distinct shape: sharded rSVD on this
    rank's rows vs all-gather of G + unsharded rSVD (rank 0 prints)."""
    world = world_size()
    me = dist.get_rank() if world > 1 else 0
    lines = [
        f"Measured on {device} with W={world} ranks ({torch.__version__}); median of "
        f"{repeats}, seconds:",
        "",
        "| m×n | sharded rSVD | all-gather G + rSVD | speed-up |",
        "|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(0)
    options = dict(oversample=p, power_iters=q, seed=0)
    for m, n in sorted(set(MATRICES.values())):
        G = torch.randn(m, n, generator=gen).to(device)
        row_counts = [c.shape[0] for c in torch.chunk(G, world, dim=0)]  # FSDP2's layout
        row_counts += [0] * (world - len(row_counts))
        offset = sum(row_counts[:me])
        G_local = G[offset : offset + row_counts[me]].contiguous()
        sharded = partial(sharded_randomized_svd, G_local, r, layout=(offset, m), **options)
        if world > 1:

            def gathered(G_local: torch.Tensor = G_local, counts: list[int] = row_counts) -> None:
                randomized_svd(_gather_rows(G_local, counts), r, **options)
        else:
            gathered = partial(randomized_svd, G_local, r, **options)
        t_sharded = _median_time(sharded, device, repeats)
        t_gathered = _median_time(gathered, device, repeats)
        lines.append(
            f"| {m}×{n} | {t_sharded:.4f} | {t_gathered:.4f} | {t_gathered / t_sharded:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=512, help="r (GaLore's 1B rank: 512)")
    parser.add_argument("--oversample", type=int, default=8, help="p")
    parser.add_argument("--power-iters", type=int, default=2, help="q")
    parser.add_argument("--world", type=int, default=8, help="W for the state table")
    parser.add_argument("--measure", action="store_true", help="also time one refresh")
    parser.add_argument("--device", default="cpu", help="device of --measure (cpu, cuda)")
    parser.add_argument(
        "--backend",
        default=None,
        help="process-group backend under torchrun (default: nccl on cuda, gloo on cpu)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of --measure")
    args = parser.parse_args(argv)
    for key in ("rank", "world", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1")
    if args.oversample < 0 or args.power_iters < 0:
        parser.error("--oversample and --power-iters must be >= 0")

    # Before the process group exists: the check runs single-process collectives.
    checked = check_closed_form()
    launched = "LOCAL_RANK" in os.environ
    device = torch.device(args.device)
    if launched:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))
    lead = not launched or dist.get_rank() == 0
    try:
        if lead:
            print(
                f"closed form = counted all-reduce payload on {len(checked)} small cases "
                f"({', '.join(f'{m}×{n} k={k} p={p} q={q}' for m, n, k, p, q, *_ in checked)})"
                "\n"
            )
            print(closed_form_table(args.rank, args.oversample, args.power_iters, args.world))
        if args.measure:
            report = measure(args.rank, args.oversample, args.power_iters, device, args.repeats)
            if lead:
                print("\n" + report)
    finally:
        if launched:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
