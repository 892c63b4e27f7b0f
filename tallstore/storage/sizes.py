"""Bytes an archive occupies in its store, by top-level part."""

from __future__ import annotations

import os
from typing import Any

import fsspec

from ..locations import is_url, local_path


def stored_bytes(location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes per top-level entry (``tensors``, ``masks``, ``zarr.json``, …) of an archive."""
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(str(location), **(storage_options or {}))
        sizes = fs.du(path, total=False)
        root = path.rstrip("/")
        items = ((p[len(root) + 1 :], s) for p, s in sizes.items())
    else:
        root_p = local_path(location)
        items = (
            (os.path.relpath(os.path.join(d, f), root_p), os.path.getsize(os.path.join(d, f)))
            for d, _, files in os.walk(root_p)
            for f in files
        )
    out: dict[str, int] = {}
    for rel, size in items:
        top = str(rel).replace(os.sep, "/").split("/", 1)[0]
        out[top] = out.get(top, 0) + int(size)
    return out
