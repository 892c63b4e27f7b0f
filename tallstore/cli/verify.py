"""``tallstore verify``: prove an archive is intact and still rebuilds what was packed."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..errors import CorruptArchiveError, TallstoreError
from ..reading.archive import Archive
from ..reading.archive import open as open_archive
from ..reading.verify import VerifyReport
from ..text import printable
from . import options
from .app import app
from .progress import bar


def render(r: VerifyReport) -> None:
    """Print what was checked, one line per level and per ``--against`` task (names and problems
    escaped: they carry archive-provided text)."""
    print(printable(f"{r.location}: {r.arrays} arrays, {r.chunks} chunks present and checksummed"))
    if r.deep:
        base = "base matches its fingerprint; " if r.base_checked else ""
        print(f"deep: {base}{r.tasks_rebuilt} tasks rebuilt, {r.tensors_rebuilt} tensors match their packed sha256")
    for a in r.against:
        recorded = f" (packed: {a.recorded_error:.6g})" if a.recorded_error is not None else ""
        files = "same files as packed" if a.files_match else "files differ from those packed"
        print(printable(
            f"{a.task} vs {a.path}: relative error {a.relative_error:.6g}{recorded}, max abs error "
            f"{a.max_abs_error:.6g}, {a.exact_tensors}/{a.tensors} tensors exact, {files}"
        ))
    for p in r.problems:
        print(f"problem: {printable(p)}")


def _tensors(arc: Archive) -> int | None:
    """How many tensors ``--deep`` rebuilds (None when a task's record is unreadable: verify says so)."""
    try:
        return sum(len(arc[name]) for name in arc.tasks)
    except TallstoreError:
        return None


@app.command()
def verify(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    base: options.ArchiveBase = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also rebuild every task and compare its sha256 digests.")] = False,
    against: Annotated[Optional[list[str]], typer.Option("--against", help="NAME=PATH: report task NAME's rebuild error against an original; repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    storage_option: options.StorageOptions = None,
    quiet: options.Quiet = False,
) -> None:
    """Check every chunk's presence and CRC (--deep: every task's digests); exit 2 on any problem."""
    originals = options.pairs(against, "--against")
    with open_archive(archive, base=base, storage_options=options.storage_options(storage_option)) as arc:
        unknown = sorted(set(originals) - set(arc.tasks))
        if unknown:
            raise options.UsageError(f"no task {unknown[0]!r} in {archive} (tasks: {', '.join(arc.tasks)})")
        with bar("verifying", _tensors(arc) if deep else 0, unit="tensors", enabled=deep and not quiet) as advance:
            report = arc.verify(deep=deep, against=originals, progress=advance)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    if not report.ok:
        n = len(report.problems)
        raise CorruptArchiveError(f"{archive}: verification failed with {n} problem{'s' * (n != 1)}; first: {report.problems[0]}")
