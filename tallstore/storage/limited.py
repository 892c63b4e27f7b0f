"""A store wrapper capping the reads in flight: the ``concurrency`` of remote archive reads.

Loading a task issues every chunk read at once through zarr's async engine; on an object store
each read is an HTTP request, and this cap is how many run at a time, whatever zarr's own
per-array ``async.concurrency`` allows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore


class LimitedStore(WrapperStore[Store]):
    """``store`` with at most ``limit`` reads (``get``, ``exists``) in flight at once."""

    def __init__(self, store: Store, limit: int) -> None:
        super().__init__(store)
        self.limit = limit
        self._gate: asyncio.Semaphore | None = None

    def _with_store(self, store: Store) -> LimitedStore:
        return type(self)(store, self.limit)

    @property
    def gate(self) -> asyncio.Semaphore:
        """The semaphore, made on first use inside zarr's event loop."""
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.limit)
        return self._gate

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        async with self.gate:
            return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        async with self.gate:
            return await self._store.exists(key)

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]],
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    def __repr__(self) -> str:
        return f"LimitedStore({self._store!r}, limit={self.limit})"
