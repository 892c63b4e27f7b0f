"""The base model an archive rebuilds from: an external checkpoint or the embedded copy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from . import dtypes
from .checkpoint import Checkpoint, TensorInfo
from .storage import format as fmt
from .storage import schema

if TYPE_CHECKING:
    from .archive import Archive


class BaseSource(Protocol):
    """Reads base tensors by name, whole or by dim-0 rows."""

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the base tensor ``key`` (all of it by default)."""


class CheckpointBase:
    """A base read from its original checkpoint (safetensors, HF folder or ``.bin``)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.ckpt.read(key, start, stop)


class EmbeddedBase:
    """A base stored inside the archive (``--embed-base``)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        e = self.archive.entries[key]
        d = dtypes.by_name(e["base_dtype"])
        shape = tuple(e["shape"])
        info = TensorInfo(d, shape)
        stop = info.rows if stop is None else min(stop, info.rows)
        rows = (max(0, stop - start), *shape[1:]) if shape else ()
        if info.numel == 0 or (shape and stop <= start):
            return torch.empty(rows, dtype=d.torch)
        arr = schema.open_array(self.archive.root, fmt.base_path(e["node"]), d.storage, info.numel)
        row = info.row_numel
        return dtypes.from_storage(arr[start * row : stop * row], d, rows)
