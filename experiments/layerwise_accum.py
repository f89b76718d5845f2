"""Train the ``cpu`` decoder layer-wise with gradient accumulation in the compact space.

Each iteration runs ``--grad-accum`` micro-batches (default 4) of ``--batch-size`` windows of
``--seq-len`` tokens; ``adarank.layerwise(..., grad_accum=4)`` adds every micro-batch's
gradient of a projected matrix to an r×n accumulator of ``R = PᵀG`` between refreshes (the
full gradient only on the steps that need it) and steps each parameter inside its 4th
backward. Same data, model and optimizer as ``python -m experiments.pretrain --optimizer
adarank``; no global-norm clipping (layer-wise mode cannot clip, see ``adarank.layerwise``).

    python -m experiments.layerwise_accum --out runs/layerwise_accum

Writes ``<out>/metrics.jsonl`` (per iteration: loss, the gradient norm from
``grad_norm()`` with its full and compact parts, and the peak accumulator bytes) and
``<out>/result.json`` (validation perplexity before and after, ranks, state bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import adarank
from experiments import data as data_mod
from experiments.model import CONFIGS, Decoder, get_config
from experiments.optim import EXCLUDE


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/layerwise_accum"))
    parser.add_argument("--model", default="cpu", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (iterations)")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=64, help="AdaRankAdamW's max_rank")
    parser.add_argument("--update-gap", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--max-works", type=int, default=None, help="corpus subset (tests)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--data-cache", default=None, help="default $ADARANK_DATA_CACHE")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    corpus = data_mod.prepare(
        data_mod.DataConfig(vocab_size=args.vocab_size, max_works=args.max_works), args.data_cache
    )
    train_tokens, val_tokens = corpus.train(), corpus.val()
    torch.manual_seed(args.seed)
    model = Decoder(get_config(args.model, vocab_size=corpus.vocab_size))
    groups = adarank.param_groups(
        model, exclude=EXCLUDE, max_rank=args.rank, update_gap=args.update_gap, seed=args.seed
    )
    lw = adarank.layerwise(
        model, lambda g: adarank.AdaRankAdamW(g, lr=args.lr), groups, grad_accum=args.grad_accum
    )
    sampler = data_mod.BatchSampler(train_tokens, args.batch_size, args.seq_len, seed=args.seed)

    def val_ppl() -> float:
        nats = data_mod.evaluate(model, val_tokens, args.seq_len, n_windows=args.eval_windows)
        return math.exp(nats)

    before = val_ppl()
    started = time.perf_counter()
    with open(args.out / "metrics.jsonl", "w") as log:
        for step in tqdm(range(args.steps), disable=args.no_progress, desc="layer-wise"):
            warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
            lw.set_lr(args.lr * warm)
            loss_sum, peak_acc = 0.0, 0
            for _ in range(args.grad_accum):
                x, y = sampler.next()
                loss = model(x, targets=y) / args.grad_accum
                loss.backward()  # the last micro-batch steps the parameters
                loss_sum += float(loss.detach())
                peak_acc = max(peak_acc, lw.accumulator_bytes()["total"])
            lw.step()
            record = {
                "step": step + 1,
                "loss": loss_sum,
                "grad_norm": lw.grad_norm(),
                "grad_norm_full": lw.grad_norm("full"),
                "grad_norm_compact": lw.grad_norm("compact"),
                "accumulator_bytes": peak_acc,
            }
            log.write(json.dumps(record) + "\n")
    seconds = time.perf_counter() - started
    ranks = lw.ranks()
    result = {
        "model": args.model,
        "steps": args.steps,
        "grad_accum": args.grad_accum,
        "tokens": args.steps * args.grad_accum * args.batch_size * args.seq_len,
        "val_ppl_before": before,
        "val_ppl_after": val_ppl(),
        "train_seconds": seconds,
        "threads": torch.get_num_threads(),
        "mean_rank": sum(ranks.values()) / len(ranks),
        "ranks": ranks,
        "state_bytes": lw.state_bytes()["total"],
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"val ppl {before:.1f} -> {result['val_ppl_after']:.1f} in {args.steps} steps × "
        f"{args.grad_accum} micro-batches ({seconds:.0f} s); mean rank {result['mean_rank']:.1f}"
    )
    return result


if __name__ == "__main__":
    main()
