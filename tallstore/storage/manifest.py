"""The format model: the manifest and the task records as frozen dataclasses (spec §3, §4).

``from_json`` is the only place archive metadata is validated (types, ranges, cross-references:
an archive is untrusted input), ``to_json`` the only place it is built. Readers and writers
never touch the raw JSON otherwise.

**Limits.** Sizes are checked before anything is enumerated or allocated, against limits far
above any real model, so that a crafted archive is refused at once rather than exhausting memory
or time: at most :data:`MAX_TASKS` tasks, :data:`MAX_TENSOR_ELEMENTS` elements in one tensor and
:data:`MAX_ELEMENTS` in all the manifest's tensors together (and in each task's), and a CRC-32C
list must have exactly one value per row block (counted, not enumerated).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from .. import dtypes
from ..dtypes import DType, TensorInfo
from ..errors import (
    ArchiveError,
    CorruptArchiveError,
    IncompleteArchiveError,
    NewerFormatError,
    TallstoreError,
)
from . import layout
from .geometry import block_rows, extra_info

NODE = re.compile(r"[a-z0-9_.~-]{1,255}")
SHA256 = re.compile(r"[0-9a-f]{64}")
GENERATION = re.compile(r"[0-9a-f]{32}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_PATH = 4096
MAX_DIM = 1 << 62
MAX_NDIM = 64
MAX_TASKS = 10_000
MAX_TENSOR_ELEMENTS = 1 << 36
"""≈ 6.9·10¹⁰ elements: some 20 times the largest tensor of today's largest open models."""
MAX_ELEMENTS = 1 << 42
"""≈ 4.4·10¹² elements: all tensors of an archive (or of one task) together."""
_MAX_FLOAT = int(sys.float_info.max)
REQUIRED = ("tasks", "lam", "merge", "base", "tensors", "mask", "block_elems")


class Malformed(CorruptArchiveError):
    """Archive metadata that fails its schema."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: archive metadata is malformed: {what}")


def _is_int(v: Any, lo: int = 0, hi: int = MAX_DIM) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    """A JSON number that converts to a float (an integer of 400 digits does not)."""
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _MAX_FLOAT)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _dtype(v: Any) -> DType | None:
    if not isinstance(v, str):
        return None
    try:
        return dtypes.by_name(v)
    except TallstoreError:
        return None


def _shape(v: Any) -> tuple[int, ...] | None:
    """A recorded shape as a tuple, or None if it is not a list of sane sizes."""
    if not isinstance(v, list) or len(v) > MAX_NDIM or not all(_is_int(s) for s in v):
        return None
    n = 1
    for s in v:
        n *= s
    return tuple(v) if n <= MAX_DIM else None


def canonical(doc: Any) -> bytes:
    """The canonical bytes of a JSON document (spec §7): keys sorted, no spaces, UTF-8, floats as
    their shortest round-trip form (Python's ``repr``), no NaN or infinity."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def archive_digest(manifest: dict[str, Any], tasks: list[Any]) -> str:
    """``sha256:`` over the canonical manifest (its ``digest`` left out) and every task's record."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(canonical({"manifest": body, "tasks": tasks})).hexdigest()


def _crc_list(v: Any, n: int) -> tuple[int, ...] | None:
    """``v`` as a tuple of ``n`` CRC-32C values, or None if it is not one."""
    if not isinstance(v, list) or len(v) != n or not all(_is_int(c, 0, 0xFFFFFFFF) for c in v):
        return None
    return tuple(v)


def _segments(v: Any, n: int) -> tuple[tuple[int, int, int], ...] | None:
    """``v`` as ``n`` stream segments ``[offset, length, crc32c]``, or None if it is not."""
    if not isinstance(v, list) or len(v) != n:
        return None
    out = []
    for seg in v:
        if not (isinstance(seg, list) and len(seg) == 3 and _is_int(seg[0]) and _is_int(seg[1])
                and _is_int(seg[2], 0, 0xFFFFFFFF)):
            return None
        out.append((seg[0], seg[1], seg[2]))
    return tuple(out)


def _n_blocks(info: TensorInfo, block_elems: int) -> int:
    """How many row blocks ``block_ranges`` cuts ``info`` into, counted without enumerating them."""
    return 1 if info.numel == 0 else -(-info.rows // block_rows(info, block_elems))


def _n_row_blocks(info: TensorInfo, base_rows: int | None, block_elems: int) -> int:
    """``len(geometry.row_blocks(info, base_rows, block_elems))``, counted without enumerating them."""
    if base_rows is None or not info.shape or base_rows >= info.rows:
        return _n_blocks(info, block_elems)
    masked = TensorInfo(info.dtype, (base_rows, *info.shape[1:]))
    return _n_blocks(masked, block_elems) + _n_blocks(extra_info(info, base_rows), block_elems)


def _check_size(info: TensorInfo, where: str, what: str) -> None:
    if info.numel > MAX_TENSOR_ELEMENTS:
        raise Malformed(where, f"{what} has {info.numel} elements, more than tallstore reads in one tensor "
                               f"({MAX_TENSOR_ELEMENTS})")


def safe_relative_path(path: Any) -> bool:
    """Whether ``path`` is a plain relative POSIX path inside a folder: no ``..``, no absolute
    part, no backslash or control character, no empty or ``.`` component."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or path.startswith("/"):
        return False
    if any(ord(c) < 32 or c in "\\\x7f" for c in path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def safe_node(node: Any) -> bool:
    """Whether ``node`` is one harmless path segment (§5): no ``/``, never ``.`` or ``..``."""
    return isinstance(node, str) and NODE.fullmatch(node) is not None and node not in (".", "..")


@dataclass(frozen=True)
class FileRecord:
    """One input file as packed: its name, size and SHA-256."""

    name: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, v: Any, where: str, who: str) -> FileRecord:
        if not (isinstance(v, dict) and isinstance(v.get("name"), str) and _is_int(v.get("size"))
                and isinstance(v.get("sha256"), str)):
            raise Malformed(where, f"the {who}'s 'files' is not a list of {{name, size, sha256}}")
        return cls(v["name"], v["size"], v["sha256"])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def _files(v: Any, where: str, who: str) -> tuple[FileRecord, ...]:
    if not isinstance(v, list):
        raise Malformed(where, f"the {who}'s 'files' is not a list of {{name, size, sha256}}")
    return tuple(FileRecord.from_json(f, where, who) for f in v)


@dataclass(frozen=True)
class FolderFile:
    """A non-weight file of an input model folder (config, tokenizer…), kept at ``files/<sha256>``."""

    path: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, v: Any, where: str, who: str) -> FolderFile:
        if not (isinstance(v, dict) and safe_relative_path(v.get("path")) and _is_int(v.get("size"))
                and isinstance(v.get("sha256"), str) and SHA256.fullmatch(v["sha256"])):
            raise Malformed(where, f"the {who}'s 'folder' lists a file without a safe path, size and sha256")
        return cls(v["path"], v["size"], v["sha256"])

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def _folder(v: Any, where: str, who: str) -> tuple[FolderFile, ...]:
    if not isinstance(v, list):
        raise Malformed(where, f"the {who}'s 'folder' is not a list")
    out = tuple(FolderFile.from_json(f, where, who) for f in v)
    if len({f.path for f in out}) != len(out):
        raise Malformed(where, f"the {who}'s 'folder' lists a path twice")
    return out


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


