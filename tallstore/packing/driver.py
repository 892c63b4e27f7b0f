"""The streaming packer: plan, run the units on a pool, write the manifest last, publish.

Memory holds at most one row block per input per worker; the archive is built in a temporary
sibling folder (or, on object stores, in place with the completeness marker written last) so a
failed pack never leaves something that opens as a complete archive.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import uuid
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack, closing
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .. import publishing
from ..checkpoint import Checkpoint
from ..checkpoint.folder_files import FolderListing
from ..checkpoint.tasks import original_key
from ..errors import OutputExistsError, PackWarning, PlanError
from ..locations import is_url, local_path
from ..storage import chunks, layout
from ..storage.arrays import WRITE_ALL, create_masks, create_weights
from ..storage.digests import combine, fingerprint, probe
from ..storage.geometry import auto_block_elems, chunk_elems
from ..storage.manifest import (
    BaseRecord,
    DeltaRecord,
    FileRecord,
    FolderFile,
    Manifest,
    MaskLayout,
    MergeRecord,
    TaskRecord,
    TaskRow,
    TaskStats,
    TensorEntry,
    WeightFile,
    WeightsLayout,
    archive_digest,
    canonical,
)
from ..storage.stores import open_store, settle_writes
from ..storage.streams import StreamWriter
from ..version import VERSION
from . import fidelity
from .collection import Collection, open_collection
from .dask_executor import DaskExecutor
from .duplicates import near_duplicates
from .executors import Executor, ThreadExecutor
from .inputs import InputSpec
from .mask_writer import MaskWriter
from .options import PackOptions
from .plan import check_task_names
from .prepare import Prepared
from .results import PackState
from .units import (
    ExactTensor,
    ExtraRows,
    FileHash,
    MaskedBlock,
    PackSpec,
    SeparateTensor,
    StoreFile,
    release,
)

MASK_CHUNK_BYTES = 1 << 20

Progress = Callable[[int], None]


def pack(
    out: str | os.PathLike[str],
    base: str | os.PathLike[str],
    tasks: Mapping[str, str | os.PathLike[str]],
    options: PackOptions,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
    executor: Executor | None = None,
    client: Any = None,
) -> str:
    """Pack fine-tunes of one base into a TALL-mask archive at ``out``; returns its location.

    ``progress`` is called with input bytes processed; ``on_start`` first with the total. Units
    run on ``executor``, else on the Dask ``client``'s workers, else on ``options.workers``
    threads. ``storage_options`` apply to every URL: the output's and the inputs'.
    """
    check_task_names(list(tasks))
    target = Target(out, options.overwrite, storage_options)  # checks the output before any pre-pass
    with ExitStack() as stack:
        c = open_collection(base, tasks, options, storage_options, stack)
        if options.block_elems is None:
            options = dataclasses.replace(options, block_elems=auto_block_elems(len(c.tasks)))
        ex = executor or _executor(client, options.workers)
        choice = fidelity.choose(c, options, ex, out, storage_options)
        exact, p = choice.stored, choice.prepared
        stored = InputSpec(
            token=uuid.uuid4().hex, base=c.base_location, tasks=tuple(c.sources[t] for t in exact),
            names=tuple(c.names[t] for t in exact), storage_options=storage_options,
            allow_nonfinite=options.allow_nonfinite,
        ) if exact else None
        with target as store:
            root = zarr.open_group(store, mode="w", zarr_format=3)
            manifest = Manifest(
                tasks=tuple(c.names), lam=tuple(p.lam(t) for t in range(len(c.names))), merge=MergeRecord(options.rule.name, p.params),
                block_elems=options.block_elems,
                mask=MaskLayout(0 if options.shared.quantized else p.plan.mask_nbytes, MASK_CHUNK_BYTES),
                shared=options.shared,
                base=BaseRecord(str(base) if is_url(base) else str(Path(base).resolve()), options.embed_base),
                tensors=(), writer=f"tallstore {VERSION}",
                created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), lam_selection=p.selection,
                generation=uuid.uuid4().hex, aliases=c.aliases,
            )
            root.attrs[layout.ATTR] = manifest.to_json()
            spec = PackSpec(
                token=uuid.uuid4().hex, inputs=p.inputs, store=target.location, storage_options=storage_options,
                lams=tuple(p.lams), rule=options.rule, params=p.params, codecs=options.codecs,
                embed_base=options.embed_base, block_elems=options.block_elems, shared=options.shared,
                stored=stored, stored_index=tuple(exact), delta_steps=tuple(choice.steps[t] for t in exact),
                tall_index=tuple(p.tall),
            )
            try:
                state = _run(spec, root, p, c, ex, progress, on_start)
            finally:
                ex.broadcast(release, spec)
            _finish(root, spec, choice, manifest, state, c)
    return str(out)


def _executor(client: Any, workers: int) -> Executor:
    """Dask workers when a client is given, else a local thread pool."""
    return ThreadExecutor(workers) if client is None else DaskExecutor(client)


class Target:
    """Where the archive is built: a hidden locked sibling published at the end (local), or a URL.

    Made before any pre-pass: a local output that may not be written or replaced fails at once,
    and publishing replaces only what was checked then (see :mod:`tallstore.publishing`).
    """

    def __init__(self, out: str | os.PathLike[str], overwrite: bool, storage_options: dict[str, Any] | None) -> None:
        self.out = out
        self.overwrite = overwrite
        self.storage_options = storage_options
        self.existing = None if is_url(out) else publishing.check(local_path(out).absolute(), overwrite)
        self.tmp: Path | None = None
        self._staged: AbstractContextManager[Path] | None = None

    @property
    def location(self) -> str:
        """Where the archive is being written now."""
        return str(self.tmp) if self.tmp is not None else str(self.out)

    def __enter__(self) -> Any:
        if is_url(self.out):
            store = open_store(self.out, read_only=False, storage_options=self.storage_options)
            self._check_remote(store)
            return store
        self._staged = publishing.staged(local_path(self.out).absolute(), ".packing", self.existing)
        self.tmp = self._staged.__enter__()
        return open_store(self.tmp, read_only=False)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._staged is not None:
            if exc is not None:
                settle_writes()
            self._staged.__exit__(exc_type, exc, tb)

    def _check_remote(self, store: Any) -> None:
        """A remote prefix is written only if empty or, with ``overwrite``, holding a tallstore archive.

        (Opening the group with ``mode="w"`` deletes everything under the prefix.)
        """
        if sync(store.is_empty("")):
            return
        if not self.overwrite:
            raise OutputExistsError(f"{self.out} exists (use --force / overwrite=True to replace it)")
        root = sync(store.get("zarr.json", prototype=default_buffer_prototype()))
        if not publishing.is_archive_document(root.to_bytes() if root is not None else None):
            raise OutputExistsError(
                f"{self.out} holds objects but no tallstore archive: --force / overwrite=True replaces only "
                "a tallstore archive, so they were left alone"
            )


def _run(
    spec: PackSpec, root: zarr.Group, p: Prepared, c: Collection, executor: Executor,
    progress: Progress | None, on_start: Callable[[int], None] | None,
) -> PackState:
    """Create the shared arrays, then run every unit on the executor, folding in the results.

    Non-weight files are hashed first, so that each distinct content is stored once."""
    plan = p.plan
    tasks = [c.tasks[t] for t in p.tall]
    for g in layout.GROUPS:
        root.create_group(g)
    for kp in plan.masked():
        chunk = chunk_elems(kp.info, plan.block_elems)
        if not spec.shared.quantized:
            create_weights(root, layout.merged_path(kp.node), kp.info.numel, kp.info.dtype.storage, chunk, spec.codecs)
        if spec.embed_base:
            bi = kp.base_info
            assert bi is not None
            create_weights(root, layout.base_path(kp.node), bi.numel, bi.dtype.storage, chunk, spec.codecs)
    quantized = spec.shared.quantized
    mask_arrays = [
        create_masks(root, layout.mask_path(t), plan.mask_nbytes, MASK_CHUNK_BYTES, spec.codecs) for t in p.tall
    ] if plan.mask_nbytes and not quantized else []
    state = PackState(plan, len(tasks), MaskWriter(mask_arrays, plan.mask_nbytes if not quantized else 0, MASK_CHUNK_BYTES))
    if quantized:
        state.codes = StreamWriter(root, layout.SHARED_CODES)
        state.mask_streams = [StreamWriter(root, layout.mask_path(t)) for t in p.tall]
    coded = [t for t, step in zip(spec.stored_index, spec.delta_steps) if step is not None]
    if coded:
        root.create_group(layout.DELTAS)
        state.delta_streams = {t: StreamWriter(root, layout.delta_path(t)) for t in coded}
    folder = sorted({f.location: f for listing in c.listings for f in listing.files}.values(), key=lambda f: f.location)
    with closing(executor.run([FileHash(f.location, spec.storage_options) for f in folder])) as hashed:
        for unit, result in hashed:
            unit.absorb(result, state)
    by_content = {state.file_hashes[f.location]: f for f in folder}
    files = sorted({f.location for ck in c.tasks for f in ck.files} | {f.location for f in c.base.files})

    def weight(kp: Any) -> int:
        per = kp.base_info.nbytes if kp.base_info else 0
        return per + sum(tasks[t].info(kp.key).nbytes for t in kp.tasks_with)

    units: list[Any] = []
    for kp in plan.keys:
        w = weight(kp)
        if kp.kind == layout.KIND_MASKED:
            units += [MaskedBlock(spec, kp, i, w // len(kp.blocks)) for i in range(len(kp.blocks))]
            if kp.grown:
                units.append(ExtraRows(spec, kp, 0))
        else:
            units.append(SeparateTensor(spec, kp, w))
    nodes = {kp.key: kp.node for kp in plan.keys}
    for position, t in enumerate(spec.stored_index):
        ck = c.tasks[t]
        units += [ExactTensor(spec, position, key, nodes[key], ck.info(key).nbytes) for key in ck.keys]
    if on_start:
        on_start(sum(u.weight for u in units))
    units += [FileHash(f, spec.storage_options) for f in files]
    units += [StoreFile(spec, f.location, sha, f.size) for sha, f in sorted(by_content.items())]
    with closing(executor.run(units)) as results:  # closed on an interrupt too: its threads joined before cleanup
        for unit, result in results:
            unit.absorb(result, state)
            if progress and unit.weight:
                progress(unit.weight)
    state.writer.close()
    state.close_streams()
    return state


def _files(ck: Checkpoint, state: PackState) -> tuple[FileRecord, ...]:
    return tuple(FileRecord(f.name, f.size, state.file_hashes[f.location]) for f in ck.files)


def _folder(listing: FolderListing, state: PackState) -> tuple[FolderFile, ...]:
    return tuple(FolderFile(f.path, f.size, state.file_hashes[f.location]) for f in listing.files)


def _weights(ck: Checkpoint) -> WeightsLayout:
    lay = ck.layout
    return WeightsLayout(lay.format, tuple(WeightFile(n, c, m) for n, c, m in lay.files), lay.index_metadata, lay.folder)


def _finish(root: zarr.Group, spec: PackSpec, choice: fidelity.Choice, manifest: Manifest, s: PackState, c: Collection) -> None:
    """Write per-task records and the tensor index, the manifest's checksummed copy, then the
    manifest with its digest and the completeness marker, last."""
    p = choice.prepared
    plan, base_ck = p.plan, c.base
    base_digests: dict[str, str] = {}
    entries = []
    quantized = spec.shared.quantized
    mask_block = 0
    for kp in plan.keys:
        offset = crcs = codes = first_block = None
        base_crcs: list[int] | None = None
        if kp.kind == layout.KIND_MASKED:
            base_digests[kp.key] = combine(s.base_blocks[kp.key])
            base_crcs = s.base_bits_crcs[kp.key]
            kind = layout.KIND_MASKED if kp.key in s.nonzero or kp.grown else layout.KIND_BASE
            if kind == layout.KIND_BASE:
                del root[layout.merged_path(kp.node)]
            elif quantized:
                codes, first_block = tuple(s.code_segments[kp.key]), mask_block
                mask_block += len(codes)
            else:
                crcs = tuple(s.merged_crcs[kp.key])
            offset = None if quantized else kp.mask_offset
        else:
            kind = layout.KIND_SEPARATE
            sep = s.separate[kp.key]
            if sep.base_blocks is not None:
                base_digests[kp.key] = combine(sep.base_blocks)
                base_crcs = sep.base_crcs
        base_dtype = kp.base_info.dtype if kp.base_info is not None else None
        entries.append(TensorEntry(kp.key, kp.node, kind, kp.info.dtype, kp.info.shape, base_dtype, offset,
                                   crcs, tuple(base_crcs) if base_crcs is not None else None, codes, first_block))
    base_infos = {k: base_ck.info(k) for k in base_ck.keys}
    manifest = manifest.with_(
        tensors=tuple(entries), complete=True,
        base=BaseRecord(manifest.base.location, manifest.base.embedded, tuple(base_ck.keys),
                        fingerprint(base_digests, base_infos), probe(base_ck), _files(base_ck, s),
                        _folder(c.listings[0], s)),
    )
    records = [_record(t, spec, choice, manifest, s, c) for t in range(len(c.names))]
    errors = [float(r["stats"]["rebuild_error"]) for r in records]
    if s.block_sums:
        for message in near_duplicates(s.gram, spec.inputs.names, [errors[t] for t in p.tall]):
            warnings.warn(message, PackWarning, stacklevel=3)
    for alias, target in sorted(c.aliases.items()):
        warnings.warn(f"task {alias!r} is the same input as {target!r} (identical files): stored once, "
                      f"{alias!r} reads {target!r}'s weights", PackWarning, stacklevel=3)
    for t, record in enumerate(records):
        root.create_group(layout.task_group(t), attributes={layout.ATTR: record})
    doc = manifest.to_json()
    doc["digest"] = archive_digest(doc, records)
    copy = canonical({"manifest": doc, "tasks": records})
    _check_document(len(copy), "its manifest copy")
    arr = root.create_array(layout.MANIFEST_COPY, shape=(len(copy),), dtype=np.uint8, chunks=(len(copy),),
                            compressors=[Crc32cCodec()], fill_value=0, config=WRITE_ALL)
    arr[:] = np.frombuffer(copy, np.uint8)
    root.attrs[layout.ATTR] = doc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(root.store)
    _check_document(sync(root.store.getsize("zarr.json")), "its root zarr.json")


def _check_document(nbytes: int, what: str) -> None:
    """Refuse to publish metadata that readers refuse (spec §4.3: a document of at most
    ``chunks.MAX_DOCUMENT`` bytes), rather than an archive that opens damaged or not at all."""
    if nbytes > chunks.MAX_DOCUMENT:
        raise PlanError(
            f"the archive's metadata would take {nbytes / 2**20:.1f} MiB ({what}), more than readers accept "
            f"({chunks.MAX_DOCUMENT / 2**20:.0f} MiB): pack the tasks into several archives"
        )


def _record(t: int, spec: PackSpec, choice: fidelity.Choice, manifest: Manifest, s: PackState, c: Collection) -> dict[str, Any]:
    """Task ``t``'s record (JSON): its tensor listing with digests and CRCs, statistics, files."""
    ck = c.tasks[t]
    p = choice.prepared
    if t not in p.tall:
        return _exact_record(t, choice, manifest, s, c)
    j = p.tall.index(t)  # its place among the TALL tasks, whose results the units index so
    quantized = spec.shared.quantized
    rows = []
    exact_bytes = 0
    for key in ck.keys:
        info = ck.info(key)
        if key in s.separate:
            src, blocks, crcs = s.separate[key].sources[j]
            exact_bytes += s.separate[key].exact_bytes.get(j, 0)
        elif key in s.nonzero or key in s.extra:
            src, blocks, crcs = layout.SOURCE_MASKED, s.task_blocks[key][j], s.task_crcs[key][j]
            if j in s.extra.get(key, {}):  # a grown tensor: then the rows past the base's
                more_blocks, more_crcs = s.extra[key][j]
                blocks, crcs = [*blocks, *more_blocks], [*crcs, *more_crcs]
        else:  # the base, cast to the task's dtype: what the unit rebuilt and checksummed
            src, blocks, crcs = layout.SOURCE_BASE, s.task_blocks[key][j], s.task_crcs[key][j]
        rows.append(TaskRow(original_key(ck, key), info.dtype, info.shape, src, combine(blocks, info), tuple(crcs)))
    total_masked = sum(kp.info.numel for kp in p.plan.masked())
    sq_err, tau_sq = s.sq_err[j], s.tau_sq[j]
    base_norm = math.sqrt(s.base_sq) if s.block_sums else 0.0
    tau_norm = math.sqrt(tau_sq)
    stats = TaskStats(
        masked_params=total_masked, mask_ones=int(s.ones[j]),
        mask_density=float(s.ones[j] / total_masked) if total_masked else 0.0, exact_bytes=exact_bytes,
        rebuild_error=float(math.sqrt(sq_err) / tau_norm) if tau_sq else 0.0, tau_norm=tau_norm,
        relative_change=tau_norm / base_norm if base_norm else None,
    )
    mask_crcs = None if quantized else (tuple(s.writer.crcs[j]) if p.plan.mask_nbytes else ())
    return _task_record(t, manifest, s, c, tuple(rows), stats, mask_crcs=mask_crcs,
                        masks=tuple(s.mask_segments[j]) if quantized else None)


