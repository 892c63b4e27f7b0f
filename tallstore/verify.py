"""``verify``: prove an archive still holds, and rebuilds, exactly what was packed.

Three levels, each including the one before:

- **shallow** (always): every array the manifest implies exists with the promised shape, dtype and
  spec-only codecs, its own ``zarr.json`` agrees with the consolidated copy, every chunk is present
  (writers store every chunk, §2) and decodes, which checks its ``crc32c``;
- **deep**: the base is hashed against its fingerprint and every task is rebuilt (the reader checks
  each tensor's CRC-32C) and compared with the SHA-256 tree digests recorded at pack time;
- **against**: a task is compared with an original checkpoint: relative error ``‖θ̂−θ‖/‖τ‖`` over
  masked tensors, maximum absolute error, exact tensors, and whether the original's files still
  have the SHA-256 recorded at pack time.

Problems are collected, not raised, so one run reports all of them.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from . import dtypes
from .checkpoint import TensorInfo, open_checkpoint
from .digests import block_digest, combine, fingerprint
from .errors import ArchiveError, TallstoreError
from .geometry import block_ranges
from .packing.units import file_sha256
from .storage import format as fmt
from .storage import schema
from .storage.reading import read_many
from .storage.strict import read_error

if TYPE_CHECKING:
    from .archive import Archive

READ_BATCH = 16


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
    """One array the manifest implies, and what it must hold."""

    path: str
    storage: np.dtype
    numel: int
    what: str


def verify(
    arc: "Archive", *, deep: bool = False, against: Mapping[str, str | os.PathLike[str]] | None = None,
) -> VerifyReport:
    """Verify ``arc`` (see the module docstring); tasks named in ``against`` must exist."""
    against = dict(against or {})
    unknown = sorted(set(against) - set(arc.tasks))
    if unknown:
        raise ArchiveError(f"{arc.location}: no task {unknown[0]!r} (tasks: {', '.join(arc.tasks)})")
    report = VerifyReport(arc.location, deep)
    _check_stored(arc, report)
    if deep:
        _check_base(arc, report)
        for t, name in enumerate(arc.tasks):
            _check_task(arc, t, name, report)
    for name, path in against.items():
        result = _compare(arc, name, str(path), report)
        if result is not None:
            report.against.append(result)
    report.problems = list(dict.fromkeys(report.problems))
    return report


def expected_arrays(arc: "Archive", report: VerifyReport) -> list[Expected]:
    """Every array the manifest and the readable task listings imply."""
    m = arc.manifest
    out: list[Expected] = []
    for e in m["tensors"]:
        info = TensorInfo(dtypes.by_name(e["dtype"]), tuple(e["shape"]))
        if e["kind"] == fmt.KIND_MASKED:
            out.append(Expected(fmt.merged_path(e["node"]), info.dtype.storage, info.numel, f"merged bits of {e['key']!r}"))
        if m["base"]["embedded"] and "base_dtype" in e:
            bd = dtypes.by_name(e["base_dtype"])
            out.append(Expected(fmt.base_path(e["node"]), bd.storage, info.numel, f"embedded base of {e['key']!r}"))
    for t, name in enumerate(arc.tasks):
        if m["mask"]["nbytes"]:
            out.append(Expected(fmt.mask_path(t), np.dtype(np.uint8), m["mask"]["nbytes"], f"mask of task {name!r}"))
        try:
            rows = arc.task_attrs(t)["tensors"]
        except TallstoreError as e:
            report.problems.append(str(e))
            continue
        for key, dname, shape, src, *_ in rows:
            if src == fmt.SOURCE_EXACT:
                info = TensorInfo(dtypes.by_name(dname), tuple(shape))
                path = fmt.exact_path(arc.entries[key]["node"], t)
                out.append(Expected(path, info.dtype.storage, info.numel, f"exact {key!r} of task {name!r}"))
    return out


def _missing(store: Any, keys: list[str]) -> list[str]:
    """Those of ``keys`` absent from ``store``, asked concurrently."""

    async def ask() -> list[bool]:
        return await asyncio.gather(*(store.exists(k) for k in keys))

    return [k for k, there in zip(keys, sync(ask())) if not there]


def _own_array_metadata(store: Any, path: str) -> dict[str, Any] | None:
    """An array's own ``zarr.json`` (not the consolidated copy), normalised, or None if unreadable."""
    try:
        return zarr.open_array(store=store, path=path, mode="r", zarr_format=3).metadata.to_dict()
    except Exception:
        return None


