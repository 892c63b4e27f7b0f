"""``tallstore pack``: build an archive from a base and its fine-tunes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..ops.ties import DEFAULT_TOP
from ..packing import driver
from ..packing.dask_executor import DaskExecutor, dask_client
from ..packing.executors import ThreadExecutor
from ..packing.options import PackOptions
from ..reading.archive import open as open_archive
from . import options
from .app import app
from .info import render
from .progress import PassBars, bars


@app.command()
def pack(
    out: Annotated[str, typer.Argument(help="Archive to create: a folder path or a URL (s3://…).")],
    base: Annotated[str, typer.Option("--base", help="Base checkpoint: .safetensors, HF folder or .bin.")],
    task: Annotated[list[str], typer.Option("--task", help="NAME=PATH of a fine-tune; repeat per task.")],
    lam: Annotated[Optional[list[str]], typer.Option("--lam", help="λ for every task (0.4), NAME=VALUE for one task, or 'auto' (chosen from --lam-grid).")] = None,
    lam_grid: Annotated[Optional[str], typer.Option("--lam-grid", help="Comma-separated λ values for --lam auto (0.2,0.3,0.4,0.5,0.6).")] = None,
    merge: Annotated[str, typer.Option("--merge", help="Merge rule for τ_MTL: ta (sum of task vectors) or ties (trim, elect sign, disjoint sum).")] = "ta",
    ties_top: Annotated[Optional[float], typer.Option("--ties-top", help="ties: percent of each task's largest-magnitude entries kept, by one threshold over the model (20).")] = None,
    embed_base: Annotated[bool, typer.Option("--embed-base", help="Store the base inside for a self-contained archive.")] = False,
    exact: Annotated[Optional[list[str]], typer.Option("--exact", help="Glob of tensor names to store exactly per task (e.g. 'classifier.*').")] = None,
    key_map: Annotated[Optional[list[str]], typer.Option("--key-map", help="OLD_PREFIX=NEW_PREFIX: rename task tensors before matching them to the base (e.g. 'bert.='); repeatable. A consistent prefix difference is found without it.")] = None,
    max_file_mb: Annotated[float, typer.Option("--max-file-mb", help="Largest non-weight file (config, tokenizer…) of an input folder that is archived, in MB.")] = 256.0,
    force: options.Force = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Accept NaN/Inf weights instead of refusing (such tensors are stored exactly).")] = False,
    allow_unrelated_base: Annotated[bool, typer.Option("--allow-unrelated-base", help="Pack even when no task looks fine-tuned from BASE (each differs from it by about its own norm).")] = False,
    shared_bits: Annotated[Optional[int], typer.Option("--shared-bits", help="Store τ_MTL quantized to this many bits (2–8, one scale per row) with entropy-coded masks: a smaller archive, each task's rebuild slightly further from the original (see benchmarks/RESULTS.md).")] = None,
    lossless: Annotated[bool, typer.Option("--lossless", help="Store every task bit for bit (each tensor XOR the base's, compressed), no TALL masks: extract gives back the exact weights.")] = False,
    max_rebuild_error: Annotated[Optional[float], typer.Option("--max-rebuild-error", help="Store exactly, instead of as TALL masks, every task whose relative rebuild error ‖θ̂−θ‖/‖τ‖ would exceed E (measured before writing; 'info' shows each task's).", metavar="E")] = None,
    fidelity: Annotated[str, typer.Option("--fidelity", help="tall (the paper's TALL masks, default); compact, balanced or high: each task delta-coded on its own (dithered steps of 6, 3 or 1 × each row's RMS change: a relative weight error of κ/√12 by design; smaller archives than TALL that kept more accuracy on the benchmark zoo, see the README); lossless (= --lossless).")] = "tall",
    codecs: Annotated[str, typer.Option("--codecs", help="Weight compression: 'fast' (LZ4HC, default: quickest loads) or 'compact' (zstd: a slightly smaller archive, slower loads).")] = "fast",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Threads packing tensors in parallel.")] = 2,
    storage_option: options.StorageOptions = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Pack on the Dask cluster whose scheduler is at this address (tcp://host:8786).")] = None,
    dask_workers: Annotated[Optional[int], typer.Option("--dask-workers", min=1, help="Pack on a new local Dask cluster of N worker processes.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Pack fine-tunes of one base model into a TALL-mask archive.

    TALL rebuilds are approximations of the fine-tunes (the paper keeps 99.2–99.7% of each
    task's accuracy); 'info' shows each task's measured rebuild error. --fidelity
    compact/balanced/high code each task on its own (smaller; see the README's table); --lossless or
    --max-rebuild-error keep tasks bit for bit. Streams tensor by tensor: memory holds a block
    of each input at a time, never a model.
    """
    tasks = options.pairs(task, "--task")
    so = options.storage_options(storage_option)
    if lam_grid is not None and lam != ["auto"]:
        raise options.UsageError("--lam-grid is only used with --lam auto")
    if ties_top is not None and merge != "ties":
        raise options.UsageError("--ties-top is only used with --merge ties")
    if scheduler is not None and dask_workers is not None:
        raise options.UsageError("give --scheduler (an existing cluster) or --dask-workers (a local one), not both")
    opts = PackOptions(
        lam="auto" if lam == ["auto"] else options.lams(lam, list(tasks)), lam_grid=options.grid(lam_grid),
        merge=merge, ties_top=DEFAULT_TOP if ties_top is None else ties_top, embed_base=embed_base,
        exact=tuple(exact or ()), allow_unrelated_base=allow_unrelated_base, key_map=tuple(key_map or ()), max_file_bytes=int(max_file_mb * 2**20), overwrite=force, allow_nonfinite=allow_nonfinite, codecs=codecs, workers=workers,
        shared_bits=shared_bits, lossless=lossless, max_rebuild_error=max_rebuild_error, fidelity=fidelity,
    )
    with dask_client(scheduler, dask_workers) as client, bars(enabled=not quiet) as display:
        packing = display.add("packing")
        executor = PassBars(ThreadExecutor(workers) if client is None else DaskExecutor(client), display)
        loc = driver.pack(
            out, base, tasks, opts, storage_options=so, progress=packing.advance, on_start=packing.start, executor=executor,
        )
    if not quiet:
        with open_archive(loc, base=base, storage_options=so) as arc:
            render(arc.describe())
