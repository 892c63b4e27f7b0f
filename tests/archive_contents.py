"""Everything an archive stores as comparable data: arrays' metadata and bytes, groups' attributes."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import zarr

from tallstore.storage.stores import open_store


def archive_contents(location: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{path: ("array", metadata, bytes) | ("group", attributes)}`` for the whole hierarchy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = open_store(location, read_only=True, storage_options=storage_options)
        root = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
        out: dict[str, Any] = {"": ("group", _attrs(root))}
        for path, node in root.members(max_depth=None):
            if isinstance(node, zarr.Array):
                meta = node.metadata.to_dict()
                out[path] = ("array", meta, np.ascontiguousarray(node[...]).tobytes())
            else:
                out[path] = ("group", _attrs(node))
    return out


def _attrs(group: zarr.Group) -> dict[str, Any]:
    attrs = copy.deepcopy(group.attrs.asdict())
    attrs.get("tallstore", {}).pop("created", None)
    return attrs


def assert_same_archive(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Array for array and attribute for attribute equal (creation time aside)."""
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path] == b[path], f"{path} differs"
