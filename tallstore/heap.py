"""Returning freed heap memory to the system, so a long pack's resident size tracks live data.

glibc keeps freed blocks below its (self-raising) mmap threshold in its arenas; blocks of
varying size (a pack's per-block temporaries) fragment them, and resident memory then grows with
the number of blocks processed rather than with what is alive. ``malloc_trim(0)`` hands every
free page back. Elsewhere (musl, macOS, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system; whether the C library could."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
