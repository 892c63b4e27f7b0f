"""``tallstore merge``: write a merged model (Consensus, TA or TIES) from the archive alone."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..reading.archive import open as open_archive
from ..text import printable
from . import options
from .app import app
from .progress import bar


@app.command()
def merge(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    out: Annotated[str, typer.Option("-o", "--out", help="OUT.safetensors, or a folder for a sharded HF layout.")],
    method: Annotated[str, typer.Option("--method", help="consensus (Σ_t m_t ≥ k), ta or ties (the archive's own merge).")] = "consensus",
    k: Annotated[Optional[int], typer.Option("--k", help="Consensus: keep weights selected by at least k tasks (default 2).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Scale of the merged task vector.")] = 1.0,
    base: options.ArchiveBase = None,
    force: options.Force = False,
    max_shard_gb: options.MaxShardGB = None,
    storage_option: options.StorageOptions = None,
    quiet: options.Quiet = False,
) -> None:
    """Write θ₀ + α·(m ⊙ τ_MTL) one tensor at a time; tensors the base lacks (heads) are left out."""
    with open_archive(archive, base=base, storage_options=options.storage_options(storage_option)) as arc:
        view = arc.merge(method, k=k, alpha=alpha)
        with bar("merging", sum(view.info(key).nbytes for key in view), enabled=not quiet) as advance:
            path = view.save(out, overwrite=force, max_shard_bytes=options.shard_bytes(max_shard_gb), progress=advance)
    print(printable(f"wrote {path} ({view.describe()}, {len(view)} tensors)"))
    if view.omitted:
        print(printable(f"left out {len(view.omitted)} task-specific tensors the base lacks: {', '.join(view.omitted)}"))
    if view.excluded:
        print(printable(f"not merged: {', '.join(view.excluded)} (stored exactly, outside the shared vector)"))
