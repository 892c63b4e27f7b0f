"""Float64 sums of squares over float blocks (``Σ (a − b)²``, ``Σ a²``), in one numba pass.

The packer reports each task's relative rebuild error ``‖θ̂_t − θ_t‖ / ‖τ_t‖`` and the norms
behind its warnings; summing in float64 without float64 copies of a block keeps those checks
at one read of it. Elements are widened to float64 before they are subtracted, so a difference
of two float32 or bfloat16 values is exact.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

LANES = 8  # independent accumulators: the sum is not one dependent chain of adds


@njit(cache=True, nogil=True)
def _squares(a: np.ndarray, b: np.ndarray, subtract: bool) -> float:
    acc = np.zeros(LANES)
    n = a.size
    body = n - n % LANES
    for i in range(0, body, LANES):
        for j in range(LANES):
            d = np.float64(a[i + j]) - np.float64(b[i + j]) if subtract else np.float64(a[i + j])
            acc[j] += d * d
    for i in range(body, n):
        d = np.float64(a[i]) - np.float64(b[i]) if subtract else np.float64(a[i])
        acc[0] += d * d
    return acc.sum()


def _flat(t: torch.Tensor) -> np.ndarray:
    """A flat float32 or float64 view (half-precision widened to float32, exactly)."""
    flat = t.reshape(-1)
    return (flat if flat.dtype in (torch.float32, torch.float64) else flat.to(torch.float32)).contiguous().numpy()


def squared_distance(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """``Σ (a − b)²`` over two float tensors of one size, or ``Σ a²`` without ``b`` (float64)."""
    fa = _flat(a)
    return float(_squares(fa, fa if b is None else _flat(b), b is not None))
