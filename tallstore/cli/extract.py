"""``tallstore extract``: rebuild one task into a safetensors file or HF folder."""

from __future__ import annotations

from typing import Annotated

import typer

from ..checkpoint.writer import save
from ..publishing import OUTPUT_KEY
from ..reading.archive import open as open_archive
from . import options
from .app import app
from .progress import bar


@app.command()
def extract(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    task: Annotated[str, typer.Argument(help="Task name (see `tallstore info`).")],
    out: Annotated[str, typer.Option("-o", "--out", help="OUT.safetensors, or a folder for a sharded HF layout.")],
    base: options.ArchiveBase = None,
    force: options.Force = False,
    max_shard_gb: options.MaxShardGB = 5.0,
    storage_option: options.StorageOptions = None,
    quiet: options.Quiet = False,
) -> None:
    """Rebuild TASK (θ₀ + m_t ⊙ τ_MTL) and write it, one tensor at a time, atomically."""
    with open_archive(archive, base=base, storage_options=options.storage_options(storage_option)) as arc:
        if task not in arc:
            raise options.UsageError(f"no task {task!r} in {archive} (tasks: {', '.join(arc.tasks)})")
        view = arc[task]
        items = [(key, view.info(key)) for key in view]
        with bar("extracting", sum(info.nbytes for _, info in items), enabled=not quiet) as advance:
            path = save(
                out, items, view.__getitem__, overwrite=force, max_shard_bytes=int(max_shard_gb * 1e9),
                metadata={OUTPUT_KEY: "extract"}, progress=advance,
            )
    print(f"wrote {path}")
