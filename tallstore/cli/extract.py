"""``tallstore extract``: rebuild one task into a safetensors file or HF folder."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..archive import open as open_archive
from . import options
from .app import app


@app.command()
def extract(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    task: Annotated[str, typer.Argument(help="Task name (see `tallstore info`).")],
    out: Annotated[str, typer.Option("-o", "--out", help="OUT.safetensors, or a folder for a sharded HF layout.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base checkpoint, if not embedded or moved.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    max_shard_gb: Annotated[float, typer.Option("--max-shard-gb", help="Shard size for folder output.")] = 5.0,
    storage_option: Annotated[Optional[list[str]], typer.Option("--storage-option", help="fsspec option key=value.")] = None,
) -> None:
    """Rebuild TASK (θ₀ + m_t ⊙ τ_MTL) and write it, one tensor at a time, atomically."""
    arc = open_archive(archive, base=base, storage_options=options.storage_options(storage_option))
    if task not in arc:
        raise options.UsageError(f"no task {task!r} in {archive} (tasks: {', '.join(arc.tasks)})")
    path = arc.extract(task, out, overwrite=force, max_shard_bytes=int(max_shard_gb * 1e9))
    print(f"wrote {path}")
