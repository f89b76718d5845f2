"""The spectrum log: one JSON Lines file, a header line first, then one record per logged step.

Format (version 1)::

    {"kind": "header", "format": "adarank-spectrum", "version": 1, "model": ..., "layers": [...],
     "optimizer": {...}, "settings": {...}, "versions": {...}, "created": ...}
    {"kind": "record", "step": 0, "time": 0.8, "loss": 4.6,
     "layers": {"blocks.0.attn.q_proj.weight": {"sv": [...], "fro_norm": 1.2, ...}, ...}}
    ...

Arrays are JSON lists, a missing or non-finite value is ``null``. Each line is written whole,
flushed and fsync'ed, so a crash loses at most the line being written; :func:`load_log` skips
such a torn last line with a warning and keeps everything before it. A run resumed into the same
file writes a ``{"kind": "resume"}`` line; records after it replace those of the same or later
steps from before (the steps re-run after restoring a checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from adarank.analysis.layer_types import layer_type

__all__ = ["FORMAT", "VERSION", "LogError", "LogWriter", "SpectrumLog", "load_log"]

FORMAT = "adarank-spectrum"
VERSION = 1
_SIGNIFICANT_DIGITS = 7  # float32 precision; keeps the log about half the size of repr()


class LogError(ValueError):
    """A spectrum log that is missing, empty, or not readable as one."""


def to_json_safe(value: Any) -> Any:
    """Plain JSON types from numbers, numpy/torch scalars and arrays, tuples and mappings.

    Non-finite floats become None (strict JSON has no NaN); floats keep 7 significant digits;
    anything else unknown becomes its ``repr`` so a header never fails to serialise.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return float(f"{value:.{_SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(item) for item in value]
    return repr(value)


class LogWriter:
    """Append-only writer of a spectrum log.

    Args:
        path: the ``.jsonl`` file; its parent directory is created.
        header: the run description (JSON-safe after :func:`to_json_safe`); written as line 1.
        resume: append to an existing log of the same format instead of starting afresh. A torn
            last line left by a crash is cut off first so the new lines stay parseable.
    """

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any], *, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a torn last line is expected: it is cut next
                load_log(self.path)  # refuses a file that is not a spectrum log
            _cut_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            self.append({"kind": "resume", "created": header.get("created")})
        else:
            self._file = open(self.path, "w", encoding="utf-8")
            self.append({"kind": "header", "format": FORMAT, "version": VERSION, **header})

    def append(self, line: Mapping[str, Any]) -> None:
        """Write one JSON object as one line, then flush and fsync so it survives a crash."""
        text = json.dumps(to_json_safe(line), separators=(",", ":"), allow_nan=False)
        self._file.write(text + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """End the file with a newline: keep a whole last record that lacks one, cut a torn one."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:].decode("utf-8"))
    except ValueError:
        with open(path, "r+b") as f:
            f.truncate(start)
    else:
        with open(path, "ab") as f:
            f.write(b"\n")


@dataclass
class SpectrumLog:
    """A loaded spectrum log, as arrays.

    Attributes:
        path: where it was read from.
        header: the header line as a dict (model, layers, optimizer, settings, versions).
        steps: (R,) int64, the logged steps in order.
        layers: ``layers[name][quantity]`` is a float64 array: (R,) for a number per step, e.g.
            ``"stable_rank"``, ``"energy_rank_0.99"``, ``"optimizer_rank"``; (R, K) for a list
            per step (``"sv"``, the top singular values), padded with NaN. A value not recorded
            at a step (including an energy rank beyond the singular values computed) is NaN.
        scalars: per-step numbers outside the layers, (R,) each: ``"time"``, ``"loss"``,
            ``"record_seconds"``, ``"state_bytes.total"``, ...
    """

    path: str
    header: dict[str, Any]
    steps: np.ndarray
    layers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def quantities(self) -> list[str]:
        """Every per-layer quantity present in at least one layer, in first-seen order."""
        seen: dict[str, None] = {}
        for quantities in self.layers.values():
            seen.update(dict.fromkeys(quantities))
        return list(seen)

    def layer_type(self, name: str) -> str:
        """The layer's role (q, k, v, o, gate, up, down, ...), as logged or recognised anew."""
        return self._logged_types.get(name) or layer_type(name)

    @cached_property
    def _logged_types(self) -> dict[str, str]:
        layers = self.header.get("layers", [])
        return {layer["name"]: str(layer["type"]) for layer in layers if layer.get("type")}

    def stack(self, quantity: str, layers: Iterable[str] | None = None) -> np.ndarray:
        """(L, R) array of a per-step ``quantity`` for ``layers`` (default all), NaN if absent."""
        names = list(self.layers) if layers is None else list(layers)
        rows = [self.layers[name].get(quantity, np.full(len(self.steps), np.nan)) for name in names]
        if not rows:
            return np.zeros((0, len(self.steps)))
        if any(row.ndim != 1 for row in rows):
            raise ValueError(f"{quantity!r} is not a number per step")
        return np.stack(rows)

    @property
    def label(self) -> str:
        """A short run label: the header's run name, else the optimizer class, else the file."""
        name = self.header.get("run_name") or (self.header.get("optimizer") or {}).get("class")
        return str(name) if name else Path(self.path).stem


def load_log(path: str | os.PathLike) -> SpectrumLog:
    """Read a spectrum log into arrays per layer and per quantity.

    A torn last line (a crash mid-write) is skipped with a ``UserWarning``; every record before it
    is kept. Raises :class:`LogError` for a missing or empty file, a file whose first line is not
    a spectrum-log header, or an unreadable line before the last.
    """
    path = Path(path)
    if not path.exists():
        raise LogError(f"{path}: no such file")
    if path.is_dir():
        raise LogError(f"{path}: is a directory, not a spectrum log")
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise LogError(f"{path}: cannot read ({error.strerror})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise LogError(f"{path}: empty file, not a spectrum log")

    entries: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if number == len(lines) and number > 1:
                warnings.warn(
                    f"{path}: skipped a torn last line (line {number}), probably a crash mid-write",
                    stacklevel=2,
                )
                break
            raise LogError(f"{path}: line {number} is not valid JSON; corrupt log") from None
        entries.append(entry)

    header = entries[0]
    if header.get("kind") != "header" or header.get("format") != FORMAT:
        raise LogError(f"{path}: first line is not an {FORMAT} header; not a spectrum log")
    layers = header.get("layers", [])
    if not isinstance(layers, list) or not all(
        isinstance(layer, dict) and isinstance(layer.get("name"), str) for layer in layers
    ):
        raise LogError(f"{path}: the header's layer list is malformed")
    if not isinstance(header.get("version"), int):
        raise LogError(f"{path}: the header has no format version")
    if header["version"] > VERSION:
        raise LogError(f"{path}: log format version {header['version']} is newer than this reader")
    _check_header(path, header)

    records: list[dict[str, Any]] = []
    for entry in entries[1:]:
        if entry.get("kind") != "record":
            continue  # resume markers and kinds added later
        layers = entry.get("layers")
        if (
            not isinstance(entry.get("step"), int)
            or not isinstance(layers, dict)
            or not all(isinstance(values, dict) for values in layers.values())
        ):
            raise LogError(f"{path}: a record at step {entry.get('step')!r} is malformed")
        # A resumed run re-logs the steps after its checkpoint: the later records win.
        while records and records[-1]["step"] >= entry["step"]:
            records.pop()
        records.append(entry)
    return _to_arrays(str(path), header, records)


def _check_header(path: Path, header: dict[str, Any]) -> None:
    """Refuse, as ``LogError``, header fields of the wrong JSON type that readers index into.

    Every field is optional (None or absent), but one that is present must have the type the
    writer gives it: ``model``/``optimizer``/``settings``/``meta`` objects whose ``class`` is a
    string, ``run_name`` a string, and per layer a string ``type``, a list of integers
    ``shape`` and a pair of non-negative integers ``matrix_shape``.
    """

    def fail(field: str, expected: str, value: Any) -> None:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise LogError(f"{path}: malformed header: {field} should be {expected}, got {shown}")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for key in ("model", "optimizer", "settings", "meta"):
        value = header.get(key)
        if value is not None and not isinstance(value, dict):
            fail(f"'{key}'", "an object or null", value)
        if key in ("model", "optimizer") and value is not None:
            if value.get("class") is not None and not isinstance(value["class"], str):
                fail(f"'{key}.class'", "a string", value["class"])
    if header.get("run_name") is not None and not isinstance(header["run_name"], str):
        fail("'run_name'", "a string or null", header["run_name"])
    for layer in header.get("layers", []):
        name = layer["name"]
        kind = layer.get("type")
        if kind is not None and not isinstance(kind, str):
            fail(f"the type of layer {name!r}", "a string", kind)
        shape = layer.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(map(count, shape))):
            fail(f"the shape of layer {name!r}", "a list of non-negative integers", shape)
        matrix = layer.get("matrix_shape")
        if matrix is not None and not (
            isinstance(matrix, list) and len(matrix) == 2 and all(map(count, matrix))
        ):
            fail(f"the matrix_shape of layer {name!r}", "a pair of non-negative integers", matrix)


def _to_arrays(path: str, header: dict[str, Any], records: list[dict[str, Any]]) -> SpectrumLog:
    steps = np.array([record["step"] for record in records], dtype=np.int64)
    n = len(records)
    names = [layer["name"] for layer in header.get("layers", [])]
    for record in records:
        names.extend(name for name in record["layers"] if name not in names)

    per_layer: dict[str, dict[str, list[Any]]] = {name: {} for name in dict.fromkeys(names)}
    for i, record in enumerate(records):
        for name, values in record["layers"].items():
            columns = per_layer[name]
            for quantity, value in values.items():
                if _is_number_or_list(value):
                    columns.setdefault(quantity, [None] * n)[i] = value
    layers = {
        name: {quantity: _column(column) for quantity, column in columns.items()}
        for name, columns in per_layer.items()
    }

    scalar_columns: dict[str, list[Any]] = {}
    for i, record in enumerate(records):
        for key, value in _flatten(record).items():
            scalar_columns.setdefault(key, [None] * n)[i] = value
    scalars = {key: _column(column) for key, column in scalar_columns.items()}
    return SpectrumLog(path=path, header=header, steps=steps, layers=layers, scalars=scalars)


def _flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's numbers outside ``layers``/``step``/``kind``, nested keys joined by '.'."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("kind", "step", "layers"):
            continue
        if isinstance(value, Mapping):
            for inner, item in value.items():
                if _is_number(item):
                    flat[f"{key}.{inner}"] = item
        elif _is_number(value):
            flat[key] = value
    return flat


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_number_or_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_number(item) for item in value)
    return _is_number(value) or isinstance(value, bool)


def _column(values: list[Any]) -> np.ndarray:
    """Numbers -> (R,) float64; lists -> (R, K) float64 padded with NaN; None -> NaN."""
    if any(isinstance(value, list) for value in values):
        width = max((len(value) for value in values if isinstance(value, list)), default=0)
        out = np.full((len(values), width), np.nan)
        for i, value in enumerate(values):
            if isinstance(value, list):
                out[i, : len(value)] = [np.nan if item is None else item for item in value]
        return out
    return np.array([np.nan if value is None else float(value) for value in values])
