"""The public reading API: ``open`` gives a read-only mapping of tasks, each a lazy tensor mapping.

A task tensor is rebuilt on access as ``θ̂_t = θ₀ + m_t ⊙ τ_MTL``: the base bits, replaced by
the merged bits where task ``t``'s mask is set. Every rebuilt tensor is checked against the
CRC-32C recorded at pack time, so corruption or a wrong base never yields silent weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import collector
from ..checkpoint.interface import WeightLayout
from ..checkpoint.writer import save
from ..dtypes import TensorInfo
from ..errors import TallstoreError
from ..storage.chunks import allocating
from ..storage.stores import read_concurrency
from . import loading, models, stats, summary
from .base_model import BaseHandle, EmbeddedBase, ExternalBase
from .merging import MergedView
from .source import ArchiveSource
from .verify import VerifyReport, verify

Progress = Callable[[int], None]


def open(
    location: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    concurrency: int | None = None,
) -> Archive:
    """Open the archive at ``location`` (folder or URL) for reading.

    ``base`` is needed only when the base is neither embedded nor at its recorded local path (a
    recorded URL is never fetched unless given here); it is opened, and checked, when a read
    first needs it — at once when given.
    ``storage_options`` (fsspec) apply to the archive's URL and a base URL. ``concurrency`` caps
    the archive reads in flight and sets the threads rebuilding tensors (which read the base):
    by default ``$TALLSTORE_CONCURRENCY``, else 64 when the archive or the base is a URL; local
    archives use one rebuild thread per core.
    """
    source = ArchiveSource(location, storage_options=storage_options, concurrency=read_concurrency(location, concurrency))
    try:
        b = source.manifest.base
        base_at = base if base is not None or b.embedded else b.location
        source.concurrency = read_concurrency(location, concurrency, base_at)
        return Archive(source, BaseHandle(source, base, storage_options))
    except BaseException:
        source.close()
        raise


class Archive(Mapping[str, "TaskView"]):
    """A packed collection: ``arc.tasks``, ``arc[name]``, ``arc.extract(name, out)``, ``arc.merge()``."""

    def __init__(self, source: ArchiveSource, base: BaseHandle) -> None:
        self._source = source
        self._handle = base

    @property
    def _base(self) -> ExternalBase | EmbeddedBase:
        return self._handle.get()

    @property
    def location(self) -> str:
        """Where the archive is (as given to ``open``)."""
        return self._source.location

    @property
    def tasks(self) -> list[str]:
        """Task names in pack order, then the aliases of tasks given twice (stored once)."""
        m = self._source.manifest
        return [*m.tasks, *m.aliases]

    def __getitem__(self, task: str) -> TaskView:
        return TaskView(self, self._source.index(task), task)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def describe(self, *, sizes: bool = True) -> dict[str, Any]:
        """Everything ``tallstore info --json`` shows: format, merge, λ, base, tensors, tasks with
        their sources, files and digests, and (``sizes``) stored bytes and compression ratios."""
        return summary.describe(self._source, sizes=sizes)

    def stats(self) -> dict[str, Any]:
        """Mask statistics (TALL paper §4): densities, the selection histogram, catastrophic and
        selfish weights overall and per layer, pairwise Jaccard overlaps (what ``tallstore stats`` shows)."""
        return stats.mask_stats(self._source)

    def extract(
        self, task: str, out: str | os.PathLike[str], *, overwrite: bool = False,
        max_shard_bytes: int | None = None, progress: Progress | None = None,
    ) -> Path:
        """Write one task to a ``.safetensors`` file or, for a folder path, its whole model folder
        (see :meth:`TaskView.save`)."""
        return self[task].save(out, overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)

    def merge(self, method: str = "consensus", *, k: int | None = None, alpha: float = 1.0) -> MergedView:
        """A lazy merged model from the archive alone: ``consensus`` (``k``, default 2), ``ta`` or ``ties``."""
        return MergedView(self._source, self._base, method, k=k, alpha=alpha)

    def verify(
        self, *, deep: bool = False, against: Mapping[str, str | os.PathLike[str]] | None = None,
        progress: Progress | None = None,
    ) -> VerifyReport:
        """Check every stored chunk; ``deep``: every task's digests; ``against``: rebuild errors.
        ``progress`` is called once per tensor rebuilt."""
        return verify(self._source, self._handle.get, deep=deep, against=against, progress=progress)

    def close(self) -> None:
        """Release the archive's handles (its folder, the base's files)."""
        self._source.close()
        self._handle.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TaskView(Mapping[str, torch.Tensor]):
    """One task of an archive as a lazy ``Mapping[str, Tensor]`` in the original key order."""

    def __init__(self, archive: Archive, index: int, name: str | None = None) -> None:
        self._source = archive._source
        self._archive = archive
        self.index = index
        self.name = name or self._source.manifest.tasks[index]
        self._rows = self._source.task(index).by_key

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of ``key`` in this task."""
        return self._rows[key].info

    @property
    def files(self) -> dict[str, int]:
        """The task's archived non-weight files (config, tokenizer…): path in its folder → size."""
        return {f.path: f.size for f in self._source.task(self.index).folder}

    def read_file(self, path: str) -> bytes:
        """One archived non-weight file of the task, checked against its recorded SHA-256."""
        for f in self._source.task(self.index).folder:
            if f.path == path:
                return self._source.read_file(f)
        raise KeyError(f"task {self.name!r} has no archived file {path!r}")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._rows:
            raise KeyError(f"task {self.name!r} has no tensor {key!r}")
        return self._load([key])[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the task, in the original key order, dtypes and shapes."""
        return self._load(list(self._rows))

    @collector.paused()
    def load_into(
        self, target: Mapping[str, torch.Tensor] | torch.nn.Module, *, strict: bool = True, dtype: torch.dtype | None = None,
    ) -> tuple[list[str], list[str]]:
        """Rebuild the task straight into existing tensors (a module's parameters and buffers, say).

        Like ``safetensors.torch.load_model``: returns ``(missing, unexpected)`` — the target's
        names the task lacks (left as they were) and the task's names the target lacks; with
        ``strict`` either is an error. Tensors are overwritten in place; contiguous CPU tensors of
        the stored dtype receive the decoded bits with no intermediate copy. ``dtype`` casts
        (targets must then have that dtype); a module's meta-device tensors are replaced by the
        rebuilt ones. Python's cyclic collector is paused meanwhile (``tallstore.collector``).
        """
        module = target if isinstance(target, torch.nn.Module) else None
        tensors = dict(module.state_dict(keep_vars=True) if module is not None else target)
        missing = [k for k in tensors if k not in self._rows]
        unexpected = [k for k in self._rows if k not in tensors]
        if strict and (missing or unexpected):
            raise TallstoreError(
                f"target does not match task {self.name!r}: "
                + "; ".join(f"{what}: {', '.join(ks[:5])}{' …' if len(ks) > 5 else ''}"
                            for what, ks in (("missing", missing), ("unexpected", unexpected)) if ks)
            )
        direct: dict[str, torch.Tensor] = {}
        staged: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key not in self._rows:
                continue
            info = self.info(key)
            want = dtype or info.dtype.torch
            if tuple(t.shape) != info.shape or t.dtype != want:
                raise TallstoreError(
                    f"target tensor {key!r} is {t.dtype} {tuple(t.shape)}; task {self.name!r} stores "
                    f"{info.dtype.torch} {info.shape}" + (f" (to be cast to {dtype})" if dtype is not None else "")
                )
            t = t.detach()
            if t.device.type == "cpu" and t.is_contiguous() and t.dtype == info.dtype.torch:
                direct[key] = t.view(-1)
            else:
                staged[key] = t
        loading.load(self._source, self._archive._base, self.index, direct)
        assign = {}
        for key, got in self._load(list(staged)).items():
            if staged[key].is_meta:
                assign[key] = got.to(staged[key].dtype)
            else:
                staged[key].copy_(got)
        if assign:
            if module is None:
                raise TallstoreError(f"target tensor {next(iter(assign))!r} is on the meta device: give a module or real tensors")
            module.load_state_dict(assign, strict=False, assign=True)
        return missing, unexpected

    def to_model(self, model_class: str | type | None = None, *, dtype: torch.dtype | None = None, strict: bool = True) -> torch.nn.Module:
        """The task as a ready transformers model, built from its archived ``config.json`` with no
        random initialisation (see :func:`tallstore.reading.models.load_pretrained`)."""
        return models.load_pretrained(self, model_class, dtype=dtype, strict=strict)

    def tokenizer(self, **kwargs: Any) -> Any:
        """The task's tokenizer, from its archived tokenizer files."""
        return models.load_tokenizer(self, **kwargs)

    def to_sentence_transformer(self, **kwargs: Any) -> Any:
        """The task as a ``SentenceTransformer`` (packed from a sentence-transformers folder)."""
        return models.load_sentence_transformer(self, **kwargs)

    def save(
        self, out: str | os.PathLike[str], *, overwrite: bool = False,
        max_shard_bytes: int | None = None, progress: Progress | None = None,
    ) -> Path:
        """Stream this task to a ``.safetensors`` file, or to a folder holding everything its input
        folder held: the weights laid out as they came (file names, shards, each file's
        ``__metadata__``; ``max_shard_bytes`` reshards them) and every archived file (config,
        tokenizer…), each checked against its SHA-256. One tensor in memory at a time."""
        record = self._source.task(self.index)
        items = [(k, self.info(k)) for k in self._rows]
        layout = None
        if record.weights is not None:
            w = record.weights
            layout = WeightLayout(w.format, tuple((f.name, f.tensors, f.metadata) for f in w.files), w.index_metadata, w.folder)
        files = [(f.path, partial(self._source.read_file, f)) for f in record.folder]
        return save(out, items, self.__getitem__, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                    progress=progress, layout=layout, files=files, command="extract")

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Fresh tensors for ``keys``, rebuilt in place."""
        nbytes = sum(self.info(k).nbytes for k in keys)
        with allocating(f"{self._source.location}: task {self.name!r} ({nbytes} bytes)"):
            out = {k: torch.empty(self.info(k).shape, dtype=self.info(k).dtype.torch) for k in keys}
        loading.load(self._source, self._archive._base, self.index, {k: t.view(-1) for k, t in out.items()})
        return out