@dataclass(frozen=True)
class WeightFile:
    """One input weight file: its name, how many of the task's tensors (in listing order) it held,
    and its safetensors ``__metadata__``."""

    name: str
    tensors: int
    metadata: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "tensors": self.tensors}
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


@dataclass(frozen=True)
class WeightsLayout:
    """How a task's weights were laid out in its input: file format, files in order, index metadata."""

    format: str
    files: tuple[WeightFile, ...]
    index_metadata: dict[str, Any] | None = None
    folder: bool = False

    @classmethod
    def from_json(cls, v: Any, rows: int, where: str, who: str) -> WeightsLayout:
        bad = Malformed(where, f"the {who}'s 'weights' layout is malformed")
        if not isinstance(v, dict) or v.get("format") not in ("safetensors", "torch") or not isinstance(v.get("files"), list):
            raise bad
        files = []
        for f in v["files"]:
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and "/" not in f["name"]
                    and f["name"] not in ("", ".", "..") and _is_int(f.get("tensors"))
                    and (f.get("metadata") is None or _str_map(f["metadata"]))):
                raise bad
            files.append(WeightFile(f["name"], f["tensors"], f.get("metadata")))
        index = v.get("index_metadata")
        if (sum(f.tensors for f in files) != rows or (index is not None and not isinstance(index, dict))
                or not isinstance(v.get("folder"), bool)):
            raise bad
        return cls(v["format"], tuple(files), index, v["folder"])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "folder": self.folder, "files": [f.to_json() for f in self.files]}
        if self.index_metadata is not None:
            out["index_metadata"] = self.index_metadata
        return out


