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
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import __version__, lam_select
from ..checkpoint import Checkpoint, open_checkpoint
from ..digests import combine, fingerprint, probe
from ..errors import OutputExistsError, PlanError
from ..geometry import DEFAULT_BLOCK_ELEMS, chunk_elems
from ..ops import merges, ties
from ..storage import format as fmt
from ..storage.arrays import create_masks, create_weights
from ..storage.codecs import Codecs, preset
from ..storage.stores import is_url, local_path, open_store
from .executors import Executor, Job, ThreadExecutor
from .inputs import InputSpec
from .inputs import release as release_inputs
from .mask_writer import MaskWriter
from .plan import KeyPlan, Plan, check_task_names, make_plan
from .ties_pass import check_top, ties_params
from .units import MaskedBlock, PackSpec, SeparateTensor, file_sha256, masked_block, release, separate_tensor

DEFAULT_LAM = 0.4
MASK_CHUNK_BYTES = 1 << 20

Progress = Callable[[int], None]


def resolve_lams(names: list[str], lam: float | Mapping[str, float], default: float = DEFAULT_LAM) -> list[float]:
    """One λ per task from a single value or a per-task mapping (others get ``default``)."""
    if isinstance(lam, Mapping):
        unknown = set(lam) - set(names)
        if unknown:
            raise PlanError(f"λ given for unknown task {sorted(unknown)[0]!r}")
        values = [float(lam.get(n, default)) for n in names]
    else:
        values = [float(lam)] * len(names)
    for n, v in zip(names, values):
        if not math.isfinite(v) or v < 0:
            raise PlanError(f"λ for task {n!r} must be a finite number ≥ 0, got {v}")
    return values


def pack(
    out: str | os.PathLike[str],
    base: str | os.PathLike[str],
    tasks: Mapping[str, str | os.PathLike[str]],
    *,
    lam: float | Mapping[str, float] | str = DEFAULT_LAM,
    merge: str = "ta",
    ties_top: float = ties.DEFAULT_TOP,
    lam_grid: Iterable[float] = lam_select.DEFAULT_GRID,
    evaluate: lam_select.Evaluate | None = None,
    embed_base: bool = False,
    exact: Iterable[str] = (),
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
    workers: int = 2,
    codecs: Codecs | str = "fast",
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
    executor: Executor | None = None,
    client: Any = None,
) -> str:
    """Pack fine-tunes of one base into a TALL-mask archive at ``out``; returns its location.

    ``progress`` is called with input bytes processed; ``on_start`` first with the total.
    ``lam`` is a number, a per-task mapping, ``"auto"`` or ``"search"`` (with ``evaluate``), the
    last two choosing from ``lam_grid`` (see :mod:`tallstore.lam_select`); ``merge="ties"`` trims
    each task to its top ``ties_top`` percent.
    Units run on ``executor``, else on the Dask ``client``'s workers, else on ``workers`` threads.
    ``storage_options`` apply to every URL: the output's and the inputs'. ``codecs``: a preset
    name (``"fast"``: LZ4HC weights, the quickest loads; ``"compact"``: zstd, smallest) or a
    :class:`~tallstore.storage.codecs.Codecs` value.
    """
    codecs = preset(codecs) if isinstance(codecs, str) else codecs
    names = list(tasks)
    check_task_names(names)
    grid = lam_select.check(lam, lam_grid, evaluate)
    lams = [] if isinstance(lam, str) else resolve_lams(names, lam)
    selection: dict[str, Any] = {"method": "fixed"}
    if merge not in merges.RULES:
        raise PlanError(f"unknown merge rule {merge!r}; choose one of {sorted(merges.RULES)}")
    if merge == "ties":
        check_top(ties_top)
    if not overwrite and not is_url(out) and local_path(out).exists():  # before any pre-pass
        raise OutputExistsError(f"{local_path(out)} exists (use --force / overwrite=True to replace it)")
    with ExitStack() as stack:
        # absolute, as the units open them: their file lists key the file hashes in _finish
        base_ck = stack.enter_context(open_checkpoint(_absolute(base), storage_options))
        task_cks = [stack.enter_context(open_checkpoint(_absolute(tasks[n]), storage_options)) for n in names]
        ex = executor or _executor(client, workers)
        plan = make_plan(base_ck, task_cks, names, block_elems, tuple(exact))
        inputs = InputSpec(
            token=uuid.uuid4().hex, base=_absolute(base), tasks=tuple(_absolute(tasks[n]) for n in names),
            names=tuple(names), storage_options=storage_options, allow_nonfinite=allow_nonfinite,
        )
        try:
            params = prepare_merge(merge, plan, inputs, ex, ties_top)
            if isinstance(lam, str):
                lams, selection = lam_select.select(lam, plan, inputs, merge, params, ex, grid, evaluate, _scratch(out))
        finally:
            ex.broadcast(release_inputs, inputs)
        target = Target(out, overwrite, storage_options)
        with target as store:
            root = zarr.open_group(store, mode="w", zarr_format=3)
            manifest = _manifest(plan, names, lams, merge, params, base, embed_base, block_elems)
            manifest["lam_selection"] = selection
            root.attrs[fmt.ATTR] = manifest
            spec = PackSpec(
                token=uuid.uuid4().hex, inputs=inputs, store=target.location, storage_options=storage_options,
                lams=tuple(lams), rule=merge, params=params, codecs=codecs, embed_base=embed_base,
                block_elems=block_elems,
            )
            try:
                summary = _run(spec, root, plan, base_ck, task_cks, ex, progress, on_start)
            finally:
                ex.broadcast(release, spec)
            _finish(root, spec, plan, manifest, summary, base_ck, task_cks)
    return str(out)


