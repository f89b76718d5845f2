"""The step math as pure functions on tensors (no optimizer state objects).

Two Adam conventions are supported, because comparisons must be fair to both
baselines:

- ``"torch"`` (``torch.optim.AdamW``): decay first, ``W ← W(1 − lr·λ)``, then
  ``W ← W − lr/(1−β₁ᵗ) · M / (√V/√(1−β₂ᵗ) + ε)``.
- ``"galore"`` (the reference GaLore AdamW, arXiv 2403.03507 Algorithm 2):
  ``W ← W − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · α·back(M / (√V + ε))``, then decay on the
  updated weight, ``W ← W − lr·λ·W``.

All arithmetic on moments and projections is float32; the result is cast to
the parameter's dtype only when it is applied.
"""

from __future__ import annotations

import math

import torch

from .projector import project, project_back

__all__ = ["CONVENTIONS", "adam_direction", "apply_update_", "lowrank_adam_step_", "adam_step_"]

CONVENTIONS = ("torch", "galore")


def update_moments_(R: torch.Tensor, M: torch.Tensor, V: torch.Tensor, beta1: float, beta2: float):
    """Exponential moving averages in place: ``M ← β₁M + (1−β₁)R``, ``V ← β₂V + (1−β₂)R²``."""
    M.lerp_(R, 1.0 - beta1)
    V.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)


def adam_direction(
    M: torch.Tensor, V: torch.Tensor, step: int, beta1: float, beta2: float, eps: float,
    convention: str,
) -> tuple[torch.Tensor, float]:
    """Normalised direction ``N`` and the factor multiplying ``lr`` for moment step ``t``.

    ``step`` counts the updates folded into ``M`` and ``V`` (t ≥ 1); the caller
    restarts it when moments are reset, so bias correction stays exact.
    """
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if convention == "galore":
        return M / (V.sqrt() + eps), math.sqrt(bc2) / bc1
    return M / (V.sqrt() / math.sqrt(bc2) + eps), 1.0 / bc1


def apply_update_(
    p: torch.Tensor, delta: torch.Tensor, lr: float, step_factor: float, weight_decay: float,
    convention: str,
) -> None:
    """``p ← p − lr·step_factor·delta`` with decoupled weight decay per ``convention``."""
    if convention == "torch" and weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(delta.to(p.dtype).view_as(p), alpha=-lr * step_factor)
    if convention == "galore" and weight_decay > 0.0:
        p.add_(p, alpha=-lr * weight_decay)


def adam_step_(
    p: torch.Tensor, g: torch.Tensor, M: torch.Tensor, V: torch.Tensor, *, step: int,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, convention: str,
) -> None:
    """Plain AdamW on a full-size parameter (biases, norms, excluded weights)."""
    update_moments_(g.to(torch.float32), M, V, beta1, beta2)
    N, factor = adam_direction(M, V, step, beta1, beta2, eps, convention)
    apply_update_(p, N, lr, factor, weight_decay, convention)


def lowrank_adam_step_(
    p: torch.Tensor, G: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None,
    M: torch.Tensor, V: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, scale: float, convention: str,
) -> torch.Tensor:
    """Adam in the compact space (DESIGN §3.6) and the back-projected update.

    ``G`` is the float32 gradient as an m×n matrix, ``P`` (m×r) / ``Q`` (n×r) the
    projectors, ``M``/``V`` the compact moments (updated in place). Returns the
    compact gradient ``R`` so callers can measure what the subspace captured.
    """
    R = project(G, P, Q)
    update_moments_(R, M, V, beta1, beta2)
    N, factor = adam_direction(M, V, step, beta1, beta2, eps, convention)
    apply_update_(p, project_back(N, P, Q), lr, factor * scale, weight_decay, convention)
    return R
