"""Reading archives: ``open`` gives a read-only mapping of tasks, each a lazy tensor mapping.

A task tensor is rebuilt on access as ``θ̂_t = θ₀ + m_t ⊙ τ_MTL``: the base bits, replaced by
the merged bits where task ``t``'s mask is set. Every rebuilt tensor is checked against the
CRC-32C recorded at pack time, so corruption or a wrong base never yields silent weights.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from . import dtypes, loading
from .base import BaseSource, CheckpointBase, EmbeddedBase
from .checkpoint import TensorInfo, open_checkpoint
from .checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, save
from .digests import checkpoint_fingerprint, probe
from .errors import ArchiveError, BaseMismatchError, CorruptArchiveError, TallstoreError
from .storage import format as fmt
from .storage import schema
from .storage.chunks import fast_codec
from .storage.strict import StrictStore
from .storage.stores import is_url, local_path, open_store, read_concurrency

if TYPE_CHECKING:
    from .merging import MergedView
    from .verify import VerifyReport


def open(
    location: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    concurrency: int | None = None,
) -> "Archive":
    """Open the archive at ``location`` (folder or URL) for reading.

    ``base`` is needed only when the base is neither embedded nor at its recorded location.
    ``storage_options`` (fsspec) apply to the archive's URL and a base URL. ``concurrency`` caps
    the archive reads in flight and sets the threads rebuilding tensors (which read the base):
    by default ``$TALLSTORE_CONCURRENCY``, else 64 when the archive or the base is a URL; local
    archives keep zarr's own pacing and two threads.
    """
    where = str(location)
    if not is_url(location) and not local_path(location).is_dir():
        raise ArchiveError(f"{where}: no such archive")
    store = StrictStore(open_store(
        location, read_only=True, storage_options=storage_options, limit=read_concurrency(location, concurrency),
    ))
    doc = _root_document(store, where)
    manifest = fmt.check_manifest(doc["attributes"], where)
    schema.check_manifest(manifest, where)
    base_at = base if base is not None or manifest["base"].get("embedded") else manifest["base"].get("location")
    return Archive(
        where, store, doc, manifest, base, storage_options=storage_options,
        concurrency=read_concurrency(location, concurrency, base_at),
    )


def _root_document(store: Store, where: str) -> dict[str, Any]:
    """The root group's ``zarr.json``, read as plain JSON (one request, no zarr objects built)."""
    try:
        buf = sync(store.get("zarr.json", default_buffer_prototype()))
        doc = json.loads(buf.to_bytes()) if buf is not None else None
    except Exception as e:  # whatever an unreachable store or a damaged document raises
        raise ArchiveError(f"{where}: not a readable tallstore archive ({type(e).__name__})") from None
    if doc is None:
        raise ArchiveError(f"{where}: not a readable tallstore archive (no zarr.json)")
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise ArchiveError(f"{where}: not a readable tallstore archive (its root is not a Zarr v3 group)")
    if not isinstance(doc.get("attributes", {}), dict):
        raise ArchiveError(f"{where}: not a readable tallstore archive (malformed attributes)")
    doc.setdefault("attributes", {})
    return doc


