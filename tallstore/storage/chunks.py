"""The one checked chunk reader every read path uses: load, extract, merge, stats, verify.

An archive is untrusted input, so every stored object is read the same bounded way:

- **local** archives are read through a handle on the archive's root directory, opened once:
  each path component is opened with ``O_NOFOLLOW`` (a symlink anywhere inside the archive is
  refused, nothing outside the root is reachable), the object must be a regular file no larger
  than an honest encoding of its chunk (a FIFO, a device or an oversized file is refused from its
  ``lstat``, before it is opened; it is then opened ``O_NONBLOCK`` and checked again, should it
  have been swapped). Holding the root handle also pins the archive's
  generation: replacing the archive at its path (``pack --force``) does not mix its files into a
  reader that opened the old one.
- **remote** archives are read with one bounded range request per object, all of a read's
  objects in one concurrent round, at most ``concurrency`` in flight.

Decoding (:class:`~tallstore.storage.codecs.ArrayFormat`) checks every ``crc32c`` trailer and
bounds every decompressed size before allocating.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from zarr.abc.store import RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..errors import ArchiveError, CorruptArchiveError
from .codecs import ArrayFormat

MAX_DOCUMENT = 64 << 20
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


class MissingObject(CorruptArchiveError):
    """A stored object the archive must hold is absent."""


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a regular file"


def _refused(what: str, key: str, path: str, mode: int, want: str, why: str | None = None) -> CorruptArchiveError:
    """The error for an archive entry that is not the folder or regular file it must be."""
    kind = _kind(mode)
    if kind == f"a {want}":  # it is what it must be, yet it could not be opened
        return CorruptArchiveError(f"{what} {key} cannot be opened ({why})")
    return CorruptArchiveError(f"{what} {key} is refused: {path} is {kind}, not a {want} "
                               "(an archive holds no links or special files)")


def _lstat(dir_fd: int, name: str, key: str, what: str) -> os.stat_result:
    """``name`` in the folder ``dir_fd`` as it is, not where a link points."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise MissingObject(f"{what} {key} is missing") from None
    except OSError as e:
        raise CorruptArchiveError(f"{what} {key} cannot be opened ({e.strerror})") from None


def _check_object(st: os.stat_result, key: str, limit: int, what: str) -> None:
    """Refuse a stored object that is not a regular file of at most ``limit`` bytes."""
    if not stat.S_ISREG(st.st_mode):
        raise _refused(what, key, key, st.st_mode, "regular file")
    if st.st_size > limit:
        raise CorruptArchiveError(f"{what} {key} holds {st.st_size} bytes, more than it may ({limit})")


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failed allocation: Python's ``MemoryError``, or the ``RuntimeError`` torch's
    CPU allocator raises ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


