"""Pausing Python's cyclic garbage collector over one load, so its full passes do not run there.

A load keeps a few thousand small objects (per-block jobs, tensor views) alive until it ends;
young-generation passes promote them, and once enough have been promoted the collector walks
every object of the process (torch, transformers and the rest: 10⁵–10⁶ of them); measured on a
25M-parameter model, a 176 ms pass once every ~10 loads of ~150 ms. None of the load's objects
form cycles that outlive it, so reference counting frees them all; the collector is resumed (if
it was enabled) when the last concurrent load ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_resume = False


@contextmanager
def paused() -> Iterator[None]:
    """Run the body with the cyclic collector off; nested and concurrent uses resume it once, at
    the end of the last, and only if it was enabled when the first began."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
