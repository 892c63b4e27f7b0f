"""Read-only passes over a pack's inputs: a pure function of each masked row block, summed.

Merge rules and λ selection express their whole-model statistics as such passes
(:data:`~tallstore.ops.merges.RunPass`); here they run as :class:`~tallstore.packing.units.BlockPass`
units on an executor, and the results are added in plan order, whatever order they finish in,
so float sums are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch

from ..errors import PlanError
from ..ops.sums import squared_distance
from ..storage.layout import KIND_MASKED
from .executors import Executor
from .inputs import Block, InputSpec
from .plan import KeyPlan, Plan
from .units import BlockPass


def _add(total: Any, part: Any) -> Any:
    if total is None:
        return part
    if isinstance(part, tuple):
        return tuple(t + p for t, p in zip(total, part))
    return total + part


def run_pass(executor: Executor, spec: InputSpec, plan: Plan, fn: Callable[[Block], Any]) -> Any:
    """``Σ fn(block)`` over every masked row block, added in plan order (arrays, or tuples of them)."""
    units = [BlockPass(spec, kp, i, fn) for kp in plan.masked() for i in range(len(kp.blocks))]
    position = {id(u): j for j, u in enumerate(units)}
    pending: dict[int, Any] = {}
    total: Any = None
    done = 0
    with closing(executor.run(units)) as results:  # closed on an interrupt too: its threads joined
        for unit, result in results:
            pending[position[id(unit)]] = result
            while done in pending:
                total = _add(total, pending.pop(done))
                done += 1
    return total


def on_tau(fn: Callable[[torch.Tensor], Any], block: Block) -> Any:
    """``fn`` of the block's task vectors alone (the form merge rules' pass functions take)."""
    return fn(block.tau)


def tau_pass(executor: Executor, spec: InputSpec, plan: Plan) -> Callable[[Callable[[torch.Tensor], Any]], Any]:
    """A :data:`~tallstore.ops.merges.RunPass` over ``τ`` of every block of ``plan``."""
    return lambda fn: run_pass(executor, spec, plan, partial(on_tau, fn))


def has_nonfinite(block: Block) -> bool:
    """Whether the block holds a NaN or an infinity in the base or any task."""
    return not (bool(torch.isfinite(block.base).all()) and bool(torch.isfinite(block.tasks).all()))


def nonfinite_keys(executor: Executor, spec: InputSpec, plan: Plan) -> set[str]:
    """The masked tensors holding NaN or Inf anywhere (only asked with ``allow_nonfinite``).

    They are stored exactly per task instead: a NaN in one task must never change another
    task's rebuild through the shared vector or the masks.
    """
    units = [BlockPass(spec, kp, i, has_nonfinite) for kp in plan.masked() for i in range(len(kp.blocks))]
    with closing(executor.run(units)) as results:
        return {unit.kp.key for unit, odd in results if odd}


UNRELATED = 1.0
SAMPLE_ELEMS = 1 << 16  # at least this many leading elements (whole rows) of each masked tensor


def sample_plan(plan: Plan, elems: int = SAMPLE_ELEMS) -> Plan:
    """``plan`` cut to a cheap sample of the model: the first rows (about ``elems`` elements, at
    least one row) of each masked tensor, as one block each."""
    def first_rows(kp: KeyPlan) -> KeyPlan:
        a, b = kp.blocks[0]
        return replace(kp, blocks=[(a, min(b, a + max(1, -(-elems // max(1, kp.info.row_numel)))))])

    return replace(plan, keys=[first_rows(kp) if kp.kind == KIND_MASKED else kp for kp in plan.keys])


def change_sums(block: Block) -> tuple[np.ndarray, np.ndarray]:
    """Per task ``Σ τ_t²`` and ``Σ θ₀²`` (float64) of one block."""
    return np.array([squared_distance(tau) for tau in block.tau]), np.array([squared_distance(block.base)])


def check_related(executor: Executor, spec: InputSpec, plan: Plan) -> None:
    """Refuse a base that no task looks fine-tuned from: on a sample of the model
    (:func:`sample_plan`), every task's ``‖τ_t‖ / ‖θ₀‖`` above :data:`UNRELATED`. A fine-tune
    moves its weights by a few percent of their norm; two unrelated models of one architecture
    differ by about √2 times it (a randomly initialised base, a base of another pre-training)."""
    if not plan.masked():
        return
    tau_sq, base_sq = run_pass(executor, spec, sample_plan(plan), change_sums)
    if base_sq[0] <= 0:
        return
    with np.errstate(invalid="ignore"):  # NaN weights (allowed ones) give NaN, never a refusal
        ratio = np.sqrt(tau_sq / base_sq[0])
    if len(ratio) and bool((ratio > UNRELATED).all()):
        figures = ", ".join(f"{n} {r:.2f}" for n, r in zip(spec.names, ratio))
        raise PlanError(
            f"every task differs from the base by more than {UNRELATED:g}× the base's own norm ({figures}; a fine-tune "
            "typically moves by a few percent): is this the base they were fine-tuned from? "
            "Pass --allow-unrelated-base / allow_unrelated_base=True to pack them anyway"
        )
