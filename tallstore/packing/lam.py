"""Choosing λ_t per task from a grid, as the paper does, before packing.

- ``search``: the paper's rule. For each task and each grid value the task's rebuilt model
  ``θ̂_t(λ)`` is materialised (one task model in memory at a time) and scored by the user's
  ``evaluate(task_name, state_dict) -> float`` (higher is better).
- ``auto``: no data. Each grid value is scored by the cosine similarity between the rebuilt task
  vector ``m_t(λ) ⊙ τ_MTL`` and ``τ_t``, i.e. by the relative L2 error of the rebuild after the
  best global rescaling (``min_c ‖c·m⊙τ_MTL − τ_t‖² / ‖τ_t‖² = 1 − cos²``). The plain L2 error is
  no criterion: the λ = 1 mask is its per-element minimiser, so it always picks the grid's
  largest value. The scale-free error is not separable per element and trades the task's own
  entries lost as λ grows against the other tasks' interference kept as λ shrinks; it has an
  interior optimum whose place depends on how the task vectors overlap.

Ties between grid values go to the larger λ (a sparser, cheaper mask).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..errors import PlanError
from ..ops.kernel import pack_mask, rebuild_bits
from ..ops.masks import merged_weights, tall_masks
from ..ops.merges import TaskArithmetic, Ties
from .executors import Executor
from .inputs import Block, InputSpec, inputs
from .passes import run_pass
from .plan import KeyPlan, Plan
from .units import BlockPass

Rule = TaskArithmetic | Ties

DEFAULT_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
METHODS = ("auto", "search")
CRITERION = "cosine"

Evaluate = Callable[[str, dict[str, torch.Tensor]], float]


def check(lam: object, grid: Iterable[float], evaluate: Evaluate | None) -> tuple[float, ...]:
    """Validate a λ request before any pass; returns the grid as floats."""
    if isinstance(lam, str) and lam not in METHODS:
        raise PlanError(f"λ must be a number, a per-task mapping, 'auto' or 'search'; got {lam!r}")
    if lam == "search" and evaluate is None:
        raise PlanError("lam='search' needs evaluate=fn(task_name, state_dict) -> score")
    if lam != "search" and evaluate is not None:
        raise PlanError("evaluate= is only used with lam='search'")
    try:
        values = tuple(float(v) for v in grid)
    except (TypeError, ValueError):
        raise PlanError(f"λ grid must be numbers, got {grid!r}") from None
    if not values:
        raise PlanError("λ grid is empty")
    if len(set(values)) != len(values):
        raise PlanError(f"λ grid has repeated values: {list(values)}")
    for v in values:
        if not math.isfinite(v) or not 0 <= v <= 1:
            raise PlanError(f"λ grid values must be finite numbers between 0 and 1, got {v}")
    return values


def select(
    method: str, plan: Plan, spec: InputSpec, rule: Rule, params: dict[str, Any], executor: Executor,
    grid: Sequence[float], evaluate: Evaluate | None = None, scratch: str | Path | None = None,
) -> tuple[list[float], dict[str, Any]]:
    """λ_t per task by ``method`` and the record stored as the manifest's ``lam_selection``."""
    if method == "auto":
        scores, extra = auto_scores(plan, spec, rule, params, executor, grid)
        record = {"method": "auto", "criterion": CRITERION, "grid": list(grid), **extra}
    else:
        assert evaluate is not None
        scores = search_scores(plan, spec, rule, params, executor, grid, evaluate, scratch)
        record = {"method": "search", "criterion": "evaluate", "grid": list(grid)}
    record["scores"] = {n: [float(s) for s in row] for n, row in zip(spec.names, scores)}
    return [best(grid, row) for row in scores], record


def best(grid: Sequence[float], scores: Sequence[float]) -> float:
    """The grid value of the highest score; among equal scores the largest λ."""
    return max(zip(scores, grid))[1]


