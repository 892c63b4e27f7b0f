"""TALL masks and the rebuild of one task from the merged vector (Wang et al., ICML 2024).

All functions are pure and work on one block of one tensor across tasks at a time: ``tau`` is a
``(T, n)`` float32 stack of task vectors, ``tau_mtl`` the ``(n,)`` merged task vector.
"""

from __future__ import annotations

import torch


def task_vectors(base: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """``τ_t = θ_t − θ₀`` in float32 for a ``(T, n)`` stack of task weights."""
    return tasks.to(torch.float32) - base.to(torch.float32)


def tall_masks(tau: torch.Tensor, tau_mtl: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` (strict, elementwise) as a ``(T, n)`` bool tensor."""
    residual = (tau_mtl.unsqueeze(0) - tau).abs_().mul_(lam.to(torch.float32).view(-1, 1))
    return tau.abs() > residual


def merged_weights(
    base: torch.Tensor, tasks: torch.Tensor, tau: torch.Tensor, tau_mtl: torch.Tensor
) -> torch.Tensor:
    """``θ_MTL = θ₀ + τ_MTL`` in the tasks' dtype, exact where the merge reproduces a task.

    Where ``τ_MTL`` equals some nonzero ``τ_t`` (one task, or disjoint supports) the value is that
    task's own weight ``θ_t``, so those rebuilds are bit-exact instead of suffering the rounding
    of ``θ₀ + (θ_t − θ₀)``; elsewhere it is ``θ₀ + τ_MTL`` computed in float32, then cast.
    """
    dtype = tasks.dtype
    merged = (base.to(torch.float32) + tau_mtl).to(dtype)
    hit = (tau == tau_mtl.unsqueeze(0)) & (tau != 0)
    if bool(hit.any()):
        first = hit.to(torch.uint8).argmax(dim=0, keepdim=True)
        own = tasks.gather(0, first).squeeze(0)
        merged = torch.where(hit.any(dim=0), own, merged)
    return merged


def rebuild(base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """``θ̂_t = θ₀ + m_t ⊙ τ_MTL``: the merged weight where the mask is set, else the base.

    ``base`` must already be in the task's dtype; the result is in that dtype.
    """
    return torch.where(mask, merged, base)


def consensus_mask(mask_count: torch.Tensor, k: int) -> torch.Tensor:
    """``m_cons = Σ_t m_t ≥ k`` from the per-element count of tasks that select each weight."""
    return mask_count >= k
