"""Task vectors, TALL masks and the merged weights they select from (Wang et al., ICML 2024).

All functions are pure and work on one block of one tensor across tasks at a time: ``tau`` is a
``(T, n)`` float32 stack of task vectors, ``tau_mtl`` the ``(n,)`` merged task vector.
"""

from __future__ import annotations

import torch


def task_vectors(base: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """``τ_t = θ_t − θ₀`` in float32 for a ``(T, n)`` stack of task weights (subtracted in place:
    one float32 ``(T, n)`` buffer)."""
    return tasks.to(torch.float32, copy=True).sub_(base.to(torch.float32))


def task_sum(tau: torch.Tensor) -> torch.Tensor:
    """``Σ_t τ_t`` in float32, in task order (``((τ_0 + τ_1) + τ_2) + …``), one row at a time.

    ``tensor.sum(dim=0)`` associates the tail of a row differently from its body, so τ_MTL (and
    the archive) would depend on the block size.
    """
    out = tau[0].clone()
    for row in tau[1:]:
        out += row
    return out


def tall_masks(tau: torch.Tensor, tau_mtl: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` (strict, elementwise) as a ``(T, n)`` bool tensor.

    Computed one task at a time so temporaries stay at one row's size, not ``(T, n)``.
    """
    lam32 = lam.to(torch.float32)
    masks = torch.empty(tau.shape, dtype=torch.bool)
    for t in range(tau.shape[0]):
        residual = (tau_mtl - tau[t]).abs_().mul_(lam32[t])
        torch.gt(tau[t].abs(), residual, out=masks[t])
    return masks


def merged_weights(
    base: torch.Tensor, tasks: torch.Tensor, tau: torch.Tensor, tau_mtl: torch.Tensor
) -> torch.Tensor:
    """``θ_MTL = θ₀ + τ_MTL`` in the tasks' dtype, exact where the merge reproduces a task.

    Where ``τ_MTL`` equals some nonzero ``τ_t`` (one task, or disjoint supports) the value is that
    task's own weight ``θ_t``, so those rebuilds are bit-exact instead of suffering the rounding
    of ``θ₀ + (θ_t − θ₀)``; elsewhere it is ``θ₀ + τ_MTL`` computed in float32, then cast.
    """
    merged = (base.to(torch.float32) + tau_mtl).to(tasks.dtype)
    taken = torch.zeros(tau_mtl.shape, dtype=torch.bool)
    for t in range(tau.shape[0]):  # task order: the first task that matches wins
        hit = (tau[t] == tau_mtl) & (tau[t] != 0) & ~taken
        if bool(hit.any()):
            merged = torch.where(hit, tasks[t], merged)
            taken |= hit
    return merged


def consensus_mask(mask_count: torch.Tensor, k: int) -> torch.Tensor:
    """``m_cons = Σ_t m_t ≥ k`` from the per-element count of tasks that select each weight."""
    return mask_count >= k
