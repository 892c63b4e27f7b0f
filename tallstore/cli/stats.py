"""``tallstore stats``: mask densities, catastrophic and selfish weights, overlaps, a plot."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..reading.archive import open as open_archive
from ..reading.stats import plot
from ..text import printable
from . import options
from .app import app, plain


def render(s: dict[str, Any]) -> None:
    """Print mask statistics made by :meth:`tallstore.Archive.stats` as tables (task and layer
    names as plain, escaped text)."""
    c = Console()
    T = len(s["tasks"])
    if not T:
        c.print(plain(f"{s['location']}: no task holds a TALL mask (each is stored on its own: "
                      f"{', '.join(s.get('exact_tasks', []))}); there is nothing to tally"))
        return
    c.print(Text.assemble((printable(s["location"]), "bold"), f"  {T} tasks, {s['masked_params']:,} maskable weights: "
                          f"catastrophic (0 tasks) {s['catastrophic']:.2%}, selfish (1 task) {s['selfish']:.2%}"))
    total = max(s["masked_params"], 1)
    h = Table("tasks selecting", *[str(i) for i in range(T + 1)])
    h.add_row("% of weights", *[f"{n / total:.1%}" for n in s["histogram"]])
    c.print(h)
    t = Table("task", "mask density", "selfish", *[f"J·{i}" for i in range(T)])
    for i, name in enumerate(s["tasks"]):
        t.add_row(plain(name), f"{s['density'][name]:.3f}", f"{s['selfish_by_task'][name]:.3f}",
                  *[f"{v:.2f}" for v in s["jaccard"][i]])
    c.print(t)
    layers = Table("layer", "params", "catastrophic", "selfish")
    for row in s["layers"]:
        layers.add_row(plain(row["layer"]), f"{row['params']:,}", f"{row['catastrophic']:.2%}", f"{row['selfish']:.2%}")
    c.print(layers)


@app.command()
def stats(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    as_json: options.AsJSON = False,
    plot_to: Annotated[Optional[str], typer.Option("--plot", help="Also write a PNG of the histogram and per-layer breakdown.")] = None,
    base: options.ArchiveBase = None,
    storage_option: options.StorageOptions = None,
) -> None:
    """How many tasks select each weight (catastrophic = 0, selfish = 1), per layer and per task pair."""
    with open_archive(archive, base=base, storage_options=options.storage_options(storage_option)) as arc:
        s = arc.stats()
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        render(s)
    if plot_to:
        path = plot(s, plot_to)
        if not as_json:
            print(f"wrote {path}")
