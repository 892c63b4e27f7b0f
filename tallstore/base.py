"""The base model an archive rebuilds from: an external checkpoint or the embedded copy."""

from __future__ import annotations

from typing import Protocol

import torch
import zarr

from . import dtypes
from .checkpoint import Checkpoint, TensorInfo
from .storage import format as fmt
from .storage import schema


class BaseSource(Protocol):
    """Reads whole base tensors by name."""

    def read(self, key: str) -> torch.Tensor:
        """The base tensor ``key``."""


class CheckpointBase:
    """A base read from its original checkpoint (safetensors, HF folder or ``.bin``)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def read(self, key: str) -> torch.Tensor:
        return self.ckpt.read(key)


class EmbeddedBase:
    """A base stored inside the archive (``--embed-base``)."""

    def __init__(self, root: zarr.Group, entries: dict[str, dict]) -> None:
        self.root = root
        self.entries = entries

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        d = dtypes.by_name(e["base_dtype"])
        shape = tuple(e["shape"])
        info = TensorInfo(d, shape)
        if info.numel == 0:
            return torch.empty(shape, dtype=d.torch)
        arr = schema.open_array(self.root, fmt.base_path(e["node"]), d.storage, info.numel)
        return dtypes.from_storage(arr[...], d, shape)
