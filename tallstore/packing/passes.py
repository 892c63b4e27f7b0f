"""Read-only passes over a pack's inputs: a pure function of each masked row block, summed.

Merge rules and λ selection express their whole-model statistics as such passes
(:data:`~tallstore.ops.merges.RunPass`); here they run as :class:`~tallstore.packing.units.BlockPass`
units on an executor, and the results are added in plan order, whatever order they finish in,
so float sums are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from .executors import Executor
from .inputs import Block, InputSpec
from .plan import Plan
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
    for unit, result in executor.run(units):
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
    return {unit.kp.key for unit, odd in executor.run(units) if odd}