@dataclass(frozen=True)
class TensorEntry:
    """How one tensor name is stored (``kind``), its task dtype and shape, its base dtype."""

    key: str
    node: str
    kind: str
    dtype: DType
    shape: tuple[int, ...]
    base_dtype: DType | None = None
    mask_offset: int | None = None
    crcs: tuple[int, ...] | None = None
    base_crcs: tuple[int, ...] | None = None
    codes: tuple[tuple[int, int, int], ...] | None = None
    mask_block: int | None = None

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.dtype, self.shape)

    @property
    def base_info(self) -> TensorInfo | None:
        """The base's dtype and shape, if the base holds this tensor."""
        return None if self.base_dtype is None else TensorInfo(self.base_dtype, self.shape)

    @property
    def mask_range(self) -> tuple[int, int]:
        """The bytes of every ``masks/<t>`` holding this tensor's bits."""
        assert self.mask_offset is not None
        return self.mask_offset, self.mask_offset + (self.info.numel + 7) // 8

    @classmethod
    def from_json(
        cls, e: Any, where: str, mask_nbytes: int, block_elems: int, version: int, shared: SharedForm | None = None,
    ) -> TensorEntry:
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise Malformed(where, "a 'tensors' entry has no key")
        what = f"tensor {e['key']!r}"
        if not safe_node(e.get("node")):
            raise Malformed(where, f"{what} has an unsafe or duplicate node name {e.get('node')!r}")
        d, shape = _dtype(e.get("dtype")), _shape(e.get("shape"))
        if d is None or shape is None:
            raise Malformed(where, f"{what} has an invalid dtype or shape")
        _check_size(TensorInfo(d, shape), where, what)
        base_dtype = None
        if "base_dtype" in e:
            base_dtype = _dtype(e["base_dtype"])
            if base_dtype is None:
                raise Malformed(where, f"{what} has an invalid base_dtype")
        kind = e.get("kind")
        if kind not in layout.KINDS:
            raise Malformed(where, f"{what} has unknown kind {kind!r}")
        if kind != layout.KIND_SEPARATE and (base_dtype is None or not d.is_float):
            raise Malformed(where, f"{what} is {kind} but lacks a floating dtype and base_dtype")
        quantized = shared is not None and shared.quantized
        offset = e.get("mask_offset")
        if kind == layout.KIND_MASKED and not quantized:
            n = TensorInfo(d, shape).numel
            if not _is_int(offset) or offset + (n + 7) // 8 > mask_nbytes:
                raise Malformed(where, f"{what} has a mask_offset outside the masks")
        elif offset is not None and not _is_int(offset):
            raise Malformed(where, f"{what} has an invalid mask_offset")
        crcs = base_crcs = codes = mask_block = None
        if version >= 2:
            blocks = _n_blocks(TensorInfo(d, shape), block_elems)
            if kind == layout.KIND_MASKED and quantized:
                codes = _segments(e.get("codes"), blocks)
                mask_block = e.get("mask_block")
                if codes is None or not _is_int(mask_block):
                    raise Malformed(where, f"{what} has no code segment per block or no mask_block")
            elif kind == layout.KIND_MASKED:
                crcs = _crc_list(e.get("crcs"), blocks)
                if crcs is None:
                    raise Malformed(where, f"{what} has no CRC-32C per block of its merged array")
            if base_dtype is not None:
                base_crcs = _crc_list(e.get("base_crcs"), blocks)
                if base_crcs is None:
                    raise Malformed(where, f"{what} has no CRC-32C per block of its base")
        return cls(e["key"], e["node"], kind, d, shape, base_dtype, offset, crcs, base_crcs, codes, mask_block)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "node": self.node, "dtype": self.dtype.name, "shape": list(self.shape),
                               "kind": self.kind}
        if self.mask_offset is not None:
            out["mask_offset"] = self.mask_offset
        if self.base_dtype is not None:
            out["base_dtype"] = self.base_dtype.name
        if self.crcs is not None:
            out["crcs"] = list(self.crcs)
        if self.base_crcs is not None:
            out["base_crcs"] = list(self.base_crcs)
        if self.codes is not None:
            out["codes"] = [list(c) for c in self.codes]
        if self.mask_block is not None:
            out["mask_block"] = self.mask_block
        return out


