"""Stored size of T checkpoints: tallstore vs raw safetensors, zstd, ZipNN and the information bound.

Measured side by side on one collection at a time (λ = ``common.LAM`` = 0.4, TA merge):

- ``raw``: the T task checkpoints as safetensors files;
- ``zstd``: each file compressed whole by zstd level 3;
- ``zipnn``: each file compressed whole by ZipNN (lossless, byte grouping + Huffman) for its dtype;
- ``tallstore_external``: the archive, base kept outside (it is stored once anyway, or fetched from
  a hub); ``tallstore_external_plus_base`` adds the base safetensors file;
- ``tallstore_embedded``: the self-contained archive with the base inside;
- ``bound_*``: the information bound of the same content: each mask at its entropy
  ``H(p_t) = −p log2 p − (1−p) log2(1−p)`` bits per masked parameter (``p_t`` = mask density), plus
  the archive's own stored merged vector (or shared codes), exact per-task tensors (and embedded base);
- ``paper_accounting``: the TALL paper's uncompressed count, θ₀ and τ_MTL at the tasks' width
  plus one bit per parameter per task: ``(2·w + T)·P`` bits.

The ``tallstore_*`` and ``bound_*`` sizes are measured for every codec profile
(``tallstore.storage.codecs.PRESETS``: the default "fast", lz4hc weights, and "compact", zstd
weights), each profile packing its own archives of the same collection: the default profile's
keys are the names above, another profile's end in ``_<profile>`` (``tallstore_embedded_compact``);
``profiles`` in the results records each profile's codec settings and key suffix, ``by_profile``
in a row each profile's bytes by role. Masks always use zstd, so they are the same under every
lossless-form profile: ``masks_identical`` says whether their stored bytes are, file for file.

The quantized shared form (``tallstore.pack(..., shared_bits=k)``, issue #14) is measured the same
way as two more profiles, ``q4`` and ``q3`` (default codecs; keys end in ``_q4``, ``_q3``): τ_MTL
stored as k-bit per-row codes, entropy coded in one stream ``shared/codes`` (role ``shared``), the
masks entropy coded against those codes. Targets (reported, not asserted) at T = 20 fp32:
≥ 40× smaller than the raw tasks with the base external, ≥ 14× embedded. ``by_profile`` also has,
per profile, ``padding_external`` / ``padding_embedded``: bytes of zeros padding the last chunk of
arrays stored without a compressor (the coded streams ``shared/codes`` and ``masks/<t>`` of the
quantized form: Zarr stores every chunk at full size), by role, ``mask_bits_per_param`` (mean over
tasks) and ``rebuild_error`` (mean of the tasks' pack-time ‖θ̂−θ‖/‖τ‖).

Mask bits per parameter of task t = stored bytes of ``masks/<t>`` (chunks and array metadata)
× 8 ÷ masked parameters (``stats.masked_params``), from the default profile's external archive.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tallstore

from .common import (
    LAM,
    Collection,
    Config,
    Profile,
    codec_profiles,
    entropy_bits,
    quantized_profiles,
    synthetic,
    tree_bytes,
    zipnn_file,
    zoo_collection,
    zstd_bytes,
)

NAME = "size"
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
QUANTIZED_BITS = (4, 3)


def role_of(rel: tuple[str, ...]) -> str:
    """The role of a folder of an archive (its path parts): merged, base, exact, extra, shared,
    masks/<t> or metadata."""
    if len(rel) >= 3 and rel[0] == "tensors" and rel[2] in ("merged", "base", "exact", "extra"):
        return rel[2]
    if len(rel) >= 2 and rel[0] == "masks":
        return f"masks/{rel[1]}"
    if len(rel) >= 2 and rel[0] == "shared":
        return "shared"
    return "metadata"


def parts(path: Path) -> dict[str, int]:
    """Stored bytes of an archive by role: merged (form ``xor``) or shared (the quantized codes),
    base, exact, extra, masks/<t>, metadata."""
    out: dict[str, int] = {}
    for d, _, files in os.walk(path):
        role = role_of(Path(d).relative_to(path).parts)
        out[role] = out.get(role, 0) + sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return out


def padding(path: Path) -> dict[str, int]:
    """Bytes of zero padding, by role, in the stored chunks of the arrays of ``path`` that have no
    compressor (codecs ``bytes`` and ``crc32c`` only): stored chunk bytes − 4 per chunk (the CRC) −
    the array's own bytes. Zarr stores an uncompressed edge chunk at the full chunk size."""
    out: dict[str, int] = {}
    for meta in path.rglob("zarr.json"):
        m = json.loads(meta.read_text())
        if m.get("node_type") != "array" or any(c["name"] not in ("bytes", "crc32c") for c in m["codecs"]):
            continue
        chunks = [f for f in (meta.parent / "c").rglob("*") if f.is_file()] if (meta.parent / "c").is_dir() else []
        if not chunks:
            continue
        crc = 4 * len(chunks) if any(c["name"] == "crc32c" for c in m["codecs"]) else 0
        logical = math.prod(m["shape"]) * np.dtype(m["data_type"]).itemsize
        pad = sum(f.stat().st_size for f in chunks) - crc - logical
        role = role_of(meta.parent.relative_to(path).parts)
        out[role] = out.get(role, 0) + max(pad, 0)
    return out


