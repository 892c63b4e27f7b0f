"""Deterministic collections and a canonical digest of every archive file, to pin format bytes.

``python tests/format_pins.py record FILE`` packs each collection below with the tallstore
installed and records, per archive, the SHA-256 of every stored file (chunk files as bytes,
``zarr.json`` documents and the manifest's copy as canonical JSON with the pack's time, writer,
random generation id, the digest over it and absolute input paths taken out).
``test_format_pins.py`` packs the same inputs and compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

VOLATILE = ("created", "writer", "generation", "digest")
COPY_CHUNK = "meta/manifest/c/0"


def _tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32)).to(dtype)


def _base(dtype: torch.dtype, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    return {
        "embed.weight": _tensor(rng, (40, 12), dtype),
        "layer.0.attn.weight": _tensor(rng, (12, 12), dtype),
        "layer.0.attn.bias": _tensor(rng, (12,), dtype),
        "layer.0.mlp.weight": _tensor(rng, (24, 12), dtype),
        "pooler.weight": _tensor(rng, (12, 12), dtype),
        "norm.weight": torch.ones(12, dtype=dtype),
        "scalar": torch.tensor(0.5, dtype=dtype),
        "position_ids": torch.arange(10),
    }


def _tasks(base: dict[str, torch.Tensor], n: int, rng: np.random.Generator) -> list[dict[str, torch.Tensor]]:
    out = []
    for t in range(n):
        sd = {}
        for k, v in base.items():
            if k == "pooler.weight" or not v.is_floating_point():
                sd[k] = v.clone()  # unchanged by every task: kind "base"
            else:
                sd[k] = (v.float() + _tensor(rng, tuple(v.shape), torch.float32, 0.02)).to(v.dtype)
        sd["head.weight"] = _tensor(rng, (3 + t, 12), base["embed.weight"].dtype)
        out.append(sd)
    return out


def collections(root: Path) -> dict[str, tuple[Path, dict[str, Path], dict[str, Any]]]:
    """``{archive name: (base path, {task: path}, pack keyword arguments)}``, written under ``root``."""
    made: dict[str, tuple[Path, dict[str, Path], dict[str, Any]]] = {}
    for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        rng = np.random.default_rng(7 if dtype == torch.float32 else 8)
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        base = _base(dtype, rng)
        save_file(base, folder / "base.safetensors")
        tasks = {}
        for t, sd in enumerate(_tasks(base, 3, rng)):
            save_file(sd, folder / f"t{t}.safetensors")
            tasks[f"t{t}"] = folder / f"t{t}.safetensors"
        made[f"{label}-ta"] = (folder / "base.safetensors", tasks, {"lam": {"t0": 0.3, "t1": 0.5}})
        made[f"{label}-ties-embedded"] = (
            folder / "base.safetensors", tasks,
            {"merge": "ties", "ties_top": 30.0, "embed_base": True, "exact": ("layer.0.attn.bias",), "block_elems": 64},
        )
    return made


def digests(location: str | Path) -> dict[str, str]:
    """SHA-256 of every file of a local archive, metadata documents canonicalised."""
    root = Path(location)
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = Path(d) / f
            rel = p.relative_to(root).as_posix()
            data = p.read_bytes()
            if f == "zarr.json":
                doc = json.loads(data)
                copy = doc if rel == "meta/manifest/zarr.json" else (doc.get("consolidated_metadata") or {}).get("metadata", {}).get("meta/manifest")
                if isinstance(copy, dict):  # its length follows the absolute input paths inside
                    copy.pop("shape", None)
                    copy.pop("chunk_grid", None)
                data = json.dumps(_canonical(doc), sort_keys=True).encode()
            elif rel == COPY_CHUNK:  # the manifest's copy: JSON behind a CRC-32C trailer
                data = json.dumps(_canonical(json.loads(data[:-4])), sort_keys=True).encode()
            out[rel] = hashlib.sha256(data).hexdigest()
    return dict(sorted(out.items()))


def _canonical(doc: Any) -> Any:
    """The document without what differs between two packs of the same inputs."""
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k in VOLATILE:
                continue
            if k in ("location", "source") and isinstance(v, str):
                v = Path(v).name
            out[k] = _canonical(v)
        return out
    if isinstance(doc, list):
        return [_canonical(v) for v in doc]
    return doc


def pack_all(root: Path) -> dict[str, dict[str, str]]:
    """Pack every collection under ``root`` and return their digests."""
    import tallstore

    out = {}
    for name, (base, tasks, kw) in collections(root / "inputs").items():
        tallstore.pack(root / f"{name}.tall", base=base, tasks=tasks, **kw)
        out[name] = digests(root / f"{name}.tall")
    return out


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 3 or sys.argv[1] != "record":
        raise SystemExit("usage: python tests/format_pins.py record FILE")
    with tempfile.TemporaryDirectory() as tmp:
        recorded = pack_all(Path(tmp))
    Path(sys.argv[2]).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sum(len(v) for v in recorded.values())} files of {len(recorded)} archives")
