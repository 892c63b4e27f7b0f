"""Runs ``tallstore`` commands in forked children that the crash-safety tests kill with SIGKILL.

Protocol, one JSON object per stdin line: ``{"argv": [...], "pause": POINT or null}``. For each
the driver forks a child running ``tallstore ARGV`` and prints ``PID <pid>``; a child that reaches
POINT prints ``AT <point>`` and sleeps until killed; when the child ends the driver prints
``EXIT <code>`` (negative: killed by that signal). Importing once and forking keeps every run cheap.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import zarr

import tallstore.checkpoint.writer as writer
from tallstore.packing import driver, units
from tallstore.cli import main


def pause(point: str) -> None:
    """Announce ``point`` and wait to be killed."""
    print(f"AT {point}", flush=True)
    time.sleep(3600)


def after(fn: Callable[..., Any], point: str, nth: int = 0) -> Callable[..., Any]:
    """``fn`` that pauses right after its ``nth`` call returns."""
    calls = itertools.count()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if next(calls) == nth:
            pause(point)
        return out

    return wrapped


def before(fn: Callable[..., Any], point: str, nth: int = 0) -> Callable[..., Any]:
    """``fn`` that pauses right before its ``nth`` call runs."""
    calls = itertools.count()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == nth:
            pause(point)
        return fn(*args, **kwargs)

    return wrapped


def install(point: str) -> None:
    """Make this process pause at ``point`` (a stage of pack, or of writing an output file)."""
    if point == "temp-created":
        driver.Target.__enter__ = after(driver.Target.__enter__, point)
    elif point == "units-running":
        units.MaskedBlock.run = before(units.MaskedBlock.run, point, nth=1)
    elif point == "before-marker":
        driver._finish = before(driver._finish, point)
    elif point == "marker-written":
        zarr.consolidate_metadata = after(zarr.consolidate_metadata, point)
    elif point == "before-publish":
        writer.replace = driver.replace = before(writer.replace, point)
    elif point == "mid-replace":
        publish = writer.replace

        def replace(src: Any, dst: Any) -> None:
            os.replace = after(os.replace, point)  # zarr renames files too: only arm it here
            publish(src, dst)

        writer.replace = driver.replace = replace
    elif point == "output-half-written":
        original = writer.write_safetensors

        def write(path: Any, items: Any, get: Callable[[str], Any], metadata: Any = None) -> None:
            original(path, items, before(get, point, nth=len(items) // 2), metadata)

        writer.write_safetensors = write
    else:
        raise SystemExit(f"unknown pause point {point!r}")


def run_child(argv: list[str], point: str | None) -> None:
    """The forked child: run the command, then leave without running the parent's exit hooks."""
    code = 0
    try:
        if point:
            install(point)
        sys.argv = ["tallstore", *argv]
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request["argv"], request.get("pause"))
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    serve()
