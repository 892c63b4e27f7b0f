"""Rate–fidelity on the real zoo: stored bits per parameter per task against normalized test accuracy.

Every method stores the same fine-tuned checkpoints of ``benchmarks.zoo``, with the base external and each
task's head kept exact. Two modules of ``benchmarks.run``: ``rate`` measures the T = 8 zoo and ``rate_wide``
the T = 20 "wide" zoo (``--quick``: three and two tasks of the quick zoo); the report plots both.

- ``tallstore_compact``/``_balanced``/``_high``: ``tallstore.pack(fidelity=...)``, each task delta-coded on its
  own (κ fixed by the preset); ``dial`` then picks, per accuracy target, the smallest preset whose mean normalized
  *validation* accuracy reaches it, and reports its test accuracy. ``tallstore_int4``: TALL with the 4-bit
  shared vector (``shared_bits=4``), λ searched on validation as below.
- ``tallstore``: ``tallstore.pack`` with the paper's TALL+TA, lossless shared vector; λ per task searched on
  validation from ``LAM_GRID`` (one archive packed per grid value, each task scored on its validation split,
  ties to the larger λ as ``lam="search"`` does), then the collection packed once with the chosen λ per task.
  Counted: every byte of the archive on disk (shared vector, masks, heads and other exact tensors, metadata).
- ``emr``, ``bitdelta``, ``int2``/``int3``/``int4``: the peers of ``benchmarks.peers``, computed here from the
  task vectors of the base's tensors. Counted: the peer's serialized bytes (``peers.serialize``, zstd level
  ``peers.ZSTD_LEVEL``) plus each task's head serialized the same way (float32, exact).

bits/param/task = 8 × stored bytes ÷ (P × T), P = the base's parameter count; a peer's per-task
``own_bits_per_param`` = 8 × (that task's bytes + its head's) ÷ P, its shared bytes left out (tallstore's
per-task parts live inside the archive's layout, which this module does not read). Accuracy is each task's encoder
with its own head; normalized = accuracy of the rebuilt model ÷ accuracy of the fine-tuned checkpoint on the
same split. Hyper-parameters (tallstore's λ) are chosen on validation only; test accuracy is reported. One
test example of task t is worth 100 / n_test(t) accuracy points of that task.

A method is one function ``Inputs -> Representation`` in ``METHODS``; a tallstore preset is another call of
``tallstore_method`` with its pack options.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import tallstore

from . import peers
from .common import RESULTS, Collection, Config, archive, param_count, tree_bytes

NAME = "rate"
WIDE_NAME = "rate_wide"
LAM_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
QUICK_LAM_GRID = (0.2, 0.6)
SPLITS = ("val", "test")
DIAL_TARGETS = (0.990, 0.995, 0.999)  # the targets: ≥ 99.0% at ≤ 0.75 bit, ≥ 99.5% at ≤ 1.0, ≥ 99.9% at ≤ 1.5


@dataclass
class Inputs:
    """What every method receives: one zoo's checkpoints, as files and as task vectors."""

    zoo: Any  # benchmarks.zoo.Zoo (imported lazily: it pulls in transformers)
    coll: Collection
    base: dict[str, torch.Tensor]
    taus: dict[str, dict[str, torch.Tensor]]  # task → base key → θ_t − θ₀ (float32)
    heads: dict[str, dict[str, torch.Tensor]]  # task → its tensors that the base lacks
    work: Path
    lam_grid: tuple[float, ...]


@dataclass
class Representation:
    """One method's stored form of a collection."""

    stored_bytes: int
    parts: dict[str, int]  # where the bytes go (sums to stored_bytes)
    counted: str  # what is counted, in words
    state_dict: Callable[[str], dict[str, torch.Tensor]]  # task → rebuilt encoder + head
    choices: dict[str, Any] = field(default_factory=dict)  # hyper-parameters chosen on validation
    task_bytes: dict[str, int] | None = None  # each task's own bytes, where the method keeps them apart


def tallstore_method(inp: Inputs, name: str = "", **options: Any) -> Representation:
    """tallstore with λ per task chosen on validation; ``options`` go to every ``tallstore.pack``."""
    val: dict[str, dict[float, float]] = {t: {} for t in inp.coll.tasks}
    for lam in inp.lam_grid:
        arc = tallstore.open(archive(inp.work, inp.coll, name=f"rate{name}-lam{lam:g}", lam=lam, **options),
                             base=inp.coll.base)
        for t in inp.coll.tasks:
            val[t][lam] = inp.zoo.evaluate(t, arc[t].state_dict(), "val")
    chosen = {t: max((score, lam) for lam, score in val[t].items())[1] for t in inp.coll.tasks}
    path = archive(inp.work, inp.coll, name=f"rate{name}-chosen", lam=chosen, **options)
    arc = tallstore.open(path, base=inp.coll.base)
    parts = ({p.name: tree_bytes(p) for p in sorted(path.iterdir())} if path.is_dir()
             else {"archive": tree_bytes(path)})
    return Representation(
        tree_bytes(path), parts, "the archive's bytes on disk (base external)",
        lambda t: arc[t].state_dict(),
        {"lam": chosen, "val_by_lam": {t: {f"{lam:g}": s for lam, s in v.items()} for t, v in val.items()}})


