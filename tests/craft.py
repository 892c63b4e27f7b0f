"""Crafting archives the way an adversary would: edit metadata and keep it self-consistent.

A format v2 archive carries a digest of its manifest and task records and a checksummed copy of
both, so a naive edit of ``zarr.json`` is caught by the digest (and repaired from the copy).
To test what the reader's validation does with a *consistent* crafted archive, these helpers
apply an edit everywhere the metadata lives (a node's own ``zarr.json``, the consolidated copy
in the root, the manifest copy) and recompute the digest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c

from tallstore.storage.manifest import archive_digest, canonical

Edit = Callable[[Any], Any]
COPY = "meta/manifest"


def craft(
    location: Path, *, manifest: Edit | None = None, node: tuple[str, Edit] | None = None,
    task: tuple[int, Edit] | None = None,
) -> None:
    """Apply ``manifest`` to the root's manifest, ``node = (path, edit)`` to one node's metadata
    document, ``task = (index, edit)`` to one task's record; then make the digest and the
    manifest's copy agree with the result."""
    root_path = location / "zarr.json"
    root = json.loads(root_path.read_text())
    nodes = (root.get("consolidated_metadata") or {}).get("metadata")
    if node is not None:
        path, edit = node
        _edit_node(location, nodes, path, edit)
    if task is not None:
        index, edit = task
        _edit_node(location, nodes, f"tasks/{index}", lambda meta: edit(meta["attributes"]["tallstore"]))
    m = root["attributes"]["tallstore"]
    if manifest is not None:
        manifest(m)
    root_path.write_text(json.dumps(root))
    if isinstance(m, dict) and "digest" in m and (location / COPY).is_dir():
        _reseal(location, root, m)


def _edit_node(location: Path, nodes: dict[str, Any] | None, path: str, edit: Edit) -> None:
    own = location / path / "zarr.json"
    meta = json.loads(own.read_text())
    edit(meta)
    own.write_text(json.dumps(meta))
    if nodes is not None and path in nodes:
        edit(nodes[path])


def _reseal(location: Path, root: dict[str, Any], m: dict[str, Any]) -> None:
    """Recompute the digest over the (edited) manifest and records and rewrite the copy to match."""
    tasks = [json.loads((location / f"tasks/{i}/zarr.json").read_text())["attributes"]["tallstore"]
             for i in range(len(m.get("tasks", [])))]
    try:
        m["digest"] = archive_digest(m, tasks)
        data = canonical({"manifest": m, "tasks": tasks})
    except (TypeError, ValueError):
        return
    (location / "zarr.json").write_text(json.dumps(root))
    (location / COPY / "c" / "0").write_bytes(data + crc32c.crc32c(data).to_bytes(4, "little"))
    meta_path = location / COPY / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [len(data)]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [len(data)]
    meta_path.write_text(json.dumps(meta))
    nodes = (root.get("consolidated_metadata") or {}).get("metadata")
    if nodes is not None and COPY in nodes:
        nodes[COPY] = meta
    (location / "zarr.json").write_text(json.dumps(root))


def naive_task_edit(location: Path, index: int, edit: Callable[[dict[str, Any]], None]) -> None:
    """A naive edit of task ``index``'s record in its own and the consolidated metadata: the
    digest and the manifest's copy are left as they were (what a careless editor would do)."""
    own = location / "tasks" / str(index) / "zarr.json"
    meta = json.loads(own.read_text())
    edit(meta["attributes"]["tallstore"])
    own.write_text(json.dumps(meta))
    root = json.loads((location / "zarr.json").read_text())
    edit(root["consolidated_metadata"]["metadata"][f"tasks/{index}"]["attributes"]["tallstore"])
    (location / "zarr.json").write_text(json.dumps(root))
