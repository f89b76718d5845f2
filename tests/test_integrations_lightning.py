"""adarank.integrations.lightning with the real Lightning Trainer, offline (a tiny Llama)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="needs the integrations extra")
transformers = pytest.importorskip("transformers", reason="needs the integrations extra")

import adarank  # noqa: E402
from adarank.integrations.lightning import SpectrumCallback  # noqa: E402

VOCAB = 64
STEPS_PER_EPOCH = 3  # 24 sequences, batches of 4, 2 accumulated per step


class LlamaModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        self.model = transformers.LlamaForCausalLM(config)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(batch, labels=batch).loss

    def configure_optimizers(self):
        groups = adarank.param_groups(self, no_decay=True, max_rank=4, update_gap=2)
        optimizer = adarank.AdaRankAdamW(groups, lr=3e-3, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self):
        ids = torch.randint(0, VOCAB, (24, 12), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(ids, batch_size=4, shuffle=False)


def fit(root: Path, log: Path, *, max_epochs: int, ckpt_path: str | None = None):
    module = LlamaModule()
    spectrum = SpectrumCallback(log, every=1)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
        logger=pl.loggers.CSVLogger(root, name="csv"),
        callbacks=[spectrum],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, spectrum


def records(log: Path) -> dict[int, dict]:
    out = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "record":
            out[entry["step"]] = entry
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    whole = fit(root / "whole", root / "whole.jsonl", max_epochs=2)
    # Interrupted after one epoch, at a checkpoint Lightning resumes exactly. (A run stopped by
    # max_steps at the same point resumed here with a first step of one micro-batch, not two.)
    fit(root / "cut", root / "cut.jsonl", max_epochs=1)
    (checkpoint,) = (root / "cut").rglob("*.ckpt")
    resumed = fit(root / "cut", root / "cut.jsonl", max_epochs=2, ckpt_path=str(checkpoint))
    return root, whole, resumed


def test_resume_with_the_callback_is_bit_identical(runs) -> None:
    _, (whole, whole_module, _), (resumed, resumed_module, _) = runs
    assert whole.global_step == resumed.global_step == 2 * STEPS_PER_EPOCH
    pairs = zip(whole_module.named_parameters(), resumed_module.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name
    a_opt, b_opt = whole.optimizers[0], resumed.optimizers[0]
    assert a_opt.ranks() == b_opt.ranks() and a_opt.refresh_counts() == b_opt.refresh_counts()


def test_log_appends_on_resume_and_matches_the_whole_run(runs) -> None:
    root, _, (_, _, spectrum) = runs
    whole, cut = records(root / "whole.jsonl"), records(root / "cut.jsonl")
    assert sorted(whole) == sorted(cut) == list(range(2 * STEPS_PER_EPOCH))
    for step, record in whole.items():
        other = cut[step]
        assert record["loss"] == other["loss"] and record["state_bytes"] == other["state_bytes"]
        for name, layer in record["layers"].items():
            assert layer["sv"] == other["layers"][name]["sv"], (step, name)
            assert layer.get("optimizer_rank") == other["layers"][name].get("optimizer_rank")
    lines = [json.loads(line) for line in (root / "cut.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e.get("kind") == "record"] == list(range(6))
    assert spectrum.records == 6  # restored from the checkpoint, then counted on


def test_record_loss_is_the_step_loss(runs) -> None:
    root, (_, module, _), _ = runs
    first = records(root / "whole.jsonl")[0]
    # Step 0's loss, recomputed: the mean over its two accumulated batches at the initial weights.
    fresh = LlamaModule()
    batches = list(fresh.train_dataloader())[:2]
    with torch.no_grad():
        expected = sum(fresh.model(b, labels=b).loss for b in batches) / 2
    assert first["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_scalars_reach_the_lightning_logger(runs) -> None:
    root, (trainer, _, _), _ = runs
    (metrics,) = (root / "whole" / "csv").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    columns = set(rows[0])
    assert {
        "adarank/state_MiB",
        "adarank/rank_mean",
        "adarank/rank_mean/q",
        "adarank/refreshes",
    } <= columns
    last = [r for r in rows if r["adarank/state_MiB"]][-1]
    optimizer = trainer.optimizers[0]
    assert float(last["adarank/state_MiB"]) == pytest.approx(
        optimizer.state_bytes()["total"] / 2**20
    )
    assert float(last["adarank/refreshes"]) == sum(optimizer.refresh_counts().values())


def test_callback_rejects_bad_settings(tmp_path) -> None:
    with pytest.raises(ValueError, match="every must be a positive integer"):
        SpectrumCallback(tmp_path / "log.jsonl", every=-1)
    with pytest.raises(ValueError, match="unknown option.*'topk'"):
        SpectrumCallback(tmp_path / "log.jsonl", topk=3)