def preset_method(inp: Inputs, fidelity: str) -> Representation:
    """tallstore's delta preset ``fidelity`` (κ fixed by the preset, nothing chosen per collection)."""
    path = archive(inp.work, inp.coll, name=f"rate-{fidelity}", fidelity=fidelity)
    arc = tallstore.open(path, base=inp.coll.base)
    parts = {p.name: tree_bytes(p) for p in sorted(path.iterdir())}
    own = {t: tree_bytes(path / "deltas" / str(i)) + sum(tree_bytes(e) for e in path.glob(f"tensors/*/exact/{i}"))
           for i, t in enumerate(inp.coll.tasks)}
    return Representation(tree_bytes(path), parts, "the archive's bytes on disk (base external)",
                          lambda t: arc[t].state_dict(), {"fidelity": fidelity}, task_bytes=own)


def dial_choices(methods: dict[str, Any], targets: tuple[float, ...] = DIAL_TARGETS) -> list[dict[str, Any]]:
    """For each target, the smallest tallstore preset whose mean normalized *validation* accuracy reaches
    it (the choice a user with a validation split makes), with its test accuracy."""
    ours = {m: x for m, x in methods.items() if m.startswith("tallstore")}
    out = []
    for target in targets:
        ok = [m for m, x in ours.items() if x["mean_normalized_val"] >= target]
        best = min(ok, key=lambda m: ours[m]["bits_per_param_task"]) if ok else None
        out.append({"target": target, "method": best,
                    **({} if best is None else {k: ours[best][k] for k in (
                        "bits_per_param_task", "mean_normalized_val", "mean_normalized_test", "worst_task",
                        "worst_normalized_test")})})
    return out


def peer_method(inp: Inputs, encode: Callable[[peers.TaskVectors], peers.Encoded], stores: str) -> Representation:
    """A peer of ``benchmarks.peers`` on the task vectors (``stores`` says what it keeps), heads stored exact."""
    enc = encode(inp.taus)
    head_bytes = {t: len(peers.serialize({k: v.numpy() for k, v in h.items()})) for t, h in inp.heads.items()}

    def state_dict(t: str) -> dict[str, torch.Tensor]:
        return {**{k: inp.base[k] + v for k, v in enc.task_vector(t).items()}, **inp.heads[t]}

    parts = {"shared": len(enc.shared), "per_task": sum(len(b) for b in enc.per_task.values()),
             "heads": sum(head_bytes.values())}
    return Representation(sum(parts.values()), parts,
                          f"{stores}; each task's head (float32); all serialized, zstd level {peers.ZSTD_LEVEL}",
                          state_dict, task_bytes={t: len(b) + head_bytes[t] for t, b in enc.per_task.items()})


METHODS: dict[str, Callable[[Inputs], Representation]] = {
    "tallstore": tallstore_method,
    "tallstore_int4": partial(tallstore_method, name="-int4", shared_bits=4),
    **{f"tallstore_{f}": partial(preset_method, fidelity=f) for f in ("compact", "balanced", "high")},
    "emr": partial(peer_method, encode=peers.emr,
                   stores="the unified vector (float32) once; per task a 1-bit mask and a float32 rescaler"),
    "bitdelta": partial(peer_method, encode=peers.bitdelta,
                        stores="per task 1 sign bit per parameter and a float32 scale per row"),
    **{f"int{b}": partial(peer_method, encode=partial(peers.quantized, bits=b),
                          stores=f"per task {b}-bit codes ({peers.code_width(b)} bits each, packed) and a float32 "
                                 "scale per row")
       for b in (4, 3, 2)},
}


def load_inputs(zoo: Any, variant: str, work: Path, lam_grid: tuple[float, ...]) -> Inputs:
    """The zoo as a ``Collection`` plus its base, task vectors (float32) and heads in memory."""
    n = len(zoo.tasks)
    coll = Collection(f"zoo-{variant}-T{n}", f"real MiniLM zoo ({variant}) float32, T={n}", zoo.base_path,
                      dict(zoo.task_paths), "float32", param_count(zoo.base_path))
    base = load_file(zoo.base_path)
    taus, heads = {}, {}
    for t, path in zoo.task_paths.items():
        sd = load_file(path)
        taus[t] = {k: sd[k].float() - v.float() for k, v in base.items()}
        heads[t] = {k: v for k, v in sd.items() if k not in base}
    return Inputs(zoo, coll, base, taus, heads, work, lam_grid)


