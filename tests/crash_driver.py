"""Runs ``tallstore`` commands in forked children that the crash-safety and signal tests kill.

Protocol, one JSON object per stdin line: ``{"argv": [...], "pause": [POINT, ...], "output":
PATH or null}``. For each the driver forks a child running ``tallstore ARGV`` (its stdout and
stderr going to ``PATH.out`` and ``PATH.err`` when ``output`` is given) and prints ``PID <pid>``;
a child that reaches a POINT prints ``AT <point>`` and sleeps until signalled; when the child ends
the driver prints ``EXIT <code>`` (negative: killed by that signal). Importing once and forking
keeps every run cheap. :class:`Driver` is the tests' side of it.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import zarr

import tallstore.checkpoint.writer as writer
import tallstore.reading.verify as verify
from tallstore import publishing
from tallstore.cli import main
from tallstore.packing import driver, units

TIMEOUT = 120.0
protocol: TextIO = sys.stdout


def pause(point: str) -> None:
    """Announce ``point`` and wait to be signalled, in short sleeps: a signal that lands between
    the announcement and the start of a sleep would not interrupt that sleep, and Python runs its
    handler only once the interpreter gets control back (one long sleep would then last an hour)."""
    print(f"AT {point}", file=protocol, flush=True)
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        time.sleep(0.05)


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
    """Make this process pause at ``point`` (a stage of pack, verify, or of writing an output file)."""
    if point == "temp-created":
        driver.Target.__enter__ = after(driver.Target.__enter__, point)
    elif point == "units-running":  # in a worker thread
        units.MaskedBlock.run = before(units.MaskedBlock.run, point, nth=1)
    elif point == "absorbing":  # in the main thread, between two finished units
        units.MaskedBlock.absorb = before(units.MaskedBlock.absorb, point, nth=1)
    elif point == "before-marker":
        driver._finish = before(driver._finish, point)
    elif point == "marker-written":
        zarr.consolidate_metadata = after(zarr.consolidate_metadata, point)
    elif point == "before-publish":
        publishing.Staging.publish = before(publishing.Staging.publish, point)
    elif point == "published":
        publishing.Staging.publish = after(publishing.Staging.publish, point)
    elif point == "mid-replace":  # the old output moved aside (rename 0), the new one not yet renamed (rename 1)
        publishing.rename_noreplace = before(publishing.rename_noreplace, point, nth=1)
    elif point == "output-half-written":
        original = writer.write_safetensors

        def write(path: Any, items: Any, get: Callable[[str], Any], metadata: Any = None) -> None:
            original(path, items, before(get, point, nth=len(items) // 2), metadata)

        writer.write_safetensors = write
    elif point == "verify-rebuilding":
        verify._rebuild = before(verify._rebuild, point, nth=1)
    elif point == "cleaning-up":  # removing an unpublished output's hidden folder
        publishing._remove_staging = before(publishing._remove_staging, point)
    else:
        raise SystemExit(f"unknown pause point {point!r}")


def run_child(argv: list[str], points: list[str], output: str | None) -> None:
    """The forked child: run the command, then leave without running the parent's exit hooks."""
    global protocol
    code = 0
    try:
        if output:
            protocol = os.fdopen(os.dup(1), "w")
            for fd, suffix in ((1, ".out"), (2, ".err")):
                os.dup2(os.open(output + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        for point in points:
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
            run_child(request["argv"], request["pause"], request["output"])
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)


class Driver:
    """The driver subprocess: ``start`` a command, wait for a pause point or its exit, signal it."""

    def __init__(self) -> None:
        here = Path(__file__).parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        self.buf = b""
        self.pidfd = -1

    def line(self, timeout: float = TIMEOUT) -> str:
        """The next protocol line (``PID``, ``AT`` or ``EXIT``); other output is skipped."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                text = raw.decode(errors="replace")
                if text.split(" ", 1)[0] in ("PID", "AT", "EXIT"):
                    return text
            left = deadline - time.monotonic()
            assert left > 0 and self.sel.select(left), "crash driver stopped answering"
            chunk = os.read(self.proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
            assert chunk, "crash driver exited"
            self.buf += chunk

    def start(self, argv: list[object], pause: str | list[str] | None = None, output: Path | None = None) -> None:
        assert self.proc.stdin is not None
        points = [pause] if isinstance(pause, str) else pause or []
        request = {"argv": list(map(str, argv)), "pause": points, "output": str(output) if output else None}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        pid = int(self.line().split()[1])
        try:  # a pidfd names this very process: a recycled PID can never be hit by the signal
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = -1

    def wait(self) -> int:
        """The exit code of the running command."""
        return int(self.line().split()[1])

    def kill_at(self, point: str, sig: int = signal.SIGKILL) -> int:
        """Wait until the command announces ``point``, then send it ``sig``; returns how it ended."""
        assert self.line() == f"AT {point}"
        return self.kill(sig)

    def send(self, sig: int) -> None:
        """Send ``sig`` to the running command (if it still runs), which goes on."""
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the running command (if it still runs) and return how it ended."""
        self.send(sig)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return self.wait()

    def run(self, argv: list[object]) -> int:
        self.start(argv)
        code = self.wait()
        os.close(self.pidfd)
        self.pidfd = -1
        return code

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


if __name__ == "__main__":
    serve()
