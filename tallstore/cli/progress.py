"""Progress bars on stderr for long commands: shown on a terminal only, hidden by ``--quiet``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from ..packing.executors import Executor, Unit
from ..packing.units import BlockPass

BYTES = "bytes"


class _Amount(ProgressColumn):
    """``1.2/3.4 GB`` for a bar counting bytes, ``12/40 tensors`` for one counting something else."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()

    def render(self, task: Task) -> Text:
        unit = task.fields["unit"]
        if unit == BYTES:
            return self._bytes.render(task)
        total = "?" if task.total is None else str(int(task.total))
        return Text(f"{int(task.completed)}/{total} {unit}", style="progress.download")


class _Speed(ProgressColumn):
    """Bytes per second for a bar counting bytes; nothing for the others."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        return self._bytes.render(task) if task.fields["unit"] == BYTES else Text("")


@dataclass
class Bar:
    """One bar: ``start(total)`` shows it, then ``advance(n)`` (the packer's and writers' callbacks)."""

    progress: Progress
    task: TaskID

    def start(self, total: int | None) -> None:
        self.progress.update(self.task, total=total, visible=True)
        self.progress.refresh()  # drawn now, even if it is done before the next periodic refresh

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def remove(self) -> None:
        self.progress.remove_task(self.task)


@dataclass
class Bars:
    """The bars of one command, drawn together; a bar is added hidden and shown by ``start``."""

    progress: Progress

    def add(self, description: str, unit: str = BYTES) -> Bar:
        return Bar(self.progress, self.progress.add_task(description, total=None, visible=False, unit=unit))


@contextmanager
def bars(enabled: bool = True) -> Iterator[Bars]:
    """A display for several bars (disabled when ``enabled`` is false or stderr is not a terminal)."""
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        _Amount(),
        _Speed(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
        transient=True,
    ) as p:
        yield Bars(p)


@contextmanager
def bar(description: str, total: int | None, unit: str = BYTES, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """One bar of ``total`` ``unit``; yields its ``advance(n)``."""
    with bars(enabled) as display:
        b = display.add(description, unit)
        b.start(total)
        yield b.advance


class PassBars:
    """An executor showing each read-only pass over the inputs (the TIES threshold, ``--lam auto``)
    as a bar of row blocks, and running everything else on ``inner`` unchanged."""

    def __init__(self, inner: Executor, display: Bars) -> None:
        self.inner = inner
        self.display = display
        self.passes = 0

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        self.inner.broadcast(fn, *args)

    def run(self, units: Sequence[Unit]) -> Iterator[tuple[Any, Any]]:
        if not units or not isinstance(units[0], BlockPass):
            yield from self.inner.run(units)
            return
        self.passes += 1
        b = self.display.add(f"pass {self.passes} over the inputs", unit="blocks")
        b.start(len(units))
        try:
            for done in self.inner.run(units):
                b.advance(1)
                yield done
        finally:
            b.remove()
