"""A readable summary of an archive: format, merge, λ, base, tensors, tasks, sizes and ratios."""

from __future__ import annotations

from typing import Any

from ..errors import TallstoreError
from ..storage import layout
from ..storage.sizes import stored_bytes
from .source import ArchiveSource


def describe(source: ArchiveSource, *, sizes: bool = True) -> dict[str, Any]:
    """Everything ``tallstore info`` shows, as JSON-ready data (``sizes``: list the store too)."""
    m = source.manifest
    base_files = [f.to_json() for f in m.base.files or ()]
    base_bytes = sum(f["size"] for f in base_files)
    tasks = []
    for i, name in enumerate(m.tasks):
        rec = source.task(i)
        tasks.append({
            "name": name, "representation": rec.representation, "lam": rec.lam, "source": rec.source,
            **({"delta_step": rec.delta.step} if rec.delta is not None else {}),
            **({"choice": rec.choice} if rec.choice is not None else {}),
            "files": [f.to_json() for f in rec.files],
            "raw_bytes": sum(f.size for f in rec.files) + sum(f.size for f in rec.folder), **rec.stats.to_json(),
            "folder": [f.to_json() for f in rec.folder], "skipped": list(rec.skipped),
            "key_map": rec.key_map, "renames": rec.renames, "adapter": rec.adapter,
            "tensors": [{"key": r.key, "dtype": r.dtype.name, "shape": list(r.shape), "source": r.source,
                         "sha256": r.sha256} for r in rec.rows],
        })
    out: dict[str, Any] = {
        "location": source.location,
        "format_version": m.version,
        "created": m.created,
        "writer": m.writer,
        "merge": m.merge.to_json(),
        "shared": m.shared.to_json(),
        "lam": list(m.lam),
        "aliases": dict(m.aliases),
        "lam_selection": m.lam_selection or {"method": "fixed"},
        "block_elems": m.block_elems,
        "base": {
            "embedded": m.base.embedded, "location": m.base.location, "fingerprint": m.base.fingerprint,
            "keys": list(m.base.keys), "files": base_files, "bytes": base_bytes,
            "folder": [f.to_json() for f in m.base.folder],
        },
        "tensors": [e.to_json() for e in m.tensors],
        "weight_codec": weight_codec(source),
        "tasks": tasks,
    }
    if sizes:
        parts = stored_bytes(source.location, source.storage_options)
        archive_bytes = sum(parts.values())
        raw = sum(t["raw_bytes"] for t in tasks)
        stored_total = archive_bytes + (0 if m.base.embedded else base_bytes)
        out.update({
            "archive_bytes": archive_bytes,
            "archive_parts": parts,
            "raw_task_bytes": raw,
            "ratio": raw / archive_bytes if archive_bytes else 0.0,
            "ratio_with_base": raw / stored_total if stored_total else 0.0,
        })
    return out


def weight_codec(source: ArchiveSource) -> str | None:
    """How the merged weights are compressed (``"blosc lz4hc 5"``), from the first merged array's
    metadata; ``None`` when the archive has no merged array."""
    node = next((e.node for e in source.manifest.tensors if e.kind == layout.KIND_MASKED), None)
    if node is None:
        return None
    try:
        meta = source.reader.metadata(layout.merged_path(node))
    except TallstoreError:
        return None
    for codec in meta.get("codecs", []) if isinstance(meta, dict) else []:
        if isinstance(codec, dict) and codec.get("name") in ("blosc", "zstd", "gzip"):
            conf = codec.get("configuration") or {}
            detail = [str(conf[k]) for k in ("cname", "clevel", "level") if k in conf]
            return " ".join([codec["name"], *detail])
    return None
