"""Read-only passes over a pack's inputs, in picklable units (TIES thresholds, λ selection).

An :class:`InputSpec` names the base and the tasks; any process opens them once per spec and
reads one row block of one masked tensor across every task at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.tasks import TaskSource
from ..dtypes import DType, TensorInfo
from ..errors import PlanError
from ..ops.masks import task_vectors
from .executors import PerProcess
from .plan import KeyPlan


@dataclass(frozen=True)
class InputSpec:
    """Where a pack's inputs are; picklable, so units run on any executor."""

    token: str
    base: str
    tasks: tuple[TaskSource, ...]
    names: tuple[str, ...]
    storage_options: dict[str, Any] | None
    allow_nonfinite: bool


@dataclass
class Inputs:
    """The opened checkpoints of one :class:`InputSpec` in this process."""

    base: Checkpoint
    tasks: list[Checkpoint]


_OPEN: PerProcess[Inputs] = PerProcess()


def inputs(spec: InputSpec) -> Inputs:
    """This process's open inputs for ``spec``, opened on first use."""
    def make() -> Inputs:
        base = open_checkpoint(spec.base, spec.storage_options)
        return Inputs(base=base, tasks=[t.open(base, spec.storage_options) for t in spec.tasks])

    return _OPEN.get(spec.token, make)


def release(spec: InputSpec) -> None:
    """Close this process's inputs for ``spec``, if open."""
    got = _OPEN.drop(spec.token)
    if got is not None:
        for ck in [got.base, *got.tasks]:
            ck.close()


@dataclass
class Block:
    """Row block of a masked tensor across the inputs: flat base, ``(T, n)`` task weights (in the
    tensor's shared dtype) and ``τ``; each task's own dtype of the tensor, the tensor's shared
    dtype and shape, and how many rows the block holds."""

    base: torch.Tensor
    tasks: torch.Tensor
    tau: torch.Tensor
    dtypes: tuple[DType, ...]
    info: TensorInfo
    rows: int


def read_block(spec: InputSpec, kp: KeyPlan, index: int) -> Block:
    """Row block ``index`` of a masked tensor (``τ`` in float32), non-finite values refused unless allowed."""
    got = inputs(spec)
    a, b = kp.blocks[index]
    base = got.base.read(kp.key, a, b).reshape(-1)
    # read straight into the stack, in the shared dtype, which holds every task's values exactly
    stack = np.empty((len(got.tasks), (b - a) * kp.info.row_numel), dtype=kp.info.dtype.storage)
    tasks = dtypes.from_storage(stack, kp.info.dtype, stack.shape)
    for t, ck in enumerate(got.tasks):
        ck.read_into(kp.key, a, b, tasks[t])
    if not spec.allow_nonfinite:
        check_finite(base, kp.key, "the base")
        for name, t in zip(spec.names, tasks):
            check_finite(t, kp.key, f"task {name!r}")
    own = tuple(ck.info(kp.key).dtype for ck in got.tasks)
    return Block(base, tasks, task_vectors(base, tasks), own, kp.info, b - a)


def check_finite(t: torch.Tensor, key: str, who: str) -> None:
    """Refuse NaN/Inf in a float tensor, naming the tensor and whose it is. One min/max pass with
    no temporary (``torch.aminmax`` propagates NaN, and ±Inf is an extreme): a tenth of the time
    of ``isfinite(t).all()``, which was 9% of a pack's busy time."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise PlanError(f"tensor {key!r} of {who} contains NaN or Inf (pass --allow-nonfinite to store it)")
