"""Checks of what an archive says about itself, before the reader acts on any of it.

An archive is untrusted input. Its manifest, task attributes and array metadata are checked here
for types, ranges and internal consistency, so a corrupted or crafted archive fails with one clear
:class:`CorruptArchiveError` instead of a traceback from deep inside the reader, and no recorded
name or codec can make the reader look outside the archive or run anything.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import zarr

from .. import dtypes
from ..errors import CorruptArchiveError, TallstoreError
from . import format as fmt

SPEC_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "sharding_indexed"})
NODE = re.compile(r"[a-z0-9_.~-]{1,255}")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_DIM = 1 << 62
MAX_NDIM = 64
KINDS = (fmt.KIND_MASKED, fmt.KIND_BASE, fmt.KIND_SEPARATE)
SOURCES = (fmt.SOURCE_MASKED, fmt.SOURCE_BASE, fmt.SOURCE_EXACT)


def _bad(where: str, what: str) -> CorruptArchiveError:
    return CorruptArchiveError(f"{where}: archive metadata is malformed: {what}")


def _is_int(v: Any, lo: int = 0, hi: int = MAX_DIM) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _dtype(v: Any) -> dtypes.DType | None:
    if not isinstance(v, str):
        return None
    try:
        return dtypes.by_name(v)
    except TallstoreError:
        return None


def _numel(shape: Any) -> int | None:
    """The element count of a recorded shape, or None if it is not a list of sane sizes."""
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(s) for s in shape):
        return None
    n = 1
    for s in shape:
        n *= s
    return n if n <= MAX_DIM else None


def safe_node(node: Any) -> bool:
    """Whether ``node`` is one harmless path segment (§5): no ``/``, never ``.`` or ``..``."""
    return isinstance(node, str) and NODE.fullmatch(node) is not None and node not in (".", "..")


def check_manifest(m: dict[str, Any], where: str) -> None:
    """Types, ranges and cross-references of a manifest whose format, version and marker passed."""
    tasks = m["tasks"]
    if not _is_str_list(tasks) or not tasks or len(set(tasks)) != len(tasks):
        raise _bad(where, "'tasks' is not a non-empty list of distinct names")
    lam = m["lam"]
    if not isinstance(lam, list) or len(lam) != len(tasks) or not all(_is_number(v) for v in lam):
        raise _bad(where, "'lam' is not one number per task")
    merge = m["merge"]
    if not isinstance(merge, dict) or not isinstance(merge.get("rule"), str) or not isinstance(merge.get("params", {}), dict):
        raise _bad(where, "'merge' is not {rule, params}")
    if not _is_int(m["block_elems"], 1):
        raise _bad(where, "'block_elems' is not a positive integer")
    mask = m["mask"]
    if not (
        isinstance(mask, dict) and mask.get("bitorder") == fmt.BITORDER
        and _is_int(mask.get("nbytes")) and _is_int(mask.get("chunk_bytes"), 1)
    ):
        raise _bad(where, "'mask' is not {bitorder: little, nbytes, chunk_bytes}")
    entries = _check_tensors(m["tensors"], mask["nbytes"], where)
    _check_base(m["base"], entries, where)


def _check_tensors(tensors: Any, mask_nbytes: int, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(tensors, list):
        raise _bad(where, "'tensors' is not a list")
    entries: dict[str, dict[str, Any]] = {}
    nodes: set[str] = set()
    for e in tensors:
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise _bad(where, "a 'tensors' entry has no key")
        key = e["key"]
        what = f"tensor {key!r}"
        if key in entries:
            raise _bad(where, f"{what} is listed twice")
        if not safe_node(e.get("node")) or e["node"] in nodes:
            raise _bad(where, f"{what} has an unsafe or duplicate node name {e.get('node')!r}")
        d = _dtype(e.get("dtype"))
        n = _numel(e.get("shape"))
        if d is None or n is None:
            raise _bad(where, f"{what} has an invalid dtype or shape")
        if "base_dtype" in e and _dtype(e["base_dtype"]) is None:
            raise _bad(where, f"{what} has an invalid base_dtype")
        kind = e.get("kind")
        if kind not in KINDS:
            raise _bad(where, f"{what} has unknown kind {kind!r}")
        if kind != fmt.KIND_SEPARATE and ("base_dtype" not in e or not d.is_float):
            raise _bad(where, f"{what} is {kind} but lacks a floating dtype and base_dtype")
        if kind == fmt.KIND_MASKED:
            lo = e.get("mask_offset")
            if not _is_int(lo) or lo + (n + 7) // 8 > mask_nbytes:
                raise _bad(where, f"{what} has a mask_offset outside the masks")
        nodes.add(e["node"])
        entries[key] = e
    return entries


def _check_base(b: Any, entries: dict[str, dict[str, Any]], where: str) -> None:
    if not isinstance(b, dict) or not isinstance(b.get("embedded"), bool):
        raise _bad(where, "'base' is not an object with 'embedded'")
    keys = b.get("keys")
    if not _is_str_list(keys) or len(set(keys)) != len(keys):
        raise _bad(where, "'base.keys' is not a list of distinct names")
    for k in keys:
        if "base_dtype" not in entries.get(k, {}):
            raise _bad(where, f"base tensor {k!r} has no entry with a base_dtype")
    for field in ("location", "fingerprint", "probe"):
        if b.get(field) is not None and not isinstance(b[field], str):
            raise _bad(where, f"'base.{field}' is not a string")
    if "files" in b:
        _check_files(b["files"], where, "base")


def _check_files(files: Any, where: str, who: str) -> None:
    ok = isinstance(files, list) and all(
        isinstance(f, dict) and isinstance(f.get("name"), str) and _is_int(f.get("size"))
        and isinstance(f.get("sha256"), str)
        for f in files
    )
    if not ok:
        raise _bad(where, f"the {who}'s 'files' is not a list of {{name, size, sha256}}")


def check_task_attrs(
    attrs: Any, manifest: dict[str, Any], entries: dict[str, dict[str, Any]], index: int, where: str,
) -> dict[str, Any]:
    """Task ``index``'s attributes, checked against the manifest; returned unchanged."""
    name = manifest["tasks"][index]
    who = f"task {name!r}"
    if not isinstance(attrs, dict) or attrs.get("name") != name:
        raise _bad(where, f"the attributes of {who} do not name it")
    if not _is_number(attrs.get("lam")) or not isinstance(attrs.get("stats"), dict):
        raise _bad(where, f"{who} lacks its lam or stats")
    _check_files(attrs.get("files"), where, who)
    rows = attrs.get("tensors")
    if not isinstance(rows, list):
        raise _bad(where, f"{who} has no tensor listing")
    seen: set[str] = set()
    for row in rows:
        if not isinstance(row, list) or len(row) < 6 or not isinstance(row[0], str):
            raise _bad(where, f"{who} has a malformed tensor row")
        key, dname, shape, src, digest, crcs = row[:6]
        what = f"tensor {key!r} of {who}"
        e = entries.get(key)
        if e is None or key in seen:
            raise _bad(where, f"{what} is unknown to the manifest or listed twice")
        seen.add(key)
        if _dtype(dname) is None or _numel(shape) is None or src not in SOURCES:
            raise _bad(where, f"{what} has an invalid dtype, shape or source")
        if not isinstance(digest, str) or SHA256.fullmatch(digest) is None:
            raise _bad(where, f"{what} has no valid sha256")
        if not isinstance(crcs, list) or not crcs or not all(_is_int(c, 0, 0xFFFFFFFF) for c in crcs):
            raise _bad(where, f"{what} has no valid CRC-32C list")
        same = dname == e["dtype"] and shape == e["shape"]
        if src == fmt.SOURCE_MASKED and (e["kind"] != fmt.KIND_MASKED or not same):
            raise _bad(where, f"{what} is masked but does not match its masked entry")
        if src == fmt.SOURCE_BASE and ("base_dtype" not in e or shape != e["shape"]):
            raise _bad(where, f"{what} comes from the base but the base has no such tensor")
    return attrs