def _exact_record(t: int, choice: fidelity.Choice, manifest: Manifest, s: PackState, c: Collection) -> dict[str, Any]:
    """The record of a task stored on its own: every tensor ``xbase``, ``exact``, ``base`` or
    (a delta preset) ``delta``."""
    ck = c.tasks[t]
    got = s.exact.get(t, {})
    rows = []
    for key in ck.keys:
        info, r = ck.info(key), got[key]
        rows.append(TaskRow(original_key(ck, key), info.dtype, info.shape, r.source, combine(r.digests, info), tuple(r.crcs)))
    coded = [r for r in got.values() if r.source == layout.SOURCE_DELTA]
    sq_err, coded_sq = sum(r.sq_err for r in coded), sum(r.tau_sq for r in coded)
    stats = TaskStats(masked_params=0, mask_ones=0, mask_density=0.0, exact_bytes=sum(r.nbytes for r in got.values()),
                      rebuild_error=math.sqrt(sq_err / coded_sq) if coded_sq else 0.0,
                      tau_norm=math.sqrt(sum(r.tau_sq for r in got.values())))
    step, chosen = choice.steps[t], choice.records.get(t)
    if step is None:
        return _task_record(t, manifest, s, c, tuple(rows), stats, representation=layout.REPR_EXACT, choice=chosen)
    segments = {original_key(ck, k): tuple(v) for k, v in s.delta_segments.get(t, {}).items()}
    return _task_record(t, manifest, s, c, tuple(rows), stats, representation=layout.REPR_DELTA,
                        delta=DeltaRecord(step, t, segments), choice=chosen)


def _task_record(t: int, manifest: Manifest, s: PackState, c: Collection, rows: tuple[TaskRow, ...],
                 stats: TaskStats, **more: Any) -> dict[str, Any]:
    ck, listing, source = c.tasks[t], c.listings[t + 1], c.sources[t]
    renames = {r.key: key for r, key in zip(rows, ck.keys) if r.key != key}
    key_map = str(c.key_maps[t]) if renames or source.adapter else None
    return TaskRecord(c.names[t], manifest.lam[t], source.location, _files(ck, s), rows, stats,
                      folder=_folder(listing, s), weights=_weights(ck), skipped=listing.skipped, renames=renames,
                      key_map=key_map, adapter=source.adapter, **more).to_json()
