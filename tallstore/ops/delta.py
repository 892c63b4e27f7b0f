"""Per-task delta codes (representation ``delta``, spec §10): ``τ_t`` coded on its own, row by row,
with a subtractive dither, against the base and nothing else.

Pure tensor math on one row block of one tensor of one task (``τ = θ_t − θ₀`` float32, 2-D: the
block's rows × the row length). Writer and reader call the same functions, so the reader's
``θ̂`` is the writer's bit for bit (elementwise float32 operations only, no reductions on the
rebuild path).

- **decay rows** (:func:`decay_rows`): rows whose task vector is a multiple ``c·θ₀_r`` of the
  base row. AdamW's decoupled weight decay moves every row by ``−lr·wd·θ``; a row that never got
  a gradient (the embedding of a token the task never saw) has nothing else. They cost one flag
  bit and are rebuilt ``c·θ₀_r``, one float32 ``c`` per block.
- **dithered codes** (:func:`dithered_codes`): every other row ``r`` gets the step
  ``s_r = κ · rms(τ_r)`` rounded to bfloat16 and the codes ``c = round(τ/s + u)``, clamped to
  ``±127``; the reader rebuilds ``s_r·(c − u)``. ``u`` is a dither in ``[−1/2, 1/2)`` that the
  reader regenerates from the task's seed, the tensor's name and the element's position
  (:func:`dither`), so it costs no bits; it makes the error uniform on ``[−s/2, s/2)`` and
  independent of ``τ``, where plain rounding shrinks ``τ`` towards 0 at coarse steps. Then the
  relative error of a row is ``κ/√12`` whatever ``τ`` is: ``κ`` is the dial.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

DECAY_TOL = 0.1  # relative residual below which a row counts as pure weight decay
DITHER_BITS = 16  # u = k / 2^16 − 1/2: c − u is exact in float32 for |c| < 2^7
QMAX = 127
CONTEXTS = 8  # codes are entropy-coded in this many streams, by the dither's bin (dither_context)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest bfloat16 (half to even), as float32: steps are stored in 16 bits."""
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float32)


def row_rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row of a 2-D tensor (float64 accumulation, float32 result)."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float32)
    return x.to(torch.float64).square().mean(dim=1).sqrt().to(torch.float32)


def decay_rows(tau: torch.Tensor, base: torch.Tensor, tol: float = DECAY_TOL) -> tuple[torch.Tensor, float]:
    """Which rows of ``tau`` (2-D float32) are pure weight decay of ``base``, and their one scale.

    A row is a decay row when ``τ_r ≠ 0`` and ``‖τ_r − c_r θ₀_r‖ ≤ tol·‖τ_r‖`` for its
    least-squares ``c_r = ⟨τ_r, θ₀_r⟩/‖θ₀_r‖² ≤ 0``; the scale is their median ``c_r``, rounded
    to float32. Without any, the rows with ``τ_r = 0`` are the decay rows, with the scale 0 (so
    rebuilt exactly); with some, such rows are coded (step 0, so also exact). ``tol = 0.1`` sits in the
    gap of the measured populations: decay rows 1–3% (float32 rounding of ``θ·(1 − lr·wd)`` at
    each step), rows that got a gradient 0.6 and more.
    """
    t, b = tau.to(torch.float64), base.to(torch.float64)
    tt, bb, tb = t.square().sum(1), b.square().sum(1), (t * b).sum(1)
    c = torch.where(bb > 0, tb / torch.where(bb > 0, bb, 1.0), 0.0)
    resid2 = (tt - c * tb).clamp_min(0.0)
    zero = tt == 0
    moving = ~zero & (resid2 <= (tol * tol) * tt) & (c <= 0) & (bb > 0)
    if not bool(moving.any()):  # rows that did not move are rebuilt exactly with the scale 0
        return zero, 0.0
    return moving, float(torch.median(c[moving]).to(torch.float32))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 (wrapping arithmetic: the same on every machine)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def tensor_seed(task_seed: int, key: str) -> int:
    """The dither stream of one tensor of one task: SplitMix64 of ``task_seed·2³² + crc32(key)``."""
    if not 0 <= task_seed < 1 << 32:
        raise ValueError("task_seed must be a 32-bit unsigned integer")
    return int(_splitmix64(np.array([(task_seed << 32) | zlib.crc32(key.encode())], np.uint64))[0])


