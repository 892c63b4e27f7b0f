"""One-task load time: tallstore vs safetensors and ZipNN, warm and cold, and its growth with T.

Every load ends with the task's tensors in preallocated model parameters (``target``: one empty
tensor per checkpoint tensor, same name, dtype and shape), which is what loading a model means:

- ``safetensors``: ``safetensors.torch.load_file`` of the original checkpoint, then ``copy_``
  into the parameters (what ``safetensors.torch.load_model`` does);
- ``safetensors_lazy``: ``load_file`` alone (memory-mapped tensors: no weight bytes are read);
- ``zipnn``: read the ZipNN-compressed checkpoint, decompress it (ZipNN's default threads), view
  its tensors in place, then ``copy_``;
- ``tallstore``: ``tallstore.open(archive, base=...)`` then ``arc[task].load_into(target)``: the
  task is rebuilt (and CRC-checked) directly into the parameters, no intermediate tensors and no
  extra copy; base external (a safetensors file on the same disk);
- ``tallstore_opened``: the same with the archive already open (no manifest read or base probe);
- ``tallstore_embedded``: ``tallstore.open(archive)`` of an archive with the base embedded, then
  ``load_into``;
- ``tallstore_state_dict``: ``tallstore.open(archive, base=...)`` then ``arc[task].state_dict()``
  (fresh tensors) and ``copy_``, shown to make the cost of that extra allocation and copy visible.

Every tallstore method runs once per codec profile (``tallstore.storage.codecs.PRESETS``: the
default "fast", lz4hc weights, and "compact", zstd weights), each profile packing its own
archives of the same collection; the default profile's keys are the names above, another
profile's end in ``_<profile>`` (``tallstore_compact``...). ``profiles`` in the results records
each profile's codec settings and key suffix; ``by_profile`` in a row its archive sizes and ratios.
The quantized shared form (``tallstore.pack(..., shared_bits=4)``, issue #14) is one more profile,
``q4`` (default codecs, keys ending in ``_q4``): the task is rebuilt from the entropy-coded 4-bit
codes and its mask coded against them. ``balanced`` (``tallstore.pack(..., fidelity="balanced")``,
the preset the README recommends for keeping fine-tunes) stores every task as its own delta code:
the load decodes the task's delta segments and adds them to the base.

Warm: one untimed call each, then ``repeats`` rounds in which every method of every profile runs
once (side by side, so load on the machine hits all alike); the best time of each. Cold:
``cold_repeats`` rounds, each call preceded by evicting the files it reads (checkpoint, ZipNN
file, archive, base) from the page cache (``POSIX_FADV_DONTNEED``); the median. Cold with the base
cached (``cold_base_cached``, issue #14 target ≤ ×1.0 of safetensors): the same, except that the
external base file is not evicted but read through (into the page cache, untimed) before each call:
the checkpoint, the ZipNN file and the archive come from disk, the base from memory (the embedded
variant's base is inside its archive and is read from disk). Before timing, each profile's
``load_into`` is checked to give exactly the tensors of ``state_dict()``. After the loads, in the
same run, ``floor`` (``benchmarks.load_floor``) times the unavoidable stages of one load from the
default profile's archive on their own: the least a load can take on this machine's cores.
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

from . import load_floor
from .common import (
    PACK_SECONDS,
    Collection,
    Config,
    Profile,
    codec_profiles,
    evict,
    fidelity_profiles,
    files_under,
    main_dtype,
    quantized_profiles,
    synthetic,
    tree_bytes,
    zipnn_decompress,
    zipnn_file,
    zoo_collection,
)

NAME = "load"
QUANTIZED_BITS = (4,)
FIDELITY_PRESETS = ("balanced",)
PHASES = ("warm", "cold", "cold_base_cached")
BASELINES = ("safetensors", "safetensors_lazy", "zipnn")
VARIANTS = ("tallstore", "tallstore_opened", "tallstore_embedded", "tallstore_state_dict")  # per codec profile
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
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


def loaders(coll: Collection, task: str, znn: Path, target: dict[str, torch.Tensor],
            archives: dict[Profile, tuple[Path, Path]]) -> Loads:
    """Each method's load of ``task`` into ``target`` and the files it reads; ``archives``:
    each profile's (external, embedded) archive. Each tallstore variant's profiles run adjacent."""
    src = coll.tasks[task]
    code = main_dtype(src)
    fns: Loads = {
        "safetensors": (lambda: copy_into(target, load_file(src)), [src]),
        "safetensors_lazy": (lambda: load_file(src), [src]),
        "zipnn": (lambda: copy_into(target, tensors_in(zipnn_decompress(znn, code))), [znn]),
    }
    per = {p: tallstore_loaders(coll, task, ext, emb, target) for p, (ext, emb) in archives.items()}
    for v in VARIANTS:
        for p, loads in per.items():
            fns[v + p.suffix] = loads[v]
    return fns


def tallstore_loaders(coll: Collection, task: str, ext: Path, emb: Path, target: dict[str, torch.Tensor]) -> Loads:
    """The tallstore variants' loads of ``task`` from one profile's archives."""
    opened = tallstore.open(ext, base=coll.base)
    return {
        "tallstore": (lambda: tallstore.open(ext, base=coll.base)[task].load_into(target), [ext, coll.base]),
        "tallstore_opened": (lambda: opened[task].load_into(target), [ext, coll.base]),
        "tallstore_embedded": (lambda: tallstore.open(emb)[task].load_into(target), [emb]),
        "tallstore_state_dict": (lambda: copy_into(target, tallstore.open(ext, base=coll.base)[task].state_dict()),
                                 [ext, coll.base]),
    }


def check_load_into(coll: Collection, task: str, ext: Path, target: dict[str, torch.Tensor]) -> None:
    """``load_into`` must leave in ``target`` exactly the tensors ``state_dict()`` returns."""
    view = tallstore.open(ext, base=coll.base)[task]
    for t in target.values():
        t.zero_()
    view.load_into(target)
    want = view.state_dict()
    bad = [k for k in target if k not in want or not torch.equal(target[k], want[k])]
    if bad or len(want) != len(target):
        raise AssertionError(f"{ext.name}: load_into differs from state_dict() for {bad[:3] or 'the key set'}")


def read_through(path: Path, block: int = 1 << 23) -> None:
    """Read every byte of ``path`` (so that it is in the page cache)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(block):
            pass


