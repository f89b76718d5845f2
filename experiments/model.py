"""A compact LLaMA-style decoder: RMSNorm, SwiGLU MLP, rotary embeddings, causal attention.

Module names follow the LLaMA convention (``embed_tokens``, ``layers.<i>.self_attn.q_proj`` ...
``mlp.down_proj``, ``norm``, ``lm_head``) so that `adarank.param_groups` can pick the projected
matrices by name and exclude the embeddings and output layer. The output layer is untied from the
embeddings, as in LLaMA and in the GaLore paper's runs; it keeps ``embed_tokens`` and ``lm_head``
as two parameters that both stay full-rank. Linear layers have no biases.

Named shapes (`CONFIGS`): ``tiny`` (tests; 0.84M parameters with the 8k vocabulary), ``cpu``
(7.4M, half the width of ``60m``: a few hundred steps in a few minutes on two CPU cores) and the
GaLore paper's ``60m``, ``130m``, ``350m``, ``1b`` (arXiv 2403.03507: d_model, layers, heads,
ffn). The paper's counts include a 32k vocabulary; with our 8k BPE the same shapes have fewer
parameters in the embedding and output layers, and identical transformer blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape. ``head_dim = d_model // n_heads`` must be even (rotary pairs)."""

    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int = 8192
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim {self.d_model // self.n_heads} must be even for rotary")
        for name in ("d_model", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=48, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64),
    "cpu": ModelConfig(d_model=256, n_layers=4, n_heads=4, ffn_dim=688, max_seq_len=128),
    "60m": ModelConfig(d_model=512, n_layers=8, n_heads=8, ffn_dim=1376),
    "130m": ModelConfig(d_model=768, n_layers=12, n_heads=12, ffn_dim=2048),
    "350m": ModelConfig(d_model=1024, n_layers=24, n_heads=16, ffn_dim=2736),
    "1b": ModelConfig(d_model=2048, n_layers=24, n_heads=32, ffn_dim=5461),
}

# GaLore's rank for each paper shape (arXiv 2403.03507); other shapes use d_model // 4.
PAPER_RANKS: dict[str, int] = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
# The projected matrices of a decoder layer, by module name: attention (``self_attn.*``), then
# the SwiGLU MLP (``mlp.*``), as in Hugging Face LLaMA.
LLAMA_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(name: str, **overrides: int | float) -> ModelConfig:
    """A named shape from `CONFIGS` with fields replaced, e.g. ``vocab_size=corpus.vocab_size``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


class RMSNorm(nn.Module):
    """x / rms(x) * g, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2) (Su et al. 2021, RoFormer)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by position; pairs are (first half, second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        d = config.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """LLaMA-style causal language model.

    ``forward(idx)`` takes int64 token ids (batch, seq) with seq <= max_seq_len and returns logits
    (batch, seq, vocab); with ``targets`` (same shape as idx) it returns the mean cross-entropy
    in nats as a 0-d float32 tensor instead.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Plain attributes, not buffers: the tables stay float32 when the model is cast to bf16,
        # and checkpoints hold only trained weights. `_rotary` moves them to the input's device.
        head_dim = config.d_model // config.n_heads
        self._rope = rotary_tables(head_dim, config.max_seq_len, config.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for matrices; output projections of each block scaled by 1/sqrt(2L).

        The 1/sqrt(2L) factor (GPT-2) keeps the residual stream's variance flat in depth.
        """
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scale = 1.0
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                scale = 1.0 / math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def _rotary(self, device: torch.device, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rope
        if cos.device != device:
            self._rope = cos, sin = cos.to(device), sin.to(device)
        return cos[:t], sin[:t]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self._rotary(idx.device, t)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``embedding`` (embed_tokens + lm_head) and ``blocks``."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("embed_tokens", "lm_head"))
    )
    return {"total": total, "embedding": embedding, "blocks": total - embedding}
