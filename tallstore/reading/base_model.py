"""The base model an archive rebuilds from: an external checkpoint or the embedded copy.

An external base is identified on open by its structure and the quick probe of spec §7 (the
full fingerprint would hash the whole model); a mismatch names both fingerprints.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import crc32c
import numpy as np
import torch

from .. import dtypes
from ..checkpoint import Checkpoint, open_checkpoint
from ..dtypes import TensorInfo
from ..errors import ArchiveError, BaseMismatchError
from ..locations import is_url
from ..storage import layout
from ..storage.codecs import ArrayFormat
from ..storage.digests import checkpoint_fingerprint, probe
from ..storage.geometry import block_ranges
from ..storage.manifest import Manifest, TensorEntry
from .source import ArchiveSource


class BaseModel(Protocol):
    """Reads base tensors by name, whole or by dim-0 rows."""

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the base tensor ``key`` (all of it by default)."""


class ExternalBase:
    """A base read from its original checkpoint (safetensors, HF folder or ``.bin``)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.ckpt.read(key, start, stop)

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows ``start:stop`` of the base tensor ``key`` into the flat tensor ``out``."""
        self.ckpt.read_into(key, start, stop, out)


class EmbeddedBase:
    """A base stored inside the archive (``--embed-base``), read through the checked reader."""

    def __init__(self, source: ArchiveSource) -> None:
        self.source = source

    def array(self, entry: TensorEntry) -> ArrayFormat:
        """The checked ``base`` array of a tensor the base holds."""
        info = entry.base_info
        assert info is not None
        return self.source.reader.array(layout.base_path(entry.node), info.dtype.storage, info.numel, entry.base_crcs)

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        e = self.source.manifest.entries[key]
        info = e.base_info
        assert info is not None
        shape = info.shape
        stop = info.rows if stop is None else min(stop, info.rows)
        rows = (max(0, stop - start), *shape[1:]) if shape else ()
        if info.numel == 0 or (shape and stop <= start):
            return torch.empty(rows, dtype=info.dtype.torch)
        row = info.row_numel
        bits = self.source.reader.read(self.array(e), start * row, stop * row)
        return dtypes.from_storage(bits, info.dtype, rows)


class BaseHandle:
    """The archive's base, opened only when a read needs it: metadata commands (info, stats,
    shallow verify) run without it, and nothing is fetched from a location the caller did not
    name (an archive could record any URL: it is never followed on its own)."""

    def __init__(self, source: ArchiveSource, base: Any, storage_options: dict[str, Any] | None) -> None:
        self._source = source
        self._storage_options = storage_options
        self._lock = threading.Lock()
        self._opened: ExternalBase | EmbeddedBase | None = None
        if base is not None:
            self._opened = open_base(source, base, storage_options)
        elif source.manifest.base.embedded:
            self._opened = EmbeddedBase(source)

    def get(self) -> ExternalBase | EmbeddedBase:
        """The base, opened from its recorded local path on first use."""
        with self._lock:
            if self._opened is None:
                recorded = self._source.manifest.base.location
                if recorded and is_url(recorded):
                    raise ArchiveError(
                        f"{self._source.location}: its base is not embedded; the archive records it at {recorded}, "
                        "which tallstore does not fetch on its own: pass base= (or --base) to read it"
                    )
                if not recorded or not Path(recorded).exists():
                    raise ArchiveError(
                        f"{self._source.location}: its base is not embedded and not found at {recorded}; pass base="
                        " (or --base) to say where it is"
                    )
                self._opened = open_base(self._source, recorded, self._storage_options)
            return self._opened

    def close(self) -> None:
        """Close the base's files, if it was opened from a checkpoint."""
        if isinstance(self._opened, ExternalBase):
            self._opened.ckpt.close()


def open_base(source: ArchiveSource, base: Any, storage_options: dict[str, Any] | None) -> ExternalBase:
    """The checkpoint at ``base``, checked to be the archive's base."""
    ckpt = open_checkpoint(base, storage_options)
    try:
        check_base(source.manifest, ckpt, str(base))
    except BaseException:
        ckpt.close()
        raise
    return ExternalBase(ckpt)


def check_base(manifest: Manifest, ckpt: Checkpoint, where: str) -> None:
    """Refuse ``ckpt`` unless its structure and probe are the recorded base's."""
    b = manifest.base
    entries = manifest.entries
    same_keys = list(ckpt.keys) == list(b.keys) or set(ckpt.keys) == set(b.keys)
    ok = same_keys and all(ckpt.info(k) == TensorInfo(entries[k].base_dtype or entries[k].dtype, entries[k].shape)
                           for k in b.keys)
    if ok and probe(ckpt) == b.probe:
        return
    got = checkpoint_fingerprint(ckpt, manifest.block_elems)
    raise BaseMismatchError(
        f"{where} is not the base this archive was packed against: "
        f"archive expects {b.fingerprint}, this base is {got}"
    )


def read_checked(base: ExternalBase | EmbeddedBase, entry: TensorEntry, block_elems: int) -> torch.Tensor:
    """The whole base tensor of ``entry``, every block checked against the CRC-32C recorded at pack
    time (format v2): a base file changed after the archive was opened is an error, not weights."""
    t = base.read(entry.key)
    info = entry.base_info
    if entry.base_crcs is None or info is None or info.numel == 0:
        return t
    bits = dtypes.to_storage(t).view(np.uint8)
    step = info.row_numel * info.dtype.itemsize
    for i, (a, b) in enumerate(block_ranges(info, block_elems)):
        if crc32c.crc32c(bits[a * step : b * step]) != entry.base_crcs[i]:
            raise BaseMismatchError(
                f"base tensor {entry.key!r} (rows {a}:{b}) is not what the archive was packed against "
                "(the base changed after it was opened?)"
            )
    return t
