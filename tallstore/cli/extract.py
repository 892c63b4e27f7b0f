"""``tallstore extract``: rebuild one task into a safetensors file or HF folder."""

from __future__ import annotations

from typing import Annotated

import typer

from ..reading.archive import open as open_archive
from . import options
from .app import app
from .progress import bar


@app.command()
def extract(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    task: Annotated[str, typer.Argument(help="Task name (see `tallstore info`).")],
    out: Annotated[str, typer.Option("-o", "--out", help="A folder: the whole model folder as it was packed (weights, config, tokenizer…); or OUT.safetensors: the weights alone.")],
    base: options.ArchiveBase = None,
    force: options.Force = False,
    max_shard_gb: options.MaxShardGB = None,
    storage_option: options.StorageOptions = None,
    quiet: options.Quiet = False,
) -> None:
    """Rebuild TASK (θ₀ + m_t ⊙ τ_MTL) and write it, one tensor at a time, atomically."""
    with open_archive(archive, base=base, storage_options=options.storage_options(storage_option)) as arc:
        if task not in arc:
            raise options.UsageError(f"no task {task!r} in {archive} (tasks: {', '.join(arc.tasks)})")
        view = arc[task]
        total = sum(view.info(key).nbytes for key in view)
        with bar("extracting", total, enabled=not quiet) as advance:
            path = view.save(out, overwrite=force, max_shard_bytes=options.shard_bytes(max_shard_gb), progress=advance)
        left = len(view.files) if path.suffix == ".safetensors" else 0
    print(f"wrote {path}")
    if left:
        print(f"note: the task's {left} other files (config, tokenizer…) are written only to a folder output (-o DIR)")