@dataclass(frozen=True)
class MaskLayout:
    """Where mask bits live: ``nbytes`` per ``masks/<t>``, in chunks of ``chunk_bytes``."""

    nbytes: int
    chunk_bytes: int
    bitorder: str = layout.BITORDER

    @property
    def stored_chunk(self) -> int:
        """The chunk length of each ``masks/<t>`` array as written (spec §2)."""
        return max(1, min(self.chunk_bytes, self.nbytes))

    @property
    def n_ranges(self) -> int:
        """How many ``chunk_bytes`` ranges a mask has (each with its CRC-32C in v2 task records)."""
        return -(-self.nbytes // self.chunk_bytes)

    @classmethod
    def from_json(cls, v: Any, where: str) -> MaskLayout:
        if not (isinstance(v, dict) and v.get("bitorder") == layout.BITORDER
                and _is_int(v.get("nbytes")) and _is_int(v.get("chunk_bytes"), 1)):
            raise Malformed(where, "'mask' is not {bitorder: little, nbytes, chunk_bytes}")
        if v["nbytes"] > -(-MAX_ELEMENTS // 8):
            raise Malformed(where, f"'mask.nbytes' is {v['nbytes']}, more than the masks of {MAX_ELEMENTS} elements")
        return cls(v["nbytes"], v["chunk_bytes"], v["bitorder"])

    def to_json(self) -> dict[str, Any]:
        return {"bitorder": self.bitorder, "nbytes": self.nbytes, "chunk_bytes": self.chunk_bytes}


@dataclass(frozen=True)
class BaseRecord:
    """The base model: where it was, whether it is embedded, its tensors and identity."""

    location: str | None
    embedded: bool
    keys: tuple[str, ...] = ()
    fingerprint: str | None = None
    probe: str | None = None
    files: tuple[FileRecord, ...] | None = None
    folder: tuple[FolderFile, ...] = ()

    @classmethod
    def from_json(cls, b: Any, where: str, entries: dict[str, TensorEntry]) -> BaseRecord:
        if not isinstance(b, dict) or not isinstance(b.get("embedded"), bool):
            raise Malformed(where, "'base' is not an object with 'embedded'")
        keys = b.get("keys")
        if not _is_str_list(keys) or len(set(keys)) != len(keys):
            raise Malformed(where, "'base.keys' is not a list of distinct names")
        for k in keys:
            if k not in entries or entries[k].base_dtype is None:
                raise Malformed(where, f"base tensor {k!r} has no entry with a base_dtype")
        for name in ("location", "fingerprint", "probe"):
            if b.get(name) is not None and not isinstance(b[name], str):
                raise Malformed(where, f"'base.{name}' is not a string")
        files = _files(b["files"], where, "base") if "files" in b else None
        folder = _folder(b["folder"], where, "base") if "folder" in b else ()
        return cls(b.get("location"), b["embedded"], tuple(keys), b.get("fingerprint"), b.get("probe"), files, folder)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"location": self.location, "embedded": self.embedded, "keys": list(self.keys),
                               "fingerprint": self.fingerprint, "probe": self.probe}
        if self.files is not None:
            out["files"] = [f.to_json() for f in self.files]
        if self.folder:
            out["folder"] = [f.to_json() for f in self.folder]
        return out


@dataclass(frozen=True)
class MergeRecord:
    """The merge rule τ_MTL was made with, and its JSON parameters (spec §6.1)."""

    rule: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, v: Any, where: str) -> MergeRecord:
        if not isinstance(v, dict) or not isinstance(v.get("rule"), str) or not isinstance(v.get("params", {}), dict):
            raise Malformed(where, "'merge' is not {rule, params}")
        return cls(v["rule"], dict(v.get("params", {})))

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "params": self.params}


@dataclass(frozen=True)
class SharedForm:
    """How the shared vector is stored (spec §2): ``xor`` (θ_MTL's bits XOR the base's, lossless)
    or ``quantized`` (``bits``-bit codes per row with a float32 scale, entropy coded, and the
    masks coded with contexts from the codes)."""

    form: str = layout.FORM_XOR
    bits: int | None = None
    method: str | None = None

    @classmethod
    def from_json(cls, v: Any, where: str) -> SharedForm:
        if v is None:
            return cls()
        bad = Malformed(where, "'shared' is not {form: xor} or {form: quantized, bits: 2..8, method}")
        if not isinstance(v, dict) or v.get("form") not in layout.FORMS:
            raise bad
        if v["form"] == layout.FORM_XOR:
            return cls()
        if not _is_int(v.get("bits"), 2, 8) or v.get("method") not in ("absmax", "mse"):
            raise bad
        return cls(layout.FORM_QUANTIZED, v["bits"], v["method"])

    @property
    def quantized(self) -> bool:
        return self.form == layout.FORM_QUANTIZED

    def to_json(self) -> dict[str, Any]:
        if not self.quantized:
            return {"form": layout.FORM_XOR}
        return {"form": self.form, "bits": self.bits, "method": self.method}


