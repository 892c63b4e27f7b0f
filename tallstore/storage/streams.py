"""Coded streams as plain Zarr arrays: variable-length segments appended to one uint8 array.

An entropy-coded block has no fixed size, so it cannot be a chunk of a regular grid. Segments are
appended, in a fixed order, to a flat ``uint8`` array whose chunks (of ``chunk_bytes``) are
``bytes → zstd → crc32c`` — spec codecs only, so any Zarr v3 reader reads the bytes — and the
manifest records each segment's ``[offset, length, crc32c]``: a reader fetches exactly the chunks
that cover a segment and checks the segment's CRC before decoding it. Coded bytes do not compress;
zstd (level 1, stored blocks) is there for the zero padding Zarr requires of the last chunk, which
would otherwise cost up to a whole chunk per stream.

The writer is fed in order by one thread (the pack driver, which reorders unit results) and
writes each chunk object as soon as it is full, so memory holds at most one chunk per stream.
"""

from __future__ import annotations

import crc32c
import numpy as np
import zarr
from numcodecs import zstd
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

STREAM_CHUNK_BYTES = 1 << 20
STREAM_ZSTD_LEVEL = 1

Segment = tuple[int, int, int]


class StreamWriter:
    """Appends segments to the stream array at ``path`` of ``group``; :meth:`close` sets its length."""

    def __init__(self, group: zarr.Group, path: str, chunk_bytes: int = STREAM_CHUNK_BYTES) -> None:
        self._group = group
        self._path = path
        self._array: zarr.Array | None = None
        self._store = group.store
        self._prefix = f"{group.path}/{path}".strip("/")
        self._chunk = chunk_bytes
        self._buf = bytearray()
        self._written = 0
        self.size = 0

    def _create(self, chunk: int) -> zarr.Array:
        return self._group.create_array(self._path, shape=(0,), dtype=np.uint8, chunks=(chunk,),
                                        compressors=[ZstdCodec(level=STREAM_ZSTD_LEVEL), Crc32cCodec()], fill_value=0,
                                        overwrite=True)

    def append(self, data: bytes) -> Segment:
        """Add one segment; returns its ``(offset, length, crc32c)``."""
        at = self.size
        self._buf += data
        self.size += len(data)
        while len(self._buf) >= self._chunk:
            self._put(bytes(self._buf[: self._chunk]))
            del self._buf[: self._chunk]
        return at, len(data), crc32c.crc32c(data)

    def close(self) -> None:
        """Write the last (partial) chunk and the array's final length. A stream shorter than one
        chunk becomes an array of one chunk of exactly its length."""
        if self._array is None:
            self._chunk = max(1, self.size)
        if self._buf:
            self._put(bytes(self._buf) + bytes(self._chunk - len(self._buf)))
            self._buf = bytearray()
        if self._array is None:
            self._array = self._create(self._chunk)
        self._array.resize((self.size,))

    def _put(self, chunk: bytes) -> None:
        if self._array is None:
            self._array = self._create(self._chunk)
        key = f"{self._prefix}/c/{self._written}"
        frame = zstd.compress(chunk, STREAM_ZSTD_LEVEL)
        body = frame + crc32c.crc32c(frame).to_bytes(4, "little")
        sync(self._store.set(key, default_buffer_prototype().buffer.from_bytes(body)))
        self._written += 1
