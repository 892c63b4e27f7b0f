"""Row-block geometry: how a tensor is cut into blocks for streaming, chunking and hashing.

A block is a whole number of dim-0 rows holding about ``block_elems`` elements, rounded so
its element count is a multiple of 8 (mask bytes never straddle two blocks).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..dtypes import TensorInfo

DEFAULT_BLOCK_ELEMS = 1 << 22  # the largest block a pack picks by itself
MIN_AUTO_BLOCK_ELEMS = 1 << 18
STACK_BYTES = 1 << 26  # a pack worker's float32 stack of one block of every task, at most


def auto_block_elems(n_tasks: int) -> int:
    """The block a pack of ``n_tasks`` TALL tasks uses unless told: the largest power of two whose
    float32 stack over the tasks fits :data:`STACK_BYTES`, within [2^18, 2^22] elements, so a
    worker's memory does not grow with the number of tasks."""
    fit = STACK_BYTES // (4 * max(1, n_tasks))
    return max(MIN_AUTO_BLOCK_ELEMS, min(DEFAULT_BLOCK_ELEMS, 1 << max(0, fit.bit_length() - 1)))


def block_rows(info: TensorInfo, block_elems: int) -> int:
    """Rows per block for a tensor of this shape."""
    rows = info.rows
    row = max(info.row_numel, 1)
    per = max(1, block_elems // row)
    step = 8 // math.gcd(row, 8)
    per = max(step, per - per % step)
    return max(1, min(per, rows))


def block_ranges(info: TensorInfo, block_elems: int) -> Iterator[tuple[int, int]]:
    """``(start_row, stop_row)`` of each block, in order (one block for a scalar or empty tensor)."""
    rows = info.rows
    per = block_rows(info, block_elems)
    if info.numel == 0:  # shape (N, 0, …) too: one block, however large N claims to be
        yield (0, rows)
        return
    for a in range(0, rows, per):
        yield (a, min(a + per, rows))


def chunk_elems(info: TensorInfo, block_elems: int) -> int:
    """Elements per chunk of the flat arrays of this tensor (one block), at least 1."""
    return max(1, block_rows(info, block_elems) * info.row_numel)


def extra_info(info: TensorInfo, base_rows: int) -> TensorInfo:
    """The rows of a grown tensor (a task with more dim-0 rows than the base) past the base's."""
    return TensorInfo(info.dtype, (info.rows - base_rows, *info.shape[1:]))


def row_blocks(info: TensorInfo, base_rows: int | None, block_elems: int) -> list[tuple[int, int]]:
    """The blocks of a task's tensor as stored: those of the base's rows (masked), then — a grown
    tensor — those of its extra rows, each range in the task tensor's own rows."""
    if base_rows is None or not info.shape or base_rows >= info.rows:
        return list(block_ranges(info, block_elems))
    masked = TensorInfo(info.dtype, (base_rows, *info.shape[1:]))
    extra = extra_info(info, base_rows)
    return [*block_ranges(masked, block_elems), *((a + base_rows, b + base_rows) for a, b in block_ranges(extra, block_elems))]
