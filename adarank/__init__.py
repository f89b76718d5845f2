"""adarank: memory-efficient training by low-rank gradient projection with adaptive rank.

Public API:

- ``AdaRankAdamW``: AdamW on gradients projected onto a per-layer subspace whose
  rank follows an energy threshold, refreshed by randomized SVD and tracked online.
- ``GaLoreAdamW``: the published GaLore (fixed rank, exact SVD, reference semantics).
- ``QGaLoreAdamW``: Q-GaLore (INT4 projectors, lazy refresh, INT8 weights).
- ``param_groups(model, target_modules=...)``: low-rank groups of the linear weights
  (heads, poolers, embeddings left out) and plain AdamW groups.
- ``quantize_linears(model)``: INT8 linear layers (``Int8Linear``) for Q-GaLore.
- ``layerwise(model, factory)``: step each parameter in its gradient hook.
- ``randomized_svd`` (and ``randomized_svd_batched``), ``energy_rank``: the
  numerical building blocks.
"""

from __future__ import annotations

from .groups import param_groups
from .layerwise import LayerwiseOptimizer, layerwise
from .optimizer import LOWRANK_DEFAULTS, AdaRankAdamW, GaLoreAdamW, QGaLoreAdamW
from .quant import Int8Linear, quantize_linears
from .rank import energy_rank
from .rsvd import randomized_svd, randomized_svd_batched, truncated_svd

__version__ = "0.1.0"

__all__ = [
    "LOWRANK_DEFAULTS",
    "AdaRankAdamW",
    "GaLoreAdamW",
    "Int8Linear",
    "LayerwiseOptimizer",
    "QGaLoreAdamW",
    "energy_rank",
    "layerwise",
    "param_groups",
    "quantize_linears",
    "randomized_svd",
    "randomized_svd_batched",
    "truncated_svd",
]
