"""``verify``: prove an archive still holds, and rebuilds, exactly what was packed.

Three levels, each including the one before:

- **shallow** (always): every array the manifest implies exists with the promised shape, dtype and
  spec-only codecs, its own ``zarr.json`` agrees with the consolidated copy, every chunk is present
  (writers store every chunk, §2) and decodes through the checked reader, which checks its
  ``crc32c`` and bounds its size;
- **deep**: every archived non-weight file is hashed against its SHA-256, the base against its
  fingerprint, and every task is rebuilt (the reader checks each tensor's CRC-32C) and compared
  with the SHA-256 tree digests recorded at pack time;
- **against**: a task is compared with an original checkpoint: relative error ``‖θ̂−θ‖/‖τ‖`` over
  masked tensors, maximum absolute error, exact tensors, and whether the original's files still
  have the SHA-256 recorded at pack time.

Problems are collected, not raised, so one run reports all of them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..checkpoint import open_checkpoint
from ..dtypes import TensorInfo
from ..errors import ArchiveError, TallstoreError
from ..ops.sums import squared_distance
from ..storage import layout
from ..storage.chunks import BUFFERS, MAX_DOCUMENT, MissingObject, allocating
from ..storage.codecs import ArrayFormat
from ..storage.digests import block_digest, combine, fingerprint
from ..storage.geometry import block_ranges, extra_info, row_blocks
from ..storage.manifest import archive_digest
from . import loading
from .base_model import EmbeddedBase, ExternalBase
from .source import ArchiveSource

READ_BATCH = 16
ARRAY_PROBLEMS = 8
"""Bad chunks reported of one array; its other chunks are then left unchecked (and that said)."""


@dataclass
class AgainstResult:
    """How one task's rebuild compares with an original checkpoint."""

    task: str
    path: str
    relative_error: float
    max_abs_error: float
    recorded_error: float | None
    exact_tensors: int
    tensors: int
    files_match: bool


@dataclass
class VerifyReport:
    """What ``verify`` checked and every problem it found (none: the archive is intact)."""

    location: str
    deep: bool
    arrays: int = 0
    chunks: int = 0
    tasks_rebuilt: int = 0
    tensors_rebuilt: int = 0
    base_checked: bool = False
    against: list[AgainstResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``tallstore verify --json``)."""
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class Expected:
    """One array the manifest implies, what it must hold and the recorded CRC-32C of each chunk."""

    path: str
    storage: np.dtype
    numel: int
    what: str
    crcs: tuple[int, ...] | None = None


def verify(
    source: ArchiveSource, base: Callable[[], ExternalBase | EmbeddedBase], *, deep: bool = False,
    against: Mapping[str, str | os.PathLike[str]] | None = None, progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify the archive (see the module docstring); tasks named in ``against`` must exist.
    ``base`` opens the base when a level needs it (shallow verification never does).

    ``progress`` is called with 1 for every tensor ``deep`` has rebuilt (or failed to).
    """
    m = source.manifest
    against = dict(against or {})
    unknown = sorted(set(against) - set(m.tasks))
    if unknown:
        raise ArchiveError(f"{source.location}: no task {unknown[0]!r} (tasks: {', '.join(m.tasks)})")
    report = VerifyReport(source.location, deep)
    if source.damage is not None:
        report.problems.append(source.damage)
    _check_stored(source, report)
    _check_copy(source, report)
    if deep:
        _check_files(source, report)
        _check_base(source, base(), report)
        for t, name in enumerate(m.tasks):
            _check_task(source, base(), t, name, report, progress)
    for name, path in against.items():
        result = _compare(source, base(), name, str(path), report)
        if result is not None:
            report.against.append(result)
    report.problems = list(dict.fromkeys(report.problems))
    return report


