"""Returning freed heap memory to the system, so a long pack's resident size tracks live data.

glibc keeps freed blocks below its (self-raising) mmap threshold in its arenas; blocks of
varying size (a pack's per-block temporaries) fragment them, and resident memory then grows with
the number of blocks processed rather than with what is alive. ``malloc_trim(0)`` hands every
free page back; the pages a later block reuses are then faulted in again, so it runs at most
once per ``TRIM_INTERVAL`` seconds. Elsewhere (musl, macOS, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from collections.abc import Callable

TRIM_INTERVAL = 1.0  # seconds: fragmentation builds up over many blocks, page faults cost per trim

_last = -float("inf")
_lock = threading.Lock()


@functools.cache
def _trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def release_free_memory(min_interval: float = 0.0) -> bool:
    """Give the heap's free pages back to the system, unless that was done less than
    ``min_interval`` seconds ago; whether it was done now."""
    global _last
    trim = _trim()
    if trim is None:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last < min_interval:
            return False
        _last = now
    trim(0)
    return True
