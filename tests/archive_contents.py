"""Everything an archive stores as comparable data: arrays' metadata and bytes, groups' attributes.

What differs between two packs of the same inputs by design is left out: the pack time, and the
random generation id with the digest that covers it (also inside the manifest's copy).
"""

from __future__ import annotations

import copy
import json
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
                data = np.ascontiguousarray(node[...]).tobytes()
                if path == "meta/manifest":  # metadata, stored as an array: compared like attributes
                    doc = json.loads(data)
                    _drop_volatile(doc["manifest"])
                    out[path] = ("manifest-copy", meta, doc)
                    continue
                out[path] = ("array", meta, data)
            else:
                out[path] = ("group", _attrs(node))
    return out


def _drop_volatile(manifest: dict[str, Any]) -> None:
    for key in ("created", "generation", "digest"):
        manifest.pop(key, None)


def _attrs(group: zarr.Group) -> dict[str, Any]:
    attrs = copy.deepcopy(group.attrs.asdict())
    _drop_volatile(attrs.get("tallstore", {}))
    return attrs


def assert_same_archive(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Array for array and attribute for attribute equal (creation time aside)."""
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path] == b[path], f"{path} differs"
