"""Run the benchmark suite: each module's JSON under benchmarks/results/, then RESULTS.md and plots.

``python -m benchmarks.run`` runs every module (the full run), ``--quick`` a small smoke
configuration of each (under five minutes on a quiet two-core machine; results go to
``benchmarks/results/quick/``), ``--only NAME ...`` a subset; the report is always rebuilt from
every module's latest JSON. Generated inputs are cached in ``--work`` (default
``benchmarks/.cache/work``); the real zoo in ``benchmarks/.cache/zoo`` (built on first use).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import (
    bench_bitflips,
    bench_core,
    bench_fidelity,
    bench_load,
    bench_pack,
    bench_rate,
    bench_size,
    report,
)
from .common import RESULTS, WORK, Config, load_average, machine, now


def run_remote(cfg: Config) -> dict[str, Any]:
    """``remote_reads``: bytes fetched from S3 (moto) for one task, and load time by concurrency."""
    from . import remote_reads  # starts moto: imported only when run

    params_m, n_tasks, repeats = (12.0, 3, 1) if cfg.quick else (22.0, 8, 2)
    return remote_reads.run(cfg.work, params_m, n_tasks, 20.0, [1, 8, 64], repeats)


MODULES: dict[str, Callable[[Config], dict[str, Any]]] = {
    bench_fidelity.NAME: bench_fidelity.run,
    bench_rate.NAME: bench_rate.run,
    bench_rate.WIDE_NAME: bench_rate.run_wide,
    bench_size.NAME: bench_size.run,
    bench_load.NAME: bench_load.run,
    bench_core.NAME: bench_core.run,
    bench_pack.NAME: bench_pack.run,
    "remote": run_remote,
    bench_bitflips.NAME: bench_bitflips.run,
}


def results_dir(quick: bool) -> Path:
    """Where a run's JSON, plots and summary go."""
    return RESULTS / "quick" if quick else RESULTS


def run_module(name: str, cfg: Config, out: Path, command: str) -> bool:
    """Run one module and save its results with when, where and how long; False if it failed."""
    print(f"== {name}", flush=True)
    meta = {"module": name, "command": command, "quick": cfg.quick, "started": now(),
            "load_average_before": load_average(), "machine": machine(), "zoo_tasks": cfg.zoo_tasks}
    t = time.perf_counter()
    try:
        results = MODULES[name](cfg)
    except Exception:
        traceback.print_exc()
        print(f"== {name} FAILED after {time.perf_counter() - t:.0f} s (previous results kept)", flush=True)
        return False
    meta |= {"seconds": time.perf_counter() - t, "finished": now(), "load_average_after": load_average()}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"== {name} done in {meta['seconds']:.0f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the chosen modules, write the report; exit status 1 if one failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke configuration (< 5 min); results in results/quick/")
    ap.add_argument("--only", nargs="+", choices=list(MODULES), metavar="NAME", help=f"run only these: {', '.join(MODULES)}")
    ap.add_argument("--work", type=Path, default=WORK, help=f"cache of generated inputs and archives (default {WORK})")
    ap.add_argument("--zoo-tasks", type=lambda s: s.split(","), help="comma-separated subset of the real zoo's tasks")
    ap.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md and plots from the JSON")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", module="zarr")
    out = results_dir(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    cfg = Config(work=args.work, quick=args.quick, zoo_tasks=args.zoo_tasks)
    names = [] if args.report_only else (args.only or list(MODULES))
    started, t = now(), time.perf_counter()
    failed = [n for n in names if not run_module(n, cfg, out, command)]
    if names:
        invocation = {"command": command, "started": started, "seconds": time.perf_counter() - t,
                      "modules": names, "failed": failed}
        (out / "last_invocation.json").write_text(json.dumps(invocation, indent=1) + "\n")
    written = report.write(out, args.quick)
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
