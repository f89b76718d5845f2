"""The flagship demo: AdaRankAdamW beside AdamW on real text, on a CPU, in a few minutes.

    python -m experiments.demo [--steps 200] [--model cpu] [--out demo_out] [--keep-checkpoints]

Pre-trains the same LLaMA-style decoder twice on the Shakespeare corpus (same weights, same
batches, same warm-up + cosine schedule; see ``experiments.pretrain``): once with
``torch.optim.AdamW`` and once with ``adarank.AdaRankAdamW``. While the AdaRankAdamW run goes, it
prints the per-layer ranks the optimizer chose at each evaluation; at the end it prints the
comparison (validation perplexity, optimizer-state memory, tokens/s) and writes the rank figure
``<out>/rank_trajectories.png`` from the run's spectrum log. Every number printed is read back
from the runs' logs in ``<out>/<optimizer>/``. Tokens/s is wall-clock throughput, so it drops
when other jobs share the CPU. Both runs share one process, whose peak resident memory cannot be
told apart per run on a CPU: the table shows no peak memory (the optimizer-state column is
exact).

Each run writes a checkpoint (``ckpt.pt``, about 75 MB for the ``cpu`` model); the demo deletes
them when it is done unless ``--keep-checkpoints``. Tokenised data is cached in
``$ADARANK_DATA_CACHE`` (default: ``data_cache/`` in the repository).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from experiments.compare import comparison_table, load_run
from experiments.model import LLAMA_MATRICES
from experiments.pretrain import TrainConfig, train
from experiments.runfiles import read_json_lines


def rank_table(metrics_path: Path) -> str:
    """Mean chosen rank per layer type at every evaluation of a run, as text."""
    rows = []
    for record in read_json_lines(metrics_path):
        if record.get("kind") != "eval" or not record.get("ranks"):
            continue
        by_type = []
        for kind in LLAMA_MATRICES:
            values = [r for name, r in record["ranks"].items() if kind in name]
            by_type.append(f"{sum(values) / len(values):6.1f}" if values else "     -")
        rows.append(f"{record['step']:>6}  " + " ".join(by_type))
    header = "  step  " + " ".join(f"{k.split('_')[0]:>6}" for k in LLAMA_MATRICES)
    return "\n".join([header, *rows])


def rank_figure(spectrum_path: Path, out_path: Path) -> Path:
    """The overview figure of ``analysis.plots`` (ranks by layer type, spectra, heatmap)."""
    from adarank.analysis import load_log
    from adarank.analysis.plots import overview_figure, save_figure

    return save_figure(overview_figure(load_log(spectrum_path)), out_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--model", default="cpu", help="model shape (tiny for a smoke run)")
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's; 1 on a machine busy with "
        "other jobs, where multi-threaded kernels stall)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each run's ckpt.pt (about 75 MB each for the cpu model)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    every = max(1, args.steps // 8)
    runs = {}
    for optimizer in ("adamw", "adarank"):
        print(f"== {optimizer}: {args.steps} steps of the '{args.model}' model", flush=True)
        config = TrainConfig(
            model=args.model,
            optimizer=optimizer,
            steps=args.steps,
            out=str(out / optimizer),
            overwrite=True,
            eval_every=every,
            ckpt_every=args.steps,
            spectrum_every=every,
            update_gap=every,
            progress=not args.no_progress,
            threads=args.threads,
        )
        train(config)
        runs[optimizer] = out / optimizer
        if not args.keep_checkpoints:
            (out / optimizer / "ckpt.pt").unlink(missing_ok=True)
    print("\nAdaRankAdamW's chosen rank per layer type (mean over layers) at each evaluation:")
    print(rank_table(runs["adarank"] / "metrics.jsonl"))
    print("\nComparison (same model, tokens, schedule and seed):")
    summaries = [load_run(path) for path in runs.values()]
    for summary in summaries:  # one process's peak RSS, the same number for both runs
        summary.pop("peak_memory_bytes", None)
    print(comparison_table(summaries))
    figure = rank_figure(runs["adarank"] / "spectrum.jsonl", out / "rank_trajectories.png")
    print(f"\nrank figure: {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
