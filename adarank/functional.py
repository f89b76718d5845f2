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
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .projector import project, project_back
from .rows import RowOps

__all__ = [
    "CONVENTIONS",
    "adam_direction",
    "adam_step_",
    "apply_lowrank_update_",
    "apply_update_",
    "LowRankSlot",
    "foreach_adam_directions_",
    "lowrank_adam",
    "lowrank_adam_step_",
    "residual_update",
    "update_moments_",
]

CONVENTIONS = ("torch", "galore")


def update_moments_(
    R: torch.Tensor, M: torch.Tensor, V: torch.Tensor, beta1: float, beta2: float
) -> None:
    """Exponential moving averages in place: ``M ← β₁M + (1−β₁)R``, ``V ← β₂V + (1−β₂)R²``."""
    M.lerp_(R, 1.0 - beta1)
    V.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)


Weight = float | torch.Tensor


def adam_direction(
    M: torch.Tensor, V: torch.Tensor, bc1: Weight, bc2: Weight, eps: float, convention: str
) -> torch.Tensor:
    """Normalised direction ``N`` (the update is ``−lr·N``) from raw moments.

    ``bc1``, ``bc2`` are the accumulated weights of the moving averages: Adam's
    bias corrections ``1 − βᵗ`` (floats), or tensors broadcasting against the
    moments when each compact coordinate has its own history (after a subspace
    change, see ``subspace.transfer_moments``).
    """
    sqrt_bc2 = bc2.sqrt() if isinstance(bc2, torch.Tensor) else math.sqrt(bc2)
    if convention == "galore":
        return M / (V.sqrt() + eps) * (sqrt_bc2 / bc1)
    return M / (V.sqrt() / sqrt_bc2 + eps) / bc1


def apply_update_(
    p: torch.Tensor, delta: torch.Tensor, lr: float, weight_decay: float, convention: str
) -> None:
    """``p ← p − lr·delta`` with decoupled weight decay placed per ``convention``."""
    if convention == "torch" and weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(delta.to(p.dtype).view_as(p), alpha=-lr)
    if convention == "galore" and weight_decay > 0.0:
        p.add_(p, alpha=-lr * weight_decay)


def adam_step_(
    p: torch.Tensor,
    g: torch.Tensor,
    M: torch.Tensor,
    V: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    convention: str,
) -> None:
    """Plain AdamW on a full-size parameter (biases, norms, excluded weights).

    ``M``/``V`` are stored in the parameter's dtype, as ``torch.optim.AdamW`` does
    (so a bf16 model's plain state is no larger than AdamW's); the arithmetic is
    float32 and the moments are written back rounded.
    """
    M32, V32 = M.to(torch.float32), V.to(torch.float32)
    update_moments_(g.to(torch.float32), M32, V32, beta1, beta2)
    N = adam_direction(M32, V32, 1.0 - beta1**step, 1.0 - beta2**step, eps, convention)
    if M32 is not M:
        M.copy_(M32)
        V.copy_(V32)
    apply_update_(p, N, lr, weight_decay, convention)


def _norm(x: torch.Tensor, rows: bool) -> torch.Tensor:
    del rows  # one process holds all of x
    return torch.linalg.vector_norm(x)


# ``norm(x, rows)``: ‖x‖_F of a whole matrix of which this process holds ``x``;
# ``rows`` says whether x is split by rows across processes (as G is under
# FSDP2), so its squared norm must be summed over them.
NormFn = Callable[[torch.Tensor, bool], torch.Tensor]


