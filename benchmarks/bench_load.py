"""One-task load time: tallstore vs safetensors and ZipNN, warm and cold, and its growth with T.

Every load ends with the task's tensors copied into preallocated model parameters (``copy_``),
which is what loading a model means:

- ``safetensors``: ``safetensors.torch.load_file`` of the original checkpoint, then the copy;
- ``safetensors_lazy``: ``load_file`` alone (memory-mapped tensors: no weight bytes are read);
- ``zipnn``: read the ZipNN-compressed checkpoint, decompress it (ZipNN's default threads), view
  its tensors in place, then the copy;
- ``tallstore``: ``tallstore.open(archive, base=...)`` then ``arc[task].state_dict()`` (rebuild
  and CRC check), then the copy; base external (a safetensors file on the same disk);
- ``tallstore_opened``: the same with the archive already open (no manifest read or base probe);
- ``tallstore_embedded``: ``tallstore.open(archive)`` of an archive with the base embedded.

Warm: one untimed call each, then ``repeats`` rounds in which every method runs once (side by
side, so load on the machine hits all alike); the best time of each. Cold: ``cold_repeats``
rounds, each call preceded by evicting the files it reads (checkpoint, ZipNN file, archive, base)
from the page cache (``POSIX_FADV_DONTNEED``); the median.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import tallstore

from .common import (
    PACK_SECONDS,
    Collection,
    Config,
    archive,
    evict,
    files_under,
    main_dtype,
    synthetic,
    tree_bytes,
    zipnn_decompress,
    zipnn_file,
    zoo_collection,
)

NAME = "load"
METHODS = ("safetensors", "safetensors_lazy", "zipnn", "tallstore", "tallstore_opened", "tallstore_embedded")
SF_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def empty_like_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Preallocated tensors shaped like every tensor of a checkpoint: the model to load into."""
    return {k: torch.empty_like(v) for k, v in load_file(path).items()}


