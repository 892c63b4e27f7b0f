"""Byte-range access to input files and folders, local or behind fsspec, behind one interface.

Every checkpoint reader reads its files through a :class:`ByteSource` (``read(offset, n)``) and
finds them through a :class:`Folder`, so one safetensors reader and one index resolver serve
local disks and object stores alike. Local files are read with ``pread`` into fresh buffers:
no memory map, so a file truncated under the reader is a clear error, never a ``SIGBUS``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

HASH_PIECE = 8 << 20


class ByteSource(ABC):
    """One input file read by byte ranges."""

    name: str
    location: str
    size: int

    @abstractmethod
    def read(self, offset: int, n: int) -> np.ndarray:
        """Exactly ``n`` bytes from ``offset`` as a fresh, writable ``uint8`` array."""

    def read_into(self, offset: int, out: np.ndarray) -> None:
        """Exactly ``out.size`` bytes from ``offset`` into the flat ``uint8`` array ``out``."""
        out[:] = self.read(offset, out.size)

    def sha256(self) -> str:
        """SHA-256 of the whole file, read in pieces."""
        h = hashlib.sha256()
        for at in range(0, self.size, HASH_PIECE):
            h.update(self.read(at, min(HASH_PIECE, self.size - at)))
        return h.hexdigest()

    def close(self) -> None:
        """Release any handle held."""

    def __str__(self) -> str:
        return self.location


class LocalFile(ByteSource):
    """A local file, opened once and read with ``pread``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.location = str(self.path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY)
            self.size = os.fstat(self._fd).st_size
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None

    def read(self, offset: int, n: int) -> np.ndarray:
        buf = np.empty(n, np.uint8)
        self.read_into(offset, buf)
        return buf

    def read_into(self, offset: int, out: np.ndarray) -> None:
        if self._fd is None:
            raise CheckpointError(f"{self.location}: read after close")
        n, got = out.size, 0
        try:
            while got < n:  # preadv may return short (large reads, signals): go on where it stopped
                step = os.preadv(self._fd, [out[got:]], offset + got)
                if step == 0:
                    break
                got += step
        except OSError as e:
            raise CheckpointError(f"{self.location}: cannot read ({e.strerror})") from None
        if got != n:
            raise CheckpointError(f"{self.location}: truncated (changed while it was read?)")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RemoteFile(ByteSource):
    """A file behind an fsspec filesystem; each read is one range request."""

    def __init__(self, fs: Any, path: str, size: int | None = None) -> None:
        self.fs = fs
        self.path = path
        self.name = posixpath.basename(path.rstrip("/"))
        self.location = fs.unstrip_protocol(path)
        self.size = int(fs.size(path)) if size is None else size

    def read(self, offset: int, n: int) -> np.ndarray:
        data = self.fs.cat_file(self.path, start=offset, end=offset + n) if n else b""
        if len(data) != n:
            raise CheckpointError(f"{self.location}: truncated (changed while it was read?)")
        return np.frombuffer(bytearray(data), np.uint8)


class Folder(ABC):
    """A folder of input files: what an index resolver needs to find a checkpoint's files."""

    location: str

    @abstractmethod
    def is_file(self, name: str) -> bool:
        """Whether ``name`` (a plain file name) is a file in this folder."""

    @abstractmethod
    def names(self, pattern: str) -> list[str]:
        """Sorted names of the files in this folder matching a glob ``pattern``."""

    @abstractmethod
    def file(self, name: str) -> ByteSource:
        """The file ``name`` of this folder, opened for reading."""

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The whole file ``name``, refused when larger than ``limit`` bytes."""
        src = self.file(name)
        try:
            if src.size > limit:
                raise CheckpointError(f"{src.location}: larger than {limit} bytes")
            return src.read(0, src.size).tobytes()
        finally:
            src.close()

    def where(self, name: str) -> str:
        """The location of ``name`` in this folder, for messages."""
        return f"{self.location.rstrip('/')}/{name}"


class LocalFolder(Folder):
    """A folder on a local disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    def is_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    def names(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.path.glob(pattern) if p.is_file())

    def file(self, name: str) -> ByteSource:
        return LocalFile(self.path / name)


class RemoteFolder(Folder):
    """A folder (prefix) behind an fsspec filesystem."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.location = fs.unstrip_protocol(self.path)
        self._sizes: dict[str, int] | None = None

    def _listing(self) -> dict[str, int]:
        if self._sizes is None:
            self._sizes = {
                posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in self.fs.ls(self.path, detail=True) if e.get("type") == "file"
            }
        return self._sizes

    def is_file(self, name: str) -> bool:
        return name in self._listing()

    def names(self, pattern: str) -> list[str]:
        return sorted(n for n in self._listing() if fnmatch.fnmatchcase(n, pattern))

    def file(self, name: str) -> ByteSource:
        return RemoteFile(self.fs, f"{self.path}/{name}", self._listing().get(name))


def plain_name(name: object) -> bool:
    """Whether ``name`` is one plain file name (no separator, not ``.``/``..``)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name

