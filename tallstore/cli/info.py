"""``tallstore info``: what an archive holds and how well it compresses."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..reading.archive import open as open_archive
from ..text import printable
from . import options
from .app import app, plain


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _num(v: Any) -> str:
    """A number as ``:g`` formats it; anything else an archive put there, escaped."""
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else printable(v)


def render(d: dict[str, Any]) -> None:
    """Print a summary made by :meth:`tallstore.Archive.describe` as tables (every name and string
    the archive provides printed as plain, escaped text)."""
    c = Console()
    base = d["base"]
    top = d["merge"]["params"].get("top")
    rule = d["merge"]["rule"] + (f" (top {_num(top)}%)" if top is not None else "")
    c.print(Text.assemble((printable(d["location"]), "bold"),
                          f"  format v{d['format_version']}  merge={printable(rule)}  {len(d['tensors'])} tensors"))
    c.print(plain(f"base: {'embedded' if base['embedded'] else base['location']}  {base['fingerprint']}"))
    if d.get("weight_codec"):
        c.print(plain(f"weights compressed with {d['weight_codec']}"))
    shared = d.get("shared", {"form": "xor"})
    if shared["form"] == "quantized":
        c.print(plain(f"shared vector: quantized to {shared['bits']} bits per weight ({shared['method']} row scales), "
                      "masks entropy coded"))
    t = Table("task", "stored as", "λ", "mask density", "rebuild error", "exact MB", "raw MB")
    for task in d["tasks"]:
        rep = task.get("representation", "tall")
        if rep == "exact":
            cells = ["exact", "—", "—", "0 (bit for bit)"]
        elif rep == "delta":
            cells = [f"delta κ={_num(task.get('delta_step'))}", "—", "—", f"{task['rebuild_error']:.4f}"]
        else:
            cells = ["TALL", f"{task['lam']:.2f}", f"{task['mask_density']:.3f}", f"{task['rebuild_error']:.4f}"]
        t.add_row(plain(task["name"]), *cells, f"{task['exact_bytes'] / 1e6:.2f}", f"{task['raw_bytes'] / 1e6:.1f}")
    c.print(t)
    if any(task.get("representation", "tall") != "exact" for task in d["tasks"]):
        c.print(plain("TALL and delta tasks rebuild approximately: rebuild error is ‖θ̂−θ‖/‖τ‖ over the masked (or "
                      "delta-coded) tensors, measured when packed. 'verify --deep' proves each task rebuilds to what was "
                      "packed, not to the original: compare with 'verify --against', or pack with --lossless / "
                      "--max-rebuild-error to keep tasks bit for bit."))
    for task in d["tasks"]:
        ch = task.get("choice")
        if not isinstance(ch, dict):
            continue
        if ch.get("method") == "max_rebuild_error":
            c.print(plain(f"task {task['name']}: stored exactly, its TALL rebuild error {_num(ch.get('rebuild_error'))} "
                          f"exceeding --max-rebuild-error {_num(ch.get('floor'))}"))
        else:
            grid = ", ".join(_num(v) for v in ch["grid"]) if isinstance(ch.get("grid"), list) else _num(ch.get("grid"))
            keeps = f"≥ {_num(ch.get('target'))} × its own score under {_num(ch.get('method'))}"
            if task.get("representation") == "delta":
                c.print(plain(f"task {task['name']}: delta κ={_num(task.get('delta_step'))}, the coarsest of {{{grid}}} "
                              f"keeping {keeps}"))
            else:
                c.print(plain(f"task {task['name']}: exact, no delta step of {{{grid}}} keeping {keeps}"))
    sel = d.get("lam_selection", {})
    if sel.get("method", "fixed") != "fixed":
        grid = sel.get("grid")
        values = ", ".join(_num(v) for v in grid) if isinstance(grid, list) else _num(grid)
        c.print(plain(f"λ chosen per task by {sel['method']} ({sel.get('criterion')}) from {{{values}}}"))
    parts = ", ".join(f"{k} {_mb(v)}" for k, v in sorted(d["archive_parts"].items()))
    c.print(plain(f"archive {_mb(d['archive_bytes'])} ({parts}); raw tasks {_mb(d['raw_task_bytes'])}"))
    line = f"compression: {d['ratio']:.2f}x"
    if not base["embedded"]:
        line += f" (archive only), {d['ratio_with_base']:.2f}x counting the external base ({_mb(base['bytes'])})"
    c.print(line)


@app.command()
def info(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    base: options.ArchiveBase = None,
    as_json: options.AsJSON = False,
    storage_option: options.StorageOptions = None,
) -> None:
    """Show tasks, λ, mask densities, rebuild errors, sizes and the compression ratio."""
    so = options.storage_options(storage_option)
    with open_archive(archive, base=base, storage_options=so) as arc:
        d = arc.describe()
    if as_json:
        print(json.dumps(d, indent=2))
    else:
        render(d)
