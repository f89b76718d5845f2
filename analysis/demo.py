"""A short real training run on CPU that writes a spectrum log (``adarank-spectrum record``).

The model is a 2-block LLaMA-style decoder (RMSNorm, causal attention with q/k/v/o projections,
a SwiGLU MLP with gate/up/down projections; about 0.4M parameters) trained as a character-level
language model on real English prose that ships with Python: the reference documentation in
``pydoc_data.topics`` (about 465k characters). Nothing is downloaded. 300 steps take about
10-20 seconds on two CPU cores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adarank.analysis.hooks import SpectrumLogger

__all__ = ["OPTIMIZERS", "DemoConfig", "TinyDecoder", "load_corpus", "train"]

OPTIMIZERS = ("adamw", "galore", "adarank")


@dataclass(frozen=True)
class DemoConfig:
    optimizer: str = "adarank"
    steps: int = 300
    every: int = 10
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 344  # ≈ 8/3·d_model, LLaMA's SwiGLU width
    lr: float | None = None  # default per optimizer: 3e-3 (adamw), 1e-2 (galore, adarank)
    rank: int = 16  # GaLore's fixed rank; adarank's max_rank is 4× this
    update_gap: int = 50  # T, short because the run is short
    eta: float = 0.9
    seed: int = 0
    # One thread: the matrices are too small to gain from more, and a busy machine stalls
    # multi-threaded kernels at their barriers (3-4x slower on 2 shared cores).
    threads: int = 1


def load_corpus() -> str:
    """Python's own reference documentation, as one string of English prose and examples."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some distributions strip pydoc_data
        raise RuntimeError(
            "the demo corpus (Python's pydoc_data.topics) is not installed in this Python"
        ) from error
    return "\n\n".join(topics[key] for key in sorted(topics))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.input_norm = nn.RMSNorm(d_model)
        self.self_attn = nn.ModuleDict(
            {
                name: nn.Linear(d_model, d_model, bias=False)
                for name in ("q_proj", "k_proj", "v_proj", "o_proj")
            }
        )
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(d_model, d_ff, bias=False),
                "up_proj": nn.Linear(d_model, d_ff, bias=False),
                "down_proj": nn.Linear(d_ff, d_model, bias=False),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        attn = self.self_attn
        h = self.input_norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.n_heads, -1).transpose(1, 2)

        q, k, v = (heads(attn[name](h)) for name in ("q_proj", "k_proj", "v_proj"))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn["o_proj"](y.transpose(1, 2).reshape(batch, length, width))
        h = self.mlp_norm(x)
        mlp = self.mlp
        return x + mlp["down_proj"](F.silu(mlp["gate_proj"](h)) * mlp["up_proj"](h))


class TinyDecoder(nn.Module):
    """A LLaMA-shaped decoder small enough for CPU; parameter names follow Hugging Face LLaMA."""

    def __init__(self, vocab_size: int, config: DemoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.seq_len, config.d_model)
        self.layers = nn.ModuleList(
            _Block(config.d_model, config.n_heads, config.d_ff) for _ in range(config.n_layers)
        )
        self.norm = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def make_optimizer(model: nn.Module, config: DemoConfig) -> torch.optim.Optimizer:
    """AdamW, GaLore (fixed rank, exact SVD) or AdaRankAdamW (energy rule at η) for ``model``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr or 3e-3)
    import adarank

    lr = config.lr or 1e-2
    if config.optimizer == "galore":
        groups = adarank.param_groups(model, rank=config.rank, update_proj_gap=config.update_gap)
        return adarank.GaLoreAdamW(groups, lr=lr)
    if config.optimizer == "adarank":
        groups = adarank.param_groups(model)
        return adarank.AdaRankAdamW(
            groups, lr=lr, eta=config.eta, max_rank=4 * config.rank, update_gap=config.update_gap
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")


def train(config: DemoConfig, log_path: str | Path) -> dict[str, float]:
    """Train the demo model for ``config.steps`` steps, logging spectra to ``log_path``.

    Returns the final loss (mean of the last 10 steps), the training wall time in seconds
    (logging included) and the seconds spent inside ``SpectrumLogger.record``.
    """
    if config.steps < 1 or config.every < 1:
        raise ValueError("steps and every must be positive")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, log_path)
    finally:
        torch.set_num_threads(threads)


def _train(config: DemoConfig, log_path: str | Path) -> dict[str, float]:
    torch.manual_seed(config.seed)
    text = load_corpus()
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    model = TinyDecoder(len(vocab), config)
    optimizer = make_optimizer(model, config)
    batches = torch.Generator().manual_seed(config.seed)
    meta = {
        "task": "character-level language modelling of Python's pydoc_data.topics",
        "demo_config": {**config.__dict__, "vocab_size": len(vocab)},
    }
    logger = SpectrumLogger(
        model,
        log_path,
        every=config.every,
        optimizer=optimizer,
        run_name=config.optimizer,
        meta=meta,
    )
    losses: list[float] = []
    records = 0
    started = time.perf_counter()
    with logger:
        for step in range(config.steps):
            starts = torch.randint(
                len(data) - config.seq_len - 1, (config.batch_size,), generator=batches
            )
            window = torch.stack([data[s : s + config.seq_len + 1] for s in starts.tolist()])
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            loss.backward()
            losses.append(loss.item())
            last = step == config.steps - 1
            records += logger.record(step, loss=losses[-1], force=last) is not None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    tail = losses[-10:]
    return {
        "final_loss": sum(tail) / len(tail),
        "initial_loss": losses[0],
        "uniform_loss": math.log(len(vocab)),
        "train_seconds": seconds,
        "record_seconds": logger.seconds,
        "records": records,
    }
