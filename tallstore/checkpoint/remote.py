"""Safetensors checkpoints at fsspec URLs (``s3://…``, ``gs://…``, ``https://…``), read by ranges.

The header comes from one range request (two for a header over 64 KiB) and is validated like a
local file's; each row block is one more range request, so a pack worker or a loader fetches
only the rows it needs. Folders work as on disk: an index with a weight map, or every
``*.safetensors`` file in it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
import torch

from .. import dtypes
from ..errors import CheckpointError
from ..storage.stores import url_options
from .reader import Checkpoint, TensorInfo
from .safetensors_file import header_length, parse_header

INDEX = "model.safetensors.index.json"
FIRST_READ = 64 * 1024


@dataclass(frozen=True)
class RemoteStat:
    """The one field of ``os.stat_result`` the packer records."""

    st_size: int


@dataclass(frozen=True)
class RemoteFile:
    """One input file at a URL, offering what the packer uses of ``pathlib.Path``."""

    url: str
    size: int
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    def stat(self) -> RemoteStat:
        return RemoteStat(self.size)

    def open(self, mode: str = "rb") -> IO[bytes]:
        """A file object reading the URL (used to hash whole input files)."""
        return fsspec.open(self.url, mode, **self.storage_options).open()

    def __str__(self) -> str:
        return self.url


def open_remote(url: str, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint at ``url``: a ``.safetensors`` file, or a folder of safetensors shards."""
    options = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **url_options(url, options))
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"{url}: cannot open this URL ({e})") from None
    path = path.rstrip("/")
    if path.endswith((".bin", ".pt", ".pth")):
        raise CheckpointError(f"{url}: torch files are read only from local paths; convert to safetensors")
    try:
        if path.endswith(".safetensors"):
            return RemoteSafetensorsCheckpoint(fs, [path], url, options)
        if not fs.isdir(path):
            raise CheckpointError(f"{url}: no such file or folder")
        index = f"{path}/{INDEX}"
        if fs.isfile(index):
            return _open_indexed(fs, path, index, url, options)
        shards = sorted(p for p in fs.glob(f"{path}/*.safetensors"))
        if not shards:
            raise CheckpointError(f"{url}: no safetensors files found in this folder")
        return RemoteSafetensorsCheckpoint(fs, shards, url, options)
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no such file or folder") from None
    except PermissionError as e:
        raise CheckpointError(f"{url}: access denied ({e})") from None


def _open_indexed(fs: Any, folder: str, index: str, url: str, options: dict[str, Any]) -> Checkpoint:
    try:
        weight_map = json.loads(fs.cat_file(index))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{url}/{INDEX}: not a valid safetensors index (needs a weight_map)") from None
    names = sorted(set(weight_map.values()))
    for n in names:
        if not isinstance(n, str) or posixpath.basename(n) != n or n in ("", ".", ".."):
            raise CheckpointError(f"{url}/{INDEX}: shard name {n!r} is not a plain file name")
    ckpt = RemoteSafetensorsCheckpoint(fs, [f"{folder}/{n}" for n in names], url, options, only=weight_map)
    missing = set(weight_map) - set(ckpt.keys)
    if missing:
        raise CheckpointError(f"{url}/{INDEX}: tensor {sorted(missing)[0]!r} is not in its shard")
    return ckpt


class RemoteSafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files behind an fsspec filesystem, read by byte ranges."""

    def __init__(
        self, fs: Any, paths: list[str], url: str, options: dict[str, Any], only: dict[str, str] | None = None,
    ) -> None:
        self.path = url
        self._fs = fs
        self._paths = paths
        self._files: list[RemoteFile] = []
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[int, int]] = {}
        self.keys = []
        for i, p in enumerate(paths):
            where = fs.unstrip_protocol(p)
            size, header, data_start = self._read_header(p, where)
            self._files.append(RemoteFile(where, size, options))
            for key, entry in header.items():
                if key == "__metadata__" or (only is not None and only.get(key) != posixpath.basename(p)):
                    continue
                if key in self._infos:
                    raise CheckpointError(f"{url}: tensor {key!r} appears in two files")
                self._infos[key] = TensorInfo(dtypes.from_safetensors(entry["dtype"]), tuple(entry["shape"]))
                self._where[key] = (i, data_start + entry["data_offsets"][0])
                self.keys.append(key)

    def _read_header(self, path: str, where: str) -> tuple[int, dict[str, Any], int]:
        """File size, validated header and where the data starts, in one or two range reads."""
        size = int(self._fs.size(path))
        first = self._fs.cat_file(path, start=0, end=min(size, FIRST_READ))
        n = header_length(first, size, where)
        raw = first[8 : 8 + n]
        if len(raw) < n:
            raw += self._fs.cat_file(path, start=len(first), end=8 + n)
        return size, parse_header(raw, size, where), 8 + n

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        info = self._infos[key]
        i, offset = self._where[key]
        rows = info.rows if info.shape else 1
        stop = rows if stop is None else min(stop, rows)
        start = min(start, stop)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        row_bytes = info.row_numel * info.dtype.itemsize
        if info.numel == 0 or stop == start:
            return torch.empty(shape, dtype=info.dtype.torch)
        data = self._fs.cat_file(self._paths[i], start=offset + start * row_bytes, end=offset + stop * row_bytes)
        return dtypes.from_storage(np.frombuffer(bytearray(data), info.dtype.storage), info.dtype, shape)

    @property
    def files(self) -> list[RemoteFile]:  # type: ignore[override]
        return list(self._files)