def residual_update(
    G: torch.Tensor,
    R: torch.Tensor,
    N: torch.Tensor,
    P: torch.Tensor | None,
    Q: torch.Tensor | None,
    previous_norm: torch.Tensor,
    limit: float,
    norm: NormFn | None = None,
) -> torch.Tensor:
    """The part of ``G`` outside the subspace, scaled like Adam scaled ``R`` (DESIGN §3.7).

    ``G − back(R)`` is multiplied by ``φ = ‖N‖_F / ‖R‖_F``, the factor by which
    Adam rescaled the compact gradient (Fira, arXiv 2410.01623, §4.1, with one
    factor per matrix), and its norm may grow by at most ``limit`` per step
    (Fira's norm-growth limiter, §4.2): when ``‖S_t‖ > limit·‖S_{t−1}‖`` it is
    rescaled to ``limit·‖S_{t−1}‖``. ``previous_norm`` (0-d, 0 before the first
    step) is updated in place. No host synchronisation.

    ``norm`` (default: ``torch.linalg.vector_norm``, one process) computes the
    three norms; under row sharding it must sum over the ranks those of S and,
    on the right side (R = GQ has G's rows), of N and R, so that φ and the
    limiter agree on every rank (``distributed.ShardContext.norm``).
    """
    norm = norm or _norm
    tiny = torch.finfo(torch.float32).tiny
    compact_rows = P is None
    phi = norm(N, compact_rows) / norm(R, compact_rows).clamp_min(tiny)
    S = (G - project_back(R, P, Q)) * phi
    s_norm = norm(S, True)
    ceiling = limit * previous_norm
    shrink = torch.where(
        (previous_norm > 0) & (s_norm > ceiling),
        ceiling / s_norm.clamp_min(tiny),
        torch.ones_like(s_norm),
    )
    previous_norm.copy_(s_norm * shrink)
    return S.mul_(shrink)


def lowrank_adam_step_(
    p: torch.Tensor,
    G: torch.Tensor | None,
    P: torch.Tensor | None,
    Q: torch.Tensor | None,
    M: torch.Tensor,
    V: torch.Tensor,
    bc1: torch.Tensor,
    bc2: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    convention: str,
    residual_norm: torch.Tensor | None = None,
    residual_limit: float = 1.01,
    R: torch.Tensor | None = None,
    norm: NormFn | None = None,
) -> torch.Tensor:
    """Adam in the compact space (DESIGN §3.6) and the back-projected update.

    ``G`` is the float32 gradient as an m×n matrix, ``P`` (m×r) / ``Q`` (n×r) the
    projectors, ``M``/``V`` the compact moments and ``bc1``/``bc2`` their
    per-coordinate accumulated weights (all updated in place). With
    ``residual_norm`` given, the gradient outside the subspace is applied too
    (``residual_update``). The update is ``−lr·α·(back(N) [+ S])``. Returns the
    compact gradient ``R`` so callers can measure what the subspace captured.

    ``R`` may be given precomputed: under row sharding ``PᵀG`` from the local
    rows is a partial sum that must be all-reduced first
    (``distributed.sharded_project``), and a gradient accumulated in the compact
    space has no ``G`` at all (None; not with the residual path); ``norm`` goes to
    ``residual_update``.
    """
    if R is None:
        if G is None:
            raise ValueError("lowrank_adam_step_: give the gradient G or its projection R")
        R = project(G, P, Q)
    update_moments_(R, M, V, beta1, beta2)
    bc1.mul_(beta1).add_(1.0 - beta1)
    bc2.mul_(beta2).add_(1.0 - beta2)
    N = adam_direction(M, V, bc1, bc2, eps, convention)
    full = project_back(N, P, Q)
    if residual_norm is not None:
        if G is None:
            raise ValueError("lowrank_adam_step_: the residual path needs the gradient G")
        full += residual_update(G, R, N, P, Q, residual_norm, residual_limit, norm)
    apply_update_(p, full.mul_(scale), lr, weight_decay, convention)
    return R


