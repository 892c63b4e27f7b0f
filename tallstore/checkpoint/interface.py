"""The lazy checkpoint interface every reader implements: ordered keys, infos, row-range reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .. import dtypes
from ..dtypes import TensorInfo
from .sources import ByteSource


@dataclass(frozen=True)
class WeightLayout:
    """The files a checkpoint's tensors came from, so an extract can lay them out the same way
    (``folder``: they were a model folder's, whose file names are worth keeping)."""

    format: str
    files: tuple[tuple[str, int, dict[str, str] | None], ...]
    index_metadata: dict[str, Any] | None = None
    folder: bool = False


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

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows ``[start, stop)`` of ``key`` into the flat tensor ``out`` (cast to its dtype): a
        packer's stack of tasks is filled without a fresh buffer per read."""
        out.copy_(self.read(key, start, stop).reshape(-1))

    def read_bytes(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        """The raw little-endian bytes of rows ``[start, stop)`` of ``key`` (what digests hash)."""
        return dtypes.to_storage(self.read(key, start, stop)).tobytes()

    @property
    @abstractmethod
    def files(self) -> list[ByteSource]:
        """The files this checkpoint is made of, in a stable order."""

    @property
    @abstractmethod
    def layout(self) -> WeightLayout:
        """How the tensors lie in the files: format, per file its name, tensor count (in key
        order) and safetensors ``__metadata__``, and an index's ``metadata``."""

    def close(self) -> None:
        """Release file handles."""

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