def _own_group_attrs(store: Any, path: str) -> dict[str, Any] | None:
    """A group's attributes from its own ``zarr.json``, or None if it is missing or no group."""
    try:
        return zarr.open_group(store=store, path=path, mode="r", zarr_format=3, use_consolidated=False).attrs.asdict()
    except Exception:
        return None


def _check_stored(arc: "Archive", report: VerifyReport) -> None:
    """Structure, metadata agreement, chunk presence and chunk checksums of every array."""
    store = arc.root.store
    groups: set[str] = {fmt.task_group(t) for t in range(len(arc.tasks))}
    for exp in expected_arrays(arc, report):
        report.arrays += 1
        try:
            arr = schema.open_array(arc.root, exp.path, exp.storage, exp.numel)
        except Exception as e:
            report.problems.append(f"{arc.location}: {exp.what}: {e}")
            continue
        parts = exp.path.split("/")
        groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if _own_array_metadata(store, exp.path) != arr.metadata.to_dict():
            report.problems.append(f"{arc.location}: {exp.path}/zarr.json is missing or disagrees with the consolidated metadata")
        _check_chunks(arc, arr, exp, report)
    for g in sorted(groups):
        own = _own_group_attrs(store, g)
        if own is None:
            report.problems.append(f"{arc.location}: group {g}/zarr.json is missing or unreadable")
        elif g.startswith("tasks/") and own != _attrs(arc.root, g):
            report.problems.append(f"{arc.location}: {g}/zarr.json disagrees with the consolidated metadata")


def _attrs(root: zarr.Group, path: str) -> dict[str, Any] | None:
    """A node's attributes as the archive was opened (consolidated), or None if unreadable."""
    try:
        return root[path].attrs.asdict()
    except Exception:
        return None


def _chunk_ranges(arr: zarr.Array) -> Iterator[tuple[int, int, int]]:
    size = int(arr.metadata.chunk_grid.chunk_shape[0])
    n = arr.shape[0]
    for i in range(math.ceil(n / size) if n else 0):
        yield i, i * size, min(n, (i + 1) * size)


def _check_chunks(arc: "Archive", arr: zarr.Array, exp: Expected, report: VerifyReport) -> None:
    """Every chunk present and decodable (decoding checks each chunk's crc32c)."""
    chunks = [(f"{exp.path}/{arr.metadata.encode_chunk_key((i,))}", a, b) for i, a, b in _chunk_ranges(arr)]
    try:
        missing = set(_missing(arr.store, [key for key, _, _ in chunks]))
    except Exception as e:
        report.problems.append(f"{arc.location}: {exp.what}: cannot check its chunks ({type(e).__name__}: {e})")
        missing = set()
    for key in sorted(missing):
        report.problems.append(f"{arc.location}: {exp.what}: chunk {key} is missing")
    present = [c for c in chunks if c[0] not in missing]
    for s in range(0, len(present), READ_BATCH):
        batch = present[s : s + READ_BATCH]
        try:
            read_many([(arr, slice(a, b)) for _, a, b in batch])
        except Exception:
            for key, a, b in batch:
                try:
                    arr[a:b]
                except Exception as e:
                    report.problems.append(f"{arc.location}: {exp.what}: chunk {key} is unreadable ({read_error(e)})")
        report.chunks += len(batch)


