"""Safetensors checkpoints (one file or several shards), validated and read lazily by row ranges.

One reader for local files and object stores: it reads through :class:`ByteSource` ranges. The
header comes from one read (two for a header over 64 KiB) and is checked against the file size
before any tensor is touched, so a truncated or lying file is a one-line
:class:`CheckpointError`; each row range is one more read.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..dtypes import TensorInfo
from ..errors import CheckpointError
from .interface import Checkpoint, WeightLayout
from .sources import ByteSource

MAX_HEADER = 100 * 1024 * 1024
FIRST_READ = 64 * 1024


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
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{where}: safetensors __metadata__ is not a map of strings")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        _check_entry(where, key, entry, data_size)
    return header


def read_header(src: ByteSource) -> tuple[dict[str, Any], int]:
    """The validated header of a safetensors file (keys in file order) and where its data starts."""
    first = src.read(0, min(src.size, FIRST_READ)).tobytes()
    n = header_length(first, src.size, src.location)
    raw = first[8 : 8 + n]
    if len(raw) < n:
        raw += src.read(len(first), 8 + n - len(first)).tobytes()
    return parse_header(raw, src.size, src.location), 8 + n


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
    """One or more safetensors files; ``only`` (an index's weight map) says which file owns a key."""

    def __init__(
        self, sources: list[ByteSource], path: str, only: dict[str, str] | None = None,
        index_metadata: dict[str, Any] | None = None, folder: bool = False,
    ) -> None:
        self.path = path
        self._sources = sources
        self._index_metadata = index_metadata
        self._folder = folder
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[int, int]] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        self.keys = []
        try:
            for i, src in enumerate(sources):
                header, data_start = read_header(src)
                if "__metadata__" in header:
                    self.metadata[src.name] = header["__metadata__"]
                for key, entry in header.items():
                    if key == "__metadata__" or (only is not None and only.get(key) != src.name):
                        continue
                    if key in self._infos:
                        raise CheckpointError(f"{self.path}: tensor {key!r} appears in two files")
                    self._infos[key] = TensorInfo(dtypes.from_safetensors(entry["dtype"]), tuple(entry["shape"]))
                    self._where[key] = (i, data_start + entry["data_offsets"][0])
                    self.keys.append(key)
        except BaseException:
            self.close()
            raise

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def _span(self, key: str, start: int, stop: int | None) -> tuple[int, int, int, tuple[int, ...]]:
        """File index, byte offset and byte count of rows ``[start, stop)`` of ``key``, and their shape."""
        info = self._infos[key]
        rows = info.rows
        stop = rows if stop is None or not info.shape else min(stop, rows)
        start = 0 if not info.shape else min(max(start, 0), stop)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        row_bytes = info.row_numel * info.dtype.itemsize
        i, offset = self._where[key]
        return i, offset + start * row_bytes, (stop - start) * row_bytes, shape

    def _rows(self, key: str, start: int, stop: int | None) -> tuple[np.ndarray, TensorInfo, tuple[int, ...]]:
        i, offset, n, shape = self._span(key, start, stop)
        return self._sources[i].read(offset, n), self._infos[key], shape

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        i, offset, n, _ = self._span(key, start, stop)
        if out.dtype != self._infos[key].dtype.torch or not out.is_contiguous() or out.numel() * out.element_size() != n:
            super().read_into(key, start, stop, out)
            return
        self._sources[i].read_into(offset, dtypes.to_storage(out).view(np.uint8))

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        data, info, shape = self._rows(key, start, stop)
        return dtypes.from_storage(data.view(info.dtype.storage), info.dtype, shape)

    def read_bytes(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        return self._rows(key, start, stop)[0].tobytes()

    @property
    def files(self) -> list[ByteSource]:
        return list(self._sources)

    @property
    def layout(self) -> WeightLayout:
        counts = [0] * len(self._sources)
        for i, _ in self._where.values():
            counts[i] += 1
        return WeightLayout("safetensors", tuple(
            (src.name, counts[i], self.metadata.get(src.name)) for i, src in enumerate(self._sources)
        ), self._index_metadata, self._folder)

    def close(self) -> None:
        for src in self._sources:
            src.close()
