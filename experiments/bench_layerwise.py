"""Gradient and process memory of layer-wise training with gradient accumulation.

Compares, on one model and GaLoreAdamW (rank ``--rank``, refresh gap 4, so the six
iterations run are: the first step, three steps between refreshes, a scheduled refresh,
one more step between refreshes):

- ``ordinary K=4``: the normal optimizer, four micro-batches accumulated in ``.grad``;
- ``layer-wise K=1``: ``adarank.layerwise``, one micro-batch per step;
- ``layer-wise K=4``: ``layerwise(..., grad_accum=4)``, accumulation in the compact space;
- ``layer-wise K=4, stagger=4``: the same with refreshes spread over four phases.

Each configuration runs in a fresh process. Measured in every parameter's gradient
pre-hook (the micro-batch's gradient has arrived and not yet been added), its
post-accumulate-grad hook (registered before the optimizer's, so the new gradient is still
alive) and after every backward: the bytes of all live ``.grad`` tensors, of the arriving
gradient and of layer-wise mode's accumulators ("live gradient memory"), and the process's
resident set size (``/proc/self/statm``). Both are reported per phase as the peak over
the iterations of that phase. Models: ``linear8`` (eight ``Linear(2048, 2048)``,
micro-batch 16×2048) and ``cpu`` (the ``cpu`` decoder, 8k vocabulary, micro-batch 8×128
tokens; embedding and output layer plain AdamW, accumulated in full in every
configuration)::

    python -m experiments.bench_layerwise --model linear8 --model cpu

Writes ``<out>.json`` and ``<out>.md`` (``--out``, default ``results/bench/layerwise_memory``).
RSS counts what the allocator holds, not what is alive: glibc's default raises its mmap
threshold after large frees and then keeps freed blocks in the heap, which interleaved
allocations and frees (layer-wise mode) leave fragmented. ``MALLOC_MMAP_THRESHOLD_=131072``
in the environment fixes the threshold, so large tensors are mapped and returned on free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODES = {
    "ordinary K=4": ("ordinary", 4, 0),
    "layer-wise K=1": ("layerwise", 1, 0),
    "layer-wise K=4": ("layerwise", 4, 0),
    "layer-wise K=4, stagger=4": ("layerwise", 4, 4),
}
# Iteration -> phase, under refresh gap 4: 0 the first step, 4 a scheduled refresh.
PHASES = {0: "first step", 1: "between refreshes", 2: "between refreshes",
          3: "between refreshes", 4: "refresh step", 5: "between refreshes"}  # fmt: skip
GAP = 4
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(model_name: str) -> tuple[nn.Module, Any, list[str]]:
    """The model, a function giving micro-batch i's loss, and the names kept full rank."""
    if model_name == "linear8":
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)])

        def loss_of(i: int) -> torch.Tensor:
            x = torch.randn(16, 2048, generator=torch.Generator().manual_seed(i))
            return model(x).square().mean()

        return model, loss_of, []
    from experiments.model import Decoder, get_config

    torch.manual_seed(0)
    model = Decoder(get_config(model_name, vocab_size=8192))
    seq = min(128, model.config.max_seq_len)

    def decoder_loss(i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(i)
        idx = torch.randint(0, 8192, (8, seq + 1), generator=gen)
        return model(idx[:, :-1], targets=idx[:, 1:])

    return model, decoder_loss, ["embed", "lm_head"]


def measure(model_name: str, mode: str, rank: int) -> dict[str, Any]:
    """One configuration, in this process: peak live gradient bytes and RSS per phase."""
    import adarank
    from adarank.layerwise import ConsumedGrad

    kind, accum, stagger = MODES[mode]
    model, loss_of, exclude = build(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = adarank.param_groups(
        model, exclude=exclude, rank=rank, update_proj_gap=GAP, stagger=stagger
    )

    def factory(g: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return adarank.GaLoreAdamW(g, lr=1e-3)

    lw = None
    peak = {"grad": 0, "rss": 0}

    def live_gradient_bytes() -> int:
        alive = sum(
            p.grad.numel() * p.grad.element_size()
            for p in params
            if p.grad is not None and not isinstance(p.grad, ConsumedGrad)
        )
        return alive + (lw.accumulator_bytes()["total"] if lw is not None else 0)

    def sample(_: torch.Tensor | None = None, incoming: int = 0) -> None:
        peak["grad"] = max(peak["grad"], live_gradient_bytes() + incoming)
        peak["rss"] = max(peak["rss"], rss_bytes())

    def sample_incoming(grad: torch.Tensor) -> None:
        # Before autograd adds a micro-batch's gradient: it exists beside .grad in every
        # mode (ordinary accumulation adds it in place, then frees it).
        sample(incoming=grad.numel() * grad.element_size())

    for p in params:
        p.register_hook(sample_incoming)
        p.register_post_accumulate_grad_hook(sample)
    if kind == "layerwise":
        lw = adarank.layerwise(model, factory, groups, grad_accum=accum)
        opt = None
    else:
        opt = factory(groups)
    phases: dict[str, dict[str, int]] = {}
    for it, phase in PHASES.items():
        peak["grad"] = peak["rss"] = 0
        for j in range(accum):
            (loss_of(it * accum + j) / accum).backward()
            sample()
        if lw is not None:
            lw.step()
        else:
            assert opt is not None
            opt.step()
            opt.zero_grad(set_to_none=True)
        got = phases.setdefault(phase, {"grad": 0, "rss": 0})
        got["grad"] = max(got["grad"], peak["grad"])
        got["rss"] = max(got["rss"], peak["rss"])
    return {
        "model": model_name,
        "mode": mode,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "rank": rank,
        "params": sum(p.numel() for p in params),
        "gradient_bytes": sum(p.numel() * p.element_size() for p in params),
        "phases": phases,
        "max_rss": max(v["rss"] for v in phases.values()),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == model_name]
        first = sel[0]
        out += [
            f"**{model_name}** ({first['params'] / 1e6:.1f}M parameters, all gradients "
            f"{first['gradient_bytes'] / MIB:.1f} MiB; GaLoreAdamW rank {first['rank']}, "
            f"gap {GAP}; RSS under glibc's "
            + (
                f"MALLOC_MMAP_THRESHOLD_={first['malloc_mmap_threshold']}"
                if first.get("malloc_mmap_threshold")
                else "default allocator settings"
            )
            + ")",
            "",
            "| configuration | live gradients, first step | between refreshes | refresh step "
            "| peak RSS, first step | between refreshes | refresh step |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sel:
            ph = r["phases"]
            cells = [f"{ph[p]['grad'] / MIB:.1f} MiB" for p in PHASE_ORDER]
            cells += [f"{ph[p]['rss'] / MIB:.0f} MiB" for p in PHASE_ORDER]
            out.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


PHASE_ORDER = ("first step", "between refreshes", "refresh step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=["linear8", "cpu", "tiny"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/bench/layerwise_memory"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.rank)))
        return 0
    rows = []
    for model_name in args.model or ["linear8", "cpu"]:
        for mode in MODES:
            # A fresh process per configuration: RSS is not shared between them.
            cmd = [sys.executable, "-m", "experiments.bench_layerwise", "--one", model_name,
                   mode, "--rank", str(args.rank), "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{model_name:8s} {mode:28s} done", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    md = table(rows)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