@dataclass(frozen=True)
class Manifest:
    """The root group's ``tallstore`` attribute: what the archive holds and how (spec §3)."""

    tasks: tuple[str, ...]
    lam: tuple[float, ...]
    merge: MergeRecord
    block_elems: int
    mask: MaskLayout
    base: BaseRecord
    tensors: tuple[TensorEntry, ...]
    complete: bool = False
    writer: str | None = None
    created: str | None = None
    lam_selection: dict[str, Any] | None = None
    version: int = layout.VERSION
    generation: str | None = None
    digest: str | None = None
    shared: SharedForm = field(default_factory=SharedForm)
    aliases: dict[str, str] = field(default_factory=dict)

    @cached_property
    def entries(self) -> dict[str, TensorEntry]:
        """Tensor entries by name."""
        return {e.key: e for e in self.tensors}

    @cached_property
    def mask_blocks(self) -> int:
        """Quantized form: how many mask segments each task has (one per masked row block)."""
        return sum(len(e.codes or ()) for e in self.tensors if e.kind == layout.KIND_MASKED)

    def with_(self, **changes: Any) -> Manifest:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    @classmethod
    def from_json(cls, m: Any, where: str) -> Manifest:
        """The manifest in the root's ``tallstore`` attribute, fully checked, or a clear error."""
        if not isinstance(m, dict) or m.get("format") != layout.FORMAT:
            raise ArchiveError(f"{where}: not a tallstore archive")
        version = m.get("version")
        if not isinstance(version, int):
            raise ArchiveError(f"{where}: archive has no valid format version")
        if version > layout.VERSION:
            raise NewerFormatError(
                f"{where}: archive format version {version} is newer than this tallstore "
                f"reads ({layout.VERSION}); upgrade tallstore"
            )
        if version not in layout.READABLE:
            raise ArchiveError(f"{where}: archive has no valid format version")
        if version < 2 and ("digest" in m or "generation" in m):
            raise Malformed(where, f"a format v{version} manifest carries the digest of a v2 archive (a relabelled version)")
        if m.get("complete") is not True:
            raise IncompleteArchiveError(f"{where}: archive is incomplete (packing did not finish); re-run pack")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise ArchiveError(f"{where}: archive manifest lacks {missing[0]!r}")
        tasks = m["tasks"]
        if isinstance(tasks, list) and len(tasks) > MAX_TASKS:
            raise Malformed(where, f"'tasks' lists {len(tasks)} tasks, more than tallstore reads ({MAX_TASKS})")
        if not _is_str_list(tasks) or not tasks or len(set(tasks)) != len(tasks):
            raise Malformed(where, "'tasks' is not a non-empty list of distinct names")
        lam = m["lam"]
        if not isinstance(lam, list) or len(lam) != len(tasks) or not all(_is_number(v) for v in lam):
            raise Malformed(where, "'lam' is not one number per task")
        merge = MergeRecord.from_json(m["merge"], where)
        if not _is_int(m["block_elems"], 1):
            raise Malformed(where, "'block_elems' is not a positive integer")
        mask = MaskLayout.from_json(m["mask"], where)
        if not isinstance(m["tensors"], list):
            raise Malformed(where, "'tensors' is not a list")
        shared = SharedForm.from_json(m.get("shared"), where) if version >= 2 else SharedForm()
        entries: dict[str, TensorEntry] = {}
        nodes: set[str] = set()
        total = 0
        for raw in m["tensors"]:
            e = TensorEntry.from_json(raw, where, mask.nbytes, m["block_elems"], version, shared)
            total += e.info.numel
            if total > MAX_ELEMENTS:
                raise Malformed(where, f"'tensors' hold more than {MAX_ELEMENTS} elements in all")
            if e.key in entries:
                raise Malformed(where, f"tensor {e.key!r} is listed twice")
            if e.node in nodes:
                raise Malformed(where, f"tensor {e.key!r} has an unsafe or duplicate node name {e.node!r}")
            nodes.add(e.node)
            entries[e.key] = e
        if shared.quantized:
            at = 0
            for e in entries.values():
                if e.kind == layout.KIND_MASKED:
                    if e.mask_block != at:
                        raise Malformed(where, f"tensor {e.key!r} has mask_block {e.mask_block}, expected {at}")
                    at += len(e.codes or ())
        base = BaseRecord.from_json(m["base"], where, entries)
        selection = m.get("lam_selection")
        if selection is not None and not isinstance(selection, dict):
            raise Malformed(where, "'lam_selection' is not an object")
        generation = digest = None
        aliases = m.get("aliases", {}) if version >= 2 else {}
        if (not _str_map(aliases) or any(a in tasks for a in aliases) or any(t not in tasks for t in aliases.values())):
            raise Malformed(where, "'aliases' is not a map of new names to stored tasks")
        if version >= 2:
            generation, digest = m.get("generation"), m.get("digest")
            if not isinstance(generation, str) or not GENERATION.fullmatch(generation):
                raise Malformed(where, "'generation' is not 32 hex digits")
            if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
                raise Malformed(where, "'digest' is not sha256:<64 hex digits>")
        return cls(
            tasks=tuple(tasks), lam=tuple(float(v) for v in lam), merge=merge, block_elems=m["block_elems"],
            mask=mask, base=base, tensors=tuple(entries.values()), complete=True,
            writer=m.get("writer") if isinstance(m.get("writer"), str) else None,
            created=m.get("created") if isinstance(m.get("created"), str) else None,
            lam_selection=selection, version=version, generation=generation, digest=digest, shared=shared,
            aliases=dict(aliases),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": layout.FORMAT, "version": self.version, "complete": self.complete,
            "writer": self.writer, "created": self.created, "tasks": list(self.tasks), "lam": list(self.lam),
            "merge": self.merge.to_json(), "block_elems": self.block_elems, "mask": self.mask.to_json(),
            "base": self.base.to_json(), "tensors": [e.to_json() for e in self.tensors],
        }
        if self.lam_selection is not None:
            out["lam_selection"] = self.lam_selection
        if self.version >= 2:
            out["shared"] = self.shared.to_json()
        if self.aliases:
            out["aliases"] = self.aliases
        if self.generation is not None:
            out["generation"] = self.generation
        if self.digest is not None:
            out["digest"] = self.digest
        return out

    def check_digest(self, raw: dict[str, Any], tasks: list[Any], where: str) -> None:
        """Refuse an archive whose manifest (``raw``, as stored) or task records are not those its
        digest was made of."""
        if self.version < 2:
            return
        try:
            got = archive_digest(raw, tasks)
        except (TypeError, ValueError):
            raise Malformed(where, "the manifest or a task record is not canonical JSON") from None
        if got != self.digest:
            raise CorruptArchiveError(
                f"{where}: archive metadata does not match its digest (the manifest or a task record was changed)"
            )


