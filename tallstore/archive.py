"""Reading archives: ``open`` gives a read-only mapping of tasks, each a lazy tensor mapping.

A task tensor is rebuilt on access as ``θ̂_t = θ₀ + m_t ⊙ τ_MTL``: the base bits, replaced by
the merged bits where task ``t``'s mask is set. Every rebuilt tensor is checked against the
CRC-32C recorded at pack time, so corruption or a wrong base never yields silent weights.
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr

from . import dtypes
from .base import BaseSource, CheckpointBase, EmbeddedBase
from .checkpoint import TensorInfo, open_checkpoint
from .checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, save
from .digests import block_crc, checkpoint_fingerprint, probe
from .errors import ArchiveError, BaseMismatchError, CorruptArchiveError, TallstoreError
from .geometry import block_ranges
from .storage import format as fmt
from .storage import schema
from .storage.strict import StrictStore, read_error
from .storage.reading import coalesce, read_many
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = zarr.open_group(store, mode="r", zarr_format=3)
        attrs = dict(root.attrs)
    except Exception as e:  # whatever a damaged root zarr.json makes zarr raise
        raise ArchiveError(f"{where}: not a readable tallstore archive ({type(e).__name__})") from None
    manifest = fmt.check_manifest(attrs, where)
    schema.check_manifest(manifest, where)
    base_at = base if base is not None or manifest["base"].get("embedded") else manifest["base"].get("location")
    return Archive(
        where, root, manifest, base, storage_options=storage_options,
        concurrency=read_concurrency(location, concurrency, base_at),
    )


class Archive(Mapping[str, "TaskView"]):
    """A packed collection: ``arc.tasks``, ``arc[name]``, ``arc.extract(name, out)``."""

    def __init__(
        self, location: str, root: zarr.Group, manifest: dict[str, Any], base: Any, *,
        storage_options: dict[str, Any] | None = None, concurrency: int | None = None,
    ) -> None:
        self.location = location
        self.storage_options = storage_options
        self.concurrency = concurrency
        self.root = root
        self.manifest = manifest
        self.entries: dict[str, dict[str, Any]] = {e["key"]: e for e in manifest["tensors"]}
        self._task_attrs: dict[int, dict[str, Any]] = {}
        self.base = self._open_base(base)

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
                attrs = self.root[fmt.task_group(index)].attrs[fmt.ATTR]
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
            return EmbeddedBase(self.root, self.entries)
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

    def save(
        self, out: str | os.PathLike[str], *, overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> Path:
        """Stream this task to a safetensors file or HF folder, one tensor at a time."""
        items = [(k, self.info(k)) for k in self._listing]
        return save(out, items, self.__getitem__, overwrite=overwrite, max_shard_bytes=max_shard_bytes)

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        arc = self.archive
        reads: list[tuple[zarr.Array, Any]] = []
        slots: dict[str, list[int]] = {}
        masks: dict[str, tuple[int, int]] = {}
        key: str | None = None
        try:
            for key in keys:
                src = self._listing[key][3]
                node = arc.entries[key]["node"]
                if src == fmt.SOURCE_MASKED:
                    e = arc.entries[key]
                    d = dtypes.by_name(e["dtype"])
                    n = TensorInfo(d, tuple(e["shape"])).numel
                    lo = e["mask_offset"]
                    slots[key] = [len(reads)]
                    reads.append((schema.open_array(arc.root, fmt.merged_path(node), d.storage, n), slice(None)))
                    masks[key] = (lo, lo + (n + 7) // 8)
                elif src == fmt.SOURCE_EXACT:
                    info = self.info(key)
                    slots[key] = [len(reads)]
                    path = fmt.exact_path(node, self.index)
                    reads.append((schema.open_array(arc.root, path, info.dtype.storage, info.numel), slice(None)))
            key = None
            data = self._read_with_masks(reads, slots, masks)
        except Exception as e:
            if isinstance(e, TallstoreError) and not isinstance(e, CorruptArchiveError):
                raise
            raise self._corrupt(key if key is not None else self._failing_key(keys, reads, slots, masks), e) from None
        with ThreadPoolExecutor(max_workers=arc.concurrency or 2) as pool:
            built = list(pool.map(lambda k: self._build(k, [data[i] for i in slots.get(k, [])]), keys))
        return dict(zip(keys, built))

    def _read_with_masks(
        self, reads: list[tuple[zarr.Array, Any]], slots: dict[str, list[int]], masks: dict[str, tuple[int, int]],
    ) -> list[np.ndarray]:
        """Run ``reads`` plus this task's mask ranges, each mask chunk fetched once; fill ``slots``."""
        if not masks:
            return read_many(reads)
        arr = self._mask_array()
        runs = coalesce(masks.values(), arr.chunks[0])
        first = len(reads)
        data = read_many([*reads, *((arr, slice(a, b)) for a, b in runs)])
        starts = [a for a, _ in runs]
        for key, (lo, hi) in masks.items():
            r = bisect.bisect_right(starts, lo) - 1
            slots[key].append(len(data))
            data.append(data[first + r][lo - starts[r] : hi - starts[r]])
        return data

    def _mask_array(self) -> zarr.Array:
        return schema.open_array(
            self.archive.root, fmt.mask_path(self.index), np.dtype(np.uint8), self.archive.manifest["mask"]["nbytes"]
        )

    def _failing_key(
        self, keys: list[str], reads: list[tuple[zarr.Array, Any]], slots: dict[str, list[int]],
        masks: dict[str, tuple[int, int]],
    ) -> str | None:
        """The first of ``keys`` whose stored data cannot be read, tried one tensor at a time."""
        for k in keys:
            try:
                read_many([reads[i] for i in slots.get(k, [])[:1]])
                if k in masks:
                    self._mask_array()[slice(*masks[k])]
            except Exception:
                return k
        return None

    def _corrupt(self, key: str | None, e: BaseException) -> CorruptArchiveError:
        """A one-line error naming the archive, the task and, when known, the tensor."""
        what = f"tensor {key!r} of task {self.name!r}" if key is not None else f"task {self.name!r}"
        detail = str(e) if isinstance(e, TallstoreError) else read_error(e)
        return CorruptArchiveError(f"{self.archive.location}: {what}: stored data is unreadable or corrupt ({detail})")

    def _build(self, key: str, arrays: list[np.ndarray]) -> torch.Tensor:
        row = self._listing[key]
        info = TensorInfo(dtypes.by_name(row[1]), tuple(row[2]))
        src = row[3]
        try:
            if src == fmt.SOURCE_EXACT:
                out = dtypes.from_storage(arrays[0], info.dtype, info.shape)
            else:
                base = self.archive.base.read(key).reshape(-1).to(info.dtype.torch)
                if src == fmt.SOURCE_BASE:
                    out = base.reshape(info.shape)
                else:
                    out = _rebuild(base, *arrays).view(info.dtype.torch).reshape(info.shape)
        except Exception as e:
            if isinstance(e, TallstoreError) and not isinstance(e, CorruptArchiveError):
                raise
            raise self._corrupt(key, e) from None
        self._verify(key, info, out, row[5])
        return out

    def _verify(self, key: str, info: TensorInfo, t: torch.Tensor, crcs: list[int]) -> None:
        flat = t.reshape(-1)
        row = info.row_numel
        got = [block_crc(flat[a * row : b * row]) for a, b in block_ranges(info, self.archive.manifest["block_elems"])]
        if got != crcs:
            raise CorruptArchiveError(
                f"{self.archive.location}: tensor {key!r} of task {self.name!r} does not match its "
                "recorded checksum (corrupt or missing data, or a modified base)"
            )


def _rebuild(base: torch.Tensor, xor: np.ndarray, mask_bytes: np.ndarray) -> torch.Tensor:
    """Bits of ``θ̂_t``: ``bits(θ₀) XOR (stored XOR where the mask is set)``, in two in-place passes.

    Unpacking the complemented mask bytes gives "keep the base" directly; the decoded ``merged``
    buffer is reused as the output, so no full-size temporary is allocated.
    """
    bb = dtypes.bits(base)
    keep_base = np.unpackbits(~mask_bytes, count=bb.numel(), bitorder=fmt.BITORDER).view(bool)
    if not xor.flags.writeable:
        xor = xor.copy()
    delta = torch.from_numpy(xor.view(bb.numpy().dtype))
    delta.masked_fill_(torch.from_numpy(keep_base), 0)
    return delta.bitwise_xor_(bb)