def copy_into(target: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy every tensor into the preallocated parameter of the same name."""
    for k, v in tensors.items():
        target[k].copy_(v)


def tensors_in(buf: bytearray) -> dict[str, torch.Tensor]:
    """Zero-copy tensor views of a safetensors file image held in memory."""
    (n,) = memoryview(buf)[:8].cast("Q")
    header = json.loads(bytes(buf[8 : 8 + n]))
    start = 8 + n
    out = {}
    for k, e in header.items():
        if k == "__metadata__":
            continue
        a, b = e["data_offsets"]
        dt = SF_DTYPES[e["dtype"]]
        if b == a:
            out[k] = torch.empty(e["shape"], dtype=dt)
        else:
            out[k] = torch.frombuffer(buf, dtype=dt, count=(b - a) // dt.itemsize, offset=start + a).view(e["shape"])
    return out


Loads = dict[str, tuple[Callable[[], Any], list[Path]]]  # method: (load, the files it reads)


def loaders(coll: Collection, task: str, ext: Path, emb: Path, znn: Path, target: dict[str, torch.Tensor]) -> Loads:
    """Each method's load of ``task`` into ``target`` and the files it reads."""
    src = coll.tasks[task]
    code = main_dtype(src)
    opened = tallstore.open(ext, base=coll.base)
    return {
        "safetensors": (lambda: copy_into(target, load_file(src)), [src]),
        "safetensors_lazy": (lambda: load_file(src), [src]),
        "zipnn": (lambda: copy_into(target, tensors_in(zipnn_decompress(znn, code))), [znn]),
        "tallstore": (lambda: copy_into(target, tallstore.open(ext, base=coll.base)[task].state_dict()),
                      [ext, coll.base]),
        "tallstore_opened": (lambda: copy_into(target, opened[task].state_dict()), [ext, coll.base]),
        "tallstore_embedded": (lambda: copy_into(target, tallstore.open(emb)[task].state_dict()), [emb]),
    }


def time_side_by_side(fns: Loads, repeats: int, cold_repeats: int) -> dict[str, dict[str, float]]:
    """Warm (best of ``repeats`` rounds) and cold (median of ``cold_repeats``, if any) seconds per method."""
    warm = {m: math.inf for m in fns}
    cold: dict[str, list[float]] = {m: [] for m in fns}
    for fn, _ in fns.values():
        fn()
    for _ in range(repeats):
        for m, (fn, _) in fns.items():
            t = time.perf_counter()
            fn()
            warm[m] = min(warm[m], time.perf_counter() - t)
    for _ in range(cold_repeats):
        for m, (fn, files) in fns.items():
            evict(files)
            t = time.perf_counter()
            fn()
            cold[m].append(time.perf_counter() - t)
    return {"warm": warm, "cold": {m: statistics.median(v) for m, v in cold.items() if v}}


def measure(work: Path, coll: Collection, repeats: int, cold_repeats: int) -> dict[str, Any]:
    """Load the first task of ``coll`` every way, warm and cold; what one task reads."""
    task = next(iter(coll.tasks))
    ext = archive(work, coll, embed_base=False)
    emb = archive(work, coll, embed_base=True)
    znn = zipnn_file(work, coll.tasks[task])
    target = empty_like_checkpoint(coll.tasks[task])
    times = time_side_by_side(loaders(coll, task, ext, emb, znn, target), repeats, cold_repeats)
    masks_all = tree_bytes(ext / "masks")
    return {
        "collection": coll.label,
        "tag": coll.tag,
        "dtype": coll.dtype,
        "params": coll.params,
        "tasks": len(coll.tasks),
        "task": task,
        "checkpoint_bytes": coll.tasks[task].stat().st_size,
        "zipnn_bytes": znn.stat().st_size,
        "archive_bytes": tree_bytes(ext),
        "mask_bytes_task": tree_bytes(ext / "masks" / "0"),
        "mask_bytes_all": masks_all,
        "archive_files": len(files_under(ext)),
        "pack_seconds": PACK_SECONDS.get(str(ext)),
        **times,
        "ratio_warm": _ratio(times["warm"], "tallstore", "safetensors"),
        "ratio_warm_opened": _ratio(times["warm"], "tallstore_opened", "safetensors"),
        "ratio_warm_vs_zipnn": _ratio(times["warm"], "tallstore", "zipnn"),
        "ratio_cold": _ratio(times["cold"], "tallstore", "safetensors"),
        "ratio_cold_vs_zipnn": _ratio(times["cold"], "tallstore", "zipnn"),
    }


def _ratio(times: dict[str, float], a: str, b: str) -> float | None:
    """``times[a] / times[b]``, or None where they were not measured."""
    return times[a] / times[b] if a in times and b in times else None


def collections(cfg: Config) -> list[Collection]:
    """The real zoo, then synthetic collections of one model size at several T."""
    zoo, _ = zoo_collection(cfg.quick, cfg.zoo_tasks)
    if cfg.quick:
        synth = [synthetic(cfg.work, 5, t, torch.float32) for t in (2, 4)]
    else:
        synth = [synthetic(cfg.work, 25, t, torch.float32) for t in (2, 8, 20)]
        synth += [synthetic(cfg.work, 25, t, torch.bfloat16) for t in (2, 20)]
    return [zoo, *synth]


def run(cfg: Config) -> dict[str, Any]:
    """Measure every collection; JSON-ready results."""
    repeats, cold_repeats = (3, 1) if cfg.quick else (7, 3)
    rows = []
    for coll in collections(cfg):
        rows.append(measure(cfg.work, coll, repeats, cold_repeats))
        r = rows[-1]
        print(f"  {r['collection']}: tallstore {r['warm']['tallstore'] * 1e3:.0f} ms, safetensors "
              f"{r['warm']['safetensors'] * 1e3:.0f} ms, ZipNN {r['warm']['zipnn'] * 1e3:.0f} ms warm "
              f"(×{r['ratio_warm']:.2f}); cold ×{r['ratio_cold']:.2f}", flush=True)
    return {"repeats": repeats, "cold_repeats": cold_repeats, "methods": list(METHODS), "rows": rows}