@dataclass(frozen=True)
class TaskRow:
    """One tensor of a task, in the task checkpoint's order: where it comes from, its digests."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    source: str
    sha256: str
    crcs: tuple[int, ...]

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.dtype, self.shape)

    def to_json(self) -> list[Any]:
        return [self.key, self.dtype.name, list(self.shape), self.source, self.sha256, list(self.crcs)]


@dataclass(frozen=True)
class TaskStats:
    """What the packer measured of one task (spec §4)."""

    masked_params: int
    mask_ones: int
    mask_density: float
    exact_bytes: int
    rebuild_error: float
    tau_norm: float
    relative_change: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "masked_params": self.masked_params, "mask_ones": self.mask_ones, "mask_density": self.mask_density,
            "exact_bytes": self.exact_bytes, "rebuild_error": self.rebuild_error, "tau_norm": self.tau_norm,
        }
        if self.relative_change is not None:
            out["relative_change"] = self.relative_change
        return out


@dataclass(frozen=True)
class TaskRecord:
    """The attributes of ``tasks/<t>``: a task's λ, its input, statistics and tensor listing."""

    name: str
    lam: float
    source: str
    files: tuple[FileRecord, ...]
    rows: tuple[TaskRow, ...]
    stats: TaskStats
    mask_crcs: tuple[int, ...] | None = None
    folder: tuple[FolderFile, ...] = ()
    weights: WeightsLayout | None = None
    skipped: tuple[str, ...] = ()
    renames: dict[str, str] = field(default_factory=dict)
    key_map: str | None = None
    adapter: bool = False
    masks: tuple[tuple[int, int, int], ...] | None = None
    representation: str = layout.REPR_TALL
    delta: DeltaRecord | None = None
    choice: dict[str, Any] | None = None

    @property
    def exact(self) -> bool:
        """Whether every tensor of the task is stored bit for bit (no mask, not in the shared vector)."""
        return self.representation == layout.REPR_EXACT

    @property
    def tall(self) -> bool:
        """Whether the task is rebuilt from the shared vector and its TALL mask (it takes part in merges)."""
        return self.representation == layout.REPR_TALL

    def entry_key(self, key: str) -> str:
        """The manifest's name of the task's tensor ``key`` (the base's, when the task's own
        names carried another prefix)."""
        return self.renames.get(key, key)

    @cached_property
    def by_key(self) -> dict[str, TaskRow]:
        """Rows by tensor name (the listing's order is the task's own key order)."""
        return {r.key: r for r in self.rows}

    @classmethod
    def from_json(cls, attrs: Any, manifest: Manifest, index: int, where: str) -> TaskRecord:
        """Task ``index``'s attributes, checked against the manifest."""
        name = manifest.tasks[index]
        who = f"task {name!r}"
        if not isinstance(attrs, dict) or attrs.get("name") != name:
            raise Malformed(where, f"the attributes of {who} do not name it")
        if not _is_number(attrs.get("lam")) or not isinstance(attrs.get("stats"), dict):
            raise Malformed(where, f"{who} lacks its lam or stats")
        if float(attrs["lam"]) != manifest.lam[index]:
            raise Malformed(where, f"{who} records λ {attrs['lam']} but the manifest {manifest.lam[index]}")
        files = _files(attrs.get("files"), where, who)
        raw_rows = attrs.get("tensors")
        if not isinstance(raw_rows, list):
            raise Malformed(where, f"{who} has no tensor listing")
        renames = attrs.get("renames", {}) if manifest.version >= 2 else {}
        if not _str_map(renames) or len(set(renames.values())) != len(renames):
            raise Malformed(where, f"{who}'s 'renames' is not a one-to-one map of names")
        representation = attrs.get("representation", layout.REPR_TALL) if manifest.version >= 2 else layout.REPR_TALL
        if representation not in layout.REPRESENTATIONS:
            raise Malformed(where, f"{who} has an unknown representation {representation!r}")
        exact = representation != layout.REPR_TALL
        rows: dict[str, TaskRow] = {}
        for raw in raw_rows:
            row = _row(raw, manifest, renames, where, who)
            if exact and row.source == layout.SOURCE_MASKED:
                raise Malformed(where, f"tensor {row.key!r} of {who} is masked, but the task is stored {representation}")
            if row.source == layout.SOURCE_DELTA and representation != layout.REPR_DELTA:
                raise Malformed(where, f"tensor {row.key!r} of {who} is delta-coded, but the task is {representation}")
            if row.key in rows:
                raise Malformed(where, f"tensor {row.key!r} of {who} is unknown to the manifest or listed twice")
            rows[row.key] = row
        if sum(r.info.numel for r in rows.values()) > MAX_ELEMENTS:
            raise Malformed(where, f"the tensors of {who} hold more than {MAX_ELEMENTS} elements in all")
        entry_keys = {renames.get(k, k) for k in rows}
        if len(entry_keys) != len(rows):
            raise Malformed(where, f"{who} names one manifest tensor twice")
        missing = [e.key for e in manifest.tensors if e.kind == layout.KIND_MASKED and e.key not in entry_keys and not exact]
        if missing:
            raise Malformed(where, f"{who} lacks the masked tensor {missing[0]!r}")
        mask_crcs = None
        folder: tuple[FolderFile, ...] = ()
        weights = None
        skipped: tuple[str, ...] = ()
        key_map = attrs.get("key_map")
        adapter = attrs.get("adapter", False)
        if not isinstance(key_map, (str, type(None))) or not isinstance(adapter, bool):
            raise Malformed(where, f"{who}'s 'key_map' or 'adapter' is malformed")
        masks = None
        if manifest.version >= 2 and not exact and manifest.shared.quantized:
            masks = _segments(attrs.get("masks"), manifest.mask_blocks)
            if masks is None:
                raise Malformed(where, f"{who} has no mask segment per masked block")
        elif manifest.version >= 2 and not exact:
            mask_crcs = _crc_list(attrs.get("mask_crcs"), manifest.mask.n_ranges)
            if mask_crcs is None:
                raise Malformed(where, f"{who} has no CRC-32C per mask range")
        if manifest.version >= 2:
            folder = _folder(attrs.get("folder", []), where, who)
            weights = WeightsLayout.from_json(attrs.get("weights"), len(rows), where, who)
            skipped_v = attrs.get("skipped", [])
            if not _is_str_list(skipped_v) or not all(safe_relative_path(p) for p in skipped_v):
                raise Malformed(where, f"{who}'s 'skipped' is not a list of safe paths")
            skipped = tuple(skipped_v)
        delta = None
        if representation == layout.REPR_DELTA:
            delta = DeltaRecord.from_json(attrs.get("delta"), rows, manifest.block_elems, where, who)
        choice = attrs.get("choice")
        if choice is not None and not (isinstance(choice, dict) and all(isinstance(k, str) for k in choice)):
            raise Malformed(where, f"{who}'s 'choice' is not an object")
        return cls(name, float(attrs["lam"]), str(attrs.get("source", "")), files, tuple(rows.values()),
                   _stats(attrs["stats"], where, who), mask_crcs, folder, weights, skipped, dict(renames), key_map, adapter,
                   masks, representation, delta, choice)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "lam": self.lam, "source": self.source, "files": [f.to_json() for f in self.files],
            "tensors": [r.to_json() for r in self.rows], "stats": self.stats.to_json(),
        }
        if self.mask_crcs is not None:
            out["mask_crcs"] = list(self.mask_crcs)
        if self.folder:
            out["folder"] = [f.to_json() for f in self.folder]
        if self.weights is not None:
            out["weights"] = self.weights.to_json()
        if self.skipped:
            out["skipped"] = list(self.skipped)
        if self.renames:
            out["renames"] = self.renames
        if self.key_map is not None:
            out["key_map"] = self.key_map
        if self.adapter:
            out["adapter"] = True
        if self.masks is not None:
            out["masks"] = [list(seg) for seg in self.masks]
        if not self.tall:
            out["representation"] = self.representation
        if self.delta is not None:
            out["delta"] = self.delta.to_json()
        if self.choice is not None:
            out["choice"] = self.choice
        return out


