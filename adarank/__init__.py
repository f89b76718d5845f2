"""adarank: memory-efficient training by low-rank gradient projection with adaptive rank.

Public API:

- ``AdaRankAdamW``: AdamW on gradients projected onto a per-layer subspace whose
  rank follows an energy threshold, refreshed by randomized SVD and tracked online.
- ``GaLoreAdamW``: the published GaLore (fixed rank, exact SVD, reference semantics).
- ``param_groups(model)``: a low-rank group of linear weights and a plain group.
- ``randomized_svd``, ``energy_rank``: the numerical building blocks.
"""

from __future__ import annotations

from .groups import param_groups
from .optimizer import LOWRANK_DEFAULTS, AdaRankAdamW, GaLoreAdamW
from .rank import energy_rank
from .rsvd import randomized_svd, truncated_svd

__version__ = "0.1.0"

__all__ = [
    "LOWRANK_DEFAULTS",
    "AdaRankAdamW",
    "GaLoreAdamW",
    "energy_rank",
    "param_groups",
    "randomized_svd",
    "truncated_svd",
]
