"""Dense references for the paper's methods, written from spec §1 and §6 with plain torch.

Everything works on whole flattened models held in memory (what the package must avoid), and
uses none of the package's own math, so the streaming code is checked against an independent
statement of the same formulas.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def save_collection(
    root: Path, base: dict[str, torch.Tensor], tasks: dict[str, dict[str, torch.Tensor]]
) -> tuple[Path, dict[str, Path]]:
    """Write a base and its tasks as safetensors files under ``root`` (absolute paths)."""
    root = root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, root / "base.safetensors")
    paths = {}
    for name, sd in tasks.items():
        save_file(sd, root / f"{name}.safetensors")
        paths[name] = root / f"{name}.safetensors"
    return root / "base.safetensors", paths


def maskable(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]]) -> list[str]:
    """Keys every input holds as one non-empty float tensor of one shape and task dtype."""
    return [
        k for k, v in base.items()
        if v.is_floating_point() and v.numel() > 0
        and all(k in sd and sd[k].shape == v.shape and sd[k].dtype == tasks[0][k].dtype for sd in tasks)
        and tasks[0][k].is_floating_point()
    ]


def in_order_sum(x: torch.Tensor) -> torch.Tensor:
    """``Σ_t x_t`` in float32, in task order."""
    out = x[0].clone()
    for row in x[1:]:
        out = out + row
    return out


def first_of_equal(tau: torch.Tensor) -> list[int]:
    """Spec §6.1: task vectors equal in value (a frozen backbone several tasks share; ``-0``
    equals ``0``) enter the merge once — the first of each group, in task order."""
    keep: list[int] = []
    for t in range(tau.shape[0]):
        if not any(bool((tau[u] == tau[t]).all()) for u in keep):
            keep.append(t)
    return keep


def ties_thresholds(tau: torch.Tensor, top: float) -> list[float]:
    """Per task, the ``n − ⌊n·top/100⌋``-th smallest ``|τ_t|`` over the whole flat model (0 if rank 0)."""
    n = tau.shape[1]
    rank = n - int(n * (top / 100.0))
    if rank <= 0:
        return [0.0] * tau.shape[0]
    return [float(torch.kthvalue(row.abs(), rank).values) for row in tau]


def spec_ties(tau: torch.Tensor, top: float) -> torch.Tensor:
    """TIES ``τ_MTL`` over the whole flat model as spec §6.1 states it."""
    thr = torch.tensor(ties_thresholds(tau, top)).view(-1, 1)
    keep = first_of_equal(tau)
    tau, thr = tau[keep], thr[keep]
    trimmed = torch.where(tau.abs() >= thr, tau, torch.zeros(()))
    s = torch.sign(in_order_sum(trimmed))
    pos, neg = int((s > 0).sum()), int((s < 0).sum())
    s[s == 0] = float((pos > neg) - (pos < neg))
    agree = torch.where(s > 0, trimmed > 0, trimmed < 0)
    return in_order_sum(torch.where(agree, trimmed, torch.zeros(())))


def authors_ties(flat_task_checks: torch.Tensor, reset_thresh: float = 20) -> torch.Tensor:
    """The TALL authors' ``ties_merging(..., merge_func="dis-sum")``, transcribed as published."""
    K = reset_thresh / 100 if reset_thresh > 1 else reset_thresh
    M = flat_task_checks.clone()
    _, d = M.shape
    k = d - int(d * K)
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    updated = M * (M.abs() >= kth_values)
    sign_to_mult = torch.sign(updated.sum(dim=0))
    sign_to_mult[sign_to_mult == 0] = torch.sign(sign_to_mult.sum())
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, updated > 0, updated < 0)
    return (updated * rows_to_keep).sum(dim=0)


def merged_weights(base: torch.Tensor, tasks: torch.Tensor, tau: torch.Tensor, mtl: torch.Tensor) -> torch.Tensor:
    """Spec §1 ``θ_MTL``: ``cast_d(θ₀ + τ_MTL)``, or the first task's own weight where ``τ_MTL = τ_t ≠ 0``."""
    merged = (base.float() + mtl).to(tasks.dtype)
    for t in reversed(range(tasks.shape[0])):
        merged = torch.where((tau[t] == mtl) & (tau[t] != 0), tasks[t], merged)
    return merged


def tall_masks(tau: torch.Tensor, mtl: torch.Tensor, lams: list[float]) -> torch.Tensor:
    """Spec §1 masks ``|τ_t| > λ_t · |τ_MTL − τ_t|`` in float32."""
    return torch.stack([tau[t].abs() > torch.tensor(lam, dtype=torch.float32) * (mtl - tau[t]).abs() for t, lam in enumerate(lams)])


class Dense:
    """A whole collection flattened over its maskable keys, with τ, τ_MTL, θ_MTL and masks."""

    def __init__(self, base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], rule: str = "ta",
                 top: float = 20.0, lams: list[float] | None = None) -> None:
        self.keys = maskable(base, tasks)
        self.sizes = [base[k].numel() for k in self.keys]
        self.shapes = [tuple(base[k].shape) for k in self.keys]
        self.base = torch.cat([base[k].reshape(-1) for k in self.keys])
        self.tasks = torch.stack([torch.cat([sd[k].reshape(-1) for k in self.keys]) for sd in tasks])
        self.tau = self.tasks.float() - self.base.float()
        self.mtl = in_order_sum(self.tau[first_of_equal(self.tau)]) if rule == "ta" else spec_ties(self.tau, top)
        self.merged = merged_weights(self.base, self.tasks, self.tau, self.mtl)
        self.masks = tall_masks(self.tau, self.mtl, lams) if lams is not None else None

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector over the maskable keys as a ``{key: tensor}`` dict."""
        return {k: p.reshape(s) for k, p, s in zip(self.keys, torch.split(flat, self.sizes), self.shapes)}


# A hand-computed archive: T = 3, λ = 0.5, eight weights of tensor "w" on a base of 10 + i.
# m_t = |τ_t| > 0.5·|τ_MTL − τ_t|; the last column is Σ_t m_t.
HAND_TAU = [  # τ_0, τ_1, τ_2      τ_MTL   masks    count
    (1.0, 0.0, 0.0),    #           1       1 0 0    1
    (1.0, 1.0, 0.0),    #           2       1 1 0    2
    (1.0, 1.0, 1.0),    #           3       0 0 0    0  (1 > 0.5·2 is false: strict)
    (1.0, 1.0, -1.5),   #           0.5     1 1 1    3
    (0.0, 0.0, 0.0),    #           0       0 0 0    0
    (4.0, 1.0, 1.0),    #           6       1 0 0    1
    (2.0, 2.0, 1.0),    #           5       1 1 0    2
    (0.0, 0.0, 0.5),    #           0.5     0 0 1    1
]
HAND_MASKS = [[1, 1, 0, 1, 0, 1, 1, 0], [0, 1, 0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0, 1]]
HAND_COUNT = [1, 2, 0, 3, 0, 1, 2, 1]
HAND_MTL = [1.0, 2.0, 3.0, 0.5, 0.0, 6.0, 5.0, 0.5]


def hand_collection() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The hand example: tensor ``w`` (masked), an int buffer and a per-task head."""
    base = {"w": 10 + torch.arange(8, dtype=torch.float32), "ids": torch.arange(4)}
    tasks = {}
    for t in range(3):
        tau = torch.tensor([row[t] for row in HAND_TAU])
        tasks[f"t{t}"] = {"w": base["w"] + tau, "ids": base["ids"].clone(), "head": torch.full((2, 2), float(t))}
    return base, tasks
