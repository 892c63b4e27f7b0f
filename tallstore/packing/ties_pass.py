"""The TIES pre-pass: each task's global magnitude threshold and the model's majority sign.

Three streaming passes over the masked tensors, each made of independent row-block units run
on an :class:`~tallstore.packing.executors.Executor`, the driver summing their small results:

1. per task, a 65536-bin histogram of the high 16 bits of ``|τ_t|`` (float32 bit patterns order
   like the magnitudes) → the bin holding the threshold's rank;
2. inside that bin, a histogram of the low 16 bits → the exact threshold value;
3. with the thresholds, the count of positive and negative elected signs → the majority sign.

Memory holds one row block per input per worker and two ``(T, 65536)`` count tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import PlanError
from ..ops import ties
from .executors import Executor
from .inputs import InputSpec, read_block
from .plan import KeyPlan, Plan


def check_top(top: float) -> float:
    """The trim percentage as a float in (0, 100], or a :class:`PlanError`."""
    try:
        value = float(top)
    except (TypeError, ValueError):
        raise PlanError(f"TIES top percentage must be a number, got {top!r}") from None
    if not (0 < value <= 100):
        raise PlanError(f"TIES top percentage must be in (0, 100], got {value}")
    return value


def high_unit(spec: InputSpec, kp: KeyPlan, index: int) -> np.ndarray:
    """Pass 1 unit: high-16-bit magnitude histogram of one block, per task."""
    return ties.high_histogram(read_block(spec, kp, index)[2])


def low_unit(spec: InputSpec, kp: KeyPlan, index: int, high: tuple[int, ...]) -> np.ndarray:
    """Pass 2 unit: low-16-bit histogram inside each task's threshold bin, for one block."""
    return ties.low_histogram(read_block(spec, kp, index)[2], high)


def sign_unit(spec: InputSpec, kp: KeyPlan, index: int, threshold: tuple[float, ...]) -> tuple[int, int]:
    """Pass 3 unit: positive and negative elected signs in one block."""
    return ties.sign_counts(ties.trim(read_block(spec, kp, index)[2], threshold))


def ties_params(plan: Plan, spec: InputSpec, executor: Executor, top: float) -> dict[str, Any]:
    """The recorded TIES parameters: ``top``, per-task ``threshold`` and ``kept``, ``majority_sign``, ``numel``."""
    top = check_top(top)
    masked = plan.masked()
    T = len(spec.tasks)
    numel = sum(kp.info.numel for kp in masked)
    blocks = [(kp, i) for kp in masked for i in range(len(kp.blocks))]
    rank = ties.keep_rank(numel, top)
    threshold = [0.0] * T
    below = [0] * T
    if rank > 0:
        high = _sum(executor.run([(None, high_unit, (spec, kp, i)) for kp, i in blocks]), np.zeros((T, ties.BINS), np.int64))
        found = [ties.locate(high[t], rank) for t in range(T)]
        bins = tuple(b for b, _ in found)
        low = _sum(executor.run([(None, low_unit, (spec, kp, i, bins)) for kp, i in blocks]), np.zeros((T, ties.BINS), np.int64))
        for t, (b, under) in enumerate(found):
            lo, under_lo = ties.locate(low[t], rank - under)
            threshold[t] = ties.bits_to_float((b << 16) | lo)
            below[t] = under + under_lo
    for name, v in zip(spec.names, threshold):
        if not math.isfinite(v):
            raise PlanError(f"TIES threshold of task {name!r} is not finite (too many NaN/Inf weights)")
    pos, neg = _sum(executor.run([(None, sign_unit, (spec, kp, i, tuple(threshold))) for kp, i in blocks]), np.zeros(2, np.int64))
    return {
        "top": top,
        "threshold": threshold,
        "majority_sign": ties.majority(int(pos), int(neg)),
        "kept": [numel - b for b in below],
        "numel": numel,
    }


def _sum(results: Iterable[tuple[Any, Any]], total: np.ndarray) -> np.ndarray:
    for _, r in results:
        total += np.asarray(r, dtype=np.int64)
    return total
