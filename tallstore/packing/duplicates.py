"""Duplicates in a collection: the same fine-tune given twice, and task vectors nearly parallel.

The same input packed under two names would enter the merge twice and rebuild as θ₀ + 2τ;
it is stored once and the second name becomes an alias. Two different tasks whose task vectors
are nearly parallel (cosine above :data:`NEAR_COSINE`) interfere the same way without being equal:
the packer warns, naming the pair and the rebuild errors measured, with the remedy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..checkpoint import Checkpoint
from ..checkpoint.opening import open_file
from ..storage.digests import probe

NEAR_COSINE = 0.9
NEAR_ERROR = 0.05  # a pair whose rebuilds are both this close (relative error) has nothing to warn about


def identical_inputs(tasks: Sequence[Checkpoint], storage_options: dict | None = None) -> dict[int, int]:
    """``{duplicate index: first index}`` for tasks whose weights are byte-for-byte those of an
    earlier task: same structure and probe rows first (cheap), then every file's SHA-256."""
    probes = [(tuple(ck.keys), tuple(ck.info(k) for k in ck.keys), probe(ck)) for ck in tasks]
    hashes: dict[int, tuple[str, ...]] = {}

    def content(i: int) -> tuple[str, ...]:
        if i not in hashes:
            digests = []
            for f in tasks[i].files:
                src = open_file(f.location, storage_options)
                try:
                    digests.append(src.sha256())
                finally:
                    src.close()
            hashes[i] = tuple(digests)
        return hashes[i]

    out: dict[int, int] = {}
    for i in range(len(tasks)):
        for j in range(i):
            if j not in out and probes[i] == probes[j] and content(i) == content(j):
                out[i] = j
                break
    return out


def near_duplicates(gram: np.ndarray, names: Sequence[str], errors: Sequence[float]) -> list[str]:
    """Warnings for task pairs whose task vectors have a cosine above :data:`NEAR_COSINE` and one of
    whose rebuild errors exceeds :data:`NEAR_ERROR` (``gram``: the ``(T, T)`` inner products of the
    task vectors over the masked tensors)."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    out = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if norms[i] == 0 or norms[j] == 0:
                continue
            cos = float(gram[i, j] / (norms[i] * norms[j]))
            if math.isfinite(cos) and cos > NEAR_COSINE and max(errors[i], errors[j]) > NEAR_ERROR:
                out.append(
                    f"tasks {names[i]!r} and {names[j]!r} have nearly parallel task vectors (cosine {cos:.3f} > "
                    f"{NEAR_COSINE}): their TALL rebuilds interfere (rebuild errors {errors[i]:.3f} and {errors[j]:.3f}); "
                    "if that is too much, store the tasks each on its own (--fidelity balanced) or the worse "
                    "one exactly (--max-rebuild-error)"
                )
    return out
