"""Run files: the JSON, JSON Lines and checkpoint files a run leaves in its output directory.

- `JsonLines`: the append-only metrics log, one JSON object per line, flushed per line, so a
  killed run leaves every finished line readable; ``offset()`` is saved with a checkpoint and a
  resumed run reopens the file cut back to it, so steps re-run after a kill are not logged twice.
- `write_json` / `read_json_lines`: ``config.json``, ``summary.json`` and reading a log back.
- `prepare_out_dir`: refuse to overwrite a finished run unless told to resume or overwrite.
- `save_atomic`, `rng_state` / `set_rng_state`: a checkpoint that is never half-written, with
  the random streams a resumed run needs to draw what the uninterrupted one would have.
- `emit`: a benchmark's table on stdout and its report as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch


class JsonLines:
    """Append-only JSON Lines writer, flushed per line.

    ``offset``: cut the existing file back to this byte offset first (a checkpoint's
    `offset`); ``fresh``: start an empty file, replacing any there.
    """

    def __init__(self, path: str | Path, offset: int | None = None, *, fresh: bool = False) -> None:
        if offset is not None:
            with open(path, "r+b") as f:
                f.truncate(offset)
        self.file = open(path, "w" if fresh else "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def offset(self) -> int:
        """Bytes written so far: where a resumed run continues."""
        return self.file.tell()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON Lines file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON with a final newline (``config.json``, ``summary.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def emit(report: dict[str, Any], table: str, path: Path | None) -> None:
    """Print a benchmark's table and, when ``path`` is given, write its report there as JSON."""
    print(table)
    if path is not None:
        write_json(path, report)


def prepare_out_dir(
    out: str | Path, products: Iterable[str], *, checkpoint: str, resume: bool, overwrite: bool
) -> bool:
    """Create or check the run directory ``out``; True when ``checkpoint`` will be resumed.

    With ``resume`` and a checkpoint, nothing is touched. Otherwise any of ``products`` already
    there is a ``FileExistsError`` unless ``resume`` (no checkpoint yet: start afresh) or
    ``overwrite``, and is deleted.
    """
    out = Path(out)
    if resume and (out / checkpoint).is_file():
        return True
    existing = [name for name in products if (out / name).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --overwrite to replace it"
        )
    for name in existing:
        (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return False


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a kill leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's CPU generator state, and the device's on CUDA."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
