"""Safetensors checkpoints (one file or several shards), validated and read lazily by row ranges.

Headers are parsed and checked here before ``safe_open`` maps the file, so a truncated or lying
file is a one-line :class:`CheckpointError`, not a panic from deep inside the Rust reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import dtypes
from ..errors import CheckpointError
from .reader import Checkpoint, TensorInfo

MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, Any]:
    """The validated JSON header of a safetensors file, keys in file order."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, str(path))
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return parse_header(raw, size, str(path))


def header_length(head: bytes, size: int, where: str) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file size."""
    if len(head) < 8:
        raise CheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{where}: safetensors header length {n} exceeds the file")
    return int(n)


def parse_header(raw: bytes, size: int, where: str) -> dict[str, Any]:
    """The header JSON ``raw`` of a ``size``-byte file, every tensor entry checked to fit in it."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    data_size = size - 8 - len(raw)
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        _check_entry(where, key, entry, data_size)
    return header


def _check_entry(path: str, key: str, entry: Any, data_size: int) -> None:
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(type(s) is int and 0 <= s < 1 << 63 for s in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(isinstance(o, int) for o in entry["data_offsets"])
    )
    if not ok:
        raise CheckpointError(f"{path}: malformed header entry for tensor {key!r}")
    try:
        d = dtypes.from_safetensors(entry["dtype"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: tensor {key!r}: {e}") from None
    begin, end = entry["data_offsets"]
    numel = 1
    for s in entry["shape"]:
        numel *= s
    if not 0 <= begin <= end <= data_size or end - begin != numel * d.itemsize:
        raise CheckpointError(f"{path}: tensor {key!r} lies outside the file (truncated?)")


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files read through memory-mapped ``safe_open``."""

    def __init__(self, paths: list[Path], only: dict[str, str] | None = None) -> None:
        self.path = str(paths[0] if len(paths) == 1 else paths[0].parent)
        self._paths = paths
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, int] = {}
        self.keys = []
        for i, p in enumerate(paths):
            for key, entry in read_header(p).items():
                if key == "__metadata__" or (only is not None and only.get(key) != p.name):
                    continue
                if key in self._infos:
                    raise CheckpointError(f"{self.path}: tensor {key!r} appears in two files")
                d = dtypes.from_safetensors(entry["dtype"])
                self._infos[key] = TensorInfo(d, tuple(entry["shape"]))
                self._where[key] = i
                self.keys.append(key)
        self._handles: list[Any] = [None] * len(paths)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def _handle(self, i: int) -> Any:
        h = self._handles[i]
        if h is None:
            try:
                h = self._handles[i] = safe_open(str(self._paths[i]), framework="pt")
            except Exception as e:  # the Rust reader's own errors: one line for the user
                raise CheckpointError(f"{self._paths[i]}: cannot open safetensors ({e})") from None
        return h

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        info = self._infos[key]
        h = self._handle(self._where[key])
        if not info.shape:
            return h.get_tensor(key)
        if start == 0 and (stop is None or stop >= info.shape[0]):
            return h.get_tensor(key)
        return h.get_slice(key)[start:stop]

    @property
    def files(self) -> list[Path]:
        return list(self._paths)

    def close(self) -> None:
        self._handles = [None] * len(self._paths)
