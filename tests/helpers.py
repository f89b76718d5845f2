"""Shared builders for the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


def low_rank_plus_noise(m: int, n: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
    return A + noise * torch.randn(m, n, generator=gen)


class TinyNet(nn.Module):
    """Two linear layers with biases and a norm: matrix and non-matrix parameters."""

    def __init__(
        self, d_in: int = 12, d_hidden: int = 24, d_out: int = 6, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, dtype=dtype)
        self.norm = nn.LayerNorm(d_hidden, dtype=dtype)
        self.down = nn.Linear(d_hidden, d_out, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.norm(self.up(x))))


def batch(step: int, d_in: int = 12, d_out: int = 6, n: int = 32, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randn(n, d_out, generator=gen)
    return x.to(dtype), y.to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, dtype=torch.float32) -> list:
    losses = []
    for step in steps:
        x, y = batch(step, dtype=dtype)
        loss = (model(x) - y).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def grad_bytes_alive(params) -> int:
    """Bytes of the parameters' live ``.grad`` tensors; a layer-wise ``ConsumedGrad`` marker
    has no storage (checked in test_layerwise) and counts 0."""
    from adarank.layerwise import ConsumedGrad

    return sum(
        p.grad.numel() * p.grad.element_size()
        for p in params
        if p.grad is not None and not isinstance(p.grad, ConsumedGrad)
    )