def _executor(client: Any, workers: int) -> Executor:
    """Dask workers when a client is given, else a local thread pool."""
    if client is None:
        return ThreadExecutor(workers)
    from .dask_executor import DaskExecutor

    return DaskExecutor(client)


def _absolute(location: str | os.PathLike[str]) -> str:
    """A URL as is, a local path made absolute: workers need not share the driver's cwd."""
    return str(location) if is_url(location) else str(local_path(location).absolute())


def prepare_merge(
    rule: str, plan: Plan, inputs: InputSpec, executor: Executor, ties_top: float = ties.DEFAULT_TOP,
) -> dict[str, Any]:
    """The parameters a merge rule needs from passes over the inputs, run as units on ``executor``.

    None for ``ta``; for ``ties`` the global per-task thresholds and the majority sign.
    """
    if rule == "ties":
        return ties_params(plan, inputs, executor, ties_top)
    return {}


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
            if _store_has_root(store) and not self.overwrite:
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
            from ..checkpoint.writer import replace

            replace(self.tmp, local_path(self.out))
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _store_has_root(store: Any) -> bool:
    from zarr.core.sync import sync

    return bool(sync(store.exists("zarr.json")))


def _manifest(
    plan: Plan, names: list[str], lams: list[float], merge: str, params: dict[str, Any],
    base: str | os.PathLike[str], embed_base: bool, block_elems: int,
) -> dict[str, Any]:
    location = str(base) if is_url(base) else str(Path(base).resolve())
    return {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "complete": False,
        "writer": f"tallstore {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": names,
        "lam": lams,
        "merge": {"rule": merge, "params": params},
        "block_elems": block_elems,
        "mask": {"bitorder": fmt.BITORDER, "nbytes": plan.mask_nbytes, "chunk_bytes": MASK_CHUNK_BYTES},
        "base": {"location": location, "embedded": embed_base, "keys": [], "fingerprint": None, "probe": None},
        "tensors": [],
    }


