"""The streaming packer: plan, run the units on a pool, write the manifest last, publish.

Memory holds at most one row block per input per worker; the archive is built in a temporary
sibling folder (or, on object stores, in place with the completeness marker written last) so a
failed pack never leaves something that opens as a complete archive.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import uuid
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .. import publishing
from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.folder_files import FolderListing, list_folder
from ..checkpoint.keymap import KeyMapReport
from ..checkpoint.tasks import TaskSource, original_key, resolve_task
from ..errors import OutputExistsError, PackWarning
from ..locations import absolute, is_url, local_path
from ..storage import layout
from ..storage.arrays import WRITE_ALL, create_masks, create_weights
from ..storage.digests import combine, fingerprint, probe
from ..storage.geometry import chunk_elems
from ..storage.manifest import (
    BaseRecord,
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
from ..storage.stores import open_store
from ..storage.streams import StreamWriter
from ..version import VERSION
from . import lam as lam_select
from .dask_executor import DaskExecutor
from .duplicates import identical_inputs, near_duplicates
from .executors import Executor, ThreadExecutor
from .inputs import InputSpec
from .inputs import release as release_inputs
from .mask_writer import MaskWriter
from .options import PackOptions
from .passes import check_related, nonfinite_keys, tau_pass
from .plan import Plan, check_task_names, make_plan
from .results import PackState
from .units import FileHash, MaskedBlock, PackSpec, SeparateTensor, StoreFile, release

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
    selection: dict[str, Any] = {"method": "fixed"}
    target = Target(out, options.overwrite, storage_options)  # checks the output before any pre-pass
    with ExitStack() as stack:
        c = _open_collection(base, tasks, options, storage_options, stack)
        base_ck, names, sources, task_cks, key_maps, listings = c.base, c.names, c.sources, c.tasks, c.key_maps, c.listings
        lams = c.lams
        ex = executor or _executor(client, options.workers)
        plan = make_plan(base_ck, task_cks, names, options.block_elems, options.exact)
        inputs = InputSpec(
            token=uuid.uuid4().hex, base=absolute(base), tasks=tuple(sources),
            names=tuple(names), storage_options=storage_options, allow_nonfinite=options.allow_nonfinite,
        )
        try:
            if not options.allow_unrelated_base:
                check_related(ex, inputs, plan)
            if options.allow_nonfinite:
                odd = nonfinite_keys(ex, inputs, plan)
                if odd:
                    plan = make_plan(base_ck, task_cks, names, options.block_elems, options.exact, frozenset(odd))
            numel = sum(kp.info.numel for kp in plan.masked())
            params = options.rule.prepare(tau_pass(ex, inputs, plan), numel, names)
            if isinstance(options.lam, str):
                lams, selection = lam_select.select(
                    options.lam, plan, inputs, options.rule, params, ex, options.lam_grid, options.evaluate, _scratch(out),
                )
        finally:
            ex.broadcast(release_inputs, inputs)
        with target as store:
            root = zarr.open_group(store, mode="w", zarr_format=3)
            manifest = Manifest(
                tasks=tuple(names), lam=tuple(lams), merge=MergeRecord(options.rule.name, params),
                block_elems=options.block_elems,
                mask=MaskLayout(0 if options.shared.quantized else plan.mask_nbytes, MASK_CHUNK_BYTES),
                shared=options.shared,
                base=BaseRecord(str(base) if is_url(base) else str(Path(base).resolve()), options.embed_base),
                tensors=(), writer=f"tallstore {VERSION}",
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), lam_selection=selection,
                generation=uuid.uuid4().hex, aliases=c.aliases,
            )
            root.attrs[layout.ATTR] = manifest.to_json()
            spec = PackSpec(
                token=uuid.uuid4().hex, inputs=inputs, store=target.location, storage_options=storage_options,
                lams=tuple(lams), rule=options.rule, params=params, codecs=options.codecs,
                embed_base=options.embed_base, block_elems=options.block_elems, shared=options.shared,
            )
            try:
                state = _run(spec, root, plan, base_ck, task_cks, listings, ex, progress, on_start)
            finally:
                ex.broadcast(release, spec)
            _finish(root, spec, plan, manifest, state, base_ck, task_cks, listings, key_maps)
    return str(out)


@dataclass
class Collection:
    """The opened inputs of a pack: the base, the distinct tasks (an input given twice is packed
    once, the other name an alias), how each was read, their λ and their folders' other files."""

    base: Checkpoint
    names: list[str]
    sources: list[TaskSource]
    tasks: list[Checkpoint]
    key_maps: list[KeyMapReport]
    listings: list[FolderListing]
    lams: list[float]
    aliases: dict[str, str]


