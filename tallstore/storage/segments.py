"""What one coded segment holds (format v2, shared form ``quantized``), both ways.

- A **code segment** (``shared/codes``) is one row block of a masked tensor's shared vector: its
  ``rows`` float32 row scales, little endian, then the entropy-coded int8 codes of its elements
  (:func:`~tallstore.storage.entropy.encode_symbols`).
- A **mask segment** (``masks/<t>``) is task ``t``'s mask of that block, entropy-coded with
  contexts from the block's codes (:func:`~tallstore.storage.entropy.encode_mask`); bits where
  the code is 0 are not stored and decode as 0 (the rebuild does not depend on them).

Decoding takes the element count from the manifest and checks the segment's CRC-32C first, so
damaged or foreign bytes are an error before the decoders see them.
"""

from __future__ import annotations

import crc32c
import numpy as np

from ..errors import CorruptArchiveError
from .entropy import decode_mask, decode_symbols, encode_mask, encode_symbols


def encode_codes(scales: np.ndarray, q: np.ndarray) -> bytes:
    """A code segment from a block's float32 row scales and its flat int8 codes."""
    return np.ascontiguousarray(scales, dtype="<f4").tobytes() + encode_symbols(np.ascontiguousarray(q))


def mask_segment(mask: np.ndarray, q: np.ndarray, row: int) -> bytes:
    """A mask segment: ``mask`` (bool, flat) coded under the block's codes ``q``, rows of ``row``."""
    return encode_mask(np.ascontiguousarray(mask), np.ascontiguousarray(q), max(1, row))


def _checked(data: np.ndarray, crc: int, what: str) -> np.ndarray:
    if crc32c.crc32c(data) != crc:
        raise CorruptArchiveError(f"{what} does not hold what was packed (its CRC-32C differs)")
    return data


def decode_codes(data: np.ndarray, crc: int, rows: int, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(scales, codes)`` of a code segment: ``rows`` float32 scales and ``n`` int8 codes."""
    data = _checked(data, crc, what)
    if data.size < 4 * rows:
        raise CorruptArchiveError(f"{what} is shorter than its {rows} row scales")
    scales = data[: 4 * rows].view("<f4").astype(np.float32)
    if not np.isfinite(scales).all():
        raise CorruptArchiveError(f"{what} holds a non-finite row scale")
    try:
        q = decode_symbols(data[4 * rows :], n).view(np.int8)
    except ValueError as e:
        raise CorruptArchiveError(f"{what} cannot be decoded ({e})") from None
    return scales, q


def decode_mask_segment(data: np.ndarray, crc: int, q: np.ndarray, what: str) -> np.ndarray:
    """The packed mask bits (little-endian bit order) of a mask segment under codes ``q``."""
    try:
        bits = decode_mask(_checked(data, crc, what), q)
    except ValueError as e:
        raise CorruptArchiveError(f"{what} cannot be decoded ({e})") from None
    return np.packbits(bits, bitorder="little")
