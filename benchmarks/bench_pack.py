"""Pack throughput and peak memory by model size and T, each pack in a fresh child process.

Generated BERT-like collections (``synthetic.py``) of two model sizes, stored as bfloat16 (the
~400M-parameter model at T=20 is 17 GB of inputs in bf16, 34 GB in fp32), at several T. Each
configuration is packed (λ = 0.4, TA, base external, two worker threads) by a child
``python -m benchmarks.bench_pack --child ...`` after its inputs were evicted from the page cache.

- ``seconds``: the ``tallstore.pack`` call inside the child (imports excluded);
- ``input_gb_per_s``: bytes of the base and the T task files ÷ ``seconds``;
- ``vm_hwm_mib``: the child's peak resident set (``VmHWM``, read by the child as it ends). It
  counts the pages of the memory-mapped input files the child has touched and not yet released,
  which the kernel may drop at any time. (``ru_maxrss`` is not used: Linux carries the forking
  parent's peak into it across ``exec``);
- ``peak_anon_mib``: the peak of the child's anonymous resident memory (``RssAnon``, sampled every
  20 ms): the memory packing itself holds;
- ``baseline_*``: the same for a child that only imports torch and tallstore.

``fit``: least squares ``seconds = a + b · input_bytes`` over all configurations, with R².
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import tallstore

from .common import HERE, LAM, Config, evict, synthetic

NAME = "pack"
WORKERS = 2
POLL_SECONDS = 0.02


def proc_status(pid: int | str) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` (VmHWM, VmRSS, RssAnon, RssFile…)."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def child(out: str, base: str, tasks: dict[str, str]) -> None:
    """Pack (or, with no tasks, do nothing) and print seconds and this process's peak RSS as JSON."""
    seconds = 0.0
    if tasks:
        t = time.perf_counter()
        tallstore.pack(out, base=base, tasks=tasks, lam=LAM, workers=WORKERS, overwrite=True)
        seconds = time.perf_counter() - t
    st = proc_status("self")
    print(json.dumps({"seconds": seconds, "vm_hwm_kib": st.get("VmHWM", 0)}))


def spawn(out: Path, base: Path | None, tasks: dict[str, Path]) -> dict[str, Any]:
    """Run ``child`` in a new process, sampling its anonymous RSS; its report plus the peak."""
    args = [sys.executable, "-W", "ignore", "-m", "benchmarks.bench_pack", "--child", str(out), str(base or ""),
            json.dumps({k: str(v) for k, v in tasks.items()})]
    proc = subprocess.Popen(args, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    peak_anon = 0
    while proc.poll() is None:
        peak_anon = max(peak_anon, proc_status(proc.pid).get("RssAnon", 0))
        time.sleep(POLL_SECONDS)
    report, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"pack child failed with status {proc.returncode}")
    got = json.loads(report.strip().splitlines()[-1])
    return {"seconds": got["seconds"], "vm_hwm_mib": got["vm_hwm_kib"] / 1024, "peak_anon_mib": peak_anon / 1024}


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line ``y = a + b·x`` and its R²."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"a_seconds": a, "b_seconds_per_gb": b * 1e9, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def run(cfg: Config) -> dict[str, Any]:
    """Pack every (model size, T) configuration in a child; JSON-ready results."""
    sizes, ts = ((5, 20), (2, 4)) if cfg.quick else ((25, 400), (2, 8, 20))
    dtype = torch.bfloat16
    out = cfg.work / "pack" / "out.tall"
    out.parent.mkdir(parents=True, exist_ok=True)
    baseline = spawn(out, None, {})
    rows = []
    for params_m in sizes:
        for T in ts:
            coll = synthetic(cfg.work, params_m, T, dtype)
            input_bytes = coll.base.stat().st_size + coll.raw_bytes
            evict([coll.base, *coll.tasks.values()])
            got = spawn(out, coll.base, coll.tasks)
            shutil.rmtree(out, ignore_errors=True)
            rows.append({"params_m": params_m, "params": coll.params, "tasks": T, "dtype": coll.dtype,
                         "input_bytes": input_bytes, "tp": T * coll.params, **got,
                         "input_gb_per_s": input_bytes / got["seconds"] / 1e9})
            r = rows[-1]
            print(f"  {params_m}M × T={T}: {r['seconds']:.1f} s, {r['input_gb_per_s']:.3f} GB/s, peak anon "
                  f"{r['peak_anon_mib']:.0f} MiB, VmHWM {r['vm_hwm_mib']:.0f} MiB", flush=True)
    return {
        "dtype": "bfloat16", "lam": LAM, "workers": WORKERS,
        "baseline": baseline, "rows": rows,
        "fit": fit([r["input_bytes"] for r in rows], [r["seconds"] for r in rows]),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="pack child process (used by benchmarks.run)")
    ap.add_argument("--child", nargs=3, metavar=("OUT", "BASE", "TASKS_JSON"), required=True)
    a = ap.parse_args()
    o, b, t = a.child
    child(o, b, json.loads(t))
