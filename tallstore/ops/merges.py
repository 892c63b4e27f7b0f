"""Merge rules for the multi-task vector ``τ_MTL``: small pure functions over a ``(T, n)`` stack.

A rule is looked up by the name recorded in the archive; its parameters are JSON values.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .ties import ties

MergeRule = Callable[..., torch.Tensor]


def task_arithmetic(tau: torch.Tensor) -> torch.Tensor:
    """Task arithmetic as TALL uses it: ``τ_MTL = Σ_t τ_t``, unscaled.

    Summed in task order, one row at a time: ``tensor.sum(dim=0)`` associates the tail of a row
    differently from its body, so τ_MTL (and the archive) would depend on the block size.
    """
    out = tau[0].clone()
    for row in tau[1:]:
        out += row
    return out


RULES: dict[str, MergeRule] = {"ta": task_arithmetic, "ties": ties}


def apply(rule: str, tau: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """``τ_MTL`` for one block under the named rule and its recorded parameters."""
    return RULES[rule](tau, **params)
