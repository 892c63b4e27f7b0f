"""The fidelity study's research variants (``dial_study.py``): uniform codes with centroid
reconstruction, activation-aware column gains, TALL pieces and sparse corrections. What the
product ships (decay rows, the dither, dithered codes) is imported from ``tallstore.ops.delta``,
so the study measures the product's own code for the variant that became ``--fidelity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tallstore.ops.delta import DECAY_TOL, bf16_round, decay_rows, row_rms, tensor_seed
from tallstore.ops.delta import dither as _dither
from tallstore.ops.quantize import row_view

__all__ = ["DECAY_TOL", "DeltaCode", "bf16_round", "column_gains", "decay_rows", "dequantize_delta", "dither",
           "dither_context", "dithered_codes", "level_table", "quantize_delta", "row_rms", "tall_mask", "tall_rebuild",
           "tensor_seed", "top_error_positions", "uniform_codes"]


def dither(stream: int, n: int) -> torch.Tensor:
    """The product's dither over a whole tensor's ``n`` flat positions."""
    return _dither(stream, 0, n)


def dither_context(u: torch.Tensor, contexts: int = 8) -> torch.Tensor:
    """``⌊(u + 1/2)·contexts⌋``: the product uses 8 contexts; the study tries others."""
    return ((u.to(torch.float64) + 0.5) * contexts).floor().clamp_(0, contexts - 1).to(torch.int64)


def dithered_codes(x: torch.Tensor, steps: torch.Tensor, u: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Subtractive-dither codes ``clamp(round(x/s + u), ±qmax)`` (the product's with ``qmax = 127``)."""
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))[:, None]
    c = torch.round(x / safe + u).clamp_(-qmax, qmax)
    return torch.where(steps[:, None] > 0, c, torch.zeros_like(c)).to(torch.int8)


def uniform_codes(x: torch.Tensor, steps: torch.Tensor, rounding: float = 0.5, qmax: int = 127) -> torch.Tensor:
    """``c = sign(x)·min(qmax, ⌊|x|/s + ρ⌋)`` as int8 for a 2-D float32 ``x`` and one step per row.

    ``ρ = rounding`` in (0, 1/2]: 1/2 rounds to nearest, smaller values widen the zero cell (a dead
    zone of half-width ``(1 − ρ)·s``). Rows with ``s = 0`` get code 0.
    """
    if not 0 < rounding <= 0.5:
        raise ValueError("rounding must be in (0, 0.5]")
    if not 1 <= qmax <= 127:
        raise ValueError("qmax must be in 1..127")
    if x.dim() != 2 or steps.shape != (x.shape[0],):
        raise ValueError("x must be 2-D with one step per row")
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))[:, None]
    mag = torch.floor(x.abs() / safe + rounding).clamp_(max=qmax)
    mag = torch.where(steps[:, None] > 0, mag, torch.zeros_like(mag))
    return (torch.sign(x) * mag).to(torch.int8)


def level_table(x: torch.Tensor, codes: torch.Tensor, steps: torch.Tensor, qmax: int) -> torch.Tensor:
    """Reconstruction point of each code magnitude, in units of the row step (float32, ``qmax+1``).

    ``v[j]`` = mean of ``|x|/s`` over the entries coded ``±j`` (the centroid: MSE-optimal for the
    cells the quantizer drew), ``v[0] = 0``, ``v[j] = j`` for a magnitude that does not occur.
    Accumulated in float64 with integer counts, then rounded to float32.
    """
    mag = codes.abs().to(torch.int64).reshape(-1)
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))[:, None]
    ratio = (x.abs().to(torch.float64) / safe.to(torch.float64)).reshape(-1)
    sums = torch.zeros(qmax + 1, dtype=torch.float64).index_add_(0, mag, ratio)
    counts = torch.bincount(mag, minlength=qmax + 1)[: qmax + 1]
    table = torch.arange(qmax + 1, dtype=torch.float64)
    hit = counts > 0
    table[hit] = sums[hit] / counts[hit].to(torch.float64)
    table[0] = 0.0
    return table.to(torch.float32)


@dataclass(frozen=True)
class DeltaCode:
    """One tensor of one task as a uniform delta code (everything a reader needs besides θ₀).

    - ``shape``: the tensor's shape (known to the reader from the base);
    - ``decay``: bool per row, True for decay rows (rebuilt ``c·θ₀_r``, nothing else stored);
    - ``decay_scale``: float32 ``c``;
    - ``steps``: float32 (bfloat16-exact) step per coded row, in row order;
    - ``codes``: int8 ``(coded rows, row length)``;
    - ``table``: float32 reconstruction points per code magnitude (``qmax + 1``);
    - ``col_gain``: optional float32 (bfloat16-exact) gain per column (:func:`column_gains`);
    - ``dither_stream``: None for plain rounding (rebuilt through ``table``), else the 64-bit
      stream id of a subtractive dither (:func:`tensor_seed`, :func:`dither`; rebuilt
      ``s·(c − u)``, ``table`` unused).
    """

    shape: tuple[int, ...]
    decay: torch.Tensor
    decay_scale: float
    steps: torch.Tensor
    codes: torch.Tensor
    table: torch.Tensor
    col_gain: torch.Tensor | None = None
    dither_stream: int | None = None

    @property
    def qmax(self) -> int:
        return int(self.table.numel()) - 1