def _open_collection(
    base: str | os.PathLike[str], tasks: Mapping[str, str | os.PathLike[str]], options: PackOptions,
    storage_options: dict[str, Any] | None, stack: ExitStack,
) -> Collection:
    """Open the base and every task (the caller's ``stack`` closes them), aliasing duplicates."""
    names = list(tasks)
    lams = [] if options.selects_lam else options.lams(names)
    # absolute, as the units open them: their file lists key the file hashes in _finish
    base_ck = stack.enter_context(open_checkpoint(absolute(base), storage_options))
    sources, cks, key_maps = [], [], []
    for n in names:
        source, ck, report = resolve_task(absolute(tasks[n]), base_ck, options.key_map, storage_options)
        stack.enter_context(ck)
        sources.append(source)
        cks.append(ck)
        key_maps.append(report)
    twins = identical_inputs(cks, storage_options)
    aliases = {names[i]: names[j] for i, j in twins.items() if not lams or lams[i] == lams[j]}
    keep = [i for i, n in enumerate(names) if n not in aliases]
    listings = [list_folder(absolute(base), base_ck, storage_options, options.max_file_bytes)]
    for i in keep:
        own = list_folder(sources[i].location, cks[i], storage_options, options.max_file_bytes)
        listings.append(_with_base_files(own, listings[0]) if sources[i].adapter else own)
    return Collection(base_ck, [names[i] for i in keep], [sources[i] for i in keep], [cks[i] for i in keep],
                      [key_maps[i] for i in keep], listings, [lams[i] for i in keep] if lams else [], aliases)


def _executor(client: Any, workers: int) -> Executor:
    """Dask workers when a client is given, else a local thread pool."""
    return ThreadExecutor(workers) if client is None else DaskExecutor(client)


