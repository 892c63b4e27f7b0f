"""Which tasks a pack stores whole, each on its own, instead of as TALL masks: all of them
(``lossless``, or a delta ``fidelity`` preset), or those whose rebuild error would exceed the
user's floor (``max_rebuild_error``).

The floor is met by measurement, not estimate: a read-only pass computes every task's rebuild
error exactly as the pack would store it; tasks above the floor leave the merge, which changes
``τ_MTL`` and so the others' errors, and the pass runs again until every TALL task is within the
floor (at most once per task). With ``fidelity="auto"`` each task's delta step is chosen by the
user's ``evaluate`` on the model the pack will store.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..checkpoint.tasks import original_key
from .collection import Collection
from .executors import Executor
from .inputs import release as release_inputs
from .lam import score
from .options import PackOptions
from .passes import run_pass
from .prepare import Prepared, prepare
from .units import delta_blocks, delta_codable, rebuild_sums


@dataclass
class Choice:
    """What the pack stores how: the tasks stored on their own (indices into the collection),
    the delta step of each of them (None: exactly), how each step was chosen, and the pack
    prepared over the TALL tasks."""

    stored: list[int]
    steps: dict[int, float | None]
    records: dict[int, dict[str, Any]]
    prepared: Prepared


def choose(
    c: Collection, options: PackOptions, ex: Executor, out: str | os.PathLike[str],
    storage_options: dict[str, Any] | None,
) -> Choice:
    """Which tasks are stored on their own, and how; the pack prepared over the others."""
    n = len(c.names)
    if options.delta:
        steps, records = _delta_steps(c, options)
        return Choice(list(range(n)), steps, records, prepare(c, [], options, ex, out, storage_options))
    exact: set[int] = set(range(n)) if options.lossless else set()
    records: dict[int, dict[str, Any]] = {}
    while True:
        tall = [t for t in range(n) if t not in exact]
        p = prepare(c, tall, options, ex, out, storage_options)
        if options.max_rebuild_error is None or not tall:
            break
        over = {t: e for t, e in zip(tall, rebuild_errors(p, options, ex)) if e > options.max_rebuild_error}
        if not over:
            break
        exact |= set(over)
        records |= {t: {"method": "max_rebuild_error", "floor": options.max_rebuild_error, "rebuild_error": e}
                    for t, e in over.items()}
    return Choice(sorted(exact), dict.fromkeys(sorted(exact)), records, p)


def _delta_steps(c: Collection, options: PackOptions) -> tuple[dict[int, float | None], dict[int, dict[str, Any]]]:
    """Each task's delta step: the preset's, or (``auto``) the coarsest step of the grid whose
    rebuilt model scores at least ``target`` of the fine-tune's own score under ``evaluate`` —
    the very model the pack then stores (same kernel, same dither) — else None (exact)."""
    n = len(c.names)
    if options.fidelity != "auto":
        return dict.fromkeys(range(n), options.delta_step), {}
    assert options.evaluate is not None
    steps: dict[int, float | None] = {}
    records: dict[int, dict[str, Any]] = {}
    for t, name in enumerate(c.names):
        reference = score(options.evaluate(name, _state_dict(c, t, None, options.block_elems)), name, "as fine-tuned")
        floor = reference - (1 - options.fidelity_target) * abs(reference)
        scores: dict[str, float] = {}
        steps[t] = None
        for step in options.fidelity_grid:
            value = score(options.evaluate(name, _state_dict(c, t, step, options.block_elems)), name, f"step {step:g}")
            scores[f"{step:g}"] = value
            if value >= floor:
                steps[t] = step
                break
        records[t] = {"method": "evaluate", "target": options.fidelity_target, "reference": reference,
                      "scores": scores, "grid": list(options.fidelity_grid)}
    return steps, records


def _state_dict(c: Collection, t: int, step: float | None, block_elems: int) -> dict[str, torch.Tensor]:
    """Task ``t`` as extract gives it, delta-coded with ``step`` (None: as fine-tuned)."""
    ck = c.tasks[t]
    out = {}
    for key in ck.keys:
        if step is not None and delta_codable(ck, c.base, key):
            shape = ck.info(key).shape
            out[original_key(ck, key)] = torch.cat(
                [r for *_, r in delta_blocks(ck, c.base, key, step, t, block_elems)]).reshape(shape)
        else:
            out[original_key(ck, key)] = ck.read(key)
    return out



def rebuild_errors(p: Prepared, options: PackOptions, ex: Executor) -> list[float]:
    """Each TALL task's relative rebuild error ``‖θ̂_t − θ_t‖ / ‖τ_t‖`` over the masked tensors,
    as the pack records it."""
    if not p.plan.masked():
        return [0.0] * len(p.tall)
    fn = partial(rebuild_sums, rule=options.rule, params=p.params, lams=tuple(p.lams), shared=options.shared)
    try:
        sq_err, tau_sq = run_pass(ex, p.inputs, p.plan, fn)
    finally:
        ex.broadcast(release_inputs, p.inputs)
    return [math.sqrt(e / s) if s else 0.0 for e, s in zip(sq_err, tau_sq)]
