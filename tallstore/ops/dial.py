"""The fidelity dial: per-task representations that can live in one archive next to TALL masks.

Pure tensor math (torch/numpy only, no I/O); the byte layouts that a writer produces from these
arrays are in ``benchmarks/DIAL_NOTES.md``. Every function is deterministic: the same inputs give
the same arrays on the same machine (float64 accumulations, no random numbers, no thread-count
dependent float reductions that could change a choice except on exact ties).

Vocabulary (``τ_t = θ_t − θ₀`` float32, one tensor of one task at a time):

- **row view**: dim-0 rows of a tensor of two or more dimensions, one row for a 1-D tensor
  (:func:`tallstore.ops.quantize.row_view`).
- **decay rows** (:func:`decay_rows`): rows whose task vector is a multiple of the base row,
  ``τ_r ≈ c·θ₀_r``. AdamW's decoupled weight decay moves every row by ``−lr·wd·θ``; a row that
  never got a gradient (an embedding row of a token the task never saw, a position beyond the
  task's sequence length) has nothing else. On the MiniLM zoo three quarters of the word
  embedding rows (38% of all parameters) are such rows. They are stored as one flag bit per row
  and rebuilt as ``c·θ₀_r`` with one float32 ``c`` per tensor.
- **uniform delta code** (:func:`quantize_delta`): the other rows are coded by a uniform
  scalar quantizer with a step proportional to the row's RMS, ``s_r = κ · rms(τ_r)`` (rounded to
  bfloat16 so it is stored in 16 bits), codes ``c = sign(x)·⌊|x|/s + ρ⌋`` clamped to ``±qmax``
  (``ρ = 1/2``: round to nearest; ``ρ < 1/2``: a dead zone), entropy coded per tensor. The
  reader rebuilds ``x̂ = s_r · sign(c) · v[|c|]`` with a per-tensor table ``v`` of the mean of
  ``|x|/s`` in each code magnitude (the MSE-optimal reconstruction points of the quantizer's
  cells; ``v[0] = 0``). ``κ`` is the single knob of the dial: the bits follow it.
- **TALL** pieces (:func:`tall_mask`, :func:`tall_rebuild`): the paper's mask against a shared
  vector (possibly quantized), kept here for the study's baselines and for residual coding.
- **sparse corrections** (:func:`top_error_positions`, :func:`position_gaps`): the largest
  entries of an error, as position gaps plus quantized values.

Presets (:data:`PRESETS`) name a weight-space rule each (what a packer does with no
``evaluate=`` callback) and the grid that a validation-driven choice searches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .quantize import row_view

__all__ = [
    "DECAY_TOL",
    "PRESETS",
    "DeltaCode",
    "Preset",
    "bf16_round",
    "cheapest_passing",
    "column_gains",
    "decay_rows",
    "dequantize_delta",
    "level_table",
    "position_gaps",
    "positions_from_gaps",
    "quantize_delta",
    "row_rms",
    "tall_mask",
    "tall_rebuild",
    "top_error_positions",
    "uniform_codes",
]

#: Relative residual below which a row counts as a pure weight-decay row (see :func:`decay_rows`).
DECAY_TOL = 0.1


# ----------------------------------------------------------------------------------------------
# Small helpers


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest bfloat16 value (half to even), back in float32.

    Row steps are stored in 16 bits; codes are computed against the rounded step so the reader
    and the writer use the same number.
    """
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float32)