@contextmanager
def allocating(what: str) -> Iterator[None]:
    """Turn a failed allocation inside the ``with`` block into a one-line ``ArchiveError`` naming
    ``what``: sizes an archive records within the manifest's limits may still exceed memory."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        raise ArchiveError(f"{what} does not fit in memory") from None


class BufferPool:
    """Reusable byte buffers: decoding reads into memory that is already mapped, not fresh pages.

    A fresh multi-MiB allocation costs a page fault per 4 KiB on first touch, which for a model's
    worth of chunks adds up to as much time as decoding them.
    """

    def __init__(self, keep: int = 16) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._lock = threading.Lock()

    @contextmanager
    def take(self, n: int) -> Iterator[memoryview]:
        """A writable view of ``n`` bytes, returned to the pool afterwards."""
        with self._lock:
            fits = [b for b in self._free if len(b) >= n]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
        if not fits:
            with allocating(f"a chunk of {n} bytes"):
                buf = bytearray(n)
        try:
            yield memoryview(buf)[:n]
        finally:
            with self._lock:
                self._free.append(buf)
                if len(self._free) > self._keep:
                    self._free.remove(min(self._free, key=len))


BUFFERS = BufferPool()


class Objects:
    """The stored objects of one archive, read under the rules of the module docstring."""

    def __init__(self, location: str, store: Store | None, root: Path | None, concurrency: int | None) -> None:
        self.location = location
        self.store = store
        self.concurrency = concurrency
        self._root_fd: int | None = None
        if root is not None:
            try:
                self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise CorruptArchiveError(f"{location}: cannot open the archive folder ({e.strerror})") from None

    @property
    def local(self) -> bool:
        return self._root_fd is not None

    def close(self) -> None:
        """Release the root directory handle."""
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    @contextmanager
    def open_local(self, key: str, limit: int, what: str = "chunk") -> Iterator[memoryview]:
        """The bytes of the local object ``key``, read into a pooled buffer (see the module docstring)."""
        if self._root_fd is None:
            raise CorruptArchiveError("the archive is closed")
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise CorruptArchiveError(f"refusing to read {key!r}")
        fd = self._root_fd
        opened: list[int] = []
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if last:  # refused before it is opened: opening a FIFO or a device is already acting on it
                    _check_object(_lstat(fd, part, key, what), key, limit, what)
                try:
                    fd = os.open(part, _FLAGS | (0 if last else os.O_DIRECTORY), dir_fd=fd)
                except FileNotFoundError:
                    raise MissingObject(f"{what} {key} is missing") from None
                except OSError as e:
                    mode = _lstat(fd, part, key, what).st_mode
                    raise _refused(what, key, "/".join(parts[: i + 1]), mode, "regular file" if last else "folder",
                                   e.strerror) from None
                opened.append(fd)
            st = os.fstat(fd)
            _check_object(st, key, limit, what)  # what was opened, should it have been swapped since
            with BUFFERS.take(st.st_size) as view:
                if st.st_size and os.preadv(fd, [view], 0) != st.st_size:
                    raise CorruptArchiveError(f"{what} {key} changed while it was read")
                yield view
        finally:
            for f in opened:
                os.close(f)

    def fetch(self, keys: Sequence[str], limits: Sequence[int], what: str = "chunk") -> list[Any]:
        """The remote objects at ``keys`` (each at most ``limits[i]`` bytes), requested concurrently
        in one round. A failed read is returned as its exception, so that the caller can name
        what it was reading."""
        if not keys:
            return []
        assert self.store is not None
        store, proto = self.store, default_buffer_prototype()

        async def gather() -> list[Any]:
            gate = asyncio.Semaphore(self.concurrency or len(keys))

            async def one(key: str, limit: int) -> np.ndarray:
                async with gate:
                    buf = await store.get(key, proto, RangeByteRequest(0, limit + 1))
                if buf is None:
                    raise MissingObject(f"{what} {key} is missing")
                data = buf.as_numpy_array()
                if data.size > limit:
                    raise CorruptArchiveError(f"{what} {key} is larger than it may be")
                return data

            return await asyncio.gather(*(one(k, n) for k, n in zip(keys, limits)), return_exceptions=True)

        return sync(gather())

    def document(self, key: str, limit: int = MAX_DOCUMENT) -> Any:
        """A JSON metadata document (``zarr.json``), bounded; ``None`` if it is absent."""
        try:
            if self.local:
                with self.open_local(key, limit, "metadata document") as view:
                    raw = bytes(view)
            else:
                got = self.fetch([key], [limit], "metadata document")[0]
                if isinstance(got, BaseException):
                    raise got
                raw = got.tobytes()
        except MissingObject:
            return None
        except CorruptArchiveError:
            raise
        except Exception as e:  # whatever an unreachable store raises
            raise CorruptArchiveError(f"metadata document {key} cannot be read ({type(e).__name__})") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise CorruptArchiveError(f"metadata document {key} is not valid JSON") from None


@dataclass
class _Held:
    """A chunk decoded for several planned reads (or why it could not be)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    data: np.ndarray | None = None
    error: Exception | None = None