def quantize_delta(
    tau: torch.Tensor,
    base: torch.Tensor,
    kappa: float,
    rounding: float = 0.5,
    qmax: int = 127,
    skip_decay: bool = True,
    decay_tol: float = DECAY_TOL,
    col_gain: torch.Tensor | None = None,
    dither_stream: int | None = None,
    step_mode: str = "row",
) -> DeltaCode:
    """Code one tensor's task vector with step ``κ · rms(τ_r)`` per row (see the module docstring).

    ``skip_decay=False`` codes every row (no decay flags set). A 1-D tensor is one row.
    ``step_mode="tensor"`` uses one step ``κ · rms`` over all coded rows instead of one per row.
    ``dither_stream`` (see :func:`tensor_seed`) switches to subtractive dithered codes.
    ``col_gain`` (float32, one per column of the row view, > 0; stored by the caller, rounded to
    bfloat16 by :func:`column_gains`) codes ``τ_rj · a_j`` instead of ``τ_rj``: a column with gain
    ``a_j > 1`` gets a finer step ``s_r / a_j`` (activation-aware steps, see :func:`column_gains`).
    """
    if kappa <= 0 or not math.isfinite(kappa):
        raise ValueError("kappa must be a positive finite number")
    t2 = row_view(tau.to(torch.float32))
    b2 = row_view(base.to(torch.float32))
    if skip_decay:
        decay, c = decay_rows(t2, b2, decay_tol)
    else:
        decay, c = torch.zeros(t2.shape[0], dtype=torch.bool), 0.0
    live = t2[~decay]
    if col_gain is not None:
        if col_gain.shape != (t2.shape[1],) or not bool((col_gain > 0).all()):
            raise ValueError("col_gain must hold one positive value per column")
        live = live * col_gain.to(torch.float32)[None, :]
    if step_mode == "row":
        steps = bf16_round(row_rms(live) * kappa)
    elif step_mode == "tensor":  # one step for the tensor (stored once), repeated per row here
        one = row_rms(live.reshape(1, -1)) * kappa if live.numel() else torch.zeros(1)
        steps = bf16_round(one).expand(live.shape[0]).contiguous()
    else:
        raise ValueError(f"unknown step_mode {step_mode!r}")
    if dither_stream is None:
        codes = uniform_codes(live, steps, rounding, qmax)
        table = level_table(live, codes, steps, qmax)
    else:
        u = dither(dither_stream, t2.numel()).reshape(t2.shape)[~decay]
        codes = dithered_codes(live, steps, u, qmax)
        table = torch.arange(qmax + 1, dtype=torch.float32)  # unused: x̂ = s·(c − u)
    return DeltaCode(tuple(tau.shape), decay, float(np.float32(c)), steps, codes, table,
                     None if col_gain is None else col_gain.to(torch.float32).clone(), dither_stream)


def dequantize_delta(code: DeltaCode, base: torch.Tensor) -> torch.Tensor:
    """τ̂ of a :class:`DeltaCode` (float32, the tensor's shape) given the base tensor θ₀."""
    b2 = row_view(base.to(torch.float32))
    out = torch.empty_like(b2)
    out[code.decay] = b2[code.decay] * torch.tensor(code.decay_scale, dtype=torch.float32)
    if code.dither_stream is None:
        mag = code.codes.abs().to(torch.int64)
        vals = code.table[mag] * torch.sign(code.codes.to(torch.float32))
    else:
        u = dither(code.dither_stream, b2.numel()).reshape(b2.shape)[~code.decay]
        vals = code.codes.to(torch.float32) - u  # exact: 8 integer + 16 fraction bits
    vals = vals * code.steps[:, None]
    if code.col_gain is not None:
        vals = vals / code.col_gain[None, :]
    out[~code.decay] = vals
    return out.reshape(code.shape)


def column_gains(power: torch.Tensor, clip: float = 8.0) -> torch.Tensor:
    """Per-column gains ``a_j = (w_j / GM(w))^(1/2)`` from input powers ``w_j = E[x_j²]`` of a linear
    layer, clipped to ``[1/clip, clip]`` and rounded to bfloat16 (they are stored).

    Scaling column ``j`` of the code by ``a_j`` makes its step ``∝ w_j^(−1/2)``: the allocation that
    minimises the output error ``E‖(W − Ŵ)x‖² = Σ_j w_j ‖e_j‖²`` at a given rate (reverse
    water-filling with weights); the geometric-mean normalisation leaves the rate about unchanged.
    """
    w = power.to(torch.float64).clamp_min(1e-30)
    a = (w / w.log().mean().exp()).sqrt().clamp(1.0 / clip, clip)
    return bf16_round(a.to(torch.float32))


def tall_mask(tau: torch.Tensor, shared: torch.Tensor, lam: float) -> torch.Tensor:
    """``m = |τ_t| > λ·|τ̂_MTL − τ_t|`` (strict), against the shared vector as the reader holds it."""
    return tau.abs() > torch.tensor(lam, dtype=torch.float32) * (shared - tau).abs()


def tall_rebuild(mask: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """``τ̂_t = m_t ⊙ τ̂_MTL``."""
    return torch.where(mask, shared, torch.zeros_like(shared))


def top_error_positions(err: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat positions (int64, ascending) of the ``⌈fraction·n⌉`` largest ``|err|`` of one tensor.

    Ties at the threshold are broken by position (lower first) so the selection is deterministic.
    """
    flat = err.reshape(-1).abs().to(torch.float32)
    n = flat.numel()
    k = min(n, math.ceil(fraction * n)) if fraction > 0 else 0
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    # Stable sort on magnitude descending: ties keep ascending positions.
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values
