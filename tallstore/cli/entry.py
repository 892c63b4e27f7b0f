"""The console entry point: SIGINT and SIGTERM are handled before anything heavy is imported.

Either signal unwinds the main thread like ``KeyboardInterrupt`` (every ``finally`` runs, so the
hidden folders of unpublished outputs are removed, and worker pools are joined) and ends the
process with status 128 + its number (130, 143) and one line on stderr saying what was
interrupted and what, if anything, was published. A second signal ends the process at once; what
that leaves behind is swept by the next run (see :mod:`tallstore.publishing`).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .. import publishing

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM; not an ``Exception``, so no handler swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main() -> None:
    """Run ``tallstore ARGS`` in this process (tests, embedding); signal handlers are restored after."""
    _main(restore=True)


def console() -> None:
    """The ``tallstore`` console script: :func:`main`, then signals are ignored while the interpreter
    shuts down, so one arriving after the command finished cannot change its exit status."""
    _main(restore=False)


def _main(restore: bool) -> None:
    """Run ``tallstore ARGS``; an interrupt ends it with 128 + the signal number and one line."""
    before = len(publishing.published())
    what = f"tallstore {_command(sys.argv[1:])}".strip()
    with _interruptible(restore, what):
        try:
            # imported only now, under the handlers: the commands import torch, which takes seconds
            importlib.import_module("tallstore.cli.app").run()
        except Interrupted as e:
            published = publishing.published()[before:]
            after = f" after publishing {', '.join(published)}" if published else "; nothing was published"
            print(f"error: {what} interrupted by {signal.Signals(e.signum).name}{after}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None


def _command(args: list[str]) -> str:
    """The command named on the command line (its first word that is not an option), or ''."""
    return next((a for a in args if not a.startswith("-")), "")


@contextmanager
def _interruptible(restore: bool, what: str) -> Iterator[None]:
    """While inside, the first SIGINT / SIGTERM raises :class:`Interrupted`, a second one ends
    ``what`` at once; after, the previous handlers are back (``restore``) or both signals are ignored.

    Outside the main thread (where Python cannot set handlers) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if received:
            name = signal.Signals(signum).name
            os.write(2, f"error: {what} interrupted by {name} again: stopped without cleaning up\n".encode())
            os._exit(128 + signum)
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if not restore else signal.SIG_DFL if h is None else h)