def row_rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row of a 2-D tensor, float64 accumulation, float32 result."""
    if x.dim() != 2:
        raise ValueError("x must be 2-D")
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float32)
    return (x.to(torch.float64).square().mean(dim=1)).sqrt().to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Decay rows


def decay_rows(tau: torch.Tensor, base: torch.Tensor, tol: float = DECAY_TOL) -> tuple[torch.Tensor, float]:
    """Rows of ``tau`` (2-D, float32) that are pure weight decay of ``base`` (same shape).

    A row is a decay row when ``‖τ_r − c_r θ₀_r‖ ≤ tol · ‖τ_r‖`` for its least-squares
    ``c_r = ⟨τ_r, θ₀_r⟩ / ‖θ₀_r‖²`` and ``c_r ≤ 0`` (decay shrinks), or when ``τ_r = 0``. Returns the
    boolean row flags and one float32 ``c`` for the tensor: the median of ``c_r`` over the decay
    rows with ``τ_r ≠ 0`` (0.0 if there are none). The reader rebuilds a decay row as ``c·θ₀_r``.

    ``tol = 0.1`` sits in the gap between the two populations of the MiniLM zoo: decay rows have a
    relative residual of 1–3% (the float32 rounding of ``θ·(1 − lr·wd)`` at each of ~100 steps,
    against a ``τ`` of only ~3e-5·θ₀), rows that got a gradient 0.6 or more (an update is not
    parallel to the weights it updates).
    """
    if tau.shape != base.shape or tau.dim() != 2:
        raise ValueError("tau and base must be 2-D and of one shape")
    t = tau.to(torch.float64)
    b = base.to(torch.float64)
    tt = t.square().sum(1)
    bb = b.square().sum(1)
    tb = (t * b).sum(1)
    c = torch.where(bb > 0, tb / torch.where(bb > 0, bb, 1.0), 0.0)
    resid2 = (tt - c * tb).clamp_min(0.0)  # ‖τ − cθ₀‖² = ‖τ‖² − c⟨τ, θ₀⟩ for the LS c
    zero = tt == 0
    decay = zero | ((resid2 <= (tol * tol) * tt) & (c <= 0) & (bb > 0))
    moving = decay & ~zero
    scalar = float(torch.median(c[moving]).to(torch.float32)) if bool(moving.any()) else 0.0
    return decay, scalar


# ----------------------------------------------------------------------------------------------
# Uniform delta codes


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
    - ``col_gain``: optional float32 (bfloat16-exact) gain per column (:func:`column_gains`).
    """

    shape: tuple[int, ...]
    decay: torch.Tensor
    decay_scale: float
    steps: torch.Tensor
    codes: torch.Tensor
    table: torch.Tensor
    col_gain: torch.Tensor | None = None

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
) -> DeltaCode:
    """Code one tensor's task vector with step ``κ · rms(τ_r)`` per row (see the module docstring).

    ``skip_decay=False`` codes every row (no decay flags set). A 1-D tensor is one row.
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
    steps = bf16_round(row_rms(live) * kappa)
    codes = uniform_codes(live, steps, rounding, qmax)
    table = level_table(live, codes, steps, qmax)
    return DeltaCode(tuple(tau.shape), decay, float(np.float32(c)), steps, codes, table,
                     None if col_gain is None else col_gain.to(torch.float32).clone())


def dequantize_delta(code: DeltaCode, base: torch.Tensor) -> torch.Tensor:
    """τ̂ of a :class:`DeltaCode` (float32, the tensor's shape) given the base tensor θ₀."""
    b2 = row_view(base.to(torch.float32))
    out = torch.empty_like(b2)
    out[code.decay] = b2[code.decay] * torch.tensor(code.decay_scale, dtype=torch.float32)
    mag = code.codes.abs().to(torch.int64)
    vals = code.table[mag] * torch.sign(code.codes.to(torch.float32))
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


# ----------------------------------------------------------------------------------------------
# TALL pieces


def tall_mask(tau: torch.Tensor, shared: torch.Tensor, lam: float) -> torch.Tensor:
    """``m = |τ_t| > λ·|τ̂_MTL − τ_t|`` (strict), against the shared vector as the reader holds it."""
    return tau.abs() > torch.tensor(lam, dtype=torch.float32) * (shared - tau).abs()


def tall_rebuild(mask: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """``τ̂_t = m_t ⊙ τ̂_MTL``."""
    return torch.where(mask, shared, torch.zeros_like(shared))


# ----------------------------------------------------------------------------------------------
# Sparse corrections


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


def position_gaps(positions: torch.Tensor) -> torch.Tensor:
    """Ascending positions as gaps ``g_0 = p_0``, ``g_i = p_i − p_{i−1} − 1`` (int64, all ≥ 0)."""
    if positions.numel() == 0:
        return positions.clone()
    g = torch.diff(positions, prepend=torch.tensor([-1], dtype=positions.dtype)) - 1
    if bool((g < 0).any()):
        raise ValueError("positions must be strictly increasing")
    return g


def positions_from_gaps(gaps: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`position_gaps`."""
    return torch.cumsum(gaps + 1, 0) - 1


# ----------------------------------------------------------------------------------------------
# Presets and the validation-driven choice


@dataclass(frozen=True)
class Preset:
    """A point of the dial: the data-free rule and the grid a validation search may use.

    ``kappa``: the step factor the packer uses with no evaluate callback (the weight-space rule);
    ``grid``: the factors a validation search tries per task (coarsest first), keeping the
    coarsest whose validation score passes ``target`` (normalized to the fine-tuned score);
    ``max_bits``: the budget in bits per parameter per task the preset is designed for.
    """

    name: str
    kappa: float | None
    grid: tuple[float, ...]
    target: float
    max_bits: float | None


PRESETS: dict[str, Preset] = {
    "compact": Preset("compact", 2.0, (3.0, 2.5, 2.0, 1.5), 0.990, 0.75),
    "balanced": Preset("balanced", 1.5, (2.0, 1.75, 1.5, 1.25, 1.0), 0.995, 1.0),
    "high": Preset("high", 0.75, (1.25, 1.0, 0.75, 0.5), 0.999, 1.5),
    "lossless": Preset("lossless", None, (), 1.0, None),
}


def cheapest_passing(scores: dict[float, float], reference: float, target: float, slack: float = 0.0) -> float | None:
    """The largest step factor (coarsest code) whose score reaches ``target · reference − slack``.

    ``scores`` maps step factors to validation scores, ``reference`` is the fine-tuned model's score
    on the same split, ``slack`` an allowance in score units (e.g. one example, ``1/n``). Returns
    None when no factor passes (the caller falls back to its finest factor or to exact storage).
    """
    ok = [k for k, s in scores.items() if s >= target * reference - slack]
    return max(ok) if ok else None