class _Summary:
    """What the driver accumulates from the units."""

    def __init__(self, plan: Plan, n_tasks: int) -> None:
        self.base_blocks: dict[str, list[bytes]] = {}
        self.base_crcs: dict[str, list[int]] = {}
        self.task_blocks: dict[str, list[list[bytes]]] = {}
        self.task_crcs: dict[str, list[list[int]]] = {}
        self.base_digest: dict[str, str] = {}
        self.nonzero: set[str] = set()
        self.separate: dict[str, SeparateTensor] = {}
        self.ones = np.zeros(n_tasks, np.int64)
        self.n_tasks = n_tasks
        self.block_sums: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.file_hashes: dict[Path, str] = {}
        for kp in plan.masked():
            self.base_blocks[kp.key] = [b""] * len(kp.blocks)
            self.base_crcs[kp.key] = [0] * len(kp.blocks)
            self.task_blocks[kp.key] = [[b""] * len(kp.blocks) for _ in range(n_tasks)]
            self.task_crcs[kp.key] = [[0] * len(kp.blocks) for _ in range(n_tasks)]

    def add_block(self, r: MaskedBlock) -> None:
        self.base_blocks[r.key][r.index] = r.base_digest
        self.base_crcs[r.key][r.index] = r.base_crc
        for t, (d, c) in enumerate(zip(r.task_digests, r.task_crcs)):
            self.task_blocks[r.key][t][r.index] = d
            self.task_crcs[r.key][t][r.index] = c
        self.ones += r.ones
        self.block_sums[r.key, r.index] = (r.sq_err, r.tau_sq)
        if r.nonzero:
            self.nonzero.add(r.key)

    def _ordered_sum(self, i: int) -> np.ndarray:
        """Float sums in a fixed block order, not completion order: packs are reproducible."""
        return sum((self.block_sums[k][i] for k in sorted(self.block_sums)), np.zeros(self.n_tasks))

    @property
    def sq_err(self) -> np.ndarray:
        """Per task, the squared rebuild error over every masked block."""
        return self._ordered_sum(0)

    @property
    def tau_sq(self) -> np.ndarray:
        """Per task, the squared norm of τ over every masked block."""
        return self._ordered_sum(1)


