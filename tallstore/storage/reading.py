"""Concurrent reads of many array regions in one round of zarr's async engine.

Loading a task touches one array per tensor; issuing them together lets zarr overlap the
store requests (essential on object stores) and decode chunks on several threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync


def read_many(arrays: Sequence[tuple[zarr.Array, Any]]) -> list[np.ndarray]:
    """``[arr[sel] for arr, sel in arrays]``, fetched concurrently; errors propagate."""

    async def gather() -> list[Any]:
        return await asyncio.gather(*(a._async_array.getitem(sel) for a, sel in arrays))

    return [np.asarray(x) for x in sync(gather())]