def _scratch(out: str | os.PathLike[str]) -> Path | None:
    """Scratch space for λ search: beside a local output (same disk), else the system temp dir."""
    if is_url(out):
        return None
    parent = local_path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


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
    spec: PackSpec, root: zarr.Group, plan: Plan, base: Checkpoint, tasks: list[Checkpoint],
    listings: list[FolderListing], executor: Executor, progress: Progress | None,
    on_start: Callable[[int], None] | None,
) -> PackState:
    """Create the shared arrays, then run every unit on the executor, folding in the results.

    Non-weight files are hashed first, so that each distinct content is stored once."""
    n_tasks = len(tasks)
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
        create_masks(root, layout.mask_path(t), plan.mask_nbytes, MASK_CHUNK_BYTES, spec.codecs)
        for t in range(n_tasks)
    ] if plan.mask_nbytes and not quantized else []
    state = PackState(plan, n_tasks, MaskWriter(mask_arrays, plan.mask_nbytes if not quantized else 0, MASK_CHUNK_BYTES))
    if quantized:
        state.codes = StreamWriter(root, layout.SHARED_CODES)
        state.mask_streams = [StreamWriter(root, layout.mask_path(t)) for t in range(n_tasks)]
    folder = sorted({f.location: f for listing in listings for f in listing.files}.values(), key=lambda f: f.location)
    for unit, result in executor.run([FileHash(f.location, spec.storage_options) for f in folder]):
        unit.absorb(result, state)
    by_content = {state.file_hashes[f.location]: f for f in folder}
    files = sorted({f.location for ck in tasks for f in ck.files} | {f.location for f in base.files})

    def weight(kp: Any) -> int:
        per = kp.base_info.nbytes if kp.base_info else 0
        return per + sum(tasks[t].info(kp.key).nbytes for t in kp.tasks_with)

    if on_start:
        on_start(sum(weight(kp) for kp in plan.keys))
    units: list[Any] = []
    for kp in plan.keys:
        w = weight(kp)
        if kp.kind == layout.KIND_MASKED:
            units += [MaskedBlock(spec, kp, i, w // len(kp.blocks)) for i in range(len(kp.blocks))]
        else:
            units.append(SeparateTensor(spec, kp, w))
    units += [FileHash(f, spec.storage_options) for f in files]
    units += [StoreFile(spec, f.location, sha, f.size) for sha, f in sorted(by_content.items())]
    for unit, result in executor.run(units):
        unit.absorb(result, state)
        if progress and unit.weight:
            progress(unit.weight)
    state.writer.close()
    state.close_streams()
    return state


def _files(ck: Checkpoint, state: PackState) -> tuple[FileRecord, ...]:
    return tuple(FileRecord(f.name, f.size, state.file_hashes[f.location]) for f in ck.files)


def _with_base_files(own: FolderListing, base: FolderListing) -> FolderListing:
    """An adapter task's files: the base folder's (its config, tokenizer: the merged model is the
    base's architecture) overlaid with the adapter folder's own."""
    mine = {f.path for f in own.files}
    files = sorted([*own.files, *(f for f in base.files if f.path not in mine)], key=lambda f: f.path)
    return FolderListing(tuple(files), own.skipped)


def _folder(listing: FolderListing, state: PackState) -> tuple[FolderFile, ...]:
    return tuple(FolderFile(f.path, f.size, state.file_hashes[f.location]) for f in listing.files)


def _weights(ck: Checkpoint) -> WeightsLayout:
    lay = ck.layout
    return WeightsLayout(lay.format, tuple(WeightFile(n, c, m) for n, c, m in lay.files), lay.index_metadata, lay.folder)


def _finish(
    root: zarr.Group, spec: PackSpec, plan: Plan, manifest: Manifest,
    s: PackState, base_ck: Checkpoint, task_cks: list[Checkpoint], listings: list[FolderListing],
    key_maps: list[KeyMapReport],
) -> None:
    """Write per-task records and the tensor index, the manifest's checksummed copy, then the
    manifest with its digest and the completeness marker, last."""
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
            kind = layout.KIND_MASKED if kp.key in s.nonzero else layout.KIND_BASE
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
                        _folder(listings[0], s)),
    )
    total_masked = sum(kp.info.numel for kp in plan.masked())
    sq_err, tau_sq = s.sq_err, s.tau_sq
    base_norm = math.sqrt(s.base_sq) if s.block_sums else 0.0
    errors = [float(math.sqrt(sq_err[t]) / math.sqrt(tau_sq[t])) if tau_sq[t] else 0.0 for t in range(len(task_cks))]
    if s.block_sums:
        for message in near_duplicates(s.gram, spec.inputs.names, errors):
            warnings.warn(message, PackWarning, stacklevel=3)
    records = []
    for t, (name, ck) in enumerate(zip(spec.inputs.names, task_cks)):
        rows = []
        exact_bytes = 0
        for key in ck.keys:
            info = ck.info(key)
            if key in s.separate:
                src, blocks, crcs = s.separate[key].sources[t]
                exact_bytes += s.separate[key].exact_bytes.get(t, 0)
            elif key in s.nonzero:
                src, blocks, crcs = layout.SOURCE_MASKED, s.task_blocks[key][t], s.task_crcs[key][t]
            else:
                src, blocks, crcs = layout.SOURCE_BASE, s.task_blocks[key][t], s.base_crcs[key]
            rows.append(TaskRow(original_key(ck, key), info.dtype, info.shape, src, combine(blocks, info), tuple(crcs)))
        tau_norm = math.sqrt(tau_sq[t])
        stats = TaskStats(
            masked_params=total_masked, mask_ones=int(s.ones[t]),
            mask_density=float(s.ones[t] / total_masked) if total_masked else 0.0, exact_bytes=exact_bytes,
            rebuild_error=errors[t], tau_norm=tau_norm,
            relative_change=tau_norm / base_norm if base_norm else None,
        )
        mask_crcs = None if quantized else (tuple(s.writer.crcs[t]) if plan.mask_nbytes else ())
        listing = listings[t + 1]
        renames = {r.key: key for r, key in zip(rows, ck.keys) if r.key != key}
        source = spec.inputs.tasks[t]
        key_map = str(key_maps[t]) if renames or source.adapter else None
        records.append(TaskRecord(name, manifest.lam[t], source.location, _files(ck, s), tuple(rows), stats,
                                  mask_crcs=mask_crcs, folder=_folder(listing, s), weights=_weights(ck),
                                  skipped=listing.skipped, renames=renames, key_map=key_map,
                                  adapter=source.adapter,
                                  masks=tuple(s.mask_segments[t]) if quantized else None).to_json())
    for t, record in enumerate(records):
        root.create_group(layout.task_group(t), attributes={layout.ATTR: record})
    doc = manifest.to_json()
    doc["digest"] = archive_digest(doc, records)
    copy = canonical({"manifest": doc, "tasks": records})
    arr = root.create_array(layout.MANIFEST_COPY, shape=(len(copy),), dtype=np.uint8, chunks=(len(copy),),
                            compressors=[Crc32cCodec()], fill_value=0, config=WRITE_ALL)
    arr[:] = np.frombuffer(copy, np.uint8)
    root.attrs[layout.ATTR] = doc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(root.store)
