"""TIES-merging as TALL uses it (Yadav et al., NeurIPS 2023; the TALL authors' reference code).

Per task, keep the entries of ``τ_t`` whose magnitude reaches one threshold over the whole model
(the ``r``-th smallest magnitude, ``r = n − ⌊n · top/100⌋``, so ties at the threshold are kept);
elect a sign per entry as ``sign(Σ_t τ̂_t)``, zero sums taking the majority sign of the whole
model; sum the entries that agree with the elected sign ("dis-sum"). Sums run in float32 in task
order (``(τ̂_0 + τ̂_1) + …``), like ``ta``, so blocks never change a bit of the result.

The two global quantities (thresholds, majority sign) are found by streaming passes over row
blocks: a magnitude's float32 bit pattern orders like its value, so a histogram of the high 16
bits locates the bin holding the ``r``-th smallest, a histogram of the low 16 bits inside that
bin gives it exactly. All functions here are pure and work on one ``(T, n)`` block at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .masks import task_sum

BINS = 1 << 16
DEFAULT_TOP = 20.0


def keep_rank(numel: int, top: float) -> int:
    """1-based rank ``r`` (ascending) of the threshold magnitude; 0 means keep everything.

    Mirrors the reference ``k = int(n · top/100)``, threshold = ``kthvalue(n − k)``.
    """
    return numel - int(numel * (top / 100.0))


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``|τ|`` in float32 as int64 (their order is the magnitudes' order)."""
    return tau.to(torch.float32).abs().view(torch.int32).to(torch.int64)


def high_histogram(tau: torch.Tensor) -> np.ndarray:
    """``(T, 65536)`` counts of the high 16 bits of each task's magnitudes in this block."""
    bits = magnitude_bits(tau)
    rows = torch.arange(bits.shape[0]).view(-1, 1) * BINS
    counts = torch.bincount(((bits >> 16) + rows).reshape(-1), minlength=bits.shape[0] * BINS)
    return counts.view(bits.shape[0], BINS).numpy()


def low_histogram(tau: torch.Tensor, high: Sequence[int]) -> np.ndarray:
    """``(T, 65536)`` counts of the low 16 bits of the magnitudes whose high bits are ``high[t]``."""
    bits = magnitude_bits(tau)
    T = bits.shape[0]
    inside = (bits >> 16) == torch.tensor(list(high), dtype=torch.int64).view(-1, 1)
    idx = (bits & (BINS - 1)) + torch.arange(T).view(-1, 1) * BINS
    counts = torch.bincount(idx[inside], minlength=T * BINS)
    return counts.view(T, BINS).numpy()


def locate(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th smallest (1-based) of a histogram, and the count below it."""
    cum = np.cumsum(hist, dtype=np.int64)
    b = int(np.searchsorted(cum, rank, side="left"))
    return b, int(cum[b - 1]) if b else 0


def bits_to_float(bits: int) -> float:
    """The float32 value with this bit pattern, as a Python float (exact)."""
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def trim(tau: torch.Tensor, threshold: Sequence[float]) -> torch.Tensor:
    """``τ̂_t``: entries with ``|τ_t| ≥ threshold_t`` kept, the rest set to 0 (float32)."""
    tau = tau.to(torch.float32)
    thr = torch.tensor(list(threshold), dtype=torch.float32).view(-1, 1)
    return torch.where(tau.abs() >= thr, tau, torch.zeros((), dtype=torch.float32))


def block_signs(trimmed: torch.Tensor) -> torch.Tensor:
    """``sign(Σ_t τ̂_t)`` per entry, before zero sums are resolved."""
    return torch.sign(task_sum(trimmed))


def sign_counts(trimmed: torch.Tensor) -> tuple[int, int]:
    """How many entries of this block have a positive and a negative summed sign."""
    s = block_signs(trimmed)
    return int((s > 0).sum()), int((s < 0).sum())


def trimmed_sign_counts(tau: torch.Tensor, threshold: Sequence[float]) -> tuple[int, int]:
    """Positive and negative elected signs of this block after trimming with ``threshold``."""
    return sign_counts(trim(tau, threshold))


def majority(positive: int, negative: int) -> int:
    """The majority sign of the whole model: ``sign(#positive − #negative)``."""
    return (positive > negative) - (positive < negative)


def disjoint_sum(trimmed: torch.Tensor, majority_sign: int) -> torch.Tensor:
    """Elect signs (zeros → ``majority_sign``) and sum the entries that agree ("dis-sum").

    As in the reference, an elected sign of 0 (only when the majority itself is 0) keeps the
    negative entries.
    """
    s = block_signs(trimmed)
    s = torch.where(s == 0, torch.tensor(float(majority_sign)), s)
    agree = torch.where(s.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    return task_sum(torch.where(agree, trimmed, torch.zeros((), dtype=torch.float32)))
