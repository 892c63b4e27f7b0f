"""A readable summary of an archive: tasks, λ, mask densities, sizes and compression ratios."""

from __future__ import annotations

from typing import Any

from .archive import Archive
from .storage import format as fmt
from .storage.sizes import stored_bytes


def describe(arc: Archive, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``tallstore info`` shows, as JSON-ready data."""
    m = arc.manifest
    parts = stored_bytes(arc.location, storage_options)
    archive_bytes = sum(parts.values())
    base_files = m["base"].get("files", [])
    base_bytes = sum(f["size"] for f in base_files)
    tasks = []
    raw = 0
    for i, name in enumerate(arc.tasks):
        a = arc.task_attrs(i)
        size = sum(f["size"] for f in a["files"])
        raw += size
        tasks.append({"name": name, "lam": a["lam"], "raw_bytes": size, **a["stats"]})
    stored_total = archive_bytes + (0 if m["base"]["embedded"] else base_bytes)
    return {
        "location": arc.location,
        "format_version": m["version"],
        "created": m.get("created"),
        "writer": m.get("writer"),
        "merge": m["merge"],
        "lam_selection": m.get("lam_selection", {"method": "fixed"}),
        "base": {
            "embedded": m["base"]["embedded"],
            "location": m["base"]["location"],
            "fingerprint": m["base"]["fingerprint"],
            "bytes": base_bytes,
        },
        "tensors": len(m["tensors"]),
        "weight_codec": weight_codec(arc),
        "archive_bytes": archive_bytes,
        "archive_parts": parts,
        "raw_task_bytes": raw,
        "ratio": raw / archive_bytes if archive_bytes else 0.0,
        "ratio_with_base": raw / stored_total if stored_total else 0.0,
        "tasks": tasks,
    }


def weight_codec(arc: Archive) -> str | None:
    """How the merged weights are compressed (``"blosc lz4hc 5"``), from the first merged array's
    metadata; ``None`` when the archive has no merged array or no consolidated metadata."""
    node = next((e["node"] for e in arc.manifest["tensors"] if e["kind"] == fmt.KIND_MASKED), None)
    meta = arc.array_meta(fmt.merged_path(node)) if node is not None else None
    for codec in (meta or {}).get("codecs", []):
        if isinstance(codec, dict) and codec.get("name") in ("blosc", "zstd", "gzip"):
            conf = codec.get("configuration") or {}
            detail = [str(conf[k]) for k in ("cname", "clevel", "level") if k in conf]
            return " ".join([codec["name"], *detail])
    return None