def expected_arrays(source: ArchiveSource, report: VerifyReport) -> list[Expected]:
    """Every array the manifest and the readable task listings imply."""
    m = source.manifest
    out: list[Expected] = []
    quantized = m.shared.quantized
    for e in m.tensors:
        info = e.info
        if e.kind == layout.KIND_MASKED and not quantized:
            out.append(Expected(layout.merged_path(e.node), info.dtype.storage, info.numel, f"merged bits of {e.key!r}", e.crcs))
        if m.base.embedded and e.base_dtype is not None:
            out.append(Expected(layout.base_path(e.node), e.base_dtype.storage, info.numel, f"embedded base of {e.key!r}",
                                e.base_crcs))
    if quantized and any(e.codes for e in m.tensors):
        out.append(Expected(layout.SHARED_CODES, np.dtype(np.uint8), sum(seg[1] for e in m.tensors for seg in e.codes or ()),
                            "the shared vector's codes"))
    stored: dict[str, int] = {f.sha256: f.size for f in m.base.folder}
    for t, name in enumerate(m.tasks):
        try:
            record = source.task(t)
        except TallstoreError as e:
            report.problems.append(str(e))
            continue
        stored.update((f.sha256, f.size) for f in record.folder)
        if quantized and record.masks:
            out.append(Expected(layout.mask_path(t), np.dtype(np.uint8), sum(seg[1] for seg in record.masks),
                                f"mask of task {name!r}"))
        elif m.mask.nbytes and record.tall:
            out.append(Expected(layout.mask_path(t), np.dtype(np.uint8), m.mask.nbytes, f"mask of task {name!r}",
                                record.mask_crcs))
        if record.delta is not None:
            out.append(Expected(layout.delta_path(t), np.dtype(np.uint8),
                                sum(seg[1] for segs in record.delta.segments.values() for seg in segs),
                                f"delta code of task {name!r}"))
        for row in record.rows:
            e = m.entries[record.entry_key(row.key)]
            if row.source in (layout.SOURCE_EXACT, layout.SOURCE_XBASE):
                path = layout.exact_path(e.node, t)
                crcs = row.crcs if row.source == layout.SOURCE_EXACT else None  # xbase chunks hold XOR bits
                out.append(Expected(path, row.dtype.storage, row.info.numel, f"exact {row.key!r} of task {name!r}", crcs))
            elif row.source == layout.SOURCE_MASKED and row.info.rows > e.info.rows:
                extra = extra_info(row.info, e.info.rows)
                out.append(Expected(layout.extra_path(e.node, t), row.dtype.storage, extra.numel,
                                    f"rows of {row.key!r} past the base's, task {name!r}",
                                    row.crcs[len(list(block_ranges(e.info, m.block_elems))):]))
    for sha, size in sorted(stored.items()):
        out.append(Expected(layout.file_path(sha), np.dtype(np.uint8), size, f"archived file {sha[:12]}…"))
    return out


def _own_document(source: ArchiveSource, path: str) -> Any:
    """A node's own ``zarr.json`` (not the consolidated copy), or None if it is missing or unreadable."""
    try:
        return source.objects.document(f"{path}/zarr.json")
    except TallstoreError:
        return None


def _check_stored(source: ArchiveSource, report: VerifyReport) -> None:
    """Structure, metadata agreement, chunk presence and chunk checksums of every array, and every
    group above them (and above the task groups and the manifest's copy) present and agreeing."""
    task_groups = [layout.task_group(t) for t in range(len(source.manifest.tasks))]
    groups = {g for path in task_groups for g in (*_ancestors(path), path)}
    if source.manifest.version >= 2:  # v2 writers create every top group, even one left empty
        groups.update(_ancestors(layout.MANIFEST_COPY), layout.GROUPS)
    checks: list[tuple[Expected, ArrayFormat]] = []
    for exp in expected_arrays(source, report):
        report.arrays += 1
        groups.update(_ancestors(exp.path))
        try:
            arr = source.reader.array(exp.path, exp.storage, exp.numel, exp.crcs)
        except TallstoreError as e:
            report.problems.append(f"{source.location}: {exp.what}: {e}")
            continue
        if source.nodes is not None and _own_document(source, exp.path) != source.nodes.get(exp.path):
            report.problems.append(f"{source.location}: {exp.path}/zarr.json is missing or disagrees with the consolidated metadata")
        checks.append((exp, arr))
    _check_chunks(source, checks, report)
    for g in sorted(groups):
        own = _own_document(source, g)
        if not isinstance(own, dict) or own.get("node_type") != "group":
            report.problems.append(f"{source.location}: group {g}/zarr.json is missing or unreadable")
        elif source.nodes is not None and (_bare(own) is None or _bare(own) != _bare(source.nodes.get(g))):
            report.problems.append(f"{source.location}: {g}/zarr.json disagrees with the consolidated metadata")


