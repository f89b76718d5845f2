"""Gradient-spectrum analysis for low-rank training: log, measure, plot.

- ``SpectrumLogger(model, path, every=50, optimizer=opt)``: call ``logger.record(step)`` after
  ``loss.backward()``; it appends each tracked weight's gradient spectrum and ranks to a
  crash-tolerant JSON Lines log.
- ``load_log(path)``: the log as arrays per layer and per quantity (``SpectrumLog``).
- ``metrics``: ``stable_rank``, ``effective_rank``, ``energy_rank`` of a spectrum or a matrix.
- ``analysis.plots``: matplotlib figures; the ``adarank-spectrum`` command line wraps them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adarank.analysis import metrics
from adarank.analysis.io import LogError, SpectrumLog, load_log

if TYPE_CHECKING:
    from adarank.analysis.hooks import SpectrumLogger

__all__ = ["LogError", "SpectrumLog", "SpectrumLogger", "load_log", "metrics"]


def __getattr__(name: str) -> Any:
    # The logger needs torch; reading and plotting logs does not, so the command line's
    # summary/plot/compare start without importing it.
    if name == "SpectrumLogger":
        from adarank.analysis.hooks import SpectrumLogger

        return SpectrumLogger
    raise AttributeError(f"module 'adarank.analysis' has no attribute {name!r}")
