"""Remote reads: bytes fetched from object storage to load one task, and load time by concurrency.

A generated BERT-like collection is packed straight to an S3-compatible endpoint (moto's server
on 127.0.0.1, started here, whose middleware counts the bytes it serves per object; see
``tests/s3server.py``). Then, per task:

- ``ratio`` = bytes fetched from the archive while opening it and loading the task
  ÷ (stored bytes of the merged vector + stored bytes of that task's mask). The numerator counts
  every GET, metadata and the task's exact tensors included; other tasks' masks must never be
  fetched (``foreign_mask_bytes``, expected 0);
- load time with a fixed per-request latency added by the server (object stores answer in tens
  of milliseconds), for several ``concurrency`` values with the base local, and at the highest
  with the base on S3 too (moto copies a whole object to serve any range of it, so that case
  mostly measures moto: its cost per ranged GET of the base is reported alongside).

Run: ``python -m benchmarks.run --only remote`` (``--quick`` for a small model); results in
``benchmarks/results/remote.json``. moto on localhost is not S3: the times show how concurrency
hides latency, not what a real bucket delivers.
"""

from __future__ import annotations

import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import torch

import tallstore
from tallstore.checkpoint import open_checkpoint

from .synthetic import write_collection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3server import S3Server  # noqa: E402

ARCHIVE_BUCKET = "archives"
MODEL_BUCKET = "models"


def stored_sizes(fs: Any, root: str) -> dict[str, int]:
    """Size of every object under ``root`` (bucket/prefix), by key relative to it."""
    return {p[len(root) + 1 :]: int(s) for p, s in fs.du(root, total=False).items()}


def needed_bytes(sizes: dict[str, int], t: int) -> dict[str, int]:
    """Stored bytes a load of task ``t`` needs: merged vector, its mask, its exact tensors."""
    merged = sum(s for k, s in sizes.items() if re.fullmatch(r"tensors/[^/]+/merged/c/.*", k))
    mask = sum(s for k, s in sizes.items() if k.startswith(f"masks/{t}/c/"))
    exact = sum(s for k, s in sizes.items() if re.fullmatch(rf"tensors/[^/]+/exact/{t}/c/.*", k))
    return {"merged": merged, "mask": mask, "exact": exact}


def load_once(server: S3Server, url: str, base: str, task: str, concurrency: int | None) -> dict[str, Any]:
    """Open the archive and load ``task`` once; what was fetched, and how long it took."""
    server.reset()
    t0 = time.perf_counter()
    arc = tallstore.open(url, base=base, storage_options=server.storage_options, concurrency=concurrency)
    opened = time.perf_counter() - t0
    arc[task].state_dict()
    total = time.perf_counter() - t0
    prefix = url.removeprefix(f"s3://{ARCHIVE_BUCKET}/") + "/"
    return {
        "open_seconds": opened,
        "load_seconds": total - opened,
        "seconds": total,
        "keys": {k.removeprefix(prefix): b for k, b in server.fetched_keys(ARCHIVE_BUCKET).items()},
        "base_bytes": server.fetched(MODEL_BUCKET),
    }


def run(work: Path, params_m: float, n_tasks: int, latency_ms: float, concurrency: list[int], repeats: int) -> dict[str, Any]:
    """Pack to S3, measure the fetch ratio of every task, then time loads by concurrency."""
    base, tasks = write_collection(work / "inputs", params_m, n_tasks, torch.float32)
    with S3Server() as server:
        so = server.storage_options
        url = server.make_bucket(ARCHIVE_BUCKET) + "/zoo.tall"
        server.make_bucket(MODEL_BUCKET)
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **so)
        fs.put(str(base), f"{MODEL_BUCKET}/{base.name}")
        remote_base = f"s3://{MODEL_BUCKET}/{base.name}"

        t0 = time.perf_counter()
        tallstore.pack(url, base, tasks, storage_options=so)
        pack_seconds = time.perf_counter() - t0
        sizes = stored_sizes(fs, f"{ARCHIVE_BUCKET}/zoo.tall")
        names = list(tasks)

        per_task = []
        for t, name in enumerate(names):
            got = load_once(server, url, str(base), name, None)
            need = needed_bytes(sizes, t)
            fetched = sum(got["keys"].values())
            foreign = sum(b for k, b in got["keys"].items() if k.startswith("masks/") and not k.startswith(f"masks/{t}/"))
            per_task.append({
                "task": name,
                "fetched_bytes": fetched,
                **{f"{k}_bytes": v for k, v in need.items()},
                "ratio": fetched / (need["merged"] + need["mask"]),
                "ratio_with_exact": fetched / sum(need.values()),
                "foreign_mask_bytes": foreign,
                "max_fetches_of_one_object": _max_repeat(got["keys"], sizes),
            })

        task = names[0]
        ranged_get = _ranged_get_seconds(fs, f"{MODEL_BUCKET}/{base.name}")
        server.set_latency(latency_ms)
        timings = []
        for where, b, levels in (("local base", str(base), concurrency), ("base on S3", remote_base, concurrency[-1:])):
            for c in levels:
                best = min((load_once(server, url, b, task, c) for _ in range(repeats)), key=lambda r: r["seconds"])
                timings.append({
                    "base": where, "concurrency": c, "open_seconds": best["open_seconds"],
                    "load_seconds": best["load_seconds"], "base_bytes_fetched": best["base_bytes"],
                })
        server.set_latency(0)
    with open_checkpoint(base) as ck:
        n_params = sum(ck.info(k).numel for k in ck.keys)
    return {
        "params": n_params,
        "tasks": n_tasks,
        "latency_ms": latency_ms,
        "archive_bytes": sum(sizes.values()),
        "base_file_bytes": base.stat().st_size,
        "pack_to_s3_seconds": pack_seconds,
        "moto_ranged_get_of_base_seconds": ranged_get,
        "per_task": per_task,
        "worst_ratio": max(r["ratio"] for r in per_task),
        "timings": timings,
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }


def _ranged_get_seconds(fs: Any, path: str, repeats: int = 5) -> float:
    """Median time moto takes to serve 8 bytes of ``path`` (it copies the whole object per request)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fs.cat_file(path, start=0, end=8)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _max_repeat(keys: dict[str, int], sizes: dict[str, int]) -> float:
    """The most times one object's bytes were served (1.0: every object fetched once)."""
    return max((b / sizes[k] for k, b in keys.items() if sizes.get(k)), default=0.0)
