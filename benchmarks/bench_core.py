"""Core benchmark: archive size ÷ raw size and one-task load time ÷ safetensors load time.

A generated collection (T=8, ~25M-parameter BERT-like model) in bf16 and fp32. Both loads are
timed side by side in one run with a warm page cache, best of ``repeats``:

- safetensors: ``load_file`` of the original checkpoint, then every tensor copied into a model's
  parameters (``copy_``), which is what loading a model means;
- tallstore: ``arc[task].state_dict()`` (rebuild and CRC check), then the same copy.

The lazy ``load_file`` alone (memory-mapped, no bytes touched) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import tallstore

from .synthetic import write_collection

RESULTS = Path(__file__).parent / "results"


def _tree_bytes(p: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run_one(work: Path, params_m: float, n_tasks: int, dtype: torch.dtype, repeats: int) -> dict:
    """Pack one generated collection and measure size and load ratios."""
    base, tasks = write_collection(work / "inputs", params_m, n_tasks, dtype)
    raw = sum(p.stat().st_size for p in tasks.values())
    out = {}
    for embed in (False, True):
        arc_path = work / f"zoo-{'emb' if embed else 'ext'}-{str(dtype).split('.')[-1]}.tall"
        t = time.perf_counter()
        arc = tallstore.pack(arc_path, base=base, tasks=tasks, embed_base=embed, overwrite=True)
        out["pack_seconds_" + ("embedded" if embed else "external")] = time.perf_counter() - t
        out["archive_bytes_" + ("embedded" if embed else "external")] = _tree_bytes(arc_path)
    task = next(iter(tasks))
    arc = tallstore.open(work / f"zoo-ext-{str(dtype).split('.')[-1]}.tall", base=base)
    target = {k: torch.empty_like(v) for k, v in load_file(tasks[task]).items()}

    def sf_load() -> None:
        for k, v in load_file(tasks[task]).items():
            target[k].copy_(v)

    def ts_load() -> None:
        for k, v in arc[task].state_dict().items():
            target[k].copy_(v)

    sf_load(), ts_load()
    t_sf = _best(sf_load, repeats)
    t_ts = _best(ts_load, repeats)
    t_lazy = _best(lambda: load_file(tasks[task]), repeats)
    base_bytes = base.stat().st_size
    return {
        "dtype": str(dtype).split(".")[-1],
        "params_m": params_m,
        "tasks": n_tasks,
        "raw_bytes": raw,
        "base_bytes": base_bytes,
        **out,
        "size_ratio_external": out["archive_bytes_external"] / raw,
        "size_ratio_external_plus_base": (out["archive_bytes_external"] + base_bytes) / raw,
        "size_ratio_embedded": out["archive_bytes_embedded"] / raw,
        "load_seconds_safetensors": t_sf,
        "load_seconds_tallstore": t_ts,
        "load_seconds_safetensors_lazy": t_lazy,
        "load_ratio": t_ts / t_sf,
    }


def main(quick: bool = False, work: Path | None = None) -> list[dict]:
    """Run the core benchmark for bf16 and fp32, print a table and save JSON."""
    params_m, n_tasks, repeats = (5.0, 4, 3) if quick else (25.0, 8, 5)
    work = work or Path(tempfile.mkdtemp(prefix="tallstore-bench-"))
    rows = [run_one(work, params_m, n_tasks, dt, repeats) for dt in (torch.bfloat16, torch.float32)]
    print(f"{'dtype':9} {'archive/raw ext':>16} {'(ext+base)/raw':>15} {'emb/raw':>9} {'load ts':>9} {'load sf':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['dtype']:9} {r['size_ratio_external']:16.3f} {r['size_ratio_external_plus_base']:15.3f} "
              f"{r['size_ratio_embedded']:9.3f} {r['load_seconds_tallstore']*1e3:7.1f}ms {r['load_seconds_safetensors']*1e3:7.1f}ms {r['load_ratio']:7.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("core-quick.json" if quick else "core.json")).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, fewer tasks (smoke run)")
    ap.add_argument("--work", type=Path, help="folder for generated inputs and archives")
    a = ap.parse_args()
    main(a.quick, a.work)
