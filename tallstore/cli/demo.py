"""``tallstore demo``: the whole job end to end on a small real collection built on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .app import app
from .info import render


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints, archive and extract.")] = Path("demo-output"),
    lam: Annotated[float, typer.Option("--lam", help="λ for every task.")] = 0.4,
) -> None:
    """Fine-tune 6 small models on real digit scans, pack them, print ratio and fidelity, extract one."""
    from ..demo import run

    c = Console()
    c.print("building a real collection: a digits MLP pre-trained, then fine-tuned on 6 tasks…")
    r = run(out, lam)
    render(r["summary"])
    t = Table("task", "fine-tuned acc", "rebuilt acc", "normalized")
    for row in r["tasks"]:
        t.add_row(row["task"], f"{row['finetuned']:.3f}", f"{row['rebuilt']:.3f}", f"{row['normalized']:.1%}")
    c.print(t)
    mean = sum(row["normalized"] for row in r["tasks"]) / len(r["tasks"])
    c.print(f"mean normalized accuracy {mean:.1%}; built in {r['build_seconds']:.0f}s, packed in {r['pack_seconds']:.1f}s")
    c.print(f"extracted {r['extracted']} (identical to the lazy view: {r['extracted_matches']})")
