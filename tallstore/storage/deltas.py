"""What one delta segment holds (representation ``delta``, spec §10), both ways.

A **delta segment** is one row block of one tensor of one task (``R`` rows of ``C`` elements,
``N`` of them coded, the others decay rows), little endian:

1. ``float32`` decay scale;
2. ``⌈R/8⌉`` bytes: the decay flag of each row, bits packed little-endian;
3. ``N`` ``bfloat16`` steps (the high 16 bits of the float32), one per coded row in row order;
4. for each dither context ``i = 0..7``: a ``uint32`` byte length ``L_i``, then ``L_i`` bytes of
   the int8 codes (as uint8) whose dither context is ``i``, in row-major order of the coded
   positions, coded by :func:`~tallstore.storage.entropy.encode_symbols` (``L_i = 0`` for none).

Decoding takes ``R`` and ``C`` from the manifest, regenerates the dither, and checks the segment's
CRC-32C first, so damaged or foreign bytes are an error before the decoders see them.
"""

from __future__ import annotations

import crc32c
import numpy as np
import torch
from numba import njit

from ..errors import CorruptArchiveError
from ..ops.delta import CONTEXTS, DeltaBlock, dither_context
from .entropy import encode_symbols, stream_error, symbols_into, u32_at


def encode_segment(block: DeltaBlock, u: torch.Tensor) -> bytes:
    """The segment of ``block`` (coded against the block's dither ``u``, rows × row length)."""
    parts = [np.float32(block.decay_scale).astype("<f4").tobytes(),
             np.packbits(block.decay.numpy(), bitorder="little").tobytes(),
             (block.steps.numpy().astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()]
    codes = block.codes.reshape(-1).numpy().view(np.uint8)
    order, bounds = _by_context(u[~block.decay])
    grouped = codes[order]
    for i in range(CONTEXTS):
        part = grouped[bounds[i] : bounds[i + 1]]
        body = encode_symbols(part) if part.size else b""
        parts += [len(body).to_bytes(4, "little"), body]
    return b"".join(parts)


def _by_context(u: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The coded positions grouped by dither context, each group in position order (a stable
    sort), and where each of the ``CONTEXTS`` groups starts and ends."""
    ctx = dither_context(u)
    order = np.argsort(ctx, kind="stable")
    bounds = np.zeros(CONTEXTS + 1, np.int64)
    np.cumsum(np.bincount(ctx, minlength=CONTEXTS), out=bounds[1:])
    return order, bounds


@njit(cache=True, nogil=True)
def _context_bounds(ctx, contexts):  # pragma: no cover - compiled
    """Where each context's group starts in the grouped order (``contexts + 1`` offsets)."""
    bounds = np.zeros(contexts + 1, np.int64)
    for i in range(ctx.size):
        bounds[ctx[i] + 1] += 1
    for c in range(contexts):
        bounds[c + 1] += bounds[c]
    return bounds


@njit(cache=True, nogil=True)
def _ungroup(grouped, bounds, ctx, out):  # pragma: no cover - compiled
    """Inverse of grouping by context (:func:`_by_context`): position ``i`` takes the next code of
    its context's group, in one pass."""
    cursor = bounds[:-1].copy()
    for i in range(ctx.size):
        c = ctx[i]
        out[i] = grouped[cursor[c]]
        cursor[c] += 1


_ENDS_EARLY, _WRONG_LENGTH, _UNDECODABLE = 1, 2, 100


@njit(cache=True, nogil=True)
def _decode_codes(data, at, ctx, codes):  # pragma: no cover - compiled
    """The ``CONTEXTS`` length-prefixed code streams from ``data[at:]``, put back in position
    order into ``codes`` (``ctx``: each position's stream): (status, the stream it stopped at,
    the offset past the last stream)."""
    bounds = _context_bounds(ctx, CONTEXTS)
    grouped = np.empty(ctx.size, np.uint8)
    for i in range(CONTEXTS):
        if data.size < at + 4:
            return _ENDS_EARLY, i, at
        length = np.int64(u32_at(data, at))
        at += 4
        lo, hi = bounds[i], bounds[i + 1]
        if length > data.size - at or (length == 0) != (hi == lo):
            return _WRONG_LENGTH, i, at
        if length:
            status = symbols_into(data[at : at + length], grouped[lo:hi])
            if status:
                return _UNDECODABLE + status, i, at
        at += length
    _ungroup(grouped, bounds, ctx, codes)
    return 0, CONTEXTS, at


def decode_segment(data: np.ndarray, crc: int, u: torch.Tensor, what: str) -> DeltaBlock:
    """The :class:`DeltaBlock` of a segment whose block has ``u.shape`` (rows, row length)."""
    if crc32c.crc32c(data) != crc:
        raise CorruptArchiveError(f"{what} does not hold what was packed (its CRC-32C differs)")
    rows, at = u.shape[0], 4 + (u.shape[0] + 7) // 8
    if data.size < at:
        raise CorruptArchiveError(f"{what} is shorter than its header")
    scale = float(data[:4].view("<f4")[0])
    decay = torch.from_numpy(np.unpackbits(data[4:at], count=rows, bitorder="little").astype(bool))
    n = rows - int(decay.sum())
    if data.size < at + 2 * n or not np.isfinite(scale):
        raise CorruptArchiveError(f"{what} is shorter than its steps or has a non-finite decay scale")
    steps = (data[at : at + 2 * n].view("<u2").astype("<u4") << 16).view("<f4").astype(np.float32)
    at += 2 * n
    if not (np.isfinite(steps).all() and (steps >= 0).all()):
        raise CorruptArchiveError(f"{what} holds a negative or non-finite step")
    ctx = dither_context(u[~decay] if bool(decay.any()) else u)
    codes = np.empty(ctx.size, np.uint8)
    status, stream, at = _decode_codes(data, at, ctx, codes)
    if status == _ENDS_EARLY:
        raise CorruptArchiveError(f"{what} ends before its code stream {stream}")
    if status == _WRONG_LENGTH:
        raise CorruptArchiveError(f"{what} has a code stream {stream} of the wrong length")
    if status:
        raise CorruptArchiveError(f"{what} cannot be decoded ({stream_error(status - _UNDECODABLE)})")
    if at != data.size:
        raise CorruptArchiveError(f"{what} has bytes past its last code stream")
    return DeltaBlock(decay, scale, torch.from_numpy(steps), torch.from_numpy(codes.view(np.int8)).reshape(n, u.shape[1]))