def _digest(t: torch.Tensor, info: TensorInfo, block_elems: int) -> str:
    """The tree digest (§7) of a whole tensor."""
    flat = t.reshape(-1)
    row = info.row_numel
    return combine(block_digest(flat[a * row : b * row]) for a, b in block_ranges(info, block_elems))


def _check_base(arc: "Archive", report: VerifyReport) -> None:
    """Hash every base tensor and compare with the fingerprint recorded at pack time."""
    b = arc.manifest["base"]
    digests: dict[str, str] = {}
    infos: dict[str, TensorInfo] = {}
    for k in b["keys"]:
        e = arc.entries[k]
        infos[k] = info = TensorInfo(dtypes.by_name(e["base_dtype"]), tuple(e["shape"]))
        try:
            digests[k] = _digest(arc.base.read(k), info, arc.manifest["block_elems"])
        except Exception as err:
            detail = str(err) if isinstance(err, TallstoreError) else read_error(err)
            report.problems.append(f"{arc.location}: base tensor {k!r} cannot be read ({detail})")
    if len(digests) < len(b["keys"]):
        return
    report.base_checked = True
    if fingerprint(digests, infos) != b["fingerprint"]:
        report.problems.append(f"{arc.location}: the base does not match its recorded fingerprint {b['fingerprint']}")


def _check_task(arc: "Archive", t: int, name: str, report: VerifyReport) -> None:
    """Rebuild every tensor of task ``t`` and compare its digest with the recorded one."""
    try:
        view = arc[name]
    except TallstoreError as e:
        report.problems.append(str(e))
        return
    bad = len(report.problems)
    for key in view:
        row = view._listing[key]
        try:
            digest = _digest(view[key], view.info(key), arc.manifest["block_elems"])
        except TallstoreError as e:
            report.problems.append(str(e))
            continue
        report.tensors_rebuilt += 1
        if digest != row[4]:
            report.problems.append(
                f"{arc.location}: tensor {key!r} of task {name!r} rebuilds to sha256 {digest}, packed as {row[4]}"
            )
    if len(report.problems) == bad:
        report.tasks_rebuilt += 1


def _compare(arc: "Archive", name: str, path: str, report: VerifyReport) -> AgainstResult | None:
    """Task ``name`` against the checkpoint at ``path``: errors, exact tensors, file hashes."""
    try:
        view = arc[name]
    except TallstoreError as e:
        report.problems.append(str(e))
        return None
    attrs = arc.task_attrs(view.index)
    where = f"task {name!r} vs {path}"
    with open_checkpoint(path, arc.storage_options) as ck:
        for k in [k for k in ck.keys if k not in view] + [k for k in view if k not in ck]:
            side = "the original" if k in ck else "the archive"
            report.problems.append(f"{where}: tensor {k!r} is only in {side}")
        sq_err = tau_sq = max_abs = 0.0
        exact = total = 0
        for key in (k for k in view if k in ck):
            total += 1
            if ck.info(key) != view.info(key):
                report.problems.append(f"{where}: tensor {key!r} has {ck.info(key)} in the original, {view.info(key)} rebuilt")
                continue
            want = ck.read(key)
            masked = view._listing[key][3] == fmt.SOURCE_MASKED
            if masked:
                tau_sq += float((want.to(torch.float64) - arc.base.read(key).to(torch.float64)).square().sum())
            try:
                got = view[key]
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
        original = [{"name": f.name, "size": f.stat().st_size, "sha256": file_sha256(f)} for f in ck.files]
    rel = math.sqrt(sq_err / tau_sq) if tau_sq else (0.0 if sq_err == 0 else math.inf)
    return AgainstResult(
        task=name, path=path, relative_error=rel, max_abs_error=max_abs,
        recorded_error=attrs["stats"].get("rebuild_error"), exact_tensors=exact, tensors=total,
        files_match=original == attrs["files"],
    )