def cosine(dot: float, rebuilt_sq: float, tau_sq: float) -> float:
    """``cos(m⊙τ_MTL, τ_t)`` from its sums; 1 when both vectors are 0, 0 when only one is."""
    if rebuilt_sq == 0 or tau_sq == 0:
        return 1.0 if rebuilt_sq == tau_sq else 0.0
    return dot / math.sqrt(rebuilt_sq * tau_sq)


def cosine_sums(block: Block, rule: Rule, params: dict[str, Any], grid: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per task and grid λ, this block's ``Σ m τ_MTL τ_t``, ``Σ m τ_MTL²``, ``Σ m``; and ``Σ τ_t²``.

    One task at a time, so the float64 temporaries stay at one row's size, not ``(T, n)``; the
    masks are those of :func:`~tallstore.ops.masks.tall_masks`.
    """
    tau = block.tau
    tau_mtl = rule.apply(tau, params)
    T = tau.shape[0]
    mtl64 = tau_mtl.to(torch.float64)
    mtl_sq = mtl64.square()
    sums = np.zeros((T, len(grid), 3))
    tau_sq = np.zeros(T)
    for t in range(T):
        tau64 = tau[t].to(torch.float64)
        prod = tau64 * mtl64
        tau_sq[t] = float(tau64.square().sum())
        for g, lam in enumerate(grid):
            m = tall_masks(tau[t : t + 1], tau_mtl, torch.tensor([lam]))[0]
            m64 = m.to(torch.float64)
            sums[t, g] = (float(torch.dot(m64, prod)), float(torch.dot(m64, mtl_sq)), np.count_nonzero(m.numpy()))
    return sums, tau_sq


def auto_scores(
    plan: Plan, spec: InputSpec, rule: Rule, params: dict[str, Any], executor: Executor, grid: Sequence[float],
) -> tuple[list[list[float]], dict[str, Any]]:
    """Cosine score of every task and grid value, in one streaming pass; plus mask densities."""
    T = len(spec.tasks)
    sums, tau_sq = run_pass(executor, spec, plan, partial(cosine_sums, rule=rule, params=params, grid=tuple(grid)))
    numel = sum(kp.info.numel for kp in plan.masked())
    scores = [[cosine(sums[t, g, 0], sums[t, g, 1], tau_sq[t]) for g in range(len(grid))] for t in range(T)]
    density = {n: [float(sums[t, g, 2] / numel) if numel else 0.0 for g in range(len(grid))] for t, n in enumerate(spec.names)}
    return scores, {"density": density}


def merged_bits(block: Block, rule: Rule, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One block's ``τ_MTL`` (float32) and the bits of ``θ_MTL`` exactly as the packer stores it."""
    tau_mtl = rule.apply(block.tau, params)
    return tau_mtl.numpy(), dtypes.to_storage(merged_weights(block.base, block.tasks, block.tau, tau_mtl)).view(np.uint8)


class MergedCache:
    """``τ_MTL`` and ``θ_MTL`` of every masked tensor in scratch files, filled in one pass.

    Rebuilding ``θ̂_t(λ)`` then reads only the base, task ``t`` and this cache, not every task.
    """

    def __init__(self, plan: Plan, spec: InputSpec, scratch: str | Path | None) -> None:
        self.spec = spec
        self.masked = {kp.key: kp for kp in plan.masked()}
        self._dir = tempfile.TemporaryDirectory(prefix=".tallstore-lam.", dir=scratch)
        self.elem: dict[str, int] = {}
        self.byte: dict[str, int] = {}
        n = nb = 0
        for kp in self.masked.values():
            self.elem[kp.key], self.byte[kp.key] = n, nb
            n += kp.info.numel
            nb += kp.info.numel * kp.info.dtype.itemsize
        root = Path(self._dir.name)
        self.tau_mtl = np.memmap(root / "tau_mtl", np.float32, "w+", shape=(n,)) if n else np.zeros(0, np.float32)
        self.merged = np.memmap(root / "merged", np.uint8, "w+", shape=(nb,)) if nb else np.zeros(0, np.uint8)

    def fill(self, rule: Rule, params: dict[str, Any], executor: Executor) -> None:
        """Compute every block of ``τ_MTL`` and ``θ_MTL`` on ``executor`` and store it."""
        fn = partial(merged_bits, rule=rule, params=params)
        units = [BlockPass(self.spec, kp, i, fn) for kp in self.masked.values() for i in range(len(kp.blocks))]
        with closing(executor.run(units)) as results:
            for unit, (mtl, bits) in results:
                kp = unit.kp
                at = kp.blocks[unit.index][0] * kp.info.row_numel
                self.tau_mtl[self.elem[kp.key] + at : self.elem[kp.key] + at + mtl.size] = mtl
                b0 = self.byte[kp.key] + at * kp.info.dtype.itemsize
                self.merged[b0 : b0 + bits.size] = bits

    def close(self) -> None:
        """Delete the scratch files."""
        self.tau_mtl = self.merged = np.zeros(0)
        self._dir.cleanup()

    def state_dict(self, t: int, lam: float) -> dict[str, torch.Tensor]:
        """Task ``t`` rebuilt with ``λ``, every tensor in the task's own order, as ``extract`` gives it."""
        got = inputs(self.spec)
        ck = got.tasks[t]
        out = {}
        for key in ck.keys:
            kp = self.masked.get(key)
            if kp is None:
                out[key] = ck.read(key)
            else:  # in the task's own dtype, rounded once (mixed dtypes), as extract gives it
                info, rows = ck.info(key), kp.info.rows
                rebuilt = self._rebuild(kp, got.base.read(key), ck.read(key, 0, rows), lam).to(info.dtype.torch)
                if info.rows > rows:  # a grown tensor: its extra rows are stored exactly
                    rebuilt = torch.cat([rebuilt, ck.read(key, rows, info.rows)])
                out[key] = rebuilt
        return out

    def _rebuild(self, kp: KeyPlan, base: torch.Tensor, task: torch.Tensor, lam: float) -> torch.Tensor:
        info = kp.info
        e0, b0 = self.elem[kp.key], self.byte[kp.key]
        tau_mtl = torch.from_numpy(np.array(self.tau_mtl[e0 : e0 + info.numel]))
        raw = np.array(self.merged[b0 : b0 + info.numel * info.dtype.itemsize])
        merged = dtypes.from_storage(raw.view(info.dtype.storage), info.dtype, (info.numel,))
        base = base.reshape(-1)
        tau = task.reshape(1, -1).to(torch.float32) - base.to(torch.float32)
        mask = tall_masks(tau, tau_mtl, torch.tensor([lam]))[0]
        base_bits = dtypes.to_storage(base.to(info.dtype.torch))
        out = dtypes.to_storage(merged) ^ base_bits
        rebuild_bits(out, base_bits, pack_mask(mask.numpy()))
        return dtypes.from_storage(out, info.dtype, info.shape)


def search_scores(
    plan: Plan, spec: InputSpec, rule: Rule, params: dict[str, Any], executor: Executor,
    grid: Sequence[float], evaluate: Evaluate, scratch: str | Path | None = None,
) -> list[list[float]]:
    """``evaluate(name, θ̂_t(λ))`` for every task and grid value, one task model in memory at a time."""
    cache = MergedCache(plan, spec, scratch)
    try:
        cache.fill(rule, params, executor)
        scores = []
        for t, name in enumerate(spec.names):
            row = []
            for lam in grid:
                sd = cache.state_dict(t, lam)
                value = evaluate(name, sd)
                del sd
                row.append(score(value, name, f"at λ={lam}"))
            scores.append(row)
        return scores
    finally:
        cache.close()


def score(value: object, name: str, what: str) -> float:
    """An ``evaluate`` result as a float; a one-line error naming the task and ``what`` was scored
    unless it is a finite number."""
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise PlanError(f"evaluate returned {value!r} for task {name!r} {what}; it must return a finite number")
    return out
