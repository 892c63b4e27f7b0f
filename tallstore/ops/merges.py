"""Merge rules for the multi-task vector ``τ_MTL``: one small object per rule, looked up by name.

A rule ``prepare``s the parameters it needs from whole-model passes (``run_pass(fn)`` applies a
pure function to the ``(T, n)`` task-vector stack of every block and sums the results: the
caller owns the I/O), then ``apply``s them to one block at a time. Parameters are JSON values
recorded in the archive, so a reader recomputes any block with ``apply`` alone.

Tasks whose block is equal in value (a backbone several tasks left frozen, say) enter a merge
once: otherwise the merge counts the same change twice and every one of them rebuilds as
θ₀ + 2τ instead of exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import PlanError
from . import ties
from .masks import task_sum

BlockFn = Callable[[torch.Tensor], Any]
RunPass = Callable[[BlockFn], np.ndarray]


SAMPLE_STRIDE = 997  # elements between the probes that rule out most pairs before a full compare


def distinct(tau: torch.Tensor) -> list[int]:
    """Indices of the first of each group of identical rows of ``tau`` (``torch.equal``, in task
    order). Rows are first compared on a strided sample, so two different tasks cost one probe,
    not a pass over the block (and no copy of it)."""
    probe = tau[:, ::SAMPLE_STRIDE]
    out: list[int] = []
    for t in range(tau.shape[0]):
        if not any(torch.equal(probe[u], probe[t]) and torch.equal(tau[u], tau[t]) for u in out):
            out.append(t)
    return out


@dataclass(frozen=True)
class TaskArithmetic:
    """Task arithmetic as TALL uses it: ``τ_MTL = Σ_t τ_t``, unscaled; no parameters."""

    name: ClassVar[str] = "ta"

    def prepare(self, run_pass: RunPass, numel: int, names: Sequence[str]) -> dict[str, Any]:
        return {}

    def apply(self, tau: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return task_sum(tau, distinct(tau))


@dataclass(frozen=True)
class Ties:
    """TIES-merging as the TALL authors' code applies it (see :mod:`tallstore.ops.ties`).

    ``top``: percent of each task's largest-magnitude entries kept, by one threshold per task
    over the whole model, found exactly by three streaming passes.
    """

    top: float = ties.DEFAULT_TOP
    name: ClassVar[str] = "ties"

    def __post_init__(self) -> None:
        try:
            value = float(self.top)
        except (TypeError, ValueError):
            raise PlanError(f"TIES top percentage must be a number, got {self.top!r}") from None
        if not (0 < value <= 100):
            raise PlanError(f"TIES top percentage must be in (0, 100], got {value}")
        object.__setattr__(self, "top", value)

    def prepare(self, run_pass: RunPass, numel: int, names: Sequence[str]) -> dict[str, Any]:
        """``top``, per-task ``threshold`` and ``kept``, ``majority_sign`` and ``numel`` (spec §6.1)."""
        n_tasks = len(names)
        rank = ties.keep_rank(numel, self.top)
        threshold = [0.0] * n_tasks
        below = [0] * n_tasks
        if rank > 0:
            high = run_pass(ties.high_histogram)
            found = [ties.locate(high[t], rank) for t in range(n_tasks)]
            bins = tuple(b for b, _ in found)
            low = run_pass(partial(ties.low_histogram, high=bins))
            for t, (b, under) in enumerate(found):
                lo, under_lo = ties.locate(low[t], rank - under)
                threshold[t] = ties.bits_to_float((b << 16) | lo)
                below[t] = under + under_lo
        for name, v in zip(names, threshold):
            if not math.isfinite(v):
                raise PlanError(f"TIES threshold of task {name!r} is not finite (too many NaN/Inf weights)")
        pos, neg = run_pass(partial(distinct_sign_counts, threshold=tuple(threshold)))
        return {
            "top": self.top,
            "threshold": threshold,
            "majority_sign": ties.majority(int(pos), int(neg)),
            "kept": [numel - b for b in below],
            "numel": numel,
        }

    def apply(self, tau: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        keep = distinct(tau)
        threshold = [params["threshold"][t] for t in keep]
        return ties.disjoint_sum(ties.trim(tau[keep], threshold), params["majority_sign"])


def distinct_sign_counts(tau: torch.Tensor, threshold: Sequence[float]) -> tuple[int, int]:
    """TIES's elected-sign counts of a block, each group of identical tasks counted once."""
    keep = distinct(tau)
    return ties.trimmed_sign_counts(tau[keep], [threshold[t] for t in keep])


RULES: dict[str, type[TaskArithmetic] | type[Ties]] = {"ta": TaskArithmetic, "ties": Ties}


def rule(name: str, **options: Any) -> TaskArithmetic | Ties:
    """The merge rule ``name`` with its options (``top`` for ``ties``); unknown names are errors."""
    if name not in RULES:
        raise PlanError(f"unknown merge rule {name!r}; choose one of {sorted(RULES)}")
    return RULES[name](**options)
