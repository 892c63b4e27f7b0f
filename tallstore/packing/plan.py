"""The pack plan: which tensors are masked, which are stored exactly, and where mask bits go.

A tensor is *masked* when the base and every task hold it as a non-empty float tensor of the
base's shape (whatever float dtype each task has; a task may have more dim-0 rows, added tokens
say: the base's rows are masked, the extra rows stored exactly) and no ``exact`` pattern names it. Every other tensor is
*separate*: each task's copy is stored exactly unless it equals the base's.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import dtypes
from ..checkpoint import Checkpoint
from ..dtypes import DType, TensorInfo
from ..errors import PlanError
from ..storage import layout
from ..storage.geometry import block_ranges
from ..storage.manifest import MAX_TASKS
from ..storage.names import encode

TASK_NAME = re.compile(r"^\w[\w.+\-@:]*(/\w[\w.+\-@:]*)*$")
MAX_NAME = 256
MIN_SHARED = 0.5


@dataclass
class KeyPlan:
    """How one tensor name is stored."""

    key: str
    node: str
    kind: str
    info: TensorInfo
    base_info: TensorInfo | None
    tasks_with: list[int]
    mask_offset: int = -1
    blocks: list[tuple[int, int]] = field(default_factory=list)
    grown: dict[int, int] = field(default_factory=dict)

    @property
    def mask_nbytes(self) -> int:
        return (self.info.numel + 7) // 8


@dataclass
class Plan:
    """The whole pack plan, in a deterministic order."""

    keys: list[KeyPlan]
    task_keys: list[list[str]]
    mask_nbytes: int
    block_elems: int

    def masked(self) -> list[KeyPlan]:
        return [k for k in self.keys if k.kind == layout.KIND_MASKED]


def check_task_names(names: list[str]) -> None:
    """Task names are shown and typed: word-like strings, unique. The Hub's ``org/model`` form is
    fine (a name is never a path: tasks are stored by index)."""
    if not names:
        raise PlanError("no tasks given: pass at least one --task NAME=PATH")
    if len(names) > MAX_TASKS:
        raise PlanError(f"{len(names)} tasks given: an archive holds at most {MAX_TASKS} (readers refuse more)")
    seen: set[str] = set()
    for n in names:
        if not isinstance(n, str) or len(n) > MAX_NAME or not TASK_NAME.fullmatch(n):
            raise PlanError(
                f"invalid task name {n!r}: use letters, digits and '_', '.', '+', '-', '@', ':' "
                f"(not leading), '/' between parts as in org/model, at most {MAX_NAME} characters"
            )
        if n in seen:
            raise PlanError(f"duplicate task name {n!r}")
        seen.add(n)


def _fits(task: TensorInfo, base: TensorInfo) -> bool:
    """A task's tensor can be masked against the base's: the same shape, or more dim-0 rows (an
    embedding or LM head grown by added tokens) of the same row shape."""
    return task.shape == base.shape or (
        len(task.shape) >= 1 and task.shape[1:] == base.shape[1:] and task.rows > base.rows and task.row_numel > 0
    )


def shared_dtype(task_dtypes: list[DType]) -> DType:
    """The dtype a masked tensor's shared data is computed in: the tasks' own when they agree;
    float32 (float64 if one task is) when they mix, so every task's values are exact in it and
    each task is rebuilt in its own dtype, rounded once."""
    if all(d == task_dtypes[0] for d in task_dtypes):
        return task_dtypes[0]
    return dtypes.by_name("float64" if any(d.name == "float64" for d in task_dtypes) else "float32")


def _is_unicode(name: str) -> bool:
    """Whether ``name`` encodes to UTF-8, as archive metadata and safetensors headers need."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def make_plan(
    base: Checkpoint,
    tasks: list[Checkpoint],
    names: list[str],
    block_elems: int,
    exact: tuple[str, ...] = (),
    exact_keys: frozenset[str] = frozenset(),
    stored: Sequence[tuple[str, Checkpoint]] = (),
) -> Plan:
    """Classify every tensor name of the base and the TALL ``tasks`` and lay out the mask bits;
    ``exact`` globs and ``exact_keys`` (names, e.g. tensors holding NaN/Inf) are stored exactly
    per task. The ``stored`` tasks (name, checkpoint), kept exactly whole, only add their names."""
    order: list[str] = list(base.keys)
    seen = set(order)
    for ck in [*tasks, *(ck for _, ck in stored)]:
        for k in ck.keys:
            if k not in seen:
                seen.add(k)
                order.append(k)
    plans: list[KeyPlan] = []
    offset = 0
    for key in order:
        if not key.isascii() and not _is_unicode(key):
            raise PlanError(f"tensor name {key!r} is not valid Unicode (it holds a lone surrogate)")
        base_info = base.info(key) if key in base else None
        with_key = [i for i, ck in enumerate(tasks) if key in ck]
        infos = [tasks[i].info(key) for i in with_key] or [ck.info(key) for _, ck in stored if key in ck]
        masked = (
            bool(tasks)
            and base_info is not None
            and len(with_key) == len(tasks)
            and base_info.dtype.is_float
            and base_info.numel > 0
            and all(_fits(inf, base_info) and inf.dtype.is_float for inf in infos)
            and not any(fnmatch.fnmatchcase(key, p) for p in exact)
            and key not in exact_keys
        )
        info = TensorInfo(shared_dtype([i.dtype for i in infos]), base_info.shape) if masked else (base_info or infos[0])
        kp = KeyPlan(
            key=key,
            node=encode(key),
            kind=layout.KIND_MASKED if masked else layout.KIND_SEPARATE,
            info=info,
            base_info=base_info,
            tasks_with=with_key,
            blocks=list(block_ranges(info, block_elems)),
            grown={t: inf.rows for t, inf in zip(with_key, infos) if masked and inf.shape != base_info.shape},
        )
        if masked:
            kp.mask_offset = offset
            offset += kp.mask_nbytes
        plans.append(kp)
    _check_related(base, [*tasks, *(ck for _, ck in stored)], [*names, *(n for n, _ in stored)])
    return Plan(plans, [list(ck.keys) for ck in tasks], offset, block_elems)


def _check_related(base: Checkpoint, tasks: list[Checkpoint], names: list[str]) -> None:
    """Refuse a task that shares too little with the base to be one of its fine-tunes."""
    total = sum(base.info(k).numel for k in base.keys if base.info(k).dtype.is_float)
    if total == 0:
        raise PlanError(f"{base.path}: the base holds no floating-point tensors")
    for name, ck in zip(names, tasks):
        shared = sum(
            base.info(k).numel
            for k in base.keys
            if base.info(k).dtype.is_float and k in ck and _fits(ck.info(k), base.info(k))
        )
        if shared < MIN_SHARED * total:
            raise PlanError(
                f"task {name!r} ({ck.path}) shares only {shared / total:.0%} of the base's "
                "parameters by name and shape: is it a fine-tune of this base?"
            )