class Archive(Mapping[str, "TaskView"]):
    """A packed collection: ``arc.tasks``, ``arc[name]``, ``arc.extract(name, out)``."""

    def __init__(
        self, location: str, store: Store, root_document: dict[str, Any], manifest: dict[str, Any], base: Any, *,
        storage_options: dict[str, Any] | None = None, concurrency: int | None = None,
    ) -> None:
        self.location = location
        self.storage_options = storage_options
        self.concurrency = concurrency
        self.store = store
        self.local_root: Path | None = None if is_url(location) else local_path(location)
        self.manifest = manifest
        self.entries: dict[str, dict[str, Any]] = {e["key"]: e for e in manifest["tensors"]}
        self._task_attrs: dict[int, dict[str, Any]] = {}
        self._codecs: dict[str, str | None] = {}
        consolidated = root_document.get("consolidated_metadata")
        nodes = consolidated.get("metadata") if isinstance(consolidated, dict) else None
        self._nodes: dict[str, Any] | None = nodes if isinstance(nodes, dict) else None
        self.base = self._open_base(base)

    @cached_property
    def root(self) -> zarr.Group:
        """The archive's root as a zarr group (opened on first use: loads do not need it)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return zarr.open_group(self.store, mode="r", zarr_format=3)
        except Exception as e:  # whatever a damaged hierarchy makes zarr raise
            raise CorruptArchiveError(f"{self.location}: not a readable Zarr hierarchy ({type(e).__name__})") from None

    def chunk_codec(self, path: str, storage: Any, numel: int, chunk: int) -> str | None:
        """How to decode the chunks of the flat array at ``path`` (checked once per archive):
        ``"blosc"``/``"zstd"`` for the archive's own layout, ``None`` to read it through zarr."""
        if path not in self._codecs:
            meta = self.array_meta(path)
            codec = fast_codec(meta, chunk) if meta is not None else None
            if meta is not None:
                schema.check_array_meta(meta, path, storage, numel, codecs_known=codec is not None)
            self._codecs[path] = codec
        return self._codecs[path]

    def array_meta(self, path: str) -> dict[str, Any] | None:
        """The consolidated ``zarr.json`` document of the node at ``path``, if the root carries one."""
        if self._nodes is None:
            return None
        meta = self._nodes.get(path)
        if meta is None:
            raise CorruptArchiveError(f"{path} is missing")
        return meta

    @property
    def tasks(self) -> list[str]:
        """Task names in pack order."""
        return list(self.manifest["tasks"])

    def __getitem__(self, task: str) -> "TaskView":
        try:
            index = self.manifest["tasks"].index(task)
        except ValueError:
            raise KeyError(f"no task {task!r} in {self.location} (tasks: {', '.join(self.tasks)})") from None
        return TaskView(self, index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.manifest["tasks"])

    def task_attrs(self, index: int) -> dict[str, Any]:
        """The recorded attributes of task ``index`` (key listing, files, statistics)."""
        if index not in self._task_attrs:
            try:
                node = self.array_meta(fmt.task_group(index))
                attrs = node["attributes"][fmt.ATTR] if node is not None else self.root[fmt.task_group(index)].attrs[fmt.ATTR]
            except Exception as e:
                raise CorruptArchiveError(f"{self.location}: task {index} metadata is missing ({e})") from None
            self._task_attrs[index] = schema.check_task_attrs(attrs, self.manifest, self.entries, index, self.location)
        return self._task_attrs[index]

    def extract(
        self, task: str, out: str | os.PathLike[str], *, overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> Path:
        """Write one task to a ``.safetensors`` file or, for a folder path, a sharded HF folder."""
        return self[task].save(out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)

    def merge(self, method: str = "consensus", *, k: int | None = None, alpha: float = 1.0) -> "MergedView":
        """A lazy merged model from the archive alone: ``consensus`` (``k``, default 2), ``ta`` or ``ties``."""
        from .merging import MergedView

        return MergedView(self, method, k=k, alpha=alpha)

    def verify(
        self, *, deep: bool = False, against: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> "VerifyReport":
        """Check every stored chunk; ``deep``: every task's digests; ``against``: rebuild errors."""
        from .verify import verify

        return verify(self, deep=deep, against=against)

    def _open_base(self, base: Any) -> BaseSource:
        b = self.manifest["base"]
        if base is None and b.get("embedded"):
            return EmbeddedBase(self)
        if base is None:
            recorded = b.get("location")
            if not recorded or (not is_url(recorded) and not Path(recorded).exists()):
                raise ArchiveError(
                    f"{self.location}: its base is not embedded and not found at {recorded}; pass base="
                    " (or --base) to say where it is"
                )
            base = recorded
        ckpt = open_checkpoint(base, self.storage_options)
        self._check_base(ckpt, str(base))
        return CheckpointBase(ckpt)

    def _check_base(self, ckpt: Any, where: str) -> None:
        b = self.manifest["base"]
        same_keys = list(ckpt.keys) == list(b["keys"]) or set(ckpt.keys) == set(b["keys"])
        ok = same_keys and all(
            ckpt.info(k) == TensorInfo(dtypes.by_name(self.entries[k].get("base_dtype", self.entries[k]["dtype"])), tuple(self.entries[k]["shape"]))
            for k in b["keys"]
        )
        if ok and probe(ckpt) == b["probe"]:
            return
        got = checkpoint_fingerprint(ckpt, self.manifest["block_elems"])
        raise BaseMismatchError(
            f"{where} is not the base this archive was packed against: "
            f"archive expects {b['fingerprint']}, this base is {got}"
        )


class TaskView(Mapping[str, torch.Tensor]):
    """One task of an archive as a lazy ``Mapping[str, Tensor]`` in the original key order."""

    def __init__(self, archive: Archive, index: int) -> None:
        self.archive = archive
        self.index = index
        self.name = archive.manifest["tasks"][index]
        attrs = archive.task_attrs(index)
        self._listing = {row[0]: row for row in attrs["tensors"]}

    def __iter__(self) -> Iterator[str]:
        return iter(self._listing)

    def __len__(self) -> int:
        return len(self._listing)

    def __contains__(self, key: object) -> bool:
        return key in self._listing

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of ``key`` in this task."""
        row = self._listing[key]
        return TensorInfo(dtypes.by_name(row[1]), tuple(row[2]))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._listing:
            raise KeyError(f"task {self.name!r} has no tensor {key!r}")
        return self._load([key])[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the task, in the original key order, dtypes and shapes."""
        return self._load(list(self._listing))

    def load_into(self, target: Mapping[str, torch.Tensor] | torch.nn.Module, *, strict: bool = True) -> None:
        """Rebuild the task directly into existing tensors (a module's parameters and buffers, say).

        Like ``safetensors.torch.load_model``: ``target`` names preallocated tensors of the task's
        dtypes and shapes, which are overwritten in place; contiguous CPU tensors receive the
        decoded bits with no intermediate copy. ``strict``: the keys must be exactly the task's.
        """
        tensors = dict(target.state_dict(keep_vars=True) if isinstance(target, torch.nn.Module) else target)
        missing = [k for k in self._listing if k not in tensors]
        extra = [k for k in tensors if k not in self._listing]
        if strict and (missing or extra):
            raise KeyError(
                f"target does not match task {self.name!r}: "
                + "; ".join(f"{what}: {', '.join(ks[:5])}{' …' if len(ks) > 5 else ''}"
                            for what, ks in (("missing", missing), ("unexpected", extra)) if ks)
            )
        direct: dict[str, torch.Tensor] = {}
        staged: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key not in self._listing:
                continue
            info = self.info(key)
            if t.dtype != info.dtype.torch or tuple(t.shape) != info.shape:
                raise TallstoreError(
                    f"target tensor {key!r} is {t.dtype} {tuple(t.shape)}; task {self.name!r} stores "
                    f"{info.dtype.torch} {info.shape}"
                )
            t = t.detach()
            if t.device.type == "cpu" and t.is_contiguous():
                direct[key] = t.view(-1)
            else:
                staged[key] = t
        loading.load(self.archive, self.index, self._listing, direct)
        for key, got in self._load(list(staged)).items():
            staged[key].copy_(got)

    def save(
        self, out: str | os.PathLike[str], *, overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> Path:
        """Stream this task to a safetensors file or HF folder, one tensor at a time."""
        items = [(k, self.info(k)) for k in self._listing]
        return save(out, items, self.__getitem__, overwrite=overwrite, max_shard_bytes=max_shard_bytes)

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Fresh tensors for ``keys``, rebuilt in place."""
        out = {k: torch.empty(self.info(k).shape, dtype=self.info(k).dtype.torch) for k in keys}
        loading.load(self.archive, self.index, self._listing, {k: t.view(-1) for k, t in out.items()})
        return out
