"""Where archives live: a local folder or an fsspec URL, opened as a Zarr v3 store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from ..errors import TallstoreError


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a remote (fsspec) location rather than a local path."""
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | os.PathLike[str]) -> Path:
    """The local path of a non-URL location."""
    s = str(location)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


def open_store(
    location: str | os.PathLike[str],
    *,
    read_only: bool,
    storage_options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> Store:
    """A Zarr store for ``location`` (a folder, or an fsspec URL such as ``s3://bucket/x``).

    ``limit`` caps its reads in flight (see :class:`~tallstore.storage.limited.LimitedStore`).
    """
    store: Store
    if is_url(location):
        options = url_options(location, storage_options, limit)
        store = FsspecStore.from_url(str(location), storage_options=options, read_only=read_only)
    else:
        store = LocalStore(local_path(location), read_only=read_only)
    if limit:
        from .limited import LimitedStore

        store = LimitedStore(store, limit)
    return store


DEFAULT_REMOTE_CONCURRENCY = 64


def url_options(
    location: str | os.PathLike[str], storage_options: dict[str, Any] | None, connections: int | None = None,
) -> dict[str, Any]:
    """The caller's fsspec options for a URL, over defaults that suit reading archives from S3.

    s3fs sends a HEAD before every whole-object GET (to split big objects into parallel ranges);
    archive chunks are a few MiB at most, so ``max_concurrency=1`` saves that round trip per
    chunk. Its connection pool holds 10 by default, which would cap the reads in flight: it is
    raised to ``connections`` (64 by default). Options the caller gives win.
    """
    options = dict(storage_options or {})
    if str(location).split("://", 1)[0] in ("s3", "s3a"):
        options.setdefault("max_concurrency", 1)
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", max(connections or 0, DEFAULT_REMOTE_CONCURRENCY))
        options["config_kwargs"] = config
    return options


def read_concurrency(
    location: str | os.PathLike[str], value: int | None = None, base: str | os.PathLike[str] | None = None,
) -> int | None:
    """Reads in flight when loading a task: ``value``, ``$TALLSTORE_CONCURRENCY``, or a default.

    Object stores need many requests in flight to hide their per-request latency, so an archive
    or a ``base`` at a URL gets 64; local folders keep zarr's own pacing (``None``: no cap).
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
