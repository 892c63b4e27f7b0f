"""Pack throughput and peak memory against ZipNN on the same inputs, by model size and T.

Generated BERT-shaped fp32 collections (``synthetic.bert_shaped``: hidden 1024, vocabulary 8192,
``LAYERS`` = 4 and 16 encoder layers, 59M and 210M parameters) whose task vectors are small
everywhere except on about 8% of each tensor's entries (``synthetic.sparse_fine_tune``), at T = 2
and 8 (issue #14: 8 fp32 fine-tunes of the 59M model). Each configuration is processed by every
method, each in a fresh child ``python -m benchmarks.bench_pack --child ...`` after the inputs were
evicted from the page cache:

- ``xor``: ``tallstore.pack`` with its defaults (the lossless shared form ``xor``; λ = 0.4, TA,
  base external, ``WORKERS`` threads);
- ``q4``: the same with ``shared_bits=4`` (the quantized shared form);
- ``zipnn``: ZipNN (lossless, ``WORKERS`` threads) compressing the same input files, base and
  tasks, each read whole into memory (its byte API, as ``common.zipnn_file`` uses it) and the
  compressed bytes written to a file.

Per run:

- ``seconds``: the work inside the child (the ``tallstore.pack`` call, or reading, compressing and
  writing every file; imports excluded);
- ``input_gb_per_s``: bytes of the base and the T task files ÷ ``seconds``;
- ``output_bytes``: what was written (the archive, or the ZipNN files);
- ``vm_hwm_mib``: the child's peak resident set (``VmHWM``, read by the child as it ends). It
  counts the pages of the memory-mapped input files the child has touched and not yet released,
  which the kernel may drop at any time. (``ru_maxrss`` is not used: Linux carries the forking
  parent's peak into it across ``exec``);
- ``peak_anon_mib``: the peak of the child's anonymous resident memory (``RssAnon``, sampled every
  20 ms): the memory the method itself holds;
- ``baseline``: the same for a child that only imports torch and tallstore (and zipnn).

Targets (issue #14, reported, not asserted), at T = 8 on the 59M model: each tallstore form no
slower than ZipNN (``seconds`` ratio ≤ 1), peak anonymous RSS ≤ 1 GB, and flat in model size (the
210M model's peak within ``report.RSS_FLAT_TARGET`` of the 59M model's). ``fits``: per method,
least squares ``seconds = a + b · input_bytes`` over its configurations, with R².
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

from .common import (
    HERE,
    LAM,
    ZIPNN_DTYPES,
    Config,
    evict,
    main_dtype,
    synthetic_sparse,
    tree_bytes,
)

NAME = "pack"
WORKERS = 2
POLL_SECONDS = 0.02
HIDDEN, VOCAB, LARGE = 1024, 8192, 0.08
LAYERS, TASKS = (4, 16), (2, 8)
QUICK_HIDDEN, QUICK_LAYERS, QUICK_TASKS = 256, (1, 4), (2,)
METHODS: dict[str, dict[str, Any] | None] = {"xor": {}, "q4": {"shared_bits": 4}, "zipnn": None}


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


def zipnn_all(out: Path, files: list[Path]) -> None:
    """ZipNN-compress each file whole into ``out/<name>.znn`` (``WORKERS`` threads)."""
    from zipnn import ZipNN

    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = bytearray(f.read_bytes())  # ZipNN.compress modifies its input in place
        z = ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[main_dtype(f)], threads=WORKERS)
        (out / f"{f.stem}.znn").write_bytes(z.compress(data))
        del data


def child(method: str, out: str, base: str, tasks: dict[str, str]) -> None:
    """Run ``method`` (or, with no tasks, only the imports) and print seconds and peak RSS as JSON."""
    import zipnn  # noqa: F401 - imported by every child, so that the baseline counts it

    seconds = 0.0
    if tasks:
        t = time.perf_counter()
        if METHODS[method] is None:
            zipnn_all(Path(out), [Path(base), *map(Path, tasks.values())])
        else:
            tallstore.pack(out, base=base, tasks=tasks, lam=LAM, workers=WORKERS, overwrite=True, **METHODS[method])
        seconds = time.perf_counter() - t
    st = proc_status("self")
    print(json.dumps({"seconds": seconds, "vm_hwm_kib": st.get("VmHWM", 0)}))


def spawn(method: str, out: Path, base: Path | None, tasks: dict[str, Path]) -> dict[str, Any]:
    """Run ``child`` in a new process, sampling its anonymous RSS; its report plus the peak."""
    args = [sys.executable, "-W", "ignore", "-m", "benchmarks.bench_pack", "--child", method, str(out), str(base or ""),
            json.dumps({k: str(v) for k, v in tasks.items()})]
    proc = subprocess.Popen(args, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    peak_anon = 0
    while proc.poll() is None:
        peak_anon = max(peak_anon, proc_status(proc.pid).get("RssAnon", 0))
        time.sleep(POLL_SECONDS)
    report, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{method} child failed with status {proc.returncode}")
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
    """Every method on every (model size, T) configuration, each in a child; JSON-ready results."""
    hidden, layers, ts = (QUICK_HIDDEN, QUICK_LAYERS, QUICK_TASKS) if cfg.quick else (HIDDEN, LAYERS, TASKS)
    dtype = torch.float32
    out = cfg.work / "pack" / "out"
    out.parent.mkdir(parents=True, exist_ok=True)
    baseline = spawn("xor", out, None, {})
    rows = []
    for n_layers in layers:
        for T in ts:
            coll = synthetic_sparse(cfg.work, hidden, n_layers, VOCAB, T, dtype, LARGE)
            input_bytes = coll.base.stat().st_size + coll.raw_bytes
            for method in METHODS:
                evict([coll.base, *coll.tasks.values()])
                got = spawn(method, out, coll.base, coll.tasks)
                output_bytes = tree_bytes(out)
                shutil.rmtree(out, ignore_errors=True)
                rows.append({"method": method, "hidden": hidden, "layers": n_layers, "vocab": VOCAB, "large": LARGE,
                             "params": coll.params, "tasks": T, "dtype": coll.dtype, "input_bytes": input_bytes,
                             "tp": T * coll.params, **got, "output_bytes": output_bytes,
                             "input_gb_per_s": input_bytes / got["seconds"] / 1e9})
                r = rows[-1]
                print(f"  {coll.params / 1e6:.0f}M × T={T} {method}: {r['seconds']:.1f} s, {r['input_gb_per_s']:.3f} GB/s, "
                      f"peak anon {r['peak_anon_mib']:.0f} MiB, VmHWM {r['vm_hwm_mib']:.0f} MiB, "
                      f"{output_bytes / 1e6:.0f} MB out", flush=True)
    fits = {m: fit([r["input_bytes"] for r in rows if r["method"] == m], [r["seconds"] for r in rows if r["method"] == m])
            for m in METHODS}
    return {"dtype": "float32", "lam": LAM, "workers": WORKERS, "methods": list(METHODS), "baseline": baseline,
            "rows": rows, "fits": fits, "fit": fits["xor"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="pack child process (used by benchmarks.run)")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "OUT", "BASE", "TASKS_JSON"), required=True)
    a = ap.parse_args()
    m, o, b, t = a.child
    child(m, o, b, json.loads(t))
