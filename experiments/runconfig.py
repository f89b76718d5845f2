"""Run configuration: a dataclass of settings is the command line, the ``--config`` file and the
resolved ``config.json`` at once.

A script declares its settings as a dataclass whose fields carry ``metadata={"help": ...}``
(`option` writes that). `build_parser` turns every field into a flag (``--batch-size`` and
``--batch_size``; booleans as ``--x/--no-x``; an optional field also accepts ``none``);
`parse_values` reads ``--config FILE`` first and lets the flags given override it. Unknown flags
and unknown keys in a file are errors (`check_keys`); defaults the parser does not see stay the
dataclass's, so ``None`` can mean "resolve from the other settings".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def option(help: str, default: Any = None) -> Any:
    """A dataclass field with a default and its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _or_none(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def field_types(cls: type) -> dict[str, Any]:
    """The argparse ``type`` of each field of ``cls``; an optional field also takes ``none``."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
        out[f.name] = _or_none(kinds[0]) if kinds else hints[f.name]
    return out


def build_parser(
    cls: type, *, prog: str, description: str, choices: Mapping[str, Sequence[str]] | None = None
) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` and one flag per field of ``cls``.

    Flags not given are absent from the parsed namespace (``argument_default=SUPPRESS``), so
    a file or the dataclass's default supplies them. ``choices`` restricts named fields.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS
    )
    parser.add_argument("--config", help=f"JSON file of {cls.__name__} fields (flags override it)")
    types = field_types(cls)
    choices = choices or {}
    for f in dataclasses.fields(cls):
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if types[f.name] is bool:
            parser.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(
                *names, dest=f.name, type=types[f.name], help=help_text, choices=choices.get(f.name)
            )
    return parser


def check_keys(cls: type, values: Iterable[str], where: str) -> None:
    """Raise ``ValueError`` naming the first key of ``values`` that is not a field of ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r} in {where}; known: {sorted(known)}")


def read_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``, checked to hold only fields of ``cls``."""
    values = json.loads(Path(path).read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object")
    check_keys(cls, values, str(path))
    return values


def parse_values(
    cls: type,
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The settings named on the command line: ``--config``'s, then the flags given over them."""
    parser = build_parser(cls, prog=prog, description=description, choices=choices)
    given = vars(parser.parse_args(argv))
    config_path = given.pop("config", None)
    values = read_settings(cls, config_path) if config_path is not None else {}
    values.update(given)
    return values


def refuse_changes(
    saved: Mapping[str, Any],
    wanted: Mapping[str, Any],
    *,
    keys: Iterable[str],
    where: str,
    allowed: Iterable[str] = (),
) -> None:
    """Raise ``ValueError`` listing the ``keys`` (but ``allowed``) whose ``wanted`` value differs
    from the ``saved`` one; for resuming a run whose results these settings would change."""
    allowed = set(allowed)
    differ = sorted(k for k in keys if k not in allowed and saved.get(k) != wanted[k])
    if differ:
        raise ValueError(
            f"--resume with settings that differ from {where}: "
            + ", ".join(f"{k}={wanted[k]!r} (saved {saved.get(k)!r})" for k in differ)
        )
