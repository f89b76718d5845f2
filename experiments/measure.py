"""Timing and memory: device synchronisation, timers, optimizer-state bytes, peak memory.

Every script measures the same way:

- `sync` before and after a timed block on CUDA (kernels are asynchronous); `timed` returns
  wall and process-CPU seconds of a call; `StepClock` times calls inside a loop without
  synchronising it (CUDA events).
- `state_bytes`: ``optimizer.state_bytes()`` where the optimizer has one (adarank's), else the
  tensors of ``optimizer.state`` (torch's AdamW, the reference GaLore package, whose projectors
  live in a Python object) counted by the same kinds.
- Peak memory: `peak_cuda_bytes` (``torch.cuda.max_memory_allocated`` since `reset_peak`;
  ``None`` off CUDA), `peak_rss_bytes` (the process's maximum resident set size, Python and the
  torch libraries included, so it compares runs only by differences), and `peak_memory_bytes`,
  the first on CUDA and the second elsewhere.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
PROJECTOR_KEYS = ("proj_left", "proj_right")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``fn()``, device work
    included."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


class StepClock:
    """Times calls inside a loop without synchronising it: CUDA events on the GPU, resolved
    when `seconds` is read; ``time.perf_counter`` on the CPU, where work is synchronous."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: list[float] = []

    def time(self, fn: Callable[[], Any]) -> None:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self._seconds.append(time.perf_counter() - t0)

    def seconds(self) -> list[float]:
        """The duration of every timed call, in order."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) / 1e3 for s, e in self._events]
        return list(self._seconds)


def state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for every tensor of ``optimizer.state``; the reference GaLore
    package's projector matrices (a ``projector`` object's ``ortho_matrix``) as
    ``proj_left``."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield key, value
            elif key == "projector":
                ortho = value.ortho_matrix
                for t in ortho if isinstance(ortho, (list, tuple)) else [ortho]:
                    if t is not None:
                        yield "proj_left", t


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state: ``total`` and by kind, ``moments``, ``projectors``, ``other``.

    ``optimizer.state_bytes()`` when the optimizer has one; otherwise its state tensors, by
    key (`MOMENT_KEYS`, `PROJECTOR_KEYS`), as adarank counts its own.
    """
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        return dict(own())
    out = {"moments": 0, "projectors": 0, "other": 0}
    for key, t in state_tensors(optimizer):
        kind = (
            "moments"
            if key in MOMENT_KEYS
            else "projectors"
            if key.startswith(PROJECTOR_KEYS)
            else "other"
        )
        out[kind] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out


def reset_peak(device: torch.device) -> None:
    """Start a new `peak_cuda_bytes` window (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_cuda_bytes(device: torch.device) -> int | None:
    """Peak allocated CUDA memory since the last `reset_peak`; ``None`` off CUDA."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def peak_rss_bytes() -> int:
    """Maximum resident set size of this process so far, in bytes."""
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def peak_memory_bytes(device: torch.device) -> int:
    """`peak_cuda_bytes` on CUDA, `peak_rss_bytes` elsewhere."""
    peak = peak_cuda_bytes(device)
    return peak_rss_bytes() if peak is None else peak
