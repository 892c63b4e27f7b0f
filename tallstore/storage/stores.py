"""Where archives live: a local folder or an fsspec URL, opened as a Zarr v3 store."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from zarr.abc.store import Store
from zarr.core import sync as zsync
from zarr.storage import FsspecStore, LocalStore

from ..errors import TallstoreError
from ..locations import DEFAULT_REMOTE_CONCURRENCY, is_url, local_path, url_options


def open_store(
    location: str | os.PathLike[str], *, read_only: bool, storage_options: dict[str, Any] | None = None,
    connections: int | None = None,
) -> Store:
    """A Zarr store for ``location`` (a folder, or an fsspec URL such as ``s3://bucket/x``)."""
    if is_url(location):
        options = url_options(location, storage_options, connections)
        return FsspecStore.from_url(str(location), storage_options=options, read_only=read_only)
    return LocalStore(local_path(location), read_only=read_only)


def read_concurrency(
    location: str | os.PathLike[str], value: int | None = None, base: str | os.PathLike[str] | None = None,
) -> int | None:
    """Reads in flight when loading a task: ``value``, ``$TALLSTORE_CONCURRENCY``, or a default.

    Object stores need many requests in flight to hide their per-request latency, so an archive
    or a ``base`` at a URL gets 64; local folders keep one rebuild thread per core (``None``).
    """
    env = os.environ.get("TALLSTORE_CONCURRENCY", "").strip()
    if value is None and env:
        if not env.isdigit():
            raise TallstoreError(f"TALLSTORE_CONCURRENCY must be a whole number, got {env!r}")
        value = int(env)
    if value is None:
        return DEFAULT_REMOTE_CONCURRENCY if is_url(location) or (base is not None and is_url(base)) else None
    if value < 1:
        raise TallstoreError(f"concurrency must be at least 1, got {value}")
    return value


def settle_writes(timeout: float = 10.0) -> None:
    """Wait (up to ``timeout`` s) for store operations still running on zarr's I/O loop.

    An interrupt that lands while the main thread waits on a zarr write leaves that write running
    on zarr's background loop; removing a staging folder before it ends would let it recreate the
    folder. Called before an interrupted or failed output is removed."""
    loop = zsync.loop[0] if zsync.loop and zsync.loop[0] is not None else None
    if loop is None or not loop.is_running():
        return

    async def others() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    try:
        asyncio.run_coroutine_threadsafe(others(), loop).result(timeout + 1)
    except Exception:  # best effort: the caller removes what it can either way
        return
