"""The top-level ``pack``: every option explicit, validated once, then the archive opened."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .checkpoint.folder_files import DEFAULT_MAX_FILE_BYTES
from .ops.ties import DEFAULT_TOP
from .packing import driver
from .packing.lam import DEFAULT_GRID, Evaluate
from .packing.options import (
    DEFAULT_FIDELITY_GRID,
    DEFAULT_FIDELITY_TARGET,
    DEFAULT_LAM,
    Lam,
    PackOptions,
)
from .reading.archive import Archive, open
from .storage.codecs import Codecs


def pack(
    out: str | os.PathLike[str],
    base: str | os.PathLike[str],
    tasks: Mapping[str, str | os.PathLike[str]],
    *,
    lam: Lam = DEFAULT_LAM,
    merge: str = "ta",
    ties_top: float = DEFAULT_TOP,
    lam_grid: Iterable[float] = DEFAULT_GRID,
    evaluate: Evaluate | None = None,
    embed_base: bool = False,
    exact: Iterable[str] = (),
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    allow_unrelated_base: bool = False,
    block_elems: int | None = None,
    workers: int = 2,
    codecs: Codecs | str = "fast",
    key_map: Iterable[str] = (),
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    shared_bits: int | None = None,
    shared_method: str = "absmax",
    lossless: bool = False,
    max_rebuild_error: float | None = None,
    fidelity: str = "tall",
    fidelity_grid: Iterable[float] = DEFAULT_FIDELITY_GRID,
    fidelity_target: float = DEFAULT_FIDELITY_TARGET,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    client: Any = None,
) -> Archive:
    """Pack ``tasks`` (name → checkpoint path) fine-tuned from ``base`` into ``out``; open it.

    - ``lam``: one λ, a per-task mapping, ``"auto"`` (weight-space choice from ``lam_grid``) or
      ``"search"`` (``evaluate(task_name, state_dict) -> score`` picks from ``lam_grid``);
    - ``merge``: ``"ta"`` (τ_MTL = Σ τ_t) or ``"ties"`` (trimmed to the top ``ties_top`` percent);
    - ``embed_base``: store the base inside (a self-contained archive);
    - ``exact``: glob patterns of tensor names stored exactly per task;
    - ``overwrite``: replace an existing archive at ``out``;
    - ``allow_nonfinite``: accept NaN/Inf weights instead of refusing (such tensors are stored exactly);
    - ``allow_unrelated_base``: pack even when no task looks fine-tuned from ``base``;
    - ``block_elems``: row-block size (elements) for streaming and chunking; by default a power
      of two from 2^22 down to 2^18 as the tasks grow in number (2^26 bytes of float32 stack per
      worker), so memory stays flat in the number of tasks;
    - ``workers``: threads; ``client``: a ``dask.distributed`` client to run the pack units on;
    - ``codecs``: ``"fast"`` (LZ4HC weights, quickest loads), ``"compact"`` (zstd) or a ``Codecs``;
    - ``key_map``: ``"OLD_PREFIX=NEW_PREFIX"`` rules renaming task tensors before they are matched
      to the base (a consistent prefix difference such as ``bert.`` is found without them); a
      PEFT LoRA folder given as a task is merged into the base as it is read;
    - ``max_file_bytes``: the largest non-weight file of an input folder that is archived;
    - ``shared_bits``: store τ_MTL quantized to this many bits (2–8, per-row ``shared_method``
      scales) with entropy-coded masks, instead of exactly;
    - ``lossless``: store every task exactly (bit for bit), each tensor XOR the base's; no masks;
    - ``max_rebuild_error``: store exactly each task whose relative rebuild error
      ``‖θ̂_t − θ_t‖ / ‖τ_t‖`` would exceed this (measured before packing), the rest as TALL;
    - ``fidelity``: ``"tall"`` (the paper's masks, the default), ``"compact"``, ``"balanced"`` or
      ``"high"`` (each task delta-coded on its own with a dithered step of κ = 6, 3 or 1 times
      each row's RMS change: a relative weight error of κ/√12; on the benchmark zoo smaller than
      TALL and more accurate; see the README's table), ``"lossless"`` (the same as ``lossless=True``), or ``"auto"``: per task the coarsest
      step of ``fidelity_grid`` whose model scores at least ``fidelity_target`` (a fraction) of the
      fine-tune's own score under ``evaluate(task_name, state_dict)`` — the model then stored —,
      else the task is stored exactly; every score is recorded in the archive (``info --json``);
    - ``storage_options``: fsspec options for every URL (output and inputs);
    - ``progress``: called with the input bytes processed as the pack goes.
    """
    options = PackOptions(
        lam=lam, merge=merge, ties_top=ties_top, lam_grid=tuple(lam_grid), evaluate=evaluate, embed_base=embed_base,
        exact=tuple(exact), overwrite=overwrite, allow_nonfinite=allow_nonfinite,
        allow_unrelated_base=allow_unrelated_base, block_elems=block_elems,
        workers=workers, codecs=codecs, key_map=tuple(key_map), max_file_bytes=max_file_bytes,
        shared_bits=shared_bits, shared_method=shared_method, lossless=lossless, max_rebuild_error=max_rebuild_error,
        fidelity=fidelity, fidelity_grid=tuple(fidelity_grid), fidelity_target=fidelity_target,
    )
    loc = driver.pack(out, base, tasks, options, storage_options=storage_options, progress=progress, client=client)
    return open(loc, base=base, storage_options=storage_options)
