"""Decoding the archive's own chunks straight into caller memory, without zarr's per-array cost.

Archives written by tallstore use one of two codec chains (spec §2): ``bytes → blosc → crc32c``
for weights and ``bytes → zstd → crc32c`` for masks, on flat arrays with zarr's default chunk
keys. For an array whose metadata is exactly that, a reader can fetch the chunk objects through
the store, check the CRC-32C trailer and decompress into the destination buffer itself: no
intermediate arrays, no copy, no per-array event-loop round trip. Arrays stored any other spec
way (rewritten by another Zarr tool, say) are read through zarr as usual.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import crc32c
import numpy as np
from numcodecs import blosc, zstd
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..errors import CorruptArchiveError

BLOSC = "blosc"
ZSTD = "zstd"
_BLOSC_HEADER = 16
_PLAIN_KEYS = {"shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs", "attributes",
               "zarr_format", "node_type", "storage_transformers", "dimension_names"}


def fast_codec(meta: dict[str, Any], chunk: int) -> str | None:
    """``"blosc"`` or ``"zstd"`` when ``meta`` (an array's zarr.json) is a flat array of ``chunk``-long
    chunks under default keys and a tallstore codec chain; ``None`` when zarr must decode it."""
    if not isinstance(meta, dict) or set(meta) - _PLAIN_KEYS or meta.get("storage_transformers"):
        return None
    grid = _dict(meta.get("chunk_grid"))
    keys = _dict(meta.get("chunk_key_encoding"))
    codecs = meta.get("codecs")
    if (
        grid.get("name") != "regular"
        or _dict(grid.get("configuration")).get("chunk_shape") != [chunk]
        or keys.get("name") != "default"
        or _dict(keys.get("configuration")).get("separator", "/") != "/"
        or not isinstance(codecs, list)
        or len(codecs) != 3
    ):
        return None
    first, middle, last = (_dict(c) for c in codecs)
    endian = _dict(first.get("configuration")).get("endian", "little")
    if first.get("name") != "bytes" or endian != "little" or last.get("name") != "crc32c":
        return None
    return middle["name"] if middle.get("name") in (BLOSC, ZSTD) else None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def chunk_key(path: str, index: int) -> str:
    """The store key of chunk ``index`` of the flat array at ``path`` (default key encoding)."""
    return f"{path}/c/{index}"


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
            buf = min(fits, key=len) if fits else bytearray(n)
            if fits:
                self._free.remove(buf)
        try:
            yield memoryview(buf)[:n]
        finally:
            with self._lock:
                self._free.append(buf)
                if len(self._free) > self._keep:
                    self._free.remove(min(self._free, key=len))


BUFFERS = BufferPool()


@contextmanager
def read_local(path: str, pool: BufferPool = BUFFERS) -> Iterator[memoryview]:
    """The bytes of the local chunk file ``path``, read into a pooled buffer (absent: corruption)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CorruptArchiveError(f"chunk file {path} is missing") from None
    try:
        n = os.fstat(fd).st_size
        with pool.take(n) as view:
            if os.preadv(fd, [view], 0) != n:
                raise CorruptArchiveError(f"chunk file {path} changed while it was read")
            yield view
    finally:
        os.close(fd)


def fetch(store: Store, keys: Sequence[str]) -> list[Any]:
    """The stored objects at ``keys`` of an archive's :class:`~tallstore.storage.strict.StrictStore`
    (which raises for an absent key), requested concurrently in one round. A failed read is
    returned as its exception, so that the caller can name what it was reading."""
    proto = default_buffer_prototype()

    async def one(key: str) -> np.ndarray:
        return (await store.get(key, proto)).as_numpy_array()

    async def gather() -> list[Any]:
        return await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)

    return sync(gather()) if keys else []


def decode_into(data: np.ndarray, codec: str, out: np.ndarray, chunk_nbytes: int, key: str) -> None:
    """Check ``data``'s CRC-32C trailer and decompress its ``chunk_nbytes`` bytes into ``out``.

    ``out`` (C-contiguous) receives the first ``out.nbytes`` of them: an array's last chunk is
    padded to the full chunk length, and only its head belongs to the tensor.
    """
    whole = memoryview(data).cast("B")
    body = whole[:-4]
    if len(whole) < 4 or crc32c.crc32c(body) != int.from_bytes(whole[-4:], "little"):
        raise CorruptArchiveError(f"chunk {key}: crc32c checksum mismatch")
    dest = out.reshape(-1).view(np.uint8)
    try:
        if codec == BLOSC:
            if len(body) < _BLOSC_HEADER or int.from_bytes(body[4:8], "little") != chunk_nbytes:
                raise ValueError("its blosc header does not announce the chunk's length")
            if dest.nbytes == chunk_nbytes:
                blosc.decompress(body, dest)
                return
            raw = blosc.decompress(body)
        else:
            raw = zstd.decompress(body)
    except (RuntimeError, ValueError) as e:
        raise CorruptArchiveError(f"chunk {key}: cannot be decompressed ({e})") from None
    if len(raw) != chunk_nbytes:
        raise CorruptArchiveError(f"chunk {key} holds {len(raw)} bytes, expected {chunk_nbytes}")
    dest[:] = np.frombuffer(raw, np.uint8, count=dest.nbytes)
