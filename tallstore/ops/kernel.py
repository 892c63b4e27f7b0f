"""The one rebuild kernel: ``θ̂_t = m_t ? θ_MTL : θ₀`` on bit patterns, in place, tile by tile.

Every path that rebuilds a task or a merged model calls it (packing, loading, merging, λ
passes). It works on the stored form: ``out`` holds ``bits(θ_MTL) XOR bits(θ₀)`` on entry, so
``out ← bits(θ₀) XOR (out AND m)`` gives ``θ_MTL`` where the mask is set and ``θ₀`` elsewhere,
one tile at a time while the tile and its base are in the core's cache.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit

from ..dtypes import DType, to_storage
from .quantize import dequantize_rows

TILE = 1 << 18  # elements combined at a time
BITORDER = "little"

Visit = Callable[[np.ndarray], None]


def rebuild_bits(out: np.ndarray, base: np.ndarray, mask: np.ndarray | bool | None, visit: Visit | None = None) -> None:
    """Rebuild ``out`` (flat, an unsigned integer view of the task's dtype) in place.

    ``out`` holds ``bits(θ_MTL) XOR bits(θ₀)`` and ``base`` the bits of ``θ₀`` in the task's dtype;
    ``mask`` is the packed mask bits (bit ``i`` of the tensor is bit ``i mod 8``, least significant
    first, of byte ``i div 8``), ``None`` for an all-zero mask (the rebuild is the base) or ``True``
    for an all-one mask (an exact copy stored XOR the base). ``visit`` sees each finished tile in
    order (a running checksum, say).
    """
    for t in range(0, out.size, TILE):
        o, b = out[t : t + TILE], base[t : t + TILE]
        if mask is None:
            o[:] = b
        elif mask is True:
            np.bitwise_xor(o, b, out=o)
        else:
            keep = np.unpackbits(mask[t // 8 : (t + o.size + 7) // 8], count=o.size, bitorder=BITORDER)
            np.multiply(o, keep, out=o)
            np.bitwise_xor(o, b, out=o)
        if visit is not None:
            visit(o)


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Packed bits (the kernel's and the archive's mask form) of a boolean array, along its last axis."""
    return np.packbits(mask, axis=-1, bitorder=BITORDER)


def shared_bits(base: torch.Tensor, scales: np.ndarray, q: np.ndarray, rows: int, dtype: DType,
                out: np.ndarray | None = None) -> np.ndarray:
    """Bits of ``cast_d(θ₀ + s·q)``, the quantized form's merged weights of one row block
    (``rows`` rows; one IEEE float32 product and sum per element, then one cast to ``dtype``):
    what :func:`rebuild_bits` selects from where the mask is set, written into ``out`` if given
    (float32 weights of a float32 base in one fused pass)."""
    if dtype.name == "float32" and base.dtype == torch.float32:
        out = np.empty(q.size, dtype.storage) if out is None else out
        _shared_f32(base.reshape(-1).contiguous().numpy(), scales.astype(np.float32, copy=False), q.reshape(-1), rows,
                    out.view(np.float32))
        return out
    tau = dequantize_rows(torch.from_numpy(q).view(rows, -1), torch.from_numpy(scales)).reshape(-1)
    got = to_storage((base.to(torch.float32) + tau).to(dtype.torch))
    if out is None:
        return got
    out[:] = got
    return out


@njit(cache=True, nogil=True)
def _shared_f32(base: np.ndarray, scales: np.ndarray, q: np.ndarray, rows: int, out: np.ndarray) -> None:
    row = q.size // rows if rows else 0
    for r in range(rows):
        s = scales[r]
        for i in range(r * row, (r + 1) * row):
            out[i] = base[i] + s * np.float32(q[i])