@dataclass(frozen=True)
class DeltaRecord:
    """A delta task's code (spec §10): its step factor κ, its dither seed, and each delta-coded
    tensor's segments in ``deltas/<t>``, one per row block."""

    step: float
    seed: int
    segments: dict[str, tuple[tuple[int, int, int], ...]]

    @classmethod
    def from_json(cls, v: Any, rows: dict[str, TaskRow], block_elems: int, where: str, who: str) -> DeltaRecord:
        if not isinstance(v, dict) or not _is_number(v.get("step")) or not _is_int(v.get("seed"), 0, 0xFFFFFFFF):
            raise Malformed(where, f"{who} is delta-coded but has no valid 'delta' step and seed")
        step = float(v["step"])
        raw = v.get("segments")
        coded = {k for k, r in rows.items() if r.source == layout.SOURCE_DELTA}
        if not math.isfinite(step) or step <= 0 or not isinstance(raw, dict) or set(raw) != coded:
            raise Malformed(where, f"{who}'s delta step is not positive or its segments do not list its delta-coded tensors")
        segments = {}
        for key in sorted(coded):
            segs = _segments(raw[key], _n_blocks(rows[key].info, block_elems))
            if segs is None:
                raise Malformed(where, f"tensor {key!r} of {who} has no delta segment per block")
            segments[key] = segs
        return cls(step, int(v["seed"]), segments)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed,
                "segments": {k: [list(s) for s in segs] for k, segs in sorted(self.segments.items())}}