def time_side_by_side(fns: Loads, repeats: int, cold_repeats: int, base: Path | None = None) -> dict[str, dict[str, float]]:
    """Warm (best of ``repeats`` rounds), cold (median of ``cold_repeats``, if any) and, given the external
    ``base``, cold with that base in the page cache (median of ``cold_repeats``) seconds per method."""
    warm = {m: math.inf for m in fns}
    cold: dict[str, list[float]] = {m: [] for m in fns}
    cold_base: dict[str, list[float]] = {m: [] for m in fns}
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
    for _ in range(cold_repeats if base is not None else 0):
        for m, (fn, files) in fns.items():
            evict([f for f in files if f != base])
            read_through(base)
            t = time.perf_counter()
            fn()
            cold_base[m].append(time.perf_counter() - t)
    return {"warm": warm, "cold": {m: statistics.median(v) for m, v in cold.items() if v},
            "cold_base_cached": {m: statistics.median(v) for m, v in cold_base.items() if v}}


def measure(work: Path, coll: Collection, profiles: list[Profile], repeats: int, cold_repeats: int) -> dict[str, Any]:
    """Load the first task of ``coll`` every way and from every profile's archives, warm and cold."""
    task = next(iter(coll.tasks))
    archives = {p: (p.archive(work, coll, embed_base=False), p.archive(work, coll, embed_base=True)) for p in profiles}
    znn = zipnn_file(work, coll.tasks[task])
    target = empty_like_checkpoint(coll.tasks[task])
    for ext, _ in archives.values():
        check_load_into(coll, task, ext, target)
    times = time_side_by_side(loaders(coll, task, znn, target, archives), repeats, cold_repeats, coll.base)
    floor = load_floor.measure(archives[profiles[0]][0], coll.base, task, DTYPE_SIZES[coll.dtype], repeats)
    by_profile = {}
    for p, (ext, emb) in archives.items():
        by_profile[p.name] = {
            "archive_bytes": tree_bytes(ext),
            "embedded_bytes": tree_bytes(emb),
            "archive_files": len(files_under(ext)),
            "pack_seconds": PACK_SECONDS.get(str(ext)),
            **ratios(times, p.suffix),
        }
    default = profiles[0]
    ext = archives[default][0]
    return {
        "collection": coll.label,
        "tag": coll.tag,
        "dtype": coll.dtype,
        "params": coll.params,
        "tasks": len(coll.tasks),
        "task": task,
        "checkpoint_bytes": coll.tasks[task].stat().st_size,
        "zipnn_bytes": znn.stat().st_size,
        "mask_bytes_task": tree_bytes(ext / "masks" / "0"),
        "mask_bytes_all": tree_bytes(ext / "masks"),
        **times,
        "floor": floor,
        "by_profile": by_profile,
        # the default profile's figures also at the top level (bench_core reads them)
        **{k: by_profile[default.name][k] for k in ("archive_bytes", "archive_files", "pack_seconds")},
        **{k: v for k, v in by_profile[default.name].items() if k.startswith("ratio_")},
    }


