"""Collects packed mask pieces from concurrent blocks and writes whole chunks only.

Every task's mask is one flat array shared by all masked tensors, so two blocks may fall in
one chunk; writing a chunk as a unit, once complete, avoids read-modify-write races.
"""

from __future__ import annotations

import threading

import crc32c
import numpy as np
import zarr


class MaskWriter:
    """Buffers ``(T, n)`` mask-byte pieces by chunk and flushes each chunk when it is full,
    recording the CRC-32C of every chunk of every task's mask (``crcs[t][c]``)."""

    def __init__(self, arrays: list[zarr.Array], nbytes: int, chunk_bytes: int) -> None:
        self._arrays = arrays
        self._nbytes = nbytes
        self._chunk = chunk_bytes
        self._pending: dict[int, tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()
        self.crcs = [[0] * -(-nbytes // chunk_bytes) for _ in arrays]

    def _chunk_size(self, c: int) -> int:
        return min(self._chunk, self._nbytes - c * self._chunk)

    def put(self, offset: int, pieces: np.ndarray) -> None:
        """Place ``pieces[t]`` at byte ``offset`` of task ``t``'s mask; write completed chunks."""
        n = pieces.shape[1]
        pos = 0
        while pos < n:
            c = (offset + pos) // self._chunk
            start = (offset + pos) - c * self._chunk
            take = min(n - pos, self._chunk_size(c) - start)
            with self._lock:
                buf, filled = self._pending.get(c) or (
                    np.zeros((len(self._arrays), self._chunk_size(c)), np.uint8),
                    0,
                )
                buf[:, start : start + take] = pieces[:, pos : pos + take]
                filled += take
                done = filled == self._chunk_size(c)
                if done:
                    self._pending.pop(c, None)
                else:
                    self._pending[c] = (buf, filled)
            if done:
                lo = c * self._chunk
                for t, arr in enumerate(self._arrays):
                    arr[lo : lo + buf.shape[1]] = buf[t]
                    self.crcs[t][c] = crc32c.crc32c(buf[t])
            pos += take

    def close(self) -> None:
        """Check every chunk was completed (a gap means a block was lost)."""
        if self._pending:
            raise RuntimeError(f"mask chunks {sorted(self._pending)} were never completed")