def _row(raw: Any, manifest: Manifest, renames: dict[str, str], where: str, who: str) -> TaskRow:
    if not isinstance(raw, list) or len(raw) < 6 or not isinstance(raw[0], str):
        raise Malformed(where, f"{who} has a malformed tensor row")
    key, dname, shape_v, src, digest, crcs = raw[:6]
    what = f"tensor {key!r} of {who}"
    e = manifest.entries.get(renames.get(key, key))
    if e is None:
        raise Malformed(where, f"{what} is unknown to the manifest or listed twice")
    d, shape = _dtype(dname), _shape(shape_v)
    if d is None or shape is None or src not in layout.SOURCES:
        raise Malformed(where, f"{what} has an invalid dtype, shape or source")
    if not isinstance(digest, str) or SHA256.fullmatch(digest) is None:
        raise Malformed(where, f"{what} has no valid sha256")
    info = TensorInfo(d, shape)
    _check_size(info, where, what)
    grown = bool(shape) and bool(e.shape) and shape[1:] == e.shape[1:] and shape[0] > e.shape[0]
    base_rows = e.shape[0] if grown and src == layout.SOURCE_MASKED else None
    if _crc_list(crcs, _n_row_blocks(info, base_rows, manifest.block_elems)) is None:
        raise Malformed(where, f"{what} has no CRC-32C per block")
    if src == layout.SOURCE_MASKED and (e.kind != layout.KIND_MASKED or not (shape == e.shape or grown) or not d.is_float):
        raise Malformed(where, f"{what} is masked but does not match its masked entry")
    if src in (layout.SOURCE_BASE, layout.SOURCE_XBASE) and (e.base_dtype is None or shape != e.shape):
        raise Malformed(where, f"{what} comes from the base but the base has no such tensor")
    if src == layout.SOURCE_XBASE and not (d == e.base_dtype or (d.is_float and e.base_dtype.is_float)):
        raise Malformed(where, f"{what} is stored against the base, whose dtype {e.base_dtype.name} it cannot take")
    if src == layout.SOURCE_DELTA and (e.base_dtype is None or shape != e.shape or len(shape) < 2
                                       or not (d.is_float and e.base_dtype.is_float)):
        raise Malformed(where, f"{what} is delta-coded but the base has no floating tensor of its shape")
    return TaskRow(key, d, shape, src, digest, tuple(crcs))


def _stats(v: dict[str, Any], where: str, who: str) -> TaskStats:
    def num(name: str) -> float:
        x = v.get(name, 0)
        if not _is_number(x):
            raise Malformed(where, f"{who}'s stats.{name} is not a number")
        return x

    def count(name: str) -> int:
        x = num(name)
        if not math.isfinite(x):
            raise Malformed(where, f"{who}'s stats.{name} is not a count")
        return int(x)

    change = float(num("relative_change")) if "relative_change" in v else None
    return TaskStats(count("masked_params"), count("mask_ones"), float(num("mask_density")),
                     count("exact_bytes"), float(num("rebuild_error")), float(num("tau_norm")), change)
