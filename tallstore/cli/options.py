"""Parsing of repeated ``NAME=VALUE`` options shared by several commands."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from ..errors import TallstoreError
from ..packing.lam import DEFAULT_GRID
from ..packing.options import DEFAULT_LAM

ArchiveBase = Annotated[Optional[str], typer.Option("--base", help="Base checkpoint, if not embedded or moved.")]
Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it is a tallstore archive, or a file or folder tallstore wrote.")]
MaxShardGB = Annotated[Optional[float], typer.Option(
    "--max-shard-gb",
    help="Folder output: reshard the weights into transformers-style files of at most this many GB "
         "(by default a task keeps the layout it was packed from; a merged model gets 5 GB shards).",
)]


def shard_bytes(gb: float | None) -> int | None:
    """``--max-shard-gb`` in bytes, checked (``None``: keep the recorded layout)."""
    if gb is None:
        return None
    if not gb > 0:
        raise UsageError(f"--max-shard-gb must be a positive number, got {gb}")
    return max(1, int(gb * 1e9))
StorageOptions = Annotated[
    Optional[list[str]], typer.Option("--storage-option", help="fsspec option key=value for URLs; repeatable.")
]
AsJSON = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


class UsageError(TallstoreError):
    """A command-line option has the wrong form."""


def pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` → ``{"a": "1", "b": "2"}``; duplicates and missing ``=`` are errors."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise UsageError(f"{what} must look like NAME=VALUE, got {v!r}")
        if name in out:
            raise UsageError(f"{what} {name!r} given twice")
        out[name] = value
    return out


def storage_options(values: list[str] | None) -> dict[str, Any] | None:
    """``--storage-option key=value`` pairs for fsspec (JSON-ish scalars are converted)."""
    raw = pairs(values, "--storage-option")
    if not raw:
        return None
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def lams(values: list[str] | None, names: list[str]) -> dict[str, float]:
    """λ per task from ``--lam 0.3`` (every task) and/or ``--lam NAME=0.5`` (one task)."""
    plain = [v for v in values or [] if "=" not in v]
    per = pairs([v for v in values or [] if "=" in v], "--lam")
    if len(plain) > 1:
        raise UsageError("give --lam VALUE once, or --lam NAME=VALUE per task")
    unknown = set(per) - set(names)
    if unknown:
        raise UsageError(f"--lam names unknown task {sorted(unknown)[0]!r}")
    default = _number(plain[0]) if plain else DEFAULT_LAM
    return {n: _number(per[n]) if n in per else default for n in names}


def grid(value: str | None) -> tuple[float, ...]:
    """``--lam-grid 0.2,0.3,0.4`` as floats (the default grid when not given)."""
    if value is None:
        return DEFAULT_GRID
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"--lam-grid expects comma-separated numbers, got {value!r}") from None


def _number(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise UsageError(f"--lam expects a number, got {v!r}") from None
