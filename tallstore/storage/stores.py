"""Where archives live: a local folder or an fsspec URL, opened as a Zarr v3 store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore


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
