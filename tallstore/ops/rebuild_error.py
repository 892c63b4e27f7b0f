"""Squared rebuild error and task-vector norm of one block, in one float64 pass (numba).

The packer reports every task's relative rebuild error ``‖θ̂_t − θ_t‖ / ‖τ_t‖``; summing in
float64 over float32 inputs without float64 copies of the block keeps that check at one read.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

LANES = 8  # independent accumulators: the sums are not one dependent chain of adds


@njit(cache=True, nogil=True)
def _sums(rebuilt: np.ndarray, task: np.ndarray, tau: np.ndarray) -> tuple[float, float]:
    err = np.zeros(LANES)
    sq = np.zeros(LANES)
    n = rebuilt.size
    body = n - n % LANES
    for i in range(0, body, LANES):
        for j in range(LANES):
            d = np.float64(rebuilt[i + j]) - np.float64(task[i + j])
            err[j] += d * d
            v = np.float64(tau[i + j])
            sq[j] += v * v
    for i in range(body, n):
        d = np.float64(rebuilt[i]) - np.float64(task[i])
        err[0] += d * d
        v = np.float64(tau[i])
        sq[0] += v * v
    return err.sum(), sq.sum()


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).to(torch.float32).numpy()


def error_sums(rebuilt: torch.Tensor, task: torch.Tensor, tau: torch.Tensor) -> tuple[float, float]:
    """``Σ (θ̂ − θ_t)²`` and ``Σ τ_t²`` (float64 sums) of one flat block: the rebuild, the task's
    weights and its float32 task vector."""
    return _sums(_f32(rebuilt), _f32(task), _f32(tau))
