"""The streaming packer: plan, run the units on a pool, write the manifest last, publish.

Memory holds at most one row block per input per worker; the archive is built in a temporary
sibling folder (or, on object stores, in place with the completeness marker written last) so a
failed pack never leaves something that opens as a complete archive.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.writer import replace
from ..errors import OutputExistsError
from ..locations import absolute, is_url, local_path
from ..storage import layout
from ..storage.arrays import create_masks, create_weights
from ..storage.digests import combine, fingerprint, probe
from ..storage.geometry import chunk_elems
from ..storage.manifest import (
    BaseRecord,
    FileRecord,
    Manifest,
    MaskLayout,
    MergeRecord,
    TaskRecord,
    TaskRow,
    TaskStats,
    TensorEntry,
)
from ..storage.stores import open_store
from ..version import VERSION
from . import lam as lam_select
from .dask_executor import DaskExecutor
from .executors import Executor, ThreadExecutor
from .inputs import InputSpec
from .inputs import release as release_inputs
from .mask_writer import MaskWriter
from .options import PackOptions
from .passes import tau_pass
from .plan import Plan, check_task_names, make_plan
from .results import PackState
from .units import FileHash, MaskedBlock, PackSpec, SeparateTensor, release

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
    names = list(tasks)
    check_task_names(names)
    lams = [] if options.selects_lam else options.lams(names)
    selection: dict[str, Any] = {"method": "fixed"}
    if not options.overwrite and not is_url(out) and local_path(out).exists():  # before any pre-pass
        raise OutputExistsError(f"{local_path(out)} exists (use --force / overwrite=True to replace it)")
    with ExitStack() as stack:
        # absolute, as the units open them: their file lists key the file hashes in _finish
        base_ck = stack.enter_context(open_checkpoint(absolute(base), storage_options))
        task_cks = [stack.enter_context(open_checkpoint(absolute(tasks[n]), storage_options)) for n in names]
        ex = executor or _executor(client, options.workers)
        plan = make_plan(base_ck, task_cks, names, options.block_elems, options.exact)
        inputs = InputSpec(
            token=uuid.uuid4().hex, base=absolute(base), tasks=tuple(absolute(tasks[n]) for n in names),
            names=tuple(names), storage_options=storage_options, allow_nonfinite=options.allow_nonfinite,
        )
        try:
            numel = sum(kp.info.numel for kp in plan.masked())
            params = options.rule.prepare(tau_pass(ex, inputs, plan), numel, names)
            if isinstance(options.lam, str):
                lams, selection = lam_select.select(
                    options.lam, plan, inputs, options.rule, params, ex, options.lam_grid, options.evaluate, _scratch(out),
                )
        finally:
            ex.broadcast(release_inputs, inputs)
        target = Target(out, options.overwrite, storage_options)
        with target as store:
            root = zarr.open_group(store, mode="w", zarr_format=3)
            manifest = Manifest(
                tasks=tuple(names), lam=tuple(lams), merge=MergeRecord(options.rule.name, params),
                block_elems=options.block_elems, mask=MaskLayout(plan.mask_nbytes, MASK_CHUNK_BYTES),
                base=BaseRecord(str(base) if is_url(base) else str(Path(base).resolve()), options.embed_base),
                tensors=(), writer=f"tallstore {VERSION}",
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), lam_selection=selection,
            )
            root.attrs[layout.ATTR] = manifest.to_json()
            spec = PackSpec(
                token=uuid.uuid4().hex, inputs=inputs, store=target.location, storage_options=storage_options,
                lams=tuple(lams), rule=options.rule, params=params, codecs=options.codecs,
                embed_base=options.embed_base, block_elems=options.block_elems,
            )
            try:
                state = _run(spec, root, plan, base_ck, task_cks, ex, progress, on_start)
            finally:
                ex.broadcast(release, spec)
            _finish(root, spec, plan, manifest, state, base_ck, task_cks)
    return str(out)


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
    """Where the archive is built: a temporary local sibling renamed at the end, or a URL."""

    def __init__(self, out: str | os.PathLike[str], overwrite: bool, storage_options: dict[str, Any] | None) -> None:
        self.out = out
        self.overwrite = overwrite
        self.storage_options = storage_options
        self.tmp: Path | None = None

    @property
    def location(self) -> str:
        """Where the archive is being written now."""
        return str(self.tmp) if self.tmp is not None else str(self.out)

    def __enter__(self) -> Any:
        if is_url(self.out):
            store = open_store(self.out, read_only=False, storage_options=self.storage_options)
            if sync(store.exists("zarr.json")) and not self.overwrite:
                raise OutputExistsError(f"{self.out} exists (use --force / overwrite=True to replace it)")
            return store
        final = local_path(self.out)
        if final.exists() and not self.overwrite:
            raise OutputExistsError(f"{final} exists (use --force / overwrite=True to replace it)")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".packing", dir=final.parent)).absolute()
        return open_store(self.tmp, read_only=False)

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.tmp is None:
            return
        if exc_type is None:
            replace(self.tmp, local_path(self.out))
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _run(
    spec: PackSpec, root: zarr.Group, plan: Plan, base: Checkpoint, tasks: list[Checkpoint],
    executor: Executor, progress: Progress | None, on_start: Callable[[int], None] | None,
) -> PackState:
    """Create the shared arrays, then run every unit on the executor, folding in the results."""
    n_tasks = len(tasks)
    for g in layout.GROUPS:
        root.create_group(g)
    for kp in plan.masked():
        chunk = chunk_elems(kp.info, plan.block_elems)
        create_weights(root, layout.merged_path(kp.node), kp.info.numel, kp.info.dtype.storage, chunk, spec.codecs)
        if spec.embed_base:
            bi = kp.base_info
            assert bi is not None
            create_weights(root, layout.base_path(kp.node), bi.numel, bi.dtype.storage, chunk, spec.codecs)
    mask_arrays = [
        create_masks(root, layout.mask_path(t), plan.mask_nbytes, MASK_CHUNK_BYTES, spec.codecs)
        for t in range(n_tasks)
    ] if plan.mask_nbytes else []
    state = PackState(plan, n_tasks, MaskWriter(mask_arrays, plan.mask_nbytes, MASK_CHUNK_BYTES))
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
    for unit, result in executor.run(units):
        unit.absorb(result, state)
        if progress and unit.weight:
            progress(unit.weight)
    state.writer.close()
    return state


def _files(ck: Checkpoint, state: PackState) -> tuple[FileRecord, ...]:
    return tuple(FileRecord(f.name, f.size, state.file_hashes[f.location]) for f in ck.files)


def _finish(
    root: zarr.Group, spec: PackSpec, plan: Plan, manifest: Manifest,
    s: PackState, base_ck: Checkpoint, task_cks: list[Checkpoint],
) -> None:
    """Write per-task attributes and tensor index, then the completeness marker, last."""
    base_digests: dict[str, str] = {}
    entries = []
    for kp in plan.keys:
        offset = None
        if kp.kind == layout.KIND_MASKED:
            base_digests[kp.key] = combine(s.base_blocks[kp.key])
            kind = layout.KIND_MASKED if kp.key in s.nonzero else layout.KIND_BASE
            if kind == layout.KIND_BASE:
                del root[layout.merged_path(kp.node)]
            offset = kp.mask_offset
        else:
            kind = layout.KIND_SEPARATE
            sep = s.separate[kp.key]
            if sep.base_digest is not None:
                base_digests[kp.key] = sep.base_digest
        base_dtype = kp.base_info.dtype if kp.base_info is not None else None
        entries.append(TensorEntry(kp.key, kp.node, kind, kp.info.dtype, kp.info.shape, base_dtype, offset))
    base_infos = {k: base_ck.info(k) for k in base_ck.keys}
    manifest = manifest.with_(
        tensors=tuple(entries),
        base=BaseRecord(manifest.base.location, manifest.base.embedded, tuple(base_ck.keys),
                        fingerprint(base_digests, base_infos), probe(base_ck), _files(base_ck, s)),
    )
    total_masked = sum(kp.info.numel for kp in plan.masked())
    sq_err, tau_sq = s.sq_err, s.tau_sq
    for t, (name, ck) in enumerate(zip(spec.inputs.names, task_cks)):
        rows = []
        exact_bytes = 0
        for key in ck.keys:
            info = ck.info(key)
            if key in s.separate:
                src, digest, crcs = s.separate[key].sources[t]
                exact_bytes += s.separate[key].exact_bytes.get(t, 0)
            elif key in s.nonzero:
                src, digest, crcs = layout.SOURCE_MASKED, combine(s.task_blocks[key][t]), s.task_crcs[key][t]
            else:
                src, digest, crcs = layout.SOURCE_BASE, combine(s.task_blocks[key][t]), s.base_crcs[key]
            rows.append(TaskRow(key, info.dtype, info.shape, src, digest, tuple(crcs)))
        tau_norm = math.sqrt(tau_sq[t])
        stats = TaskStats(
            masked_params=total_masked, mask_ones=int(s.ones[t]),
            mask_density=float(s.ones[t] / total_masked) if total_masked else 0.0, exact_bytes=exact_bytes,
            rebuild_error=float(math.sqrt(sq_err[t]) / tau_norm) if tau_norm else 0.0, tau_norm=tau_norm,
        )
        record = TaskRecord(name, manifest.lam[t], str(ck.path), _files(ck, s), tuple(rows), stats)
        root.create_group(layout.task_group(t), attributes={layout.ATTR: record.to_json()})
    root.attrs[layout.ATTR] = manifest.with_(complete=True).to_json()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(root.store)
