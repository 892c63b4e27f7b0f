"""Task vectors, TALL masks and the merged weights they select from (Wang et al., ICML 2024).

All functions are pure and work on one block of one tensor across tasks at a time: ``tau`` is a
``(T, n)`` float32 stack of task vectors, ``tau_mtl`` the ``(n,)`` merged task vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit


def task_vectors(base: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """``τ_t = θ_t − θ₀`` in float32 for a ``(T, n)`` stack of task weights (one float32
    ``(T, n)`` buffer, written in one pass when the weights are float32)."""
    if tasks.dtype == torch.float32 and base.dtype == torch.float32:
        out = np.empty(tuple(tasks.shape), dtype=np.float32)
        _differences(tasks.reshape(tasks.shape[0], -1).contiguous().numpy(), base.reshape(-1).contiguous().numpy(),
                     out.reshape(tasks.shape[0], -1))
        return torch.from_numpy(out)
    return tasks.to(torch.float32, copy=True).sub_(base.to(torch.float32))


@njit(cache=True, nogil=True)
def _differences(tasks: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
    for t in range(tasks.shape[0]):
        for i in range(tasks.shape[1]):
            out[t, i] = tasks[t, i] - base[i]


def task_sum(tau: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
    """``Σ_t τ_t`` over ``rows`` of ``tau`` (default all) in float32, in task order
    (``((τ_0 + τ_1) + τ_2) + …``), one row at a time, without copying the stack.

    ``tensor.sum(dim=0)`` associates the tail of a row differently from its body, so τ_MTL (and
    the archive) would depend on the block size.
    """
    order = list(range(tau.shape[0])) if rows is None else list(rows)
    out = tau[order[0]].clone()
    for t in order[1:]:
        out += tau[t]
    return out


@njit(cache=True, nogil=True)
def _tall_masks(tau: np.ndarray, tau_mtl: np.ndarray, lam: np.ndarray, out: np.ndarray) -> None:
    for t in range(tau.shape[0]):
        lt = lam[t]
        for i in range(tau.shape[1]):
            x = tau[t, i]
            out[t, i] = abs(x) > lt * abs(tau_mtl[i] - x)


def tall_masks(tau: torch.Tensor, tau_mtl: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` (strict, elementwise) as a ``(T, n)`` bool tensor.

    One fused float32 pass per task (``|τ_MTL − τ_t|`` rounded, times λ_t rounded, compared),
    no temporaries.
    """
    masks = np.empty(tuple(tau.shape), dtype=np.bool_)
    _tall_masks(tau.to(torch.float32).reshape(tau.shape[0], -1).contiguous().numpy(),
                tau_mtl.to(torch.float32).reshape(-1).contiguous().numpy(),
                lam.to(torch.float32).numpy(), masks.reshape(tau.shape[0], -1))
    return torch.from_numpy(masks)


def merged_weights(
    base: torch.Tensor, tasks: torch.Tensor, tau: torch.Tensor, tau_mtl: torch.Tensor
) -> torch.Tensor:
    """``θ_MTL = θ₀ + τ_MTL`` in the tasks' dtype, exact where the merge reproduces a task.

    Where ``τ_MTL`` equals some nonzero ``τ_t`` (one task, or disjoint supports) the value is that
    task's own weight ``θ_t`` (the first such task in task order), so those rebuilds are bit-exact
    instead of suffering the rounding of ``θ₀ + (θ_t − θ₀)``; elsewhere it is ``θ₀ + τ_MTL``
    computed in float32, then cast.
    """
    merged = (base.to(torch.float32) + tau_mtl).to(tasks.dtype).reshape(-1).contiguous()
    bits = _BITS[tasks.element_size()]
    _take_reproduced(tau.reshape(tau.shape[0], -1).contiguous().numpy(), tau_mtl.reshape(-1).contiguous().numpy(),
                     tasks.reshape(tasks.shape[0], -1).contiguous().view(bits).numpy(), merged.view(bits).numpy())
    return merged.reshape(tau_mtl.shape)


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float's bits, by its width


@njit(cache=True, nogil=True)
def _take_reproduced(tau: np.ndarray, tau_mtl: np.ndarray, task_bits: np.ndarray, merged_bits: np.ndarray) -> None:
    """Copy task t's bits wherever ``τ_t = τ_MTL ≠ 0``, the first such t winning: one pass, no
    temporaries (a chain of torch masks per task took a fifth of a lossless pack's compute)."""
    for i in range(tau_mtl.size):
        v = tau_mtl[i]
        if v != 0:
            for t in range(tau.shape[0]):
                if tau[t, i] == v:
                    merged_bits[i] = task_bits[t, i]
                    break


def consensus_mask(mask_count: torch.Tensor, k: int) -> torch.Tensor:
    """``m_cons = Σ_t m_t ≥ k`` from the per-element count of tasks that select each weight."""
    return mask_count >= k