def _ancestors(path: str) -> list[str]:
    """The groups above node ``path`` (``a``, ``a/b`` for ``a/b/c``)."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


_NO_CONSOLIDATED = {"kind": "inline", "must_understand": False, "metadata": {}}


def _bare(doc: Any) -> dict[str, Any] | None:
    """A group document without the empty ``consolidated_metadata`` Zarr adds to a group's
    consolidated copy; None if it is not a document or holds another ``consolidated_metadata``."""
    if not isinstance(doc, dict) or doc.get("consolidated_metadata", _NO_CONSOLIDATED) not in (_NO_CONSOLIDATED, None):
        return None
    return {k: v for k, v in doc.items() if k != "consolidated_metadata"}


def _check_copy(source: ArchiveSource, report: VerifyReport) -> None:
    """Format v2: the manifest's second copy is present, intact and agrees with the root (the
    copy is what a reader falls back to when the root ``zarr.json`` is lost)."""
    if source.manifest.version < 2 or source.damage is not None:
        return
    report.arrays += 1
    where = f"{source.location}: the manifest's copy {layout.MANIFEST_COPY}"
    meta = _own_document(source, layout.MANIFEST_COPY)
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and 0 < shape[0] <= MAX_DOCUMENT):
        report.problems.append(f"{where} is missing or unreadable")
        return
    if source.nodes is not None and meta != source.nodes.get(layout.MANIFEST_COPY):
        report.problems.append(f"{where}: its zarr.json disagrees with the consolidated metadata")
    try:
        arr = ArrayFormat.from_meta(meta, layout.MANIFEST_COPY, np.dtype(np.uint8), shape[0])
        report.chunks += arr.n_chunks
        doc = json.loads(source.reader.read(arr).tobytes())
    except (TallstoreError, ValueError, RecursionError) as e:
        report.problems.append(f"{where} is unreadable ({e if isinstance(e, TallstoreError) else 'not JSON'})")
        return
    if not _copy_holds(doc, source.manifest.digest):
        report.problems.append(f"{where} disagrees with the root zarr.json")


def _copy_holds(doc: Any, digest: str | None) -> bool:
    """Whether the manifest copy ``doc`` is the root's: it records ``digest``, and its content hashes to it."""
    if not (isinstance(doc, dict) and isinstance(doc.get("manifest"), dict) and isinstance(doc.get("tasks"), list)):
        return False
    try:
        return doc["manifest"].get("digest") == digest == archive_digest(doc["manifest"], doc["tasks"])
    except (TypeError, ValueError):  # not canonical JSON (a NaN, say)
        return False


def _check_chunks(source: ArchiveSource, checks: list[tuple[Expected, ArrayFormat]], report: VerifyReport) -> None:
    """Every chunk of every array present and decodable, ``READ_BATCH`` chunks a round; after
    ``ARRAY_PROBLEMS`` bad chunks of one array its remaining chunks are one more problem."""
    bad: dict[str, int] = {}

    def chunks() -> Iterator[tuple[Expected, ArrayFormat, int]]:
        for exp, arr in checks:
            for i in range(arr.n_chunks):
                if bad.get(exp.path, 0) >= ARRAY_PROBLEMS:
                    report.problems.append(f"{source.location}: {exp.what}: its other {arr.n_chunks - i} chunks "
                                           f"were not checked after {bad[exp.path]} bad ones")
                    break
                yield exp, arr, i

    threads = 1 if not source.local else (os.cpu_count() or 2)

    def check(item: tuple[Expected, ArrayFormat, int], batch: Any) -> str | None:
        exp, arr, i = item
        try:
            with BUFFERS.take(arr.chunk_nbytes) as buf:
                batch.decode(arr, i, np.frombuffer(buf, np.uint8))
        except TallstoreError as e:
            return f"{source.location}: {exp.what}: chunk {arr.key(i)} {_why(e)}"
        return None

    pending = chunks()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        while part := list(itertools.islice(pending, READ_BATCH)):
            batch = source.reader.batch()
            for _, arr, i in part:
                batch.add(arr, i)
            batch.fetch()
            for (exp, _, _), problem in zip(part, pool.map(lambda item: check(item, batch), part)):
                if problem is not None:
                    bad[exp.path] = bad.get(exp.path, 0) + 1
                    report.problems.append(problem)
            report.chunks += len(part)


def _why(e: TallstoreError) -> str:
    """``is missing`` / ``is unreadable (…)`` from a reader error."""
    return "is missing" if isinstance(e, MissingObject) else f"is unreadable ({e})"


def _digest(t: torch.Tensor, info: TensorInfo, block_elems: int, version: int = 1, base_rows: int | None = None) -> str:
    """The tree digest (§7) of a whole tensor (format v2: ``[dtype, shape]`` first; a grown
    tensor's blocks are those of the base's rows, then those of its extra rows)."""
    flat = t.reshape(-1)
    row = info.row_numel
    return combine((block_digest(flat[a * row : b * row]) for a, b in row_blocks(info, base_rows, block_elems)),
                   info if version >= 2 else None)


def _check_base(source: ArchiveSource, base: ExternalBase | EmbeddedBase, report: VerifyReport) -> None:
    """Hash every base tensor and compare with the fingerprint recorded at pack time."""
    m = source.manifest
    digests: dict[str, str] = {}
    infos: dict[str, TensorInfo] = {}
    for k in m.base.keys:
        info = m.entries[k].base_info
        assert info is not None
        infos[k] = info
        try:
            digests[k] = _digest(base.read(k), info, m.block_elems)
        except TallstoreError as err:
            report.problems.append(f"{source.location}: base tensor {k!r} cannot be read ({err})")
    if len(digests) < len(m.base.keys):
        return
    report.base_checked = True
    if fingerprint(digests, infos) != m.base.fingerprint:
        report.problems.append(f"{source.location}: the base does not match its recorded fingerprint {m.base.fingerprint}")


