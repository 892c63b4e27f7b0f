"""Where things live: a local path or an fsspec URL (``s3://…``, ``gs://…``, ``https://…``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_REMOTE_CONCURRENCY = 64


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a remote (fsspec) location rather than a local path."""
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | os.PathLike[str]) -> Path:
    """The local path of a non-URL location."""
    s = str(location)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


def absolute(location: str | os.PathLike[str]) -> str:
    """A URL as is, a local path made absolute: workers need not share the driver's cwd."""
    return str(location) if is_url(location) else str(local_path(location).absolute())


def url_options(
    location: str | os.PathLike[str], storage_options: dict[str, Any] | None, connections: int | None = None,
) -> dict[str, Any]:
    """The caller's fsspec options for a URL, over defaults that suit many small range reads.

    s3fs sends a HEAD before every whole-object GET (to split big objects into parallel ranges);
    archive chunks and row blocks are a few MiB at most, so ``max_concurrency=1`` saves that round
    trip. Its connection pool holds 10 by default, which would cap the reads in flight: it is
    raised to ``connections`` (64 by default). Options the caller gives win.
    """
    options = dict(storage_options or {})
    if str(location).split("://", 1)[0] in ("s3", "s3a"):
        options.setdefault("max_concurrency", 1)
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", max(connections or 0, DEFAULT_REMOTE_CONCURRENCY))
        options["config_kwargs"] = config
    return options
