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
) -> Store:
    """A Zarr store for ``location`` (a folder, or an fsspec URL such as ``s3://bucket/x``)."""
    if is_url(location):
        return FsspecStore.from_url(
            str(location), storage_options=storage_options or {}, read_only=read_only
        )
    return LocalStore(local_path(location), read_only=read_only)


DEFAULT_REMOTE_CONCURRENCY = 64


def read_concurrency(location: str | os.PathLike[str], value: int | None = None) -> int | None:
    """Reads in flight when loading a task: ``value``, ``$TALLSTORE_CONCURRENCY``, or a default.

    Object stores need many requests in flight to hide their per-request latency; local folders
    keep zarr's own pacing (``None``: no cap beyond zarr's ``async.concurrency`` per array).
    """
    env = os.environ.get("TALLSTORE_CONCURRENCY", "").strip()
    if value is None and env:
        if not env.isdigit():
            raise TallstoreError(f"TALLSTORE_CONCURRENCY must be a whole number, got {env!r}")
        value = int(env)
    if value is None:
        return DEFAULT_REMOTE_CONCURRENCY if is_url(location) else None
    if value < 1:
        raise TallstoreError(f"concurrency must be at least 1, got {value}")
    return value
