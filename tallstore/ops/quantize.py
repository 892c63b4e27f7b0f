"""k-bit symmetric quantization of float32 blocks viewed as rows, one float32 scale per row.

``q = clamp(round(x / s), −qmax, qmax)`` with ``qmax = 2^(k−1) − 1`` and ``x̂ = s · q``. Every step
is one IEEE-754 float32 operation (division, round-half-to-even, multiplication) or an exact
integer comparison, so the same input gives the same codes and scales on any machine:

- ``absmax``: ``s = fl32(max|x| / qmax)`` per row, nothing clipped;
- ``mse``: ``s = fl32(fl32(max|x| · r) / qmax)`` for the clip ratio ``r`` in :data:`CLIP_RATIOS`
  with the smallest squared error ``Σ (x − x̂)²`` of the row. The errors are compared as exact
  integer sums (each term floored in fixed point, see :func:`_row_errors`), ties going to the
  larger ratio, so no float reduction order can change the choice.

A row whose entries are all zero gets ``s = 0`` and codes 0. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["CLIP_RATIOS", "QuantMethod", "dequantize_rows", "qmax", "quantize_rows", "row_view"]

QuantMethod = Literal["absmax", "mse"]

#: Clip ratios the ``mse`` method tries, largest first (1 is absmax); all exact in float32.
CLIP_RATIOS: tuple[float, ...] = tuple((32 - i) / 32 for i in range(24))

_ERR_BITS = 60  # a row's integer squared error stays below 2^60


def qmax(bits: int) -> int:
    """Largest code magnitude for ``bits``-bit symmetric codes (2 → 1, 4 → 7, 8 → 127)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return (1 << (bits - 1)) - 1


def row_view(t: torch.Tensor) -> torch.Tensor:
    """The ``(rows, row_numel)`` view quantization works on: dim-0 rows for a tensor of two or
    more dimensions, the whole tensor as one row for a scalar or a 1-D tensor.

    1-D tensors (biases, norms) are one row because they are a fraction of a percent of a
    model's parameters: one scale each costs nothing, and splitting them buys no measurable size.
    """
    if t.dim() >= 2:
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))
    return t.reshape(1, t.numel())


def quantize_rows(
    x: torch.Tensor, bits: int, method: QuantMethod = "absmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float32 block row by row: int8 codes shaped like ``x``, float32 scales
    of shape ``(rows,)``. Raises ValueError on non-finite input or a bad argument."""
    top = qmax(bits)
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError("x must be a 2-D float32 tensor")
    if method not in ("absmax", "mse"):
        raise ValueError(f"unknown method {method!r}")
    x = x.contiguous()
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int8), torch.zeros(x.shape[0], dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot quantize non-finite values")
    absmax = x.abs().amax(dim=1)
    divisor = torch.full_like(absmax, top)  # a tensor, so the division is elementwise IEEE
    if method == "absmax":
        scales = absmax / divisor
        return _codes(x, scales, top), scales
    best_err = best_scales = best_codes = None
    for ratio in CLIP_RATIOS:
        scales = (absmax * ratio) / divisor
        codes = _codes(x, scales, top)
        err = _row_errors(x, codes, scales, absmax)
        if best_err is None:
            best_err, best_scales, best_codes = err, scales, codes
            continue
        better = err < best_err  # strict: ties keep the larger ratio
        best_err = torch.where(better, err, best_err)
        best_scales = torch.where(better, scales, best_scales)
        best_codes = torch.where(better[:, None], codes, best_codes)
    assert best_scales is not None and best_codes is not None
    return best_codes, best_scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x̂ = s · q`` in float32 (one IEEE multiplication per entry)."""
    if q.dtype != torch.int8 or q.dim() != 2 or scales.shape != (q.shape[0],):
        raise ValueError("q must be 2-D int8 and scales one float32 per row")
    if scales.dtype != torch.float32:
        raise ValueError("scales must be float32")
    return scales[:, None] * q.to(torch.float32)


def _codes(x: torch.Tensor, scales: torch.Tensor, top: int) -> torch.Tensor:
    """``clamp(round_half_even(x / s), ±top)``; rows with ``s = 0`` (all-zero rows) give 0."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(x / safe[:, None]).clamp_(-top, top)
    return q.to(torch.int8)


def _row_errors(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, absmax: torch.Tensor
) -> torch.Tensor:
    """Per-row ``Σ ⌊(x − x̂)² · 2^K⌋`` as int64, with ``K`` per row from the exponent of
    ``max|x|`` so every sum stays below 2^60.

    ``x − x̂`` of two float32 values within a few binades of each other is exact in float64, the
    square is one IEEE multiplication, the power-of-two scaling is exact and integer sums do not
    depend on their order: the result is the same on every machine.
    """
    xhat = scales[:, None] * codes.to(torch.float32)
    e = x.to(torch.float64) - xhat.to(torch.float64)
    _, exp = torch.frexp(absmax.to(torch.float64))  # absmax < 2^exp, so e² < 2^(2·exp)
    width = max(1, (x.shape[1] - 1).bit_length())
    shift = (_ERR_BITS - width - 2 * exp.to(torch.int64)).clamp(-1000, 1000)
    pow2 = ((shift + 1023) << 52).view(torch.float64)  # exactly 2^shift, built from its bits
    return torch.floor(e * e * pow2[:, None]).to(torch.int64).sum(dim=1)
