"""What a pack decides before it writes: which tasks are TALL, the plan over them, the read-only
pre-passes (unrelated base, NaN/Inf, the merge rule's statistics, λ selection)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..locations import is_url, local_path
from . import lam as lam_select
from .collection import Collection
from .executors import Executor
from .inputs import InputSpec
from .inputs import release as release_inputs
from .options import PackOptions
from .passes import check_related, nonfinite_keys, tau_pass
from .plan import Plan, make_plan


@dataclass
class Prepared:
    """The TALL tasks (indices into the collection), the plan and the inputs over them, the merge
    rule's parameters, each TALL task's λ and how it was chosen."""

    tall: list[int]
    plan: Plan
    inputs: InputSpec
    params: dict[str, Any]
    lams: list[float]
    selection: dict[str, Any]

    def lam(self, t: int) -> float:
        """Task ``t``'s λ; 0 for a task stored exactly (no mask, λ unused)."""
        return self.lams[self.tall.index(t)] if t in self.tall else 0.0


def prepare(
    c: Collection, tall: list[int], options: PackOptions, ex: Executor, out: str | os.PathLike[str],
    storage_options: dict[str, Any] | None,
) -> Prepared:
    """Plan the pack of the TALL tasks ``tall`` (the others kept exactly whole) and run the
    read-only pre-passes over them."""
    names = [c.names[t] for t in tall]
    cks = [c.tasks[t] for t in tall]
    stored = [(c.names[t], c.tasks[t]) for t in range(len(c.names)) if t not in tall]
    plan = make_plan(c.base, cks, names, options.block_elems, options.exact, stored=stored)
    inputs = InputSpec(
        token=uuid.uuid4().hex, base=c.base_location, tasks=tuple(c.sources[t] for t in tall),
        names=tuple(names), storage_options=storage_options, allow_nonfinite=options.allow_nonfinite,
    )
    lams = [c.lams[t] for t in tall] if c.lams else []
    selection: dict[str, Any] = {"method": "fixed"}
    try:
        if not options.allow_unrelated_base and plan.masked():
            check_related(ex, inputs, plan)
        if options.allow_nonfinite:
            odd = nonfinite_keys(ex, inputs, plan)
            if odd:
                plan = make_plan(c.base, cks, names, options.block_elems, options.exact, frozenset(odd), stored)
        numel = sum(kp.info.numel for kp in plan.masked())
        params = options.rule.prepare(tau_pass(ex, inputs, plan), numel, names) if plan.masked() else {}
        if isinstance(options.lam, str) and names:
            lams, selection = lam_select.select(
                options.lam, plan, inputs, options.rule, params, ex, options.lam_grid, options.evaluate, _scratch(out),
            )
    finally:
        ex.broadcast(release_inputs, inputs)
    return Prepared(tall, plan, inputs, params, lams, selection)


def _scratch(out: str | os.PathLike[str]) -> Path | None:
    """Scratch space for λ search: beside a local output (same disk), else the system temp dir."""
    if is_url(out):
        return None
    parent = local_path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent
