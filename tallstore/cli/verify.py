"""``tallstore verify``: prove an archive is intact and still rebuilds what was packed."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..errors import CorruptArchiveError
from ..reading.archive import open as open_archive
from ..reading.verify import VerifyReport
from . import options
from .app import app


def render(r: VerifyReport) -> None:
    """Print what was checked, one line per level and per ``--against`` task."""
    print(f"{r.location}: {r.arrays} arrays, {r.chunks} chunks present and checksummed")
    if r.deep:
        base = "base matches its fingerprint; " if r.base_checked else ""
        print(f"deep: {base}{r.tasks_rebuilt} tasks rebuilt, {r.tensors_rebuilt} tensors match their packed sha256")
    for a in r.against:
        recorded = f" (packed: {a.recorded_error:.6g})" if a.recorded_error is not None else ""
        files = "same files as packed" if a.files_match else "files differ from those packed"
        print(
            f"{a.task} vs {a.path}: relative error {a.relative_error:.6g}{recorded}, max abs error "
            f"{a.max_abs_error:.6g}, {a.exact_tensors}/{a.tensors} tensors exact, {files}"
        )
    for p in r.problems:
        print(f"problem: {p}")


@app.command()
def verify(
    archive: Annotated[str, typer.Argument(help="Archive folder or URL.")],
    base: options.ArchiveBase = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also rebuild every task and compare its sha256 digests.")] = False,
    against: Annotated[Optional[list[str]], typer.Option("--against", help="NAME=PATH: report task NAME's rebuild error against an original; repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    storage_option: options.StorageOptions = None,
) -> None:
    """Check every chunk's presence and CRC (--deep: every task's digests); exit 2 on any problem."""
    originals = options.pairs(against, "--against")
    with open_archive(archive, base=base, storage_options=options.storage_options(storage_option)) as arc:
        unknown = sorted(set(originals) - set(arc.tasks))
        if unknown:
            raise options.UsageError(f"no task {unknown[0]!r} in {archive} (tasks: {', '.join(arc.tasks)})")
        report = arc.verify(deep=deep, against=originals)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    if not report.ok:
        n = len(report.problems)
        raise CorruptArchiveError(f"{archive}: verification failed with {n} problem{'s' * (n != 1)}; first: {report.problems[0]}")
