"""An opened archive: its root document, manifest, task records and the one checked chunk reader.

Every read path (loads, extract, merge, stats, verify, info) starts from an
:class:`ArchiveSource`, so each reads the same validated metadata through the same reader.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ArchiveError, CorruptArchiveError, TallstoreError
from ..locations import is_url, local_path
from ..storage import layout
from ..storage.chunks import ChunkReader, Objects
from ..storage.manifest import Manifest, TaskRecord
from ..storage.stores import open_store


class ArchiveSource:
    """The metadata and chunks of the archive at ``location``, read once and checked."""

    def __init__(
        self, location: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.location = where = str(location)
        self.storage_options = storage_options
        self.concurrency = concurrency
        remote = is_url(location)
        if not remote and not local_path(location).is_dir():
            raise ArchiveError(f"{where}: no such archive")
        store = open_store(location, read_only=True, storage_options=storage_options, connections=concurrency) if remote else None
        self.objects = Objects(where, store, None if remote else local_path(location), concurrency)
        try:
            doc = self._root_document()
            self.manifest = Manifest.from_json(doc["attributes"].get(layout.ATTR), where)
            consolidated = doc.get("consolidated_metadata")
            nodes = consolidated.get("metadata") if isinstance(consolidated, dict) else None
            self.nodes: dict[str, Any] | None = nodes if isinstance(nodes, dict) else None
            self.reader = ChunkReader(self.objects, self.nodes)
        except BaseException:
            self.objects.close()
            raise
        self._tasks: dict[int, TaskRecord] = {}

    @property
    def local(self) -> bool:
        """Whether the archive is a local folder (read through a directory handle)."""
        return self.objects.local

    def _root_document(self) -> dict[str, Any]:
        """The root group's ``zarr.json``, read as plain JSON (one bounded read)."""
        where = self.location
        try:
            doc = self.objects.document("zarr.json")
        except CorruptArchiveError as e:
            raise ArchiveError(f"{where}: not a readable tallstore archive ({e})") from None
        if doc is None:
            raise ArchiveError(f"{where}: not a readable tallstore archive (no zarr.json)")
        if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
            raise ArchiveError(f"{where}: not a readable tallstore archive (its root is not a Zarr v3 group)")
        if not isinstance(doc.get("attributes", {}), dict):
            raise ArchiveError(f"{where}: not a readable tallstore archive (malformed attributes)")
        doc.setdefault("attributes", {})
        return doc

    def task(self, index: int) -> TaskRecord:
        """The checked record of task ``index`` (key listing, files, statistics)."""
        if index not in self._tasks:
            try:
                attrs = self.reader.metadata(layout.task_group(index))["attributes"][layout.ATTR]
            except TallstoreError as e:
                raise CorruptArchiveError(f"{self.location}: task {index} metadata is missing ({e})") from None
            except (KeyError, TypeError):
                raise CorruptArchiveError(f"{self.location}: task {index} metadata is missing") from None
            self._tasks[index] = TaskRecord.from_json(attrs, self.manifest, index, self.location)
        return self._tasks[index]

    def index(self, task: str) -> int:
        """The index of task ``task``; a ``KeyError`` naming the tasks if there is none."""
        try:
            return self.manifest.tasks.index(task)
        except ValueError:
            raise KeyError(f"no task {task!r} in {self.location} (tasks: {', '.join(self.manifest.tasks)})") from None

    def close(self) -> None:
        """Release the archive's directory handle."""
        self.objects.close()
