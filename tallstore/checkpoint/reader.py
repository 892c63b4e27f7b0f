"""The lazy checkpoint interface and the dispatch from a path to the reader that serves it."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import dtypes
from ..dtypes import DType
from ..errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    """Dtype and shape of one stored tensor, known without reading its bytes."""

    dtype: DType
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def rows(self) -> int:
        """Length of dim 0 (1 for a scalar): the unit in which blocks are read."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        """Elements per row of dim 0."""
        return self.numel // self.rows if self.rows else 0


class Checkpoint(ABC):
    """A read-only, lazily read state dict: ordered keys, metadata, and row-range reads."""

    path: str
    keys: list[str]

    @abstractmethod
    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of ``key``."""

    @abstractmethod
    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 of ``key`` (the whole tensor for a scalar)."""

    def read_bytes(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        """The raw little-endian bytes of rows ``[start, stop)`` of ``key`` (what digests hash)."""
        return dtypes.to_storage(self.read(key, start, stop)).tobytes()

    @property
    @abstractmethod
    def files(self) -> list[Path]:
        """The files this checkpoint is made of, in a stable order."""

    def close(self) -> None:
        """Release file handles and maps."""

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    @property
    def _key_set(self) -> set[str]:
        cached = self.__dict__.get("_keys_cache")
        if cached is None:
            cached = self.__dict__["_keys_cache"] = set(self.keys)
        return cached

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Open a ``.safetensors`` file, a Hugging Face folder or a torch ``.bin``/``.pt`` state dict.

    An fsspec URL (``s3://…``) opens safetensors files or folders remotely with ``storage_options``.
    """
    from ..storage.stores import is_url, local_path
    from .hf_folder import open_folder
    from .safetensors_file import SafetensorsCheckpoint
    from .torch_file import TorchCheckpoint

    if is_url(path):
        from .remote import open_remote

        return open_remote(str(path), storage_options)
    p = local_path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        return open_folder(p)
    if p.suffix in (".bin", ".pt", ".pth"):
        return TorchCheckpoint(p)
    return SafetensorsCheckpoint([p])
