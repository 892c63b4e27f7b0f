"""Concurrent reads of many array regions in one round of zarr's async engine.

Loading a task touches one array per tensor; issuing them together lets zarr overlap the
store requests (essential on object stores) and decode chunks on several threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync


def read_many(arrays: Sequence[tuple[zarr.Array, Any]], *, return_exceptions: bool = False) -> list[Any]:
    """``[arr[sel] for arr, sel in arrays]``, fetched concurrently. Errors propagate, or with
    ``return_exceptions`` take the place of their result (so the caller can name what failed)."""

    async def gather() -> list[Any]:
        return await asyncio.gather(*(a._async_array.getitem(sel) for a, sel in arrays), return_exceptions=return_exceptions)

    return [x if isinstance(x, BaseException) else np.asarray(x) for x in sync(gather())]


def coalesce(ranges: Iterable[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    """Sorted ranges merged wherever they share a chunk, so that no chunk is fetched twice."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a // chunk <= (out[-1][1] - 1) // chunk:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