def ratios(times: dict[str, dict[str, float]], suffix: str) -> dict[str, float | None]:
    """One profile's warm and cold tallstore load times ÷ safetensors' (and ÷ ZipNN's)."""
    out = {}
    for ph in PHASES:
        t = times.get(ph, {})
        out[f"ratio_{ph}"] = _ratio(t, "tallstore" + suffix, "safetensors")
        out[f"ratio_{ph}_opened"] = _ratio(t, "tallstore_opened" + suffix, "safetensors")
        out[f"ratio_{ph}_embedded"] = _ratio(t, "tallstore_embedded" + suffix, "safetensors")
        out[f"ratio_{ph}_state_dict"] = _ratio(t, "tallstore_state_dict" + suffix, "safetensors")
        out[f"ratio_{ph}_vs_zipnn"] = _ratio(t, "tallstore" + suffix, "zipnn")
    return out


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
    profiles = codec_profiles() + quantized_profiles(QUANTIZED_BITS) + fidelity_profiles(FIDELITY_PRESETS)
    rows = []
    for coll in collections(cfg):
        rows.append(measure(cfg.work, coll, profiles, repeats, cold_repeats))
        r = rows[-1]
        w = r["warm"]
        each = ", ".join(f"{p.name} {w['tallstore' + p.suffix] * 1e3:.0f} ms (×{r['by_profile'][p.name]['ratio_warm']:.2f}, "
                         f"open ×{r['by_profile'][p.name]['ratio_warm_opened']:.2f}, "
                         f"cold ×{r['by_profile'][p.name]['ratio_cold'] or math.nan:.2f}, base cached "
                         f"×{r['by_profile'][p.name]['ratio_cold_base_cached'] or math.nan:.2f})" for p in profiles)
        print(f"  {r['collection']}: safetensors {w['safetensors'] * 1e3:.0f} ms, ZipNN {w['zipnn'] * 1e3:.0f} ms warm; "
              f"tallstore {each}", flush=True)
    methods = [*BASELINES, *(v + p.suffix for v in VARIANTS for p in profiles)]
    return {"repeats": repeats, "cold_repeats": cold_repeats, "methods": methods,
            "profiles": {p.name: p.record() for p in profiles}, "default_profile": profiles[0].name, "rows": rows}