def dither(stream: int, start: int, n: int) -> torch.Tensor:
    """Dither values ``u_i = (SplitMix64(stream + i) >> 48)/2¹⁶ − 1/2`` for the flat positions
    ``start ≤ i < start + n`` of the tensor (float32, exact): a block's dither does not depend on
    which other blocks are read."""
    out = np.empty(n, np.float32)
    _dither_kernel(np.uint64(stream), np.uint64(start), out)
    return torch.from_numpy(out)


@njit(cache=True, nogil=True)
def _dither_kernel(stream, start, out):  # pragma: no cover - compiled
    """:func:`_splitmix64` of ``stream + start + i``, its 16 high bits as ``k/2¹⁶ − 1/2``, into ``out``."""
    scale = np.float32(2.0**-DITHER_BITS)
    half = np.float32(0.5)
    for i in range(out.size):
        z = stream + start + np.uint64(i) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        out[i] = np.float32(z >> np.uint64(64 - DITHER_BITS)) * scale - half


def dither_context(u: torch.Tensor) -> np.ndarray:
    """The entropy-coding stream of each code, ``⌊(u + 1/2)·8⌋`` (uint8, 0..7, flat): given ``u`` a
    code is far more predictable (at coarse steps ``c ≠ 0`` mostly where ``|u|`` is near 1/2).
    Exact in float32: ``u + 1/2`` is a multiple of 2⁻¹⁶ below 1."""
    flat = u.to(torch.float32).contiguous().reshape(-1).numpy()
    out = np.empty(flat.size, np.uint8)
    _context_kernel(flat, out)
    return out


@njit(cache=True, nogil=True)
def _context_kernel(u, out):  # pragma: no cover - compiled
    half, n = np.float32(0.5), np.float32(CONTEXTS)
    for i in range(u.size):
        out[i] = np.uint8(np.floor((u[i] + half) * n))


def dithered_codes(x: torch.Tensor, steps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``c = clamp(round_half_even(x/s + u), ±127)`` (int8) per row step ``s``; 0 where ``s = 0``."""
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))[:, None]
    c = torch.round(x / safe + u).clamp_(-QMAX, QMAX)
    return torch.where(steps[:, None] > 0, c, torch.zeros_like(c)).to(torch.int8)


@dataclass(frozen=True)
class DeltaBlock:
    """One row block of one tensor of one task, as stored: decay flags (bool per row), the decay
    scale (float32), one bfloat16-exact float32 step per coded row, int8 codes of the coded rows."""

    decay: torch.Tensor
    decay_scale: float
    steps: torch.Tensor
    codes: torch.Tensor


def encode_block(tau: torch.Tensor, base: torch.Tensor, kappa: float, u: torch.Tensor) -> DeltaBlock:
    """Code ``tau`` (2-D float32) with steps ``κ·rms`` per row, given the block's base rows and dither."""
    decay, scale = decay_rows(tau, base)
    live = tau[~decay]
    steps = bf16_round(row_rms(live) * kappa)
    return DeltaBlock(decay, scale, steps, dithered_codes(live, steps, u[~decay]))


def rebuild_block(block: DeltaBlock, base: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``θ̂ = θ₀ + τ̂`` (float32, the block's 2-D shape): ``θ₀_r + c·θ₀_r`` on decay rows,
    ``θ₀ + s_r·(c − u)`` on the others, in one float32 pass (into ``out`` if given: float32, the
    block's shape, contiguous). The caller casts to the task's dtype."""
    b = base.to(torch.float32).contiguous()
    res = torch.empty_like(b) if out is None else out
    _rebuild_kernel(block.decay.numpy(), np.float32(block.decay_scale), block.steps.numpy(),
                    block.codes.numpy(), b.numpy(), u.contiguous().numpy(), res.numpy())
    return res


@njit(cache=True, nogil=True)
def _rebuild_kernel(decay, scale, steps, codes, base, u, out):  # pragma: no cover - compiled
    """:func:`rebuild_block`: each element rounded as ``base + (base·scale)`` or ``base + ((c − u)·s)``."""
    k = 0
    for r in range(base.shape[0]):
        if decay[r]:
            for j in range(base.shape[1]):
                b = base[r, j]
                out[r, j] = b + b * scale
        else:
            s = steps[k]
            for j in range(base.shape[1]):
                out[r, j] = base[r, j] + (np.float32(codes[k, j]) - u[r, j]) * s
            k += 1