def codec_names(meta: Any) -> list[str]:
    """Every codec name in an array's metadata, nested (sharding) codecs included."""
    out: list[str] = []
    if isinstance(meta, dict):
        if isinstance(meta.get("name"), str) and ("configuration" in meta or len(meta) == 1):
            out.append(meta["name"])
        for v in meta.values():
            out.extend(codec_names(v))
    elif isinstance(meta, (list, tuple)):
        for v in meta:
            out.extend(codec_names(v))
    return out


def check_array_meta(
    meta: Any, path: str, storage: np.dtype, numel: int, *, codecs_known: bool = False,
) -> dict[str, Any]:
    """``meta`` (an array's ``zarr.json`` document) if it is the flat array the manifest promises,
    decoded by spec codecs only (``codecs_known``: the caller has matched its codec chain already).

    Refusing non-spec codecs keeps decoding to plain, data-only transforms: nothing a crafted
    archive names (a pickle codec, say) is ever loaded to decode its bytes.
    """
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        raise CorruptArchiveError(f"{path} is not an array")
    odd = [] if codecs_known else sorted(set(codec_names(meta.get("codecs", []))) - SPEC_CODECS)
    if odd or meta.get("storage_transformers"):
        raise CorruptArchiveError(f"{path} uses codec {odd[0] if odd else 'storage transformer'!r} outside the Zarr v3 spec; refusing to decode it")
    shape, dtype = meta.get("shape"), meta.get("data_type")
    if shape != [numel] or dtype != storage.name:
        raise CorruptArchiveError(f"{path} holds {shape} {dtype}, expected ({numel},) {storage}")
    return meta


def check_array(node: Any, path: str, storage: np.dtype, numel: int) -> zarr.Array:
    """``node`` if it is an array whose metadata passes :func:`check_array_meta`."""
    if not isinstance(node, zarr.Array):
        raise CorruptArchiveError(f"{path} is not an array")
    meta = node.metadata.to_dict()
    check_array_meta({**meta, "data_type": np.dtype(node.dtype).name, "shape": list(node.shape)}, path, storage, numel)
    return node


def open_array(root: zarr.Group, path: str, storage: np.dtype, numel: int) -> zarr.Array:
    """The checked array at ``path`` of an archive (see :func:`check_array`)."""
    try:
        node = root[path]
    except (KeyError, FileNotFoundError):
        raise CorruptArchiveError(f"{path} is missing") from None
    return check_array(node, path, storage, numel)