def measure(inp: Inputs, methods: dict[str, Callable[[Inputs], Representation]]) -> dict[str, Any]:
    """Fine-tuned accuracy, then every method's bytes and per-task val/test accuracy, on one zoo."""
    zoo, tasks = inp.zoo, list(inp.coll.tasks)
    finetuned = {t: {s: zoo.evaluate(t, load_file(inp.coll.tasks[t]), s) for s in SPLITS} for t in tasks}
    n = {t: {s: zoo.n_examples(t, s) for s in SPLITS} for t in tasks}
    out: dict[str, Any] = {}
    for name, method in methods.items():
        t0 = time.perf_counter()
        rep = method(inp)
        per = {}
        for t in tasks:
            sd = rep.state_dict(t)
            acc = {s: zoo.evaluate(t, sd, s) for s in SPLITS}
            own = None if rep.task_bytes is None else 8 * rep.task_bytes[t] / inp.coll.params
            per[t] = {**acc, **{f"normalized_{s}": acc[s] / finetuned[t][s] for s in SPLITS},
                      "own_bits_per_param": own}
            del sd
        worst = min(tasks, key=lambda t: per[t]["normalized_test"])
        out[name] = {
            "stored_bytes": rep.stored_bytes, "parts": rep.parts, "counted": rep.counted,
            "bits_per_param_task": 8 * rep.stored_bytes / (inp.coll.params * len(tasks)),
            "choices": rep.choices, "per_task": per,
            **{f"mean_normalized_{s}": statistics.mean(per[t][f"normalized_{s}"] for t in tasks) for s in SPLITS},
            "worst_task": worst, "worst_normalized_test": per[worst]["normalized_test"],
            "seconds": time.perf_counter() - t0,
        }
        print(f"  T={len(tasks)} {name}: {out[name]['bits_per_param_task']:.3f} bits/param/task, normalized "
              f"test {out[name]['mean_normalized_test']:.4f} (worst {worst} "
              f"{out[name]['worst_normalized_test']:.4f}), {out[name]['seconds']:.0f} s", flush=True)
    # One test example of task t moves the mean normalized accuracy by 100 / (T · n_test · acc_ft) points.
    return {
        "tasks": tasks, "params": inp.coll.params, "raw_bytes": inp.coll.raw_bytes,
        "finetuned": finetuned, "n": n,
        "points_per_test_example": {t: 100 / n[t]["test"] for t in tasks},
        "mean_points_per_test_example": statistics.mean(
            100 / (len(tasks) * n[t]["test"] * finetuned[t]["test"]) for t in tasks),
        "zoo": {"root": str(zoo.root), "config": zoo.manifest["config"], "base": zoo.manifest["base"],
                "build_seconds": sum(zoo.manifest["tasks"][t]["build_seconds"] for t in tasks),
                "tasks": {t: {k: zoo.manifest["tasks"][t][k] for k in ("description", "source", "labels",
                                                                        "n_train", "n_val", "n_test")}
                          for t in tasks}},
        "methods": out,
        "dial": dial_choices(out),
    }


def measure_zoo(cfg: Config, variant: str, tasks: list[str] | None, name: str = NAME) -> dict[str, Any]:
    """Every method of ``METHODS`` on one zoo variant (built first if missing); JSON-ready.

    ``RATE_METHODS=a,b`` in the environment measures only those methods and keeps every other
    method's figures from the module's previous results on the same checkpoints, marked
    ``reused_from`` with when they were measured (accuracy and bytes do not depend on the load)."""
    from .zoo import build_zoo

    lam_grid = QUICK_LAM_GRID if cfg.quick else LAM_GRID
    zoo = build_zoo(tasks=tasks, variant=variant)
    inp = load_inputs(zoo, variant, cfg.work, lam_grid)
    only = [m for m in os.environ.get("RATE_METHODS", "").split(",") if m]
    unknown = sorted(set(only) - set(METHODS))
    if unknown:
        raise ValueError(f"RATE_METHODS names unknown methods {unknown}; known: {', '.join(METHODS)}")
    got = measure(inp, {m: METHODS[m] for m in only} if only else METHODS)
    if only:
        previous = json.loads((RESULTS / ("quick" if cfg.quick else "") / f"{name}.json").read_text())
        old = previous["results"]["collections"][0]
        if old["tasks"] != got["tasks"] or old["finetuned"] != got["finetuned"]:
            raise ValueError("the previous results are of other checkpoints: run every method")
        kept = {m: {**x, "reused_from": x.get("reused_from", previous["meta"]["finished"])}
                for m, x in old["methods"].items() if m not in only}
        got["methods"] = {m: got["methods"].get(m) or kept[m] for m in METHODS if m in got["methods"] or m in kept}
        got["dial"] = dial_choices(got["methods"])
    return {"lam_grid": list(lam_grid), "zstd_level": peers.ZSTD_LEVEL, "splits": list(SPLITS),
            "collections": [{"variant": variant, **got}]}


def run(cfg: Config) -> dict[str, Any]:
    """``rate``: the T = 8 zoo (``--zoo-tasks`` for a subset); ``--quick``: the quick zoo."""
    return measure_zoo(cfg, "quick" if cfg.quick else "full", cfg.zoo_tasks)


def run_wide(cfg: Config) -> dict[str, Any]:
    """``rate_wide``: the T = 20 zoo; ``--quick``: two tasks of the quick zoo, standing in for a second T."""
    from .zoo import QUICK_TASKS

    return measure_zoo(cfg, "quick", list(QUICK_TASKS[:2]), WIDE_NAME) if cfg.quick else measure_zoo(cfg, "wide", None, WIDE_NAME)
