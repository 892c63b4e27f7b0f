"""A byte-counting progress bar on stderr for long commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@dataclass
class Bar:
    """Callbacks for the packer: ``start(total)`` then ``advance(n)`` bytes."""

    progress: Progress
    task: int

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


@contextmanager
def bar(description: str, enabled: bool = True) -> Iterator[Bar]:
    """A progress bar (hidden when ``enabled`` is false or stderr is not a terminal)."""
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
        transient=True,
    ) as p:
        yield Bar(p, p.add_task(description, total=None))