def _run(
    spec: PackSpec, root: zarr.Group, plan: Plan, base: Checkpoint, tasks: list[Checkpoint],
    executor: Executor, progress: Progress | None, on_start: Callable[[int], None] | None,
) -> _Summary:
    """Create the shared arrays, then run every unit on the executor, feeding the mask writer."""
    n_tasks = len(tasks)
    for g in ("tensors", "tasks", "masks"):
        root.create_group(g)
    for kp in plan.masked():
        chunk = chunk_elems(kp.info, plan.block_elems)
        create_weights(root, fmt.merged_path(kp.node), kp.info.numel, kp.info.dtype.storage, chunk, spec.codecs)
        if spec.embed_base:
            bi = kp.base_info
            assert bi is not None
            create_weights(root, fmt.base_path(kp.node), bi.numel, bi.dtype.storage, chunk, spec.codecs)
    mask_arrays = [
        create_masks(root, fmt.mask_path(t), plan.mask_nbytes, MASK_CHUNK_BYTES, spec.codecs)
        for t in range(n_tasks)
    ] if plan.mask_nbytes else []
    writer = MaskWriter(mask_arrays, plan.mask_nbytes, MASK_CHUNK_BYTES)
    summary = _Summary(plan, n_tasks)
    files = sorted({f for ck in tasks for f in ck.files} | set(base.files), key=str)

    def weight(kp: KeyPlan) -> int:
        per = (kp.base_info.numel * kp.base_info.dtype.itemsize) if kp.base_info else 0
        return per + sum(tasks[t].info(kp.key).numel * tasks[t].info(kp.key).dtype.itemsize for t in kp.tasks_with)

    if on_start:
        on_start(sum(weight(kp) for kp in plan.keys))
    jobs: list[Job] = []
    for kp in plan.keys:
        w = weight(kp)
        if kp.kind == fmt.KIND_MASKED:
            for i in range(len(kp.blocks)):
                jobs.append((("block", kp, w // len(kp.blocks)), masked_block, (spec, kp, i)))
        else:
            jobs.append((("separate", kp, w), separate_tensor, (spec, kp)))
    for path in files:
        jobs.append((("file", path, 0), file_sha256, (path,)))
    for (what, item, w), result in executor.run(jobs):
        if what == "block":
            writer.put(item.mask_offset + _mask_start(item, result.index), result.mask_bytes)
            summary.add_block(result)
        elif what == "separate":
            summary.separate[item.key] = result
        else:
            summary.file_hashes[item] = result
        if progress and w:
            progress(w)
    writer.close()
    return summary


def _mask_start(kp: KeyPlan, index: int) -> int:
    return kp.blocks[index][0] * kp.info.row_numel // 8


def _finish(
    root: zarr.Group, spec: PackSpec, plan: Plan, manifest: dict[str, Any],
    s: _Summary, base_ck: Checkpoint, task_cks: list[Checkpoint],
) -> None:
    """Write per-task attributes and tensor index, then the completeness marker, last."""
    names = spec.inputs.names
    base_digests: dict[str, str] = {}
    tensors = []
    for kp in plan.keys:
        entry: dict[str, Any] = {"key": kp.key, "node": kp.node, "dtype": kp.info.dtype.name, "shape": list(kp.info.shape)}
        if kp.kind == fmt.KIND_MASKED:
            base_digests[kp.key] = combine(s.base_blocks[kp.key])
            kind = fmt.KIND_MASKED if kp.key in s.nonzero else fmt.KIND_BASE
            if kind == fmt.KIND_BASE:
                del root[fmt.merged_path(kp.node)]
            entry.update(kind=kind, mask_offset=kp.mask_offset)
        else:
            sep = s.separate[kp.key]
            if sep.base_digest is not None:
                base_digests[kp.key] = sep.base_digest
            entry.update(kind=fmt.KIND_SEPARATE)
        if kp.base_info is not None:
            entry["base_dtype"] = kp.base_info.dtype.name
        tensors.append(entry)
    base_infos = {k: base_ck.info(k) for k in base_ck.keys}
    manifest["base"].update(
        keys=list(base_ck.keys),
        fingerprint=fingerprint(base_digests, base_infos),
        probe=probe(base_ck),
        files=[{"name": f.name, "size": f.stat().st_size, "sha256": s.file_hashes[f]} for f in base_ck.files],
    )
    manifest["tensors"] = tensors
    total_masked = sum(kp.info.numel for kp in plan.masked())
    for t, (name, ck) in enumerate(zip(names, task_cks)):
        listing = []
        exact_bytes = 0
        for key in ck.keys:
            info = ck.info(key)
            if key in s.separate:
                src, digest, crcs = s.separate[key].sources[t]
                exact_bytes += s.separate[key].exact_bytes.get(t, 0)
            elif key in s.nonzero:
                src, digest, crcs = fmt.SOURCE_MASKED, combine(s.task_blocks[key][t]), s.task_crcs[key][t]
            else:
                src, digest, crcs = fmt.SOURCE_BASE, combine(s.task_blocks[key][t]), s.base_crcs[key]
            listing.append([key, info.dtype.name, list(info.shape), src, digest, crcs])
        tau_norm = math.sqrt(s.tau_sq[t])
        attrs = {
            "name": name,
            "lam": manifest["lam"][t],
            "source": str(ck.path),
            "files": [{"name": f.name, "size": f.stat().st_size, "sha256": s.file_hashes[f]} for f in ck.files],
            "tensors": listing,
            "stats": {
                "masked_params": total_masked,
                "mask_ones": int(s.ones[t]),
                "mask_density": float(s.ones[t] / total_masked) if total_masked else 0.0,
                "exact_bytes": exact_bytes,
                "rebuild_error": float(math.sqrt(s.sq_err[t]) / tau_norm) if tau_norm else 0.0,
                "tau_norm": tau_norm,
            },
        }
        root.create_group(fmt.task_group(t), attributes={fmt.ATTR: attrs})
    manifest["complete"] = True
    root.attrs[fmt.ATTR] = manifest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(root.store)
