"""An opened archive: its root document, manifest, task records and the one checked chunk reader.

Every read path (loads, extract, merge, stats, verify, info) starts from an
:class:`ArchiveSource`, so each reads the same validated metadata through the same reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from ..errors import (
    ArchiveError,
    CorruptArchiveError,
    IncompleteArchiveError,
    NewerFormatError,
    TallstoreError,
)
from ..locations import is_url, local_path
from ..storage import layout
from ..storage.chunks import MAX_DOCUMENT, ChunkReader, Objects
from ..storage.codecs import ArrayFormat
from ..storage.manifest import FolderFile, Manifest, TaskRecord
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
        self._tasks: dict[int, TaskRecord] = {}
        self._raw_tasks: list[Any] | None = None
        self.nodes: dict[str, Any] | None = None
        self.damage: str | None = None
        try:
            self._open_metadata()
        except BaseException:
            self.objects.close()
            raise

    def _open_metadata(self) -> None:
        """Read and check the manifest and task records; fall back to the checksummed copy (v2)
        when the root document is lost, torn or does not match its digest."""
        where = self.location
        try:
            doc = self._root_document()
            raw = doc["attributes"].get(layout.ATTR)
            self.manifest = Manifest.from_json(raw, where)
            consolidated = doc.get("consolidated_metadata")
            nodes = consolidated.get("metadata") if isinstance(consolidated, dict) else None
            self.nodes = nodes if isinstance(nodes, dict) else None
            self.reader = ChunkReader(self.objects, self.nodes)
            if self.manifest.version >= 2:
                self._raw_tasks = [self._raw_task(i) for i in range(len(self.manifest.tasks))]
                self.manifest.check_digest(raw, self._raw_tasks, where)
            elif self.objects.document(f"{layout.MANIFEST_COPY}/zarr.json") is not None:
                raise CorruptArchiveError(
                    f"{where}: the root zarr.json says format v{self.manifest.version}, but the archive holds the "
                    "manifest copy only format v2 writes (a relabelled version)"
                )
        except (IncompleteArchiveError, NewerFormatError):
            raise
        except ArchiveError as e:
            if not self._open_copy():
                raise
            self.damage = f"{where}: the root zarr.json is damaged ({e}); its checksummed copy {layout.MANIFEST_COPY} was read"

    def _open_copy(self) -> bool:
        """Use the manifest's second copy (``meta/manifest``) if it is there and intact."""
        where = self.location
        self.nodes = None
        self.reader = ChunkReader(self.objects, None)
        try:
            meta = self.objects.document(f"{layout.MANIFEST_COPY}/zarr.json")
            if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list) or len(meta["shape"]) != 1:
                return False
            n = meta["shape"][0]
            if not isinstance(n, int) or not 0 < n <= MAX_DOCUMENT:
                return False
            arr = ArrayFormat.from_meta(meta, layout.MANIFEST_COPY, np.dtype(np.uint8), n)
            doc = json.loads(self.reader.read(arr).tobytes())
            raw, tasks = doc["manifest"], doc["tasks"]
            manifest = Manifest.from_json(raw, where)
            if manifest.version < 2 or not isinstance(tasks, list) or len(tasks) != len(manifest.tasks):
                return False
            manifest.check_digest(raw, tasks, where)
        except (TallstoreError, ValueError, KeyError, TypeError, RecursionError):
            return False
        self.manifest = manifest
        self._raw_tasks = tasks
        return True

    def _raw_task(self, index: int) -> Any:
        try:
            return self.reader.metadata(layout.task_group(index))["attributes"][layout.ATTR]
        except TallstoreError as e:
            raise CorruptArchiveError(f"{self.location}: task {index} metadata is missing ({e})") from None
        except (KeyError, TypeError):
            raise CorruptArchiveError(f"{self.location}: task {index} metadata is missing") from None

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
            attrs = self._raw_tasks[index] if self._raw_tasks is not None else self._raw_task(index)
            self._tasks[index] = TaskRecord.from_json(attrs, self.manifest, index, self.location)
        return self._tasks[index]

    def codes_array(self) -> ArrayFormat:
        """Shared form ``quantized``: the ``shared/codes`` stream (its length: all code segments)."""
        total = sum(seg[1] for e in self.manifest.tensors for seg in e.codes or ())
        return self.reader.array(layout.SHARED_CODES, np.dtype(np.uint8), total)

    def mask_stream(self, task: int) -> ArrayFormat:
        """Shared form ``quantized``: task ``task``'s mask stream (its length: all its segments)."""
        total = sum(seg[1] for seg in self.task(task).masks or ())
        return self.reader.array(layout.mask_path(task), np.dtype(np.uint8), total)

    def delta_stream(self, task: int) -> ArrayFormat:
        """Representation ``delta``: task ``task``'s stream of delta segments (its length: all of them)."""
        record = self.task(task).delta
        total = sum(seg[1] for segs in record.segments.values() for seg in segs) if record else 0
        return self.reader.array(layout.delta_path(task), np.dtype(np.uint8), total)

    def read_file(self, f: FolderFile) -> bytes:
        """An archived non-weight file's bytes, checked against its recorded size and SHA-256."""
        arr = self.reader.array(layout.file_path(f.sha256), np.dtype(np.uint8), f.size)
        data = self.reader.read(arr).tobytes()
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise CorruptArchiveError(f"{self.location}: archived file {f.path!r} does not match its SHA-256")
        return data

    def index(self, task: str) -> int:
        """The index of task ``task``; a ``KeyError`` naming the tasks if there is none."""
        try:
            return self.manifest.tasks.index(self.manifest.aliases.get(task, task))
        except ValueError:
            names = [*self.manifest.tasks, *self.manifest.aliases]
            raise KeyError(f"no task {task!r} in {self.location} (tasks: {', '.join(names)})") from None

    def close(self) -> None:
        """Release the archive's directory handle."""
        self.objects.close()