def mask_digests(path: Path) -> dict[str, str]:
    """SHA-1 of every stored file under an archive's ``masks/``, by path inside it."""
    root = path / "masks"
    return {str(f.relative_to(root)): hashlib.sha1(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def measure(work: Path, coll: Collection, profiles: list[Profile]) -> dict[str, Any]:
    """Every size of ``coll`` under every profile, its per-task mask statistics, and ratios to the raw size."""
    archives = {p: (p.archive(work, coll, embed_base=False), p.archive(work, coll, embed_base=True)) for p in profiles}
    default = profiles[0]
    ext = archives[default][0]
    arc = tallstore.open(ext, base=coll.base)
    by_profile = {p.name: {"parts_external": parts(e), "parts_embedded": parts(m), "padding_external": padding(e),
                           "padding_embedded": padding(m)} for p, (e, m) in archives.items()}
    p_ext = by_profile[default.name]["parts_external"]
    T = len(coll.tasks)
    for p, (e, _) in archives.items():
        facts_p = tallstore.open(e, base=coll.base).describe(sizes=False)["tasks"]
        pe = by_profile[p.name]["parts_external"]
        bits = [pe[f"masks/{t}"] * 8 / st["masked_params"] for t, st in enumerate(facts_p) if f"masks/{t}" in pe]
        errors = [st["rebuild_error"] for st in facts_p if st.get("rebuild_error") is not None]
        by_profile[p.name] |= {"mask_bits_per_param": sum(bits) / len(bits) if bits else None,
                               "rebuild_error": sum(errors) / len(errors) if errors else None}
    tasks = []
    facts = arc.describe(sizes=False)
    for t, name in enumerate(arc.tasks):
        st = facts["tasks"][t]
        p = st["mask_density"]
        mask_bytes = p_ext[f"masks/{t}"]
        bits = mask_bytes * 8 / st["masked_params"]
        tasks.append({
            "task": name, "density": p, "entropy_bits": entropy_bits(p), "mask_bytes": mask_bytes,
            "mask_bits_per_param": bits, "vs_entropy": bits / entropy_bits(p) if entropy_bits(p) else None,
            "masked_params": st["masked_params"], "rebuild_error": st["rebuild_error"],
        })
    mask_bound = sum(r["entropy_bits"] * r["masked_params"] / 8 for r in tasks)
    masks = [mask_digests(e) for p, (e, _) in archives.items() if not p.quantized]
    sizes = {
        "raw": coll.raw_bytes,
        "zstd": sum(zstd_bytes(f) for f in coll.tasks.values()),
        "zipnn": sum(zipnn_file(work, f).stat().st_size for f in coll.tasks.values()),
    }
    for prof, (e, m) in archives.items():
        pe, pm = by_profile[prof.name]["parts_external"], by_profile[prof.name]["parts_embedded"]
        bound_ext = mask_bound + sum(pe.get(k, 0) for k in ("merged", "shared", "exact", "extra"))
        sizes |= {
            "tallstore_external" + prof.suffix: tree_bytes(e),
            "tallstore_external_plus_base" + prof.suffix: tree_bytes(e) + coll.base.stat().st_size,
            "tallstore_embedded" + prof.suffix: tree_bytes(m),
            "bound_external" + prof.suffix: bound_ext,
            "bound_embedded" + prof.suffix: bound_ext + pm.get("base", 0),
        }
    sizes["paper_accounting"] = (2 * DTYPE_BITS[coll.dtype] + T) * coll.params / 8
    return {
        "collection": coll.label, "tag": coll.tag, "dtype": coll.dtype, "params": coll.params, "tasks": T,
        "lam": LAM, "base_bytes": coll.base.stat().st_size, "sizes": sizes,
        "fraction_of_raw": {k: v / sizes["raw"] for k, v in sizes.items()},
        "times_smaller": {k: sizes["raw"] / v for k, v in sizes.items()},
        "parts_external": p_ext, "parts_embedded": by_profile[default.name]["parts_embedded"],
        "by_profile": by_profile, "masks_identical": all(d == masks[0] for d in masks), "per_task": tasks,
        "masks_vs_entropy_max": max((r["vs_entropy"] for r in tasks if r["vs_entropy"]), default=None),
    }


def collections(cfg: Config) -> list[Collection]:
    """The real zoo at its own T, then synthetic 25M-parameter collections at T = 8 and 20."""
    zoo, _ = zoo_collection(cfg.quick, cfg.zoo_tasks)
    if cfg.quick:
        return [zoo, synthetic(cfg.work, 5, 4, torch.float32)]
    return [zoo, *(synthetic(cfg.work, 25, t, d) for d in (torch.float32, torch.bfloat16) for t in (8, 20))]


def run(cfg: Config) -> dict[str, Any]:
    """Measure every collection; JSON-ready results."""
    profiles = codec_profiles() + quantized_profiles(QUANTIZED_BITS)
    rows = []
    for coll in collections(cfg):
        rows.append(measure(cfg.work, coll, profiles))
        r = rows[-1]
        x = r["times_smaller"]
        each = "; ".join(f"{p.name}: embedded {x['tallstore_embedded' + p.suffix]:.2f}× smaller, external "
                         f"{x['tallstore_external' + p.suffix]:.2f}×" for p in profiles)
        print(f"  {r['collection']}: {each}; ZipNN {x['zipnn']:.2f}×, zstd {x['zstd']:.2f}×; masks ≤ "
              f"{r['masks_vs_entropy_max']:.3f}× H(p){'' if r['masks_identical'] else ' (mask bytes differ between profiles: zstd level)'}",
              flush=True)
    return {"lam": LAM, "profiles": {p.name: p.record() for p in profiles}, "default_profile": profiles[0].name,
            "rows": rows}