class Batch:
    """The chunks one read needs: planned, fetched in one round (remote), then decoded on demand.

    Local chunks are read by the decoding thread itself; remote ones are fetched beforehand by
    :meth:`fetch`. A chunk that fails to read or decode raises where it is used, so the caller
    can name the tensor it was reading. A chunk that several planned ranges touch (coded
    segments packed back to back) is decoded once and held until the last of them is read.
    """

    def __init__(self, objects: Objects) -> None:
        self.objects = objects
        self._planned: dict[tuple[str, int], int] = {}
        self._keys: list[str] = []
        self._limits: list[int] = []
        self._data: list[Any] = []
        self._uses: dict[int, int] = {}
        self._held: dict[int, _Held] = {}
        self._lock = threading.Lock()

    def add(self, array: ArrayFormat, index: int) -> None:
        """Plan to read chunk ``index`` of ``array``."""
        if (array.path, index) in self._planned:
            return
        if not 0 <= index < max(1, array.n_chunks):
            raise CorruptArchiveError(f"chunk {index} of {array.path} is outside the array")
        self._planned[array.path, index] = len(self._keys)
        self._keys.append(array.key(index))
        self._limits.append(array.max_stored)

    def fetch(self) -> None:
        """Fetch every planned remote chunk concurrently (local chunks are read when decoded)."""
        if not self.objects.local:
            self._data = self.objects.fetch(self._keys, self._limits)

    def add_range(self, array: ArrayFormat, lo: int, hi: int) -> None:
        """Plan to read elements ``[lo, hi)`` of ``array`` (every chunk they touch), once."""
        for c in range(lo // array.chunk, (hi - 1) // array.chunk + 1) if hi > lo else ():
            self.add(array, c)
            slot = self._planned[array.path, c]
            self._uses[slot] = self._uses.get(slot, 0) + 1

    def read_range(self, array: ArrayFormat, lo: int, out: np.ndarray) -> None:
        """Fill ``out`` (flat, ``array``'s storage dtype) with elements ``[lo, lo + out.size)``.

        A chunk that no other planned range needs and that ``out`` covers from its start is
        decoded straight into ``out``; any other is decoded once (see :class:`Batch`) and its part
        copied.
        """
        hi = lo + out.size
        for c in range(lo // array.chunk, (hi - 1) // array.chunk + 1) if hi > lo else ():
            a, b = max(lo, c * array.chunk), min(hi, (c + 1) * array.chunk)
            slot = self._planned.get((array.path, c))
            with self._lock:
                held = slot is not None and (self._uses.get(slot, 0) > 1 or slot in self._held)
            if held:
                assert slot is not None
                with self._held_chunk(array, c, slot) as full:
                    out[a - lo : b - lo] = full[a - c * array.chunk : b - c * array.chunk]
            elif a == c * array.chunk:
                self.decode(array, c, out[a - lo : b - lo])
            else:
                with BUFFERS.take(array.chunk_nbytes) as buf:
                    full = np.frombuffer(buf, array.storage)
                    self.decode(array, c, full[: b - c * array.chunk])
                    out[a - lo : b - lo] = full[a - c * array.chunk : b - c * array.chunk]

    @contextmanager
    def _held_chunk(self, array: ArrayFormat, index: int, slot: int) -> Iterator[np.ndarray]:
        """Chunk ``index`` decoded whole, by the first of its planned reads; dropped after the last."""
        with self._lock:
            held = self._held.setdefault(slot, _Held())
        with held.lock:
            if held.data is None and held.error is None:
                try:
                    with allocating(f"a chunk of {array.chunk_nbytes} bytes"):
                        full = np.empty(array.chunk, array.storage)
                    self.decode(array, index, full)
                    held.data = full
                except Exception as e:
                    held.error = e
        try:
            if held.error is not None:
                raise held.error
            assert held.data is not None
            yield held.data
        finally:
            with self._lock:
                self._uses[slot] -= 1
                if self._uses[slot] <= 0:
                    self._held.pop(slot, None)

    def decode(self, array: ArrayFormat, index: int, out: np.ndarray) -> None:
        """Decode chunk ``index`` of ``array`` into ``out``: its first ``out.nbytes`` bytes."""
        slot = self._planned.get((array.path, index))
        if slot is None:
            raise CorruptArchiveError(f"chunk {array.key(index)} was not planned")
        dest = out.reshape(-1).view(np.uint8)
        if self.objects.local:
            with self.objects.open_local(array.key(index), array.max_stored) as data:
                self._decode_bytes(array, index, data, dest)
            return
        data, self._data[slot] = self._data[slot], None
        if isinstance(data, BaseException):
            if isinstance(data, CorruptArchiveError):
                raise data
            raise CorruptArchiveError(f"chunk {array.key(index)} cannot be read ({type(data).__name__}: {data})")
        self._decode_bytes(array, index, memoryview(data).cast("B"), dest)

    @staticmethod
    def _decode_bytes(array: ArrayFormat, index: int, data: memoryview, dest: np.ndarray) -> None:
        if dest.nbytes == array.chunk_nbytes:
            array.decode(index, data, dest)
            return
        if dest.nbytes > array.valid_nbytes(index):
            raise CorruptArchiveError(f"chunk {array.key(index)} is shorter than what is read of it")
        with BUFFERS.take(array.chunk_nbytes) as buf:
            full = np.frombuffer(buf, np.uint8)
            array.decode(index, data, full)
            dest[:] = full[: dest.nbytes]


def coalesce(ranges: Sequence[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    """Sorted ranges merged wherever they share a chunk, so that no chunk is fetched twice."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a // chunk <= (out[-1][1] - 1) // chunk:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class ChunkReader:
    """Checked reads of an archive's flat arrays: their metadata (checked once) and their chunks."""

    def __init__(self, objects: Objects, nodes: dict[str, Any] | None) -> None:
        self.objects = objects
        self._nodes = nodes
        self._formats: dict[str, ArrayFormat] = {}
        self._lock = threading.Lock()

    def metadata(self, path: str) -> Any:
        """The ``zarr.json`` of node ``path``: its consolidated copy, else its own document."""
        if self._nodes is not None:
            meta = self._nodes.get(path)
            if meta is None:
                raise MissingObject(f"{path} is missing")
            return meta
        meta = self.objects.document(f"{path}/zarr.json")
        if meta is None:
            raise MissingObject(f"{path} is missing")
        return meta

    def array(self, path: str, storage: np.dtype, numel: int, crcs: tuple[int, ...] | None = None) -> ArrayFormat:
        """The checked format of the flat array at ``path`` (``numel`` elements of ``storage``);
        ``crcs``: the CRC-32C of each chunk's data as recorded, checked on every decode."""
        with self._lock:
            fmt = self._formats.get(path)
        if fmt is None:
            fmt = ArrayFormat.from_meta(self.metadata(path), path, storage, numel)
            with self._lock:
                self._formats[path] = fmt
        if fmt.storage != storage or fmt.numel != numel:
            raise CorruptArchiveError(f"{path} holds ({fmt.numel},) {fmt.storage}, expected ({numel},) {storage}")
        return fmt.with_crcs(crcs)

    def batch(self) -> Batch:
        """A new set of chunk reads, fetched together."""
        return Batch(self.objects)

    def read(self, array: ArrayFormat, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Elements ``[lo, hi)`` of ``array``, every chunk they touch checked."""
        hi = array.numel if hi is None else hi
        with allocating(f"{array.path} ({max(0, hi - lo) * array.storage.itemsize} bytes)"):
            out = np.empty(max(0, hi - lo), array.storage)
        self.read_into([(array, lo, out)])
        return out

    def read_into(self, reads: Sequence[tuple[ArrayFormat, int, np.ndarray]]) -> None:
        """For each ``(array, lo, out)``, fill ``out`` with elements ``[lo, lo + out.size)``; one round."""
        batch = self.batch()
        for array, lo, out in reads:
            batch.add_range(array, lo, lo + out.size)
        batch.fetch()
        for array, lo, out in reads:
            batch.read_range(array, lo, out.reshape(-1))
