"""Accuracy on the real MiniLM zoo: fine-tuned, rebuilt from the archive, and merged models.

Per task (``benchmarks.zoo``: validation accuracy of the task's encoder + its own head):

- ``zero_shot``: the base encoder with the task's fine-tuned head (``Zoo.zero_shot``);
- ``finetuned``: the original checkpoint;
- ``rebuilt[<merge>-<λ>]``: the task rebuilt from an archive (``arc[task].state_dict()``) packed
  with ``merge`` = ``ta`` (TALL+TA) or ``ties`` (TALL+TIES, top 20%) and λ = ``fixed`` (0.4),
  ``search`` (``lam="search"`` with ``Zoo.evaluate`` as the callback, the paper's rule) or
  ``auto`` (``lam="auto"``, no data); ``normalized`` = rebuilt ÷ fine-tuned;
- ``merged[<method>]``: one merged encoder for all tasks, with each task's own head (the merged
  model leaves heads out; they come from the task's archive view): ``ta`` and ``ties``
  (``θ₀ + α·τ_MTL``), ``consensus_ta`` and ``consensus_ties`` (``θ₀ + α·(Σ_t m_t ≥ 2) ⊙ τ_MTL``,
  masks of the ``search`` archives). α is chosen from ``alpha_grid`` by the mean accuracy over
  tasks, as the paper does.

λ and α are chosen on the same validation split that is reported (the zoo has no test split), so
selected-λ and merged accuracies are optimistic by the selection's own noise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file

import tallstore

from .common import LAM, PACK_SECONDS, Config, archive, zoo_collection

NAME = "fidelity"
MERGES = ("ta", "ties")
SELECTIONS = ("fixed", "search", "auto")
K = 2
QUICK_T = 2  # tasks of the quick zoo evaluated in a --quick run
ZOO_FIELDS = ("description", "source", "labels", "n_train", "n_val", "majority_acc", "build_seconds")
MERGED = {  # label: (archive merge rule, Archive.merge method)
    "ta": ("ta", "ta"),
    "ties": ("ties", "ties"),
    "consensus_ta": ("ta", "consensus"),
    "consensus_ties": ("ties", "consensus"),
}


def with_heads(merged: Mapping[str, torch.Tensor], view: tallstore.TaskView) -> dict[str, torch.Tensor]:
    """A merged encoder plus the task's own tensors the merged model lacks (its head)."""
    return {**merged, **{k: view[k] for k in view if k not in merged}}


def grids(quick: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The λ grid for ``search``/``auto`` and the α grid for merged models."""
    if quick:
        return (0.2, 0.6), (1.0,)
    return (0.2, 0.3, 0.4, 0.5, 0.6), tuple(round(0.1 * i, 1) for i in range(1, 11))


def run(cfg: Config) -> dict[str, Any]:
    """Evaluate every model of the zoo's tasks; JSON-ready results."""
    from .zoo import QUICK_TASKS

    coll, zoo = zoo_collection(cfg.quick, cfg.zoo_tasks or (list(QUICK_TASKS[:QUICK_T]) if cfg.quick else None))
    lam_grid, alpha_grid = grids(cfg.quick)
    tasks = zoo.tasks
    per: dict[str, dict[str, Any]] = {}
    for t in tasks:
        per[t] = {"zero_shot": zoo.zero_shot(t), "finetuned": zoo.evaluate(t, load_file(zoo.task_paths[t])),
                  "rebuilt": {}, "lam": {}, "density": {}, "rebuild_error": {}, "merged": {}}
    archives: dict[str, tallstore.Archive] = {}
    packs: dict[str, dict[str, Any]] = {}
    for merge in MERGES:
        for sel in SELECTIONS:
            name = f"{merge}-{sel}"
            options: dict[str, Any] = {} if merge == "ta" else {"merge": merge}
            if sel != "fixed":
                options |= {"lam": sel, "lam_grid": lam_grid}
            if sel == "search":
                options["evaluate"] = zoo.evaluate
            path = archive(cfg.work, coll, name="" if name == "ta-fixed" else name, **options)
            arc = archives[name] = tallstore.open(path, base=coll.base)
            facts = arc.describe(sizes=False)
            packs[name] = {"seconds": PACK_SECONDS.get(str(path)), "lam_selection": facts["lam_selection"]}
            for i, t in enumerate(arc.tasks):
                stats = facts["tasks"][i]
                per[t]["rebuilt"][name] = zoo.evaluate(t, arc[t].state_dict())
                per[t]["lam"][name] = facts["lam"][i]
                per[t]["density"][name] = stats["mask_density"]
                per[t]["rebuild_error"][name] = stats["rebuild_error"]
            print(f"  {name}: λ {[per[t]['lam'][name] for t in tasks]}, normalized "
                  f"{[round(per[t]['rebuilt'][name] / per[t]['finetuned'], 3) for t in tasks]}", flush=True)
    merged: dict[str, dict[str, Any]] = {}
    for label, (rule, method) in MERGED.items():
        arc = archives[f"{rule}-search"]
        scores: dict[str, dict[str, float]] = {}
        for alpha in alpha_grid:
            t0 = time.perf_counter()
            view = arc.merge(method, k=K if method == "consensus" else None, alpha=alpha)
            sd = view.state_dict()
            scores[str(alpha)] = {t: zoo.evaluate(t, with_heads(sd, arc[t])) for t in tasks}
            del sd
            print(f"  {label} α={alpha}: mean {statistics.mean(scores[str(alpha)].values()):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        best = max(alpha_grid, key=lambda a: (statistics.mean(scores[str(a)].values()), -a))
        merged[label] = {"alpha": best, "k": K if method == "consensus" else None,
                         "mean_by_alpha": {a: statistics.mean(s.values()) for a, s in scores.items()}}
        for t in tasks:
            per[t]["merged"][label] = scores[str(best)][t]
    for t in tasks:
        ft = per[t]["finetuned"]
        per[t]["normalized"] = {k: v / ft for k, v in per[t]["rebuilt"].items()}
        per[t]["merged_normalized"] = {k: v / ft for k, v in per[t]["merged"].items()}
    zm = zoo.manifest
    return {
        "zoo": {"root": str(zoo.root), "quick": cfg.quick, "base": zm["base"], "config": zm["config"],
                "build_seconds": sum(zm["tasks"][t]["build_seconds"] for t in tasks),
                "tasks": {t: {k: zm["tasks"][t][k] for k in ZOO_FIELDS} for t in tasks}},
        "tasks": tasks, "fixed_lam": LAM, "lam_grid": list(lam_grid), "alpha_grid": list(alpha_grid), "k": K,
        "archives": packs, "merged": merged, "per_task": per, "mean": means(per, tasks),
    }


def means(per: dict[str, dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Averages over tasks of every accuracy and normalized accuracy."""
    out: dict[str, Any] = {"zero_shot": statistics.mean(per[t]["zero_shot"] for t in tasks),
                           "finetuned": statistics.mean(per[t]["finetuned"] for t in tasks)}
    for group in ("rebuilt", "normalized", "merged", "merged_normalized"):
        out[group] = {k: statistics.mean(per[t][group][k] for t in tasks) for k in per[tasks[0]][group]}
    return out