def foreach_adam_directions_(
    Rs: list[torch.Tensor],
    Ms: list[torch.Tensor],
    Vs: list[torch.Tensor],
    B1s: list[torch.Tensor],
    B2s: list[torch.Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    convention: str,
) -> list[torch.Tensor]:
    """The compact half of ``lowrank_adam_step_`` for many matrices in ``torch._foreach_*``
    kernels: update the moments ``Ms``/``Vs`` and their per-coordinate weights
    ``B1s``/``B2s`` in place from the compact gradients ``Rs``, and return the
    directions ``N`` (``adam_direction``). Same operations in the same order as
    the one-matrix functions, so results agree to the last bit on the CPU.
    """
    torch._foreach_lerp_(Ms, Rs, 1.0 - beta1)
    torch._foreach_mul_(Vs, beta2)
    torch._foreach_addcmul_(Vs, Rs, Rs, value=1.0 - beta2)
    for weights, beta in ((B1s, beta1), (B2s, beta2)):
        torch._foreach_mul_(weights, beta)
        torch._foreach_add_(weights, 1.0 - beta)
    denominators = torch._foreach_sqrt(Vs)
    sqrt_b2 = torch._foreach_sqrt(B2s)
    if convention == "galore":
        torch._foreach_add_(denominators, eps)
        Ns = list(torch._foreach_div(Ms, denominators))
        torch._foreach_mul_(Ns, torch._foreach_div(sqrt_b2, B1s))
        return Ns
    torch._foreach_div_(denominators, sqrt_b2)
    torch._foreach_add_(denominators, eps)
    Ns = list(torch._foreach_div(Ms, denominators))
    torch._foreach_div_(Ns, B1s)
    return Ns


def apply_lowrank_update_(
    p: torch.Tensor,
    N: torch.Tensor,
    P: torch.Tensor | None,
    Q: torch.Tensor | None,
    *,
    lr: float,
    weight_decay: float,
    scale: float,
    convention: str,
) -> None:
    """``p ← p − lr·α·back(N)`` with decoupled decay as ``apply_update_``, in one GEMM.

    ``back(N)`` (``P N``, ``N Qᵀ``, ``P N Qᵀ``) is never materialised at full
    size: ``addmm_`` scales ``p`` by the decay and adds the product in place,
    so the weight is read and written once, where ``apply_update_`` makes five
    full-size passes. The galore convention decays after the update,
    ``(1 − lr·λ)(W − lr·α·back(N))``, which is the same form. A bf16 weight
    takes bf16 factors (the GEMM accumulates in float32 and rounds once; the
    one-matrix path rounds the float32 update to bf16 before adding it, an
    error of the same size). A non-contiguous ``p`` falls back to ``apply_update_``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not known; choose one of {CONVENTIONS}")
    if P is not None and Q is not None:
        left, right = P @ N, Q.T
    elif P is not None:
        left, right = P, N
    else:
        assert Q is not None, "a projector on at least one side"
        left, right = N, Q.T
    if not p.is_contiguous():
        apply_update_(p, (left @ right).mul_(scale), lr, weight_decay, convention)
        return
    decay = 1.0 - lr * weight_decay
    alpha = -lr * scale * (decay if convention == "galore" else 1.0)
    W = p.view(p.shape[0], -1)
    W.addmm_(left.to(W.dtype), right.to(W.dtype), beta=decay, alpha=alpha)


class LowRankSlot(Protocol):
    """How the low-rank kernels reach one matrix: its float32 gradient, its projectors
    and its weight, each produced on demand, so that what is stored in low precision
    (INT4 projectors, INT8 weights) is expanded one matrix at a time, never all at once."""

    @property
    def ops(self) -> RowOps: ...

    def gradient(self) -> torch.Tensor | None:
        """G, float32 m×n (this rank's rows); None when the step has only a precomputed
        compact gradient (``Rs``), e.g. one accumulated over micro-batches."""
        ...

    def projectors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(P, Q)`` in float32."""
        ...

    def load_weight(self) -> torch.Tensor:
        """The tensor the update is applied to (W's rows, or a float32 INT8 dequantisation)."""
        ...

    def store_weight(self, W: torch.Tensor) -> None:
        """Write back what ``load_weight`` gave, once updated."""
        ...


def lowrank_adam(
    slots: Sequence[LowRankSlot],
    Ms: list[torch.Tensor],
    Vs: list[torch.Tensor],
    B1s: list[torch.Tensor],
    B2s: list[torch.Tensor],
    Rs: Sequence[torch.Tensor | None],
    residual_norms: Sequence[torch.Tensor] | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    convention: str,
    residual_limit: float,
    foreach: bool,
    cache_projectors: bool = True,
) -> list[torch.Tensor]:
    """The compact Adam step of many low-rank matrices (DESIGN §3.6), in one of two kernels.

    ``Ms``/``Vs`` (compact moments) and ``B1s``/``B2s`` (their per-coordinate weights)
    are updated in place, and each weight takes ``−lr·α·(back(N) [+ S])`` with decoupled
    decay. ``Rs``: a precomputed compact gradient per matrix, or None to project here.
    ``residual_norms``: the residual path's norms (``residual_update``), or None.

    ``foreach`` chooses the kernel: ``_multi_tensor_lowrank_adam`` (``torch._foreach_*``
    for the compact math, one GEMM per weight update) or ``_single_tensor_lowrank_adam``
    (one matrix at a time, the row-sharded and the residual path's kernel too). The two
    agree to float rounding. Returns ``‖R‖_F/‖G‖_F`` per matrix (0-d, on the device).
    """
    multi = foreach and residual_norms is None and not any(s.ops.sharded for s in slots)
    kernel = _multi_tensor_lowrank_adam if multi else _single_tensor_lowrank_adam
    return kernel(
        slots,
        Ms,
        Vs,
        B1s,
        B2s,
        Rs,
        residual_norms,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        scale=scale,
        convention=convention,
        residual_limit=residual_limit,
        cache_projectors=cache_projectors,
    )


def _single_tensor_lowrank_adam(
    slots: Sequence[LowRankSlot],
    Ms: list[torch.Tensor],
    Vs: list[torch.Tensor],
    B1s: list[torch.Tensor],
    B2s: list[torch.Tensor],
    Rs: Sequence[torch.Tensor | None],
    residual_norms: Sequence[torch.Tensor] | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    convention: str,
    residual_limit: float,
    cache_projectors: bool,
) -> list[torch.Tensor]:
    del cache_projectors  # each matrix's projectors are used once, right away
    captured = []
    for i, slot in enumerate(slots):
        G = slot.gradient()
        P, Q = slot.projectors()
        R = Rs[i]
        if R is None:
            assert G is not None, "a low-rank step needs G or a precomputed R"
            R = slot.ops.project(G, P, Q)
        W = slot.load_weight()
        lowrank_adam_step_(
            W,
            G,
            P,
            Q,
            Ms[i],
            Vs[i],
            B1s[i],
            B2s[i],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            scale=scale,
            convention=convention,
            residual_norm=None if residual_norms is None else residual_norms[i],
            residual_limit=residual_limit,
            R=R,
            norm=slot.ops.norm,
        )
        slot.store_weight(W)
        captured.append(
            R.new_tensor(math.nan)
            if G is None
            else slot.ops.captured_fraction(R, G, R_rows=P is None)
        )
    return captured


def _multi_tensor_lowrank_adam(
    slots: Sequence[LowRankSlot],
    Ms: list[torch.Tensor],
    Vs: list[torch.Tensor],
    B1s: list[torch.Tensor],
    B2s: list[torch.Tensor],
    Rs: Sequence[torch.Tensor | None],
    residual_norms: Sequence[torch.Tensor] | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    convention: str,
    residual_limit: float,
    cache_projectors: bool,
) -> list[torch.Tensor]:
    del residual_norms, residual_limit  # the residual path takes the single-tensor kernel
    projectors: list[tuple[torch.Tensor | None, torch.Tensor | None] | None] = []
    compact: list[torch.Tensor] = []
    g_norms = []
    for slot, R in zip(slots, Rs, strict=True):
        P, Q = slot.projectors()
        G = slot.gradient()
        # Float32 projectors are the stored tensors; quantised ones are dequantised again
        # below rather than kept, which would hold a float32 copy of all at once.
        projectors.append((P, Q) if cache_projectors else None)
        if R is None:
            assert G is not None, "a low-rank step needs G or a precomputed R"
            R = project(G, P, Q)
        compact.append(R)
        # ‖G‖ is unknown when only R exists: the captured fraction is then nan.
        g_norms.append(R.new_tensor(math.nan) if G is None else torch.linalg.vector_norm(G))
    Ns = foreach_adam_directions_(
        compact, Ms, Vs, B1s, B2s, beta1=beta1, beta2=beta2, eps=eps, convention=convention
    )
    tiny = torch.finfo(torch.float32).tiny
    captured = torch.stack(torch._foreach_norm(compact)) / torch.stack(g_norms).clamp_min(tiny)
    for slot, N, PQ in zip(slots, Ns, projectors, strict=True):
        P, Q = PQ if PQ is not None else slot.projectors()
        W = slot.load_weight()
        apply_lowrank_update_(
            W, N, P, Q, lr=lr, weight_decay=weight_decay, scale=scale, convention=convention
        )
        slot.store_weight(W)
    return list(captured.unbind())
