"""Safetensors checkpoints (one file or several shards), validated and read lazily by row ranges.

Headers are parsed and checked here before ``safe_open`` maps the file, so a truncated or lying
file is a one-line :class:`CheckpointError`, not a panic from deep inside the Rust reader.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import dtypes
from ..errors import CheckpointError
from .reader import Checkpoint, TensorInfo

MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The validated JSON header of a safetensors file (keys in file order) and where its data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, str(path))
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return parse_header(raw, size, str(path)), 8 + n


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
        self._offsets: dict[str, int] = {}
        self.keys = []
        for i, p in enumerate(paths):
            header, data_start = read_header(p)
            for key, entry in header.items():
                if key == "__metadata__" or (only is not None and only.get(key) != p.name):
                    continue
                if key in self._infos:
                    raise CheckpointError(f"{self.path}: tensor {key!r} appears in two files")
                d = dtypes.from_safetensors(entry["dtype"])
                self._infos[key] = TensorInfo(d, tuple(entry["shape"]))
                self._where[key] = i
                self._offsets[key] = data_start + entry["data_offsets"][0]
                self.keys.append(key)
        self._handles: list[Any] = [None] * len(paths)
        self._maps: list[mmap.mmap | None] = [None] * len(paths)

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

    def read_bytes(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        """Rows ``[start, stop)`` of ``key`` as stored, sliced from a memory map: no tensor built."""
        info = self._infos[key]
        row = info.row_numel * info.dtype.itemsize
        if not info.shape:  # a scalar is read whole, like ``read``
            start, stop = 0, 1
        stop = info.rows if stop is None else min(stop, info.rows)
        n = max(0, stop - start) * row
        i = self._where[key]
        if self._maps[i] is None:
            try:
                with open(self._paths[i], "rb") as f:
                    self._maps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self._paths[i]}: cannot read ({e})") from None
        at = self._offsets[key] + start * row
        got = self._maps[i][at : at + n]
        if len(got) != n:
            raise CheckpointError(f"{self._paths[i]}: tensor {key!r} is truncated")
        return got

    @property
    def files(self) -> list[Path]:
        return list(self._paths)

    def close(self) -> None:
        self._handles = [None] * len(self._paths)
        for m in self._maps:
            if m is not None:
                m.close()
        self._maps = [None] * len(self._paths)
