"""A read-side store wrapper that turns a missing chunk into an error instead of zeros.

Zarr reads an absent chunk as the array's fill value. Archive writers store every chunk (spec §2),
so for an archive an absent chunk is always lost data: reading it through this wrapper raises
:class:`MissingChunkError`, which every reader reports as corruption, instead of yielding zeros
that only the per-tensor checksum would catch (and that merged views, which have none, would not).
"""

from __future__ import annotations

from collections.abc import Iterable

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

METADATA = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


class MissingChunkError(FileNotFoundError):
    """A chunk the archive must hold is absent from its store."""


class StrictStore(WrapperStore[Store]):
    """``store`` whose reads of absent chunk keys raise; absent metadata still reads as absent."""

    def _with_store(self, store: Store) -> StrictStore:
        return type(self)(store)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        out = await self._store.get(key, prototype, byte_range)
        if out is None and key.rsplit("/", 1)[-1] not in METADATA:
            raise MissingChunkError(f"chunk {key} is missing")
        return out

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    def __repr__(self) -> str:
        return f"StrictStore({self._store!r})"


def read_error(e: BaseException) -> str:
    """A short description of why reading stored data failed (zarr's checksum message included)."""
    if isinstance(e, ValueError) and "computed checksum do not match" in str(e):
        return "crc32c checksum mismatch"
    return f"{type(e).__name__}: {e}"
