"""Progress bars: every long command draws one on a terminal (stderr), none with ``--quiet``;
the callbacks behind them count exactly what was done, and the API stays silent."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
from reliability_helpers import tiny_collection

import tallstore
from tallstore.checkpoint import writer
from tallstore.cli import main
from tallstore.reading.verify import verify


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def on_terminal(*args: object) -> str:
    """``tallstore ARGS`` in this process with stderr on a (fake) terminal → what stderr received."""
    err = Terminal()
    argv = sys.argv
    sys.argv = ["tallstore", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main()
    finally:
        sys.argv = argv
    return err.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("progress")
    base, tasks = tiny_collection(root / "in", n_tasks=2)
    tallstore.pack(root / "arc", base, tasks)
    return base, tasks, root / "arc"


COMMANDS = {
    "pack": ("packing", "B"),
    "pack --lam auto": ("pass 1 over the inputs", "blocks"),
    "extract": ("extracting", "B"),
    "merge": ("merging", "B"),
    "verify --deep": ("verifying", "tensors"),
}


def argv(command: str, inputs: tuple[Path, dict[str, Path], Path], out: Path) -> list[object]:
    base, tasks, archive = inputs
    pack = ["pack", out / "arc", "--base", base, *[a for n, p in tasks.items() for a in ("--task", f"{n}={p}")]]
    return {
        "pack": pack,
        "pack --lam auto": [*pack, "--lam", "auto"],
        "extract": ["extract", archive, "t0", "-o", out / "x.safetensors"],
        "merge": ["merge", archive, "-o", out / "m.safetensors"],
        "verify --deep": ["verify", archive, "--deep"],
    }[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_long_command_draws_a_progress_bar_on_a_terminal_and_none_when_quiet(
    inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path, command: str,
) -> None:
    description, unit = COMMANDS[command]
    drawn = on_terminal(*argv(command, inputs, tmp_path / "loud"))
    assert description in drawn and unit in drawn.split(description, 1)[1]
    assert description not in on_terminal(*argv(command, inputs, tmp_path / "quiet"), "-q")


def test_save_reports_every_byte_it_writes_and_verify_every_tensor_it_rebuilds(
    inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path,
) -> None:
    arc = tallstore.open(inputs[2])
    view = arc["t0"]
    written: list[int] = []
    items = [(k, view.info(k)) for k in view]
    writer.save(tmp_path / "x.safetensors", items, view.__getitem__, progress=written.append)
    assert sum(written) == sum(info.nbytes for _, info in items) and len(written) == len(items)
    rebuilt: list[int] = []
    verify(arc._source, arc._handle.get, deep=True, progress=rebuilt.append)
    assert sum(rebuilt) == sum(len(arc[t]) for t in arc.tasks)


def test_the_api_draws_nothing_on_a_terminal(inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path) -> None:
    base, tasks, archive = inputs
    err = Terminal()
    with contextlib.redirect_stderr(err):
        tallstore.pack(tmp_path / "arc", base, tasks, lam="auto")
        tallstore.open(archive).extract("t0", tmp_path / "x.safetensors")
        tallstore.open(archive).verify(deep=True)
    assert err.getvalue() == ""
