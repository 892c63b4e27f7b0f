"""Read-only passes over a pack's inputs, in picklable units (TIES thresholds, λ selection).

An :class:`InputSpec` names the base and the tasks; any process opens them once per spec and
reads one row block of one masked tensor across every task at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import PlanError
from ..ops.masks import task_vectors
from .plan import KeyPlan


@dataclass(frozen=True)
class InputSpec:
    """Where a pack's inputs are; picklable, so units run on any executor."""

    token: str
    base: str
    tasks: tuple[str, ...]
    names: tuple[str, ...]
    storage_options: dict[str, Any] | None
    allow_nonfinite: bool


@dataclass
class Inputs:
    """The opened checkpoints of one :class:`InputSpec` in this process."""

    base: Checkpoint
    tasks: list[Checkpoint]


_OPEN: dict[str, Inputs] = {}
_LOCK = threading.Lock()


def inputs(spec: InputSpec) -> Inputs:
    """This process's open inputs for ``spec``, opened on first use."""
    with _LOCK:
        got = _OPEN.get(spec.token)
        if got is None:
            got = _OPEN[spec.token] = Inputs(
                base=open_checkpoint(spec.base, spec.storage_options),
                tasks=[open_checkpoint(p, spec.storage_options) for p in spec.tasks],
            )
        return got


def release(spec: InputSpec) -> None:
    """Close this process's inputs for ``spec``, if open."""
    with _LOCK:
        got = _OPEN.pop(spec.token, None)
    if got is not None:
        for ck in [got.base, *got.tasks]:
            ck.close()


def read_block(spec: InputSpec, kp: KeyPlan, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row block ``index`` of a masked tensor: flat base, ``(T, n)`` task weights and ``τ`` (float32)."""
    got = inputs(spec)
    a, b = kp.blocks[index]
    base = got.base.read(kp.key, a, b).reshape(-1)
    first = got.tasks[0].read(kp.key, a, b).reshape(-1)
    tasks = torch.empty((len(got.tasks), first.numel()), dtype=first.dtype)  # filled in place: no stack copy
    tasks[0] = first
    for t, ck in enumerate(got.tasks[1:], 1):
        tasks[t] = ck.read(kp.key, a, b).reshape(-1)
    if not spec.allow_nonfinite:
        check_finite(base, kp.key, "the base")
        for name, t in zip(spec.names, tasks):
            check_finite(t, kp.key, f"task {name!r}")
    return base, tasks, task_vectors(base, tasks)


def check_finite(t: torch.Tensor, key: str, who: str) -> None:
    """Refuse NaN/Inf in a float tensor, naming the tensor and whose it is."""
    if not bool(torch.isfinite(t).all()):
        raise PlanError(f"tensor {key!r} of {who} contains NaN or Inf (pass --allow-nonfinite to store it)")