def _check_files(source: ArchiveSource, report: VerifyReport) -> None:
    """Every archived non-weight file still has its recorded SHA-256."""
    seen: set[str] = set()
    records = [source.manifest.base.folder]
    for t in range(len(source.manifest.tasks)):
        try:
            records.append(source.task(t).folder)
        except TallstoreError:
            continue  # already reported by the shallow checks
    for f in (f for folder in records for f in folder):
        if f.sha256 in seen:
            continue
        seen.add(f.sha256)
        try:
            source.read_file(f)
        except TallstoreError as e:
            report.problems.append(f"{source.location}: archived file {f.path!r}: {e}")


def _rebuild(source: ArchiveSource, base: ExternalBase | EmbeddedBase, t: int, key: str, info: TensorInfo) -> torch.Tensor:
    with allocating(f"{source.location}: tensor {key!r} of task {source.manifest.tasks[t]!r} ({info.nbytes} bytes)"):
        out = torch.empty(info.shape, dtype=info.dtype.torch)
        loading.load(source, base, t, {key: out.view(-1)})
    return out


def _check_task(
    source: ArchiveSource, base: ExternalBase | EmbeddedBase, t: int, name: str, report: VerifyReport,
    progress: Callable[[int], None] | None,
) -> None:
    """Rebuild every tensor of task ``t`` and compare its digest with the recorded one."""
    try:
        record = source.task(t)
    except TallstoreError as e:
        report.problems.append(str(e))
        return
    bad = len(report.problems)
    for row in record.rows:
        try:
            e = source.manifest.entries[record.entry_key(row.key)]
            digest = _digest(_rebuild(source, base, t, row.key, row.info), row.info, source.manifest.block_elems,
                             source.manifest.version, e.info.rows if row.source == layout.SOURCE_MASKED else None)
        except TallstoreError as e:
            report.problems.append(str(e))
            continue
        finally:
            if progress is not None:
                progress(1)
        report.tensors_rebuilt += 1
        if digest != row.sha256:
            report.problems.append(
                f"{source.location}: tensor {row.key!r} of task {name!r} rebuilds to sha256 {digest}, packed as {row.sha256}"
            )
    if len(report.problems) == bad:
        report.tasks_rebuilt += 1


def _compare(
    source: ArchiveSource, base: ExternalBase | EmbeddedBase, name: str, path: str, report: VerifyReport,
) -> AgainstResult | None:
    """Task ``name`` against the checkpoint at ``path``: errors, exact tensors, file hashes."""
    t = source.manifest.tasks.index(name)
    try:
        record = source.task(t)
    except TallstoreError as e:
        report.problems.append(str(e))
        return None
    rows = record.by_key
    where = f"task {name!r} vs {path}"
    with open_checkpoint(path, source.storage_options) as ck:
        for k in [k for k in ck.keys if k not in rows] + [k for k in rows if k not in ck]:
            side = "the original" if k in ck else "the archive"
            report.problems.append(f"{where}: tensor {k!r} is only in {side}")
        sq_err = tau_sq = max_abs = 0.0
        exact = total = 0
        for key in (k for k in rows if k in ck):
            total += 1
            row = rows[key]
            if ck.info(key) != row.info:
                report.problems.append(f"{where}: tensor {key!r} has {ck.info(key)} in the original, {row.info} rebuilt")
                continue
            want = ck.read(key)
            masked = row.source in (layout.SOURCE_MASKED, layout.SOURCE_DELTA)  # the approximate rows
            if masked:
                tau_sq += squared_distance(want, base.read(record.entry_key(key)))
            try:
                got = _rebuild(source, base, t, key, row.info)
            except TallstoreError as e:
                report.problems.append(str(e))
                continue
            if np.array_equal(dtypes.to_storage(got), dtypes.to_storage(want)):
                exact += 1
                continue
            diff = got.to(torch.float64) - want.to(torch.float64)
            max_abs = max(max_abs, float(diff.abs().max()))
            if masked:
                sq_err += float(diff.square().sum())
        original = [{"name": f.name, "size": f.size, "sha256": f.sha256()} for f in ck.files]
    rel = math.sqrt(sq_err / tau_sq) if tau_sq else (0.0 if sq_err == 0 else math.inf)
    if not (math.isfinite(rel) and math.isfinite(max_abs)):
        report.problems.append(f"{where}: the rebuild error is not finite (relative {rel}, max abs {max_abs})")
    return AgainstResult(
        task=name, path=path, relative_error=rel, max_abs_error=max_abs,
        recorded_error=record.stats.rebuild_error, exact_tensors=exact, tensors=total,
        files_match=original == [f.to_json() for f in record.files],
    )
