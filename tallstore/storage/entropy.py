"""Entropy coding of tallstore's quantized codes and TALL masks (static rANS, numba kernels).

Three stream kinds, each decodable from its bytes plus what the caller already holds (the byte
layouts are normative in ``benchmarks/ENTROPY_NOTES.md``):

- **symbol stream** (:func:`encode_symbols`): bytes 0–255 under one static frequency table kept
  in the stream header, e.g. the quantized shared vector ``q``;
- **bit stream** (:func:`encode_bits`): one bit per position with a context 0–255 that the reader
  computes itself; context 0 is not coded (decodes as 0). The bits of one context are packed into
  bytes and coded as 256-ary symbols under a Bernoulli model picked from a fixed grid, so the
  coder runs once per 8 bits;
- **mask stream** (:func:`encode_mask`): a TALL mask as a bit stream whose contexts are the level
  of ``|q|`` at each position (``q = 0`` is not coded: the rebuild does not read those bits)
  crossed with a per-segment class chosen by the writer and stored in the stream.

Decoders take the expected output size from the caller, allocate only what that size implies,
bounds-check every read and raise :class:`ValueError` (one line) on a malformed stream. Encoders
are deterministic: every choice they make is an integer comparison, so equal inputs give equal
bytes on any machine.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np
from numba import njit

__all__ = [
    "decode_bits",
    "decode_mask",
    "decode_symbols",
    "default_thresholds",
    "encode_bits",
    "encode_mask",
    "encode_symbols",
    "mask_contexts",
    "stream_error",
    "symbols_into",
    "u32_at",
]

_RANS_L = 1 << 31  # rANS state interval [L, 2^63), renormalised 32 bits at a time
_STATES = 4  # interleaved rANS states: symbol i uses state i mod 4
_LANES = 4  # a context's bits are ordered by (position mod 4, position)
_MASK_SCALE_BITS = 16  # bit-stream byte tables sum to 2^16
_MIN_ENCODE_SCALE_BITS = 12  # the encoder's reciprocal division is exact from here up
_GRID_LOW = (8, 11, 14, 19, 26, 34, 46, 61, 82, 109, 146, 195, 261, 348, 465, 620, 827, 1101,
             1464, 1943, 2573, 3396, 4464, 5836, 7576, 9752, 12418, 15609, 19322, 23503, 28039)
# Model j of a context: P(bit = 1) = p16[j] / 65536; j = 0 is "all 0", j = 64 "all 1".
_P16 = (0, *_GRID_LOW, 32768, *(65536 - p for p in reversed(_GRID_LOW)), 65536)
_MODELS = len(_P16)  # 65
_Q12 = 4096  # writer costs are integers in units of 1/4096 bit
_INF = 1 << 30  # cost of a bit a constant model cannot code
_MAX_N = 1 << 31  # elements per stream (keeps every count and cost inside int64)
_BITS_MODE_ZERO, _BITS_MODE_RAW, _BITS_MODE_MODEL = 0, 1, 2
_SYM_MODE_CONST, _SYM_MODE_RAW, _SYM_MODE_RANS = 0, 1, 2
_MAX_LEVELS = 15
_RAW_BELOW = 512  # bit streams with fewer coded bits are written raw
_CLASS_CHOICES = (1, 2, 4, 8, 16)
_LLOYD_ROUNDS = 4
_DENSITY_BUCKETS = 1024


# ----------------------------------------------------------------------------------------------
# rANS kernels (shared by symbol and bit streams)


@njit(cache=True, nogil=True)
def _rans_encode(sym, tid, freq, cum, rcp, scale_bits):  # pragma: no cover - compiled
    """Code ``sym`` (uint8) in reverse; symbol i uses table ``tid[i]`` (or 0 if ``tid`` is
    empty) and state i mod 4. Returns the 4 final states and the 32-bit words in decoding order.

    ``x // f`` comes from the float64 reciprocal ``rcp = 1 / f`` and one correction step: the
    quotient is below 2^(63 − scale_bits) ≤ 2^51, so the estimate is off by at most 1 and the
    corrected result is the exact integer quotient (the bytes do not depend on float rounding).
    """
    n = sym.size
    words = np.empty(n + 1, np.uint32)  # at most one word per symbol
    p = words.size
    st = np.full(_STATES, _RANS_L, np.int64)
    xk = np.int64((_RANS_L >> scale_bits) << 32)
    per_symbol = tid.size > 0
    for i in range(n - 1, -1, -1):
        t = tid[i] if per_symbol else 0
        s = sym[i]
        f = freq[t, s]
        x = st[i & 3]
        if x >= xk * f:
            p -= 1
            words[p] = x & 0xFFFFFFFF
            x >>= 32
        q = np.int64(np.float64(x) * rcp[t, s])
        r = x - q * f
        if r < 0:
            q -= 1
            r += f
        elif r >= f:
            q += 1
            r -= f
        st[i & 3] = (q << scale_bits) + r + cum[t, s]
    return st, words[p:].copy()


@njit(cache=True, nogil=True, inline="always")
def _dec_step(x, t, freq, cum, lut, scale_bits):  # pragma: no cover - compiled
    """Pop one symbol from state x (before renormalisation); returns (state, symbol)."""
    slot = x & ((1 << scale_bits) - 1)
    s = lut[t, slot]
    return freq[t, s] * (x >> scale_bits) + slot - cum[t, s], s


@njit(cache=True, nogil=True)
def _rans_decode(words, st0, tid, freq, cum, lut, scale_bits, out):  # pragma: no cover
    """Decode ``out.size`` symbols into ``out``. 0 = ok, -1 = ran out of words, -2 = words left
    over or a final state is not the encoder's initial state (a corrupt stream)."""
    n = out.size
    m = words.size
    pos = 0
    per_symbol = tid.size > 0
    x0, x1, x2, x3 = st0[0], st0[1], st0[2], st0[3]
    t0 = t1 = t2 = t3 = 0
    n4 = n & ~3
    for i in range(0, n4, 4):
        if per_symbol:
            t0, t1, t2, t3 = tid[i], tid[i + 1], tid[i + 2], tid[i + 3]
        x0, out[i] = _dec_step(x0, t0, freq, cum, lut, scale_bits)
        x1, out[i + 1] = _dec_step(x1, t1, freq, cum, lut, scale_bits)
        x2, out[i + 2] = _dec_step(x2, t2, freq, cum, lut, scale_bits)
        x3, out[i + 3] = _dec_step(x3, t3, freq, cum, lut, scale_bits)
        if x0 < _RANS_L:
            if pos >= m:
                return -1
            x0 = (x0 << 32) | np.int64(words[pos])
            pos += 1
        if x1 < _RANS_L:
            if pos >= m:
                return -1
            x1 = (x1 << 32) | np.int64(words[pos])
            pos += 1
        if x2 < _RANS_L:
            if pos >= m:
                return -1
            x2 = (x2 << 32) | np.int64(words[pos])
            pos += 1
        if x3 < _RANS_L:
            if pos >= m:
                return -1
            x3 = (x3 << 32) | np.int64(words[pos])
            pos += 1
    st = np.empty(_STATES, np.int64)
    st[0], st[1], st[2], st[3] = x0, x1, x2, x3
    for i in range(n4, n):
        t = tid[i] if per_symbol else 0
        x, out[i] = _dec_step(st[i & 3], t, freq, cum, lut, scale_bits)
        if x < _RANS_L:
            if pos >= m:
                return -1
            x = (x << 32) | np.int64(words[pos])
            pos += 1
        st[i & 3] = x
    if pos != m:
        return -2
    for j in range(_STATES):
        if st[j] != _RANS_L:
            return -2
    return 0


# ----------------------------------------------------------------------------------------------
# Bit-stream kernels: contexts, partition by context, and its inverse


@njit(cache=True, nogil=True)
def _contexts_kernel(key, seg, cls, table):  # pragma: no cover - compiled
    """``ctx[i] = table[cls[i // seg], key[i]]`` and the count of each context per lane."""
    n = key.size
    ctx = np.empty(n, np.uint8)
    lanes = np.zeros((_LANES, 256), np.int64)
    a = 0
    s = 0
    while a < n:
        e = min(n, a + seg)
        row = table[cls[s]]
        i = a
        while i < e and (i & 3 or i + 4 > e):
            c = row[key[i]]
            ctx[i] = c
            lanes[i & 3, c] += 1
            i += 1
        while i + 4 <= e:  # i is a multiple of 4 here
            c0, c1, c2, c3 = row[key[i]], row[key[i + 1]], row[key[i + 2]], row[key[i + 3]]
            ctx[i], ctx[i + 1], ctx[i + 2], ctx[i + 3] = c0, c1, c2, c3
            lanes[0, c0] += 1
            lanes[1, c1] += 1
            lanes[2, c2] += 1
            lanes[3, c3] += 1
            i += 4
        while i < e:
            c = row[key[i]]
            ctx[i] = c
            lanes[i & 3, c] += 1
            i += 1
        a = e
        s += 1
    return ctx, lanes


@njit(cache=True, nogil=True)
def _lane_counts(ctx):  # pragma: no cover - compiled
    """Count of each context value per lane (position mod 4)."""
    lanes = np.zeros((_LANES, 256), np.int64)
    for i in range(ctx.size):
        lanes[i & 3, ctx[i]] += 1
    return lanes


@njit(cache=True, nogil=True)
def _scatter(bits, ctx, base, packed):  # pragma: no cover - compiled
    """Stable partition into LSB-first packed bytes (zeroed by the caller): bit i becomes bit
    number ``base[i % 4, ctx[i]] + rank`` of ``packed``, rank counting earlier positions of the
    same lane and context."""
    cur = base.copy()
    n = ctx.size
    n4 = n & ~3
    for i in range(0, n4, 4):
        c0 = ctx[i]
        c1 = ctx[i + 1]
        c2 = ctx[i + 2]
        c3 = ctx[i + 3]
        k0 = cur[0, c0]
        k1 = cur[1, c1]
        k2 = cur[2, c2]
        k3 = cur[3, c3]
        packed[k0 >> 3] |= bits[i] << (k0 & 7)
        packed[k1 >> 3] |= bits[i + 1] << (k1 & 7)
        packed[k2 >> 3] |= bits[i + 2] << (k2 & 7)
        packed[k3 >> 3] |= bits[i + 3] << (k3 & 7)
        cur[0, c0] = k0 + 1
        cur[1, c1] = k1 + 1
        cur[2, c2] = k2 + 1
        cur[3, c3] = k3 + 1
    for i in range(n4, n):
        c = ctx[i]
        k = cur[i & 3, c]
        packed[k >> 3] |= bits[i] << (k & 7)
        cur[i & 3, c] = k + 1


@njit(cache=True, nogil=True)
def _gather(packed, ctx, base, out):  # pragma: no cover - compiled
    """Inverse of :func:`_scatter` reading LSB-first packed bytes: ``out[i]`` = bit i."""
    cur = base.copy()
    n = ctx.size
    n4 = n & ~3
    for i in range(0, n4, 4):
        c0 = ctx[i]
        c1 = ctx[i + 1]
        c2 = ctx[i + 2]
        c3 = ctx[i + 3]
        k0 = cur[0, c0]
        k1 = cur[1, c1]
        k2 = cur[2, c2]
        k3 = cur[3, c3]
        out[i] = (packed[k0 >> 3] >> (k0 & 7)) & 1
        out[i + 1] = (packed[k1 >> 3] >> (k1 & 7)) & 1
        out[i + 2] = (packed[k2 >> 3] >> (k2 & 7)) & 1
        out[i + 3] = (packed[k3 >> 3] >> (k3 & 7)) & 1
        cur[0, c0] = k0 + 1
        cur[1, c1] = k1 + 1
        cur[2, c2] = k2 + 1
        cur[3, c3] = k3 + 1
    for i in range(n4, n):
        c = ctx[i]
        k = cur[i & 3, c]
        out[i] = (packed[k >> 3] >> (k & 7)) & 1
        cur[i & 3, c] = k + 1


@njit(cache=True, nogil=True)
def _group_histograms(packed, starts, lengths):  # pragma: no cover - compiled
    """Byte histogram of each group ``packed[starts[g] : starts[g] + lengths[g]]``."""
    hist = np.zeros((starts.size, 256), np.int64)
    for g in range(starts.size):
        for i in range(starts[g], starts[g] + lengths[g]):
            hist[g, packed[i]] += 1
    return hist


@njit(cache=True, nogil=True)
def _segment_stats(key, bits, seg):  # pragma: no cover - compiled
    """Per segment: coded positions (code byte ≠ 0) and ones among them. (Each segment is
    sliced out first so the inner loop vectorises.)"""
    n = key.size
    nseg = (n + seg - 1) // seg
    stats = np.zeros((nseg, 2), np.int64)
    for s in range(nseg):
        k = key[s * seg : min(n, s * seg + seg)]
        b = bits[s * seg : min(n, s * seg + seg)]
        coded = np.uint32(0)
        ones = np.uint32(0)
        for i in range(k.size):
            nz = np.uint8(k[i] != 0)
            coded += nz
            ones += nz & b[i]
        stats[s, 0] = coded
        stats[s, 1] = ones
    return stats


# ----------------------------------------------------------------------------------------------
# Fixed-point helpers and the model grid


def _ilog2_q12(v: np.ndarray) -> np.ndarray:
    """``log2(v)`` in units of 1/4096 (truncated), for integers ``1 <= v < 2^31``, by integer
    squaring only (no libm), so writers on any machine rank candidate models identically."""
    return _ilog2_q12_kernel(np.ascontiguousarray(v, dtype=np.int64).reshape(-1)).reshape(
        np.shape(v)
    )


@njit(cache=True, nogil=True)
def _ilog2_q12_kernel(v):  # pragma: no cover - compiled
    out = np.empty(v.size, np.int64)
    for i in range(v.size):
        out[i] = _ilog2_q12_one(v[i])
    return out


@njit(cache=True, nogil=True)
def _ilog2_q12_one(x):  # pragma: no cover - compiled
    e = 0
    while (x >> (e + 1)) > 0:  # e = floor(log2 x)
        e += 1
    m = x << (30 - e)  # mantissa in [2^30, 2^31), Q30
    frac = 0
    for _ in range(12):
        m = (m * m) >> 30
        top = m >= (1 << 31)
        if top:
            m >>= 1
        frac = (frac << 1) | top
    return e * _Q12 + frac


@functools.cache
def _log2_table() -> np.ndarray:
    """``_ilog2_q12(v)`` for ``v = 0 … 2^16`` (entry 0 unused)."""
    table = _ilog2_q12(np.arange(1 << 16 | 1).clip(1))
    table.flags.writeable = False
    return table


def _bernoulli_freqs(p16: int) -> np.ndarray:
    """Byte table of model ``p16``: ``f[b] = 1 + floor(65280 · p^k (1−p)^(8−k))`` with
    ``k = popcount(b)``, in exact integers; the remainder to 2^16 goes to the likeliest byte."""
    total = 1 << _MASK_SCALE_BITS
    f = np.empty(256, np.int64)
    for b in range(256):
        k = b.bit_count()
        w = p16**k * (65536 - p16) ** (8 - k)  # < 2^128, exact Python integer
        f[b] = 1 + (w * (total - 256)) // (1 << 128)
    f[0 if p16 <= 32768 else 255] += total - int(f.sum())
    return f


class _Grid(NamedTuple):
    """Tables of the 65 bit-stream models (rows 0 and 64, the constant models, are not coded)."""

    freq: np.ndarray  # (65, 256) byte frequencies, each row sums to 2^16
    cum: np.ndarray  # (65, 256) cumulative frequencies
    rcp: np.ndarray  # (65, 256) float64 1 / freq, for the encoder's division
    lut: np.ndarray  # (65, 65536) uint8: slot → byte, for the decoder
    byte_cost: np.ndarray  # (65, 256) code length of each byte, 1/4096 bit
    bit_cost: np.ndarray  # (2, 65): code length of a 1 and of a 0, 1/4096 bit
    popcount_cost: np.ndarray  # (65, 9): byte_cost of the bytes with k ones (the same for each of them)


@functools.cache
def _grid() -> _Grid:
    """Build the model tables once per process (about 4.5 MB, mostly the decode lookup)."""
    total = 1 << _MASK_SCALE_BITS
    freq = np.full((_MODELS, 256), total // 256, np.int64)
    for j in range(1, _MODELS - 1):
        freq[j] = _bernoulli_freqs(_P16[j])
    cum = np.zeros_like(freq)
    cum[:, 1:] = np.cumsum(freq[:, :-1], axis=1)
    lut = np.empty((_MODELS, total), np.uint8)
    for j in range(_MODELS):
        lut[j] = np.repeat(np.arange(256, dtype=np.uint8), freq[j])
    p = np.asarray(_P16, np.int64)
    one = np.full(_MODELS, _INF, np.int64)
    zero = np.full(_MODELS, _INF, np.int64)
    one[1:] = 16 * _Q12 - _ilog2_q12(p[1:])
    zero[:-1] = 16 * _Q12 - _ilog2_q12(65536 - p[:-1])
    byte_cost = _MASK_SCALE_BITS * _Q12 - _ilog2_q12(freq)
    popcount_cost = byte_cost[:, [(1 << k) - 1 for k in range(9)]]
    grid = _Grid(freq, cum, 1.0 / freq, lut, byte_cost, np.stack([one, zero]), popcount_cost)
    for a in grid:
        a.flags.writeable = False
    return grid


# ----------------------------------------------------------------------------------------------
# Small byte-level helpers


def _as_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A read-only uint8 view of ``data`` (no copy for bytes-like inputs)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError("stream must be bytes or a 1-D uint8 array")
        return data
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def _varint(value: int) -> bytes:
    """Unsigned LEB128."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    """Bounds-checked cursor over a stream; every failure is a one-line ValueError."""

    def __init__(self, buf: np.ndarray, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def fail(self, why: str) -> ValueError:
        return ValueError(f"corrupt {self.what}: {why}")

    def u8(self) -> int:
        if self.pos >= self.buf.size:
            raise self.fail("truncated header")
        self.pos += 1
        return int(self.buf[self.pos - 1])

    def take(self, count: int) -> np.ndarray:
        if count < 0 or self.pos + count > self.buf.size:
            raise self.fail("truncated")
        self.pos += count
        return self.buf[self.pos - count : self.pos]

    def varint(self, limit: int) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > limit:
                    raise self.fail(f"value {value} out of range")
                return value
        raise self.fail("varint too long")

    def rest(self) -> np.ndarray:
        return self.take(self.buf.size - self.pos)

    def end(self) -> None:
        if self.pos != self.buf.size:
            raise self.fail(f"{self.buf.size - self.pos} trailing bytes")


def _pack_states(states: np.ndarray) -> bytes:
    return states.astype("<u8").tobytes()


def _decode_rans(
    reader: _Reader, tid: np.ndarray, freq: np.ndarray, cum: np.ndarray, lut: np.ndarray,
    scale_bits: int, out: np.ndarray
) -> None:
    """Read states and words (the rest of ``reader``) and decode ``out.size`` symbols into
    ``out``, or raise ValueError."""
    status, states, words = _payload(reader.rest(), 0, out.size)
    if status == 0:
        status = _rans_status(_rans_decode(words, states, tid, freq, cum, lut, scale_bits, out))
    if status:
        raise reader.fail(_STREAM_ERRORS[status])


_STREAM_ERRORS = {
    1: "truncated header", 2: "trailing bytes", 3: "truncated", 4: "unknown mode",
    5: "scale_bits out of range", 6: "symbol beyond 255", 7: "varint too long",
    8: "frequency out of range", 9: "frequencies do not sum to 2^scale_bits", 10: "rANS state out of range",
    11: "payload is not whole 32-bit words", 12: "more payload than symbols", 13: "truncated payload",
    14: "rANS check failed",
}


@njit(cache=True, nogil=True)
def _rans_status(code):  # pragma: no cover - compiled
    """:func:`_rans_decode`'s result as a key of ``_STREAM_ERRORS`` (0 = ok)."""
    return 0 if code == 0 else (13 if code == -1 else 14)


@njit(cache=True, nogil=True, inline="always")
def u32_at(buf, a):  # pragma: no cover - compiled
    """The little-endian ``u32`` at ``buf[a : a + 4]`` (bounds checked by the caller)."""
    return (np.uint32(buf[a]) | (np.uint32(buf[a + 1]) << np.uint32(8))
            | (np.uint32(buf[a + 2]) << np.uint32(16)) | (np.uint32(buf[a + 3]) << np.uint32(24)))


@njit(cache=True, nogil=True)
def _payload(buf, pos, n):  # pragma: no cover - compiled
    """The 4 rANS states and the 32-bit words of ``buf[pos:]`` for ``n`` symbols: (status, states,
    words), status 0 or a key of ``_STREAM_ERRORS``."""
    st = np.empty(_STATES, np.int64)
    size = buf.size
    if size - pos < 8 * _STATES:
        return 3, st, np.empty(0, np.uint32)
    for j in range(_STATES):
        x = np.uint64(0)
        for b in range(8):
            x |= np.uint64(buf[pos + 8 * j + b]) << np.uint64(8 * b)
        if x < np.uint64(_RANS_L) or x >= np.uint64(1 << 63):
            return 10, st, np.empty(0, np.uint32)
        st[j] = np.int64(x)
    pos += 8 * _STATES
    rest = size - pos
    if rest % 4:
        return 11, st, np.empty(0, np.uint32)
    m = rest // 4
    if m > n + 1:  # an encoder emits at most one word per symbol
        return 12, st, np.empty(0, np.uint32)
    words = np.empty(m, np.uint32)
    for k in range(m):
        a = pos + 4 * k
        words[k] = u32_at(buf, a)
    return 0, st, words


# ----------------------------------------------------------------------------------------------
# Symbol streams


def _normalise(counts: np.ndarray, scale_bits: int) -> np.ndarray:
    """Frequencies summing to ``2^scale_bits``, ≥ 1 wherever ``counts`` > 0 (integers only)."""
    present = counts > 0
    nsym = int(present.sum())
    total = 1 << scale_bits
    f = np.zeros(256, np.int64)
    f[present] = 1 + (counts[present] * (total - nsym)) // int(counts.sum())
    f[int(np.argmax(counts))] += total - int(f.sum())
    return f


def _table_header_size(freq: np.ndarray) -> int:
    """Length of :func:`_table_header` without building it."""
    f = freq[freq > 0] - 1
    return 2 + f.size + int((f >= 1 << 7).sum() + (f >= 1 << 14).sum())


def _table_header(freq: np.ndarray, scale_bits: int) -> bytes:
    syms = np.flatnonzero(freq)
    out = bytearray((scale_bits, syms.size - 2))
    prev = -1
    for s in syms:
        out.append(int(s) - prev - 1)
        out += _varint(int(freq[s]) - 1)
        prev = int(s)
    return bytes(out)


def encode_symbols(symbols: np.ndarray) -> bytes:
    """Code a 1-D array of byte symbols (uint8 or int8, viewed as bytes) under one static table.

    The table (symbols present and their frequencies) goes in the header; the writer picks the
    table precision that minimises header plus payload, and falls back to a constant or raw
    stream where that is smaller.
    """
    sym = _symbol_bytes(symbols)
    n = sym.size
    counts = np.bincount(sym, minlength=256).astype(np.int64)
    nsym = int((counts > 0).sum())
    if nsym <= 1:
        return bytes((_SYM_MODE_CONST, int(sym[0]) if n else 0))
    best: tuple[int, int] | None = None  # (estimated cost in 1/4096 bit, scale_bits)
    present = counts > 0
    for scale_bits in range(_MIN_ENCODE_SCALE_BITS, 17):
        f = _normalise(counts, scale_bits)
        payload = int((counts[present] * (scale_bits * _Q12 - _log2_table()[f[present]])).sum())
        cost = payload + 8 * _Q12 * (_table_header_size(f) + 8 * _STATES)
        if best is None or cost < best[0]:
            best = (cost, scale_bits)
    assert best is not None
    scale_bits = best[1]
    if best[0] >= 8 * _Q12 * n:
        return bytes((_SYM_MODE_RAW,)) + sym.tobytes()
    f = _normalise(counts, scale_bits)
    cum = np.zeros(256, np.int64)
    cum[1:] = np.cumsum(f[:-1])
    states, words = _rans_encode(
        sym, np.empty(0, np.uint8), f[None], cum[None], 1.0 / np.maximum(f, 1)[None], scale_bits
    )
    coded = (
        bytes((_SYM_MODE_RANS,)) + _table_header(f, scale_bits) + _pack_states(states)
        + words.astype("<u4").tobytes()
    )
    if len(coded) >= n + 1:
        return bytes((_SYM_MODE_RAW,)) + sym.tobytes()
    return coded


def decode_symbols(data: bytes | bytearray | memoryview | np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`encode_symbols`: exactly ``n`` uint8 symbols, or ValueError."""
    if not 0 <= n < _MAX_N:
        raise ValueError(f"symbol count {n} out of range")
    reader = _Reader(_as_bytes(data), "symbol stream")
    return _read_symbols(reader, n)


def _read_symbols(reader: _Reader, n: int) -> np.ndarray:
    """The ``n`` symbols of the stream that is the rest of ``reader`` (one compiled pass)."""
    out = np.empty(n, np.uint8)
    status = symbols_into(reader.rest(), out)
    if status:
        raise reader.fail(_STREAM_ERRORS[status])
    return out


def stream_error(status: int) -> str:
    """What a nonzero status of :func:`symbols_into` means, as :func:`decode_symbols` says it."""
    return f"corrupt symbol stream: {_STREAM_ERRORS[status]}"


@njit(cache=True, nogil=True)
def symbols_into(buf, out):  # pragma: no cover - compiled
    """Decode the symbol stream ``buf`` (all of it) into ``out``: 0, or a nonzero status that
    :func:`stream_error` explains. Compiled whole, header included, and callable from compiled
    code: a delta segment holds eight small streams, whose headers cost more to parse in Python
    than their symbols to decode."""
    size, n = buf.size, out.size
    if size < 1:
        return 1
    mode = buf[0]
    if mode == _SYM_MODE_CONST:
        if size < 2:
            return 1
        if size > 2:
            return 2
        out[:] = buf[1]
        return 0
    if mode == _SYM_MODE_RAW:
        if size - 1 < n:
            return 3
        if size - 1 > n:
            return 2
        out[:] = buf[1 : 1 + n]
        return 0
    if mode != _SYM_MODE_RANS:
        return 4
    if size < 3:
        return 1
    scale_bits = np.int64(buf[1])
    if not 1 <= scale_bits <= 16:
        return 5
    nsym = np.int64(buf[2]) + 2
    total = np.int64(1) << scale_bits
    freq = np.zeros((1, 256), np.int64)
    pos = 3
    sym = -1
    for _ in range(nsym):
        if pos >= size:
            return 1
        sym += np.int64(buf[pos]) + 1
        pos += 1
        if sym > 255:
            return 6
        value = np.int64(0)
        shift = 0
        while True:
            if shift >= 64:
                return 7
            if pos >= size:
                return 1
            byte = np.int64(buf[pos])
            pos += 1
            if byte & 0x7F:
                if shift >= 17:  # above 2^16 > total - 1 whatever follows
                    return 8
                value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        if value > total - 1:
            return 8
        freq[0, sym] = value + 1
    if freq.sum() != total:
        return 9
    status, st, words = _payload(buf, pos, n)
    if status:
        return status
    cum = np.zeros((1, 256), np.int64)
    lut = np.empty((1, total), np.uint8)
    c = 0
    for k in range(256):
        cum[0, k] = c
        for j in range(freq[0, k]):
            lut[0, c + j] = k
        c += freq[0, k]
    return _rans_status(_rans_decode(words, st, np.empty(0, np.uint8), freq, cum, lut, scale_bits, out))


def _symbol_bytes(symbols: np.ndarray) -> np.ndarray:
    sym = np.asarray(symbols)
    if sym.ndim != 1 or sym.dtype not in (np.uint8, np.int8):
        raise ValueError("symbols must be a 1-D uint8 or int8 array")
    if sym.size >= _MAX_N:
        raise ValueError(f"at most {_MAX_N - 1} symbols per stream")
    return np.ascontiguousarray(sym).view(np.uint8)


# ----------------------------------------------------------------------------------------------
# Bit streams


def _layout(
    lanes: np.ndarray, first: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each context's bytes live in a working buffer: per context its bit count, first
    byte and byte length, and the (lane, context) bit offsets of its group.

    Groups are whole bytes, in ascending context order except that the contexts flagged in
    ``first`` (if given) come before the others; context 0 (not coded) comes last, so its bits
    land in scratch space past the coded bytes. (The stream order is fixed by the format; this
    is only the buffer layout.)
    """
    counts = lanes.sum(axis=0)
    nbytes = (counts + 7) // 8
    rank = np.arange(256) if first is None else np.where(first, 0, 256) + np.arange(256)
    rank[0] = 1 << 20
    order = np.argsort(rank, kind="stable")
    start = np.empty(256, np.int64)
    start[order] = np.cumsum(nbytes[order]) - nbytes[order]
    base = 8 * start[None, :] + np.concatenate(
        [np.zeros((1, 256), np.int64), np.cumsum(lanes[:-1], axis=0)]
    )
    return counts, start, nbytes, base


def _choose_models(hist: np.ndarray, counts: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """Model index per group: 0 or 64 for a constant group, else the cheapest grid model."""
    # A model's byte cost depends on the byte only through its popcount (_bernoulli_freqs), so a
    # group's costs are integer products over the 9 popcount classes: exact, and no BLAS thread
    # pool is woken (whose idle workers spin on a core for a while after every call).
    cost = (hist @ _POPCOUNT_CLASS) @ _grid().popcount_cost[1:-1].T
    j = 1 + np.argmin(cost, axis=1)
    j = np.where(ones == 0, 0, j)
    return np.where(ones == counts, _MODELS - 1, j)


def encode_bits(bits: np.ndarray, ctx: np.ndarray) -> bytes:
    """Code ``bits`` (1-D bool/uint8) under contexts ``ctx`` (uint8, same length).

    Positions with context 0 are not coded and decode as 0. Each other context gets one model
    from the fixed grid, fitted to that context's bits (bytes of 8 bits as 256-ary symbols).
    """
    b, c = _check_bits(bits, ctx)
    return _encode_bits(b, c, _lane_counts(c))


def _encode_bits(bits: np.ndarray, ctx: np.ndarray, lanes: np.ndarray) -> bytes:
    coded = int(ctx.size - lanes[:, 0].sum())
    if coded < _RAW_BELOW:  # a model's states and table bytes would outweigh what it saves
        raw = bits[ctx != 0]
        if not raw.any():
            return bytes((_BITS_MODE_ZERO,))
        present = int(np.count_nonzero(lanes[:, 1:].sum(axis=0)))
        if raw.all() and present < (coded + 7) // 8:  # every group constant 1
            return bytes((_BITS_MODE_MODEL,)) + bytes((_MODELS - 1,)) * present
        return bytes((_BITS_MODE_RAW,)) + np.packbits(raw, bitorder="little").tobytes()
    counts, start, nbytes, base = _layout(lanes)
    packed = np.zeros(int(start[0] + nbytes[0]), np.uint8)  # context 0 lands past the end
    _scatter(bits, ctx, base, packed)
    present = np.flatnonzero(counts[1:]) + 1
    hist = _group_histograms(packed, start[present], nbytes[present])
    ones = _POPCOUNT @ hist.T
    if not ones.any():
        return bytes((_BITS_MODE_ZERO,))
    models = _choose_models(hist, counts[present], ones)
    stream = _model_stream(packed, start[present], nbytes[present], models)
    if len(stream) > (coded + 7) // 8:
        raw = np.packbits(bits[ctx != 0], bitorder="little")
        return bytes((_BITS_MODE_RAW,)) + raw.tobytes()
    return bytes((_BITS_MODE_MODEL,)) + stream


_POPCOUNT = np.array([b.bit_count() for b in range(256)], np.int64)
_POPCOUNT_CLASS = (_POPCOUNT[:, None] == np.arange(9)).astype(np.int64)  # byte → one-hot popcount


def _model_stream(
    packed: np.ndarray, starts: np.ndarray, lengths: np.ndarray, models: np.ndarray
) -> bytes:
    """Model bytes, then (if any group is not constant) rANS states and words."""
    head = models.astype(np.uint8).tobytes()
    coded = (models > 0) & (models < _MODELS - 1)
    if not coded.any():
        return head
    keep = np.repeat(coded, lengths)  # the groups are contiguous from byte 0, in context order
    sym = packed[: keep.size][keep]
    tid = np.repeat(models[coded].astype(np.uint8), lengths[coded])
    g = _grid()
    states, words = _rans_encode(sym, tid, g.freq, g.cum, g.rcp, _MASK_SCALE_BITS)
    return head + _pack_states(states) + words.astype("<u4").tobytes()


def decode_bits(data: bytes | bytearray | memoryview | np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_bits`: ``ctx.size`` bits as a bool array, or ValueError."""
    c = _check_ctx(ctx)
    reader = _Reader(_as_bytes(data), "bit stream")
    return _decode_bits(reader, c, _lane_counts(c))


def _decode_bits(reader: _Reader, ctx: np.ndarray, lanes: np.ndarray) -> np.ndarray:
    n = ctx.size
    mode = reader.u8()
    if mode == _BITS_MODE_ZERO:
        reader.end()
        return np.zeros(n, np.bool_)
    if mode == _BITS_MODE_RAW:
        coded = ctx != 0
        m = int(n - lanes[:, 0].sum())
        raw = reader.take((m + 7) // 8)
        reader.end()
        if m % 8 and raw[-1] >> (m % 8):
            raise reader.fail("nonzero padding bits")
        out = np.zeros(n, np.bool_)
        out[coded] = np.unpackbits(raw, count=m, bitorder="little").view(np.bool_)
        return out
    if mode != _BITS_MODE_MODEL:
        raise reader.fail(f"unknown mode {mode}")
    counts = lanes.sum(axis=0)
    present = np.flatnonzero(counts[1:]) + 1
    models = reader.take(present.size).astype(np.int64)
    if np.any(models >= _MODELS):
        raise reader.fail("model index out of range")
    model_of = np.zeros(256, np.int64)
    model_of[present] = models
    is_coded = (model_of > 0) & (model_of < _MODELS - 1)
    counts, start, nbytes, base = _layout(lanes, first=is_coded)  # coded groups first, in order
    coded_bytes = int(nbytes[is_coded].sum())
    packed = np.zeros(int(start[0] + nbytes[0]), np.uint8)
    for c in np.flatnonzero(model_of == _MODELS - 1):  # constant-one groups
        packed[start[c] : start[c] + nbytes[c]] = 0xFF
    if coded_bytes:
        g = _grid()
        tid = np.repeat(model_of[is_coded].astype(np.uint8), nbytes[is_coded])
        _decode_rans(reader, tid, g.freq, g.cum, g.lut, _MASK_SCALE_BITS, packed[:coded_bytes])
        tail = counts % 8
        pad = is_coded & (tail > 0)
        if np.any(packed[(start + nbytes - 1)[pad]] >> tail[pad]):
            raise reader.fail("nonzero padding bits")
    else:
        reader.end()
    out = np.empty(n, np.uint8)
    _gather(packed, ctx, base, out)
    return out.view(np.bool_)


def _check_ctx(ctx: np.ndarray) -> np.ndarray:
    c = np.asarray(ctx)
    if c.ndim != 1 or c.dtype != np.uint8:
        raise ValueError("ctx must be a 1-D uint8 array")
    if c.size >= _MAX_N:
        raise ValueError(f"at most {_MAX_N - 1} bits per stream")
    return np.ascontiguousarray(c)


def _check_bits(bits: np.ndarray, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = _check_ctx(ctx)
    b = np.asarray(bits)
    if b.shape != c.shape or b.dtype not in (np.bool_, np.uint8):
        raise ValueError("bits must be a bool or uint8 array shaped like ctx")
    if b.dtype == np.uint8 and b.size and int(b.max()) > 1:
        raise ValueError("uint8 bits must be 0 or 1")
    return np.ascontiguousarray(b).view(np.uint8), c


# ----------------------------------------------------------------------------------------------
# Mask streams: contexts from |q| levels x per-segment classes


def default_thresholds(qmax: int) -> tuple[int, ...]:
    """Level boundaries for codes up to ``|q| = qmax``: one level per magnitude up to 8, then
    two per octave (12, 16, 24, …), at most 15 levels."""
    ladder = (2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96)
    return tuple(t for t in ladder if t <= qmax)


def _level_of(thresholds: tuple[int, ...]) -> np.ndarray:
    """Level of each int8 code byte: 0 for q = 0, else 1 + #{thresholds ≤ |q|}."""
    mag = np.abs(np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int64))
    level = 1 + np.searchsorted(np.asarray(thresholds, np.int64), mag, side="right")
    return np.where(mag == 0, 0, level).astype(np.uint8)


@functools.lru_cache(maxsize=64)  # at most 64 × 64 KiB; a model's blocks share a handful of geometries
def _context_table(thresholds: tuple[int, ...], classes: int) -> np.ndarray:
    """``table[r, byte]``: context of a code byte in a class-``r`` segment (read-only: cached,
    since a small block would otherwise spend a fifth of its decode time building it)."""
    level = _level_of(thresholds).astype(np.int64)
    nlev = len(thresholds) + 1
    r = np.arange(classes, dtype=np.int64)[:, None]
    table = np.where(level == 0, 0, level + nlev * r).astype(np.uint8)
    table.flags.writeable = False
    return table


def mask_contexts(
    q: np.ndarray, segment: int, classes: np.ndarray, thresholds: tuple[int, ...]
) -> np.ndarray:
    """Context of every mask position: 0 where ``q = 0``, else ``level(|q|) + L · class`` with
    ``L = len(thresholds) + 1`` levels and ``classes[i // segment]`` the segment's class."""
    key = _code_bytes(q)
    cls = np.ascontiguousarray(classes, dtype=np.uint8)
    nclass = int(cls.max()) + 1 if cls.size else 1
    thresholds = tuple(int(t) for t in thresholds)
    _check_geometry(key.size, segment, cls.size, thresholds, nclass)
    return _contexts_kernel(key, segment, cls, _context_table(thresholds, nclass))[0]


def _check_geometry(
    n: int, segment: int, nseg: int, thresholds: tuple[int, ...], nclass: int
) -> None:
    if segment < 1 or (n and segment > n):
        raise ValueError(f"segment {segment} out of range for {n} positions")
    if nseg != -(-n // segment):
        raise ValueError(f"{nseg} classes for {-(-n // segment)} segments")
    if len(thresholds) >= _MAX_LEVELS or any(
        not 2 <= t <= 128 for t in thresholds
    ) or any(a >= b for a, b in itertools.pairwise(thresholds)):
        raise ValueError(f"bad level thresholds {thresholds}")
    if nclass * (len(thresholds) + 1) > 255:
        raise ValueError("levels × classes must be at most 255")


def _code_bytes(q: np.ndarray) -> np.ndarray:
    key = np.asarray(q)
    if key.ndim != 1 or key.dtype != np.int8:
        raise ValueError("q must be a 1-D int8 array")
    if key.size >= _MAX_N:
        raise ValueError(f"at most {_MAX_N - 1} positions per stream")
    return np.ascontiguousarray(key).view(np.uint8)


def _choose_classes(stats: np.ndarray, choices: tuple[int, ...]) -> np.ndarray:
    """Per-segment classes by density of coded ones (see :func:`_classes_kernel`)."""
    cost_one, cost_zero = _grid().bit_cost
    return _classes_kernel(np.ascontiguousarray(stats[:, 0]), np.ascontiguousarray(stats[:, 1]),
                           np.asarray(choices, np.int64), _LLOYD_ROUNDS, cost_one, cost_zero)


@njit(cache=True, nogil=True)
def _classes_kernel(total, ones, choices, rounds, cost_one, cost_zero):  # pragma: no cover
    """Segments go to 1025 density buckets (``⌊1024 · ones / coded⌋``); for each class count in
    ``choices`` the buckets start as quantile groups and are refined by Lloyd iterations on
    integer code lengths (a bucket's cost under a class is linear in its summed counts, so this
    is exact for bucket-level assignments). The count with the smallest estimate, coded bits
    plus class stream, wins; one class unless that is beaten. Returns uint8 per segment."""
    nseg = total.size
    nb = _DENSITY_BUCKETS + 1
    bucket = np.empty(nseg, np.int64)
    seg_n = np.zeros(nb, np.int64)
    b_total = np.zeros(nb, np.int64)
    b_ones = np.zeros(nb, np.int64)
    for s in range(nseg):
        b = (ones[s] * _DENSITY_BUCKETS) // max(total[s], 1)
        bucket[s] = b
        seg_n[b] += 1
        b_total[b] += total[s]
        b_ones[b] += ones[s]
    best = -1
    all_total, all_ones = b_total.sum(), b_ones.sum()
    for j in range(cost_one.size):
        c = all_ones * cost_one[j] + (all_total - all_ones) * cost_zero[j]
        if best < 0 or c < best:
            best = c
    used_buckets = np.flatnonzero(seg_n)  # Lloyd runs over the non-empty buckets only
    seg_n, b_total, b_ones = seg_n[used_buckets], b_total[used_buckets], b_ones[used_buckets]
    before = np.cumsum(seg_n) - seg_n  # segments in lower buckets
    best_of_used = np.zeros(used_buckets.size, np.int64)
    log_nseg = _ilog2_q12_one(max(nseg, 1))
    for nclass in choices:
        if nclass < 2 or nseg < 2 * nclass:
            continue
        of_bucket, cost = _lloyd(b_total, b_ones, before * nclass // nseg, nclass, rounds,
                                 cost_one, cost_zero)
        per_class = np.zeros(nclass, np.int64)
        for b in range(of_bucket.size):
            per_class[of_bucket[b]] += seg_n[b]
        used = 0
        for r in range(nclass):  # order-0 code length of the class stream, table, states
            if per_class[r]:
                used += 1
                cost += per_class[r] * (log_nseg - _ilog2_q12_one(per_class[r]))
        cost += 8 * _Q12 * (3 * used + 8 * _STATES + 4)
        if cost < best:
            best = cost
            best_of_used = of_bucket
    best_of_bucket = np.zeros(nb, np.int64)
    best_of_bucket[used_buckets] = best_of_used
    out = np.empty(nseg, np.uint8)
    for s in range(nseg):
        out[s] = best_of_bucket[bucket[s]]
    return out


@njit(cache=True, nogil=True)
def _lloyd(total, ones, cls, nclass, rounds, cost_one, cost_zero):  # pragma: no cover
    """Lloyd iterations over buckets: fit each class's cheapest grid model, move each bucket to
    its cheapest class (ties to the lower class); returns the classes and the coded cost."""
    nb = total.size
    cls = cls.copy()
    cost = 0
    for _ in range(rounds):
        tc = np.zeros(nclass, np.int64)
        oc = np.zeros(nclass, np.int64)
        for b in range(nb):
            tc[cls[b]] += total[b]
            oc[cls[b]] += ones[b]
        model = np.zeros(nclass, np.int64)
        for r in range(nclass):
            best = -1
            for j in range(cost_one.size):
                c = oc[r] * cost_one[j] + (tc[r] - oc[r]) * cost_zero[j]
                if best < 0 or c < best:
                    best = c
                    model[r] = j
        moved = False
        cost = 0
        for b in range(nb):
            best = -1
            pick = 0
            for r in range(nclass):
                j = model[r]
                c = ones[b] * cost_one[j] + (total[b] - ones[b]) * cost_zero[j]
                if best < 0 or c < best:
                    best = c
                    pick = r
            moved |= pick != cls[b]
            cls[b] = pick
            cost += best
        if not moved:
            break
    return cls, cost


def encode_mask(
    mask: np.ndarray, q: np.ndarray, segment: int, thresholds: tuple[int, ...] | None = None
) -> bytes:
    """Code a TALL mask given the quantized shared vector ``q`` of the same positions.

    Bits where ``q = 0`` are not stored (they decode as 0: the rebuild ignores them). ``segment``
    (a row length, typically) sets the run of positions sharing one class; the writer tries 1,
    2, 4, 8 and 16 classes and keeps the cheapest. ``thresholds`` default to
    :func:`default_thresholds` of ``max |q|``.
    """
    key = _code_bytes(q)
    bits = np.asarray(mask)
    if bits.shape != key.shape or bits.dtype != np.bool_:
        raise ValueError("mask must be a bool array shaped like q")
    bits = np.ascontiguousarray(bits).view(np.uint8)
    n = key.size
    if thresholds is None:
        qmax = max(-int(key.view(np.int8).min()), int(key.view(np.int8).max())) if n else 0
        thresholds = default_thresholds(qmax)
    thresholds = tuple(int(t) for t in thresholds)
    segment = int(segment) if n else 1
    nseg = -(-n // segment) if segment >= 1 else -1
    _check_geometry(n, segment, nseg, thresholds, 1)
    nlev = len(thresholds) + 1
    choices = tuple(c for c in _CLASS_CHOICES if c * nlev <= 255)
    cls = _choose_classes(_segment_stats(key, bits, segment), choices)
    nclass = int(cls.max()) + 1 if cls.size else 1
    head = bytearray(_varint(segment))
    head.append(nlev)
    head += bytes(thresholds)
    head.append(nclass)
    if nclass > 1:
        classes = encode_symbols(cls)
        head += _varint(len(classes)) + classes
    ctx, lanes = _contexts_kernel(key, segment, cls, _context_table(thresholds, nclass))
    return bytes(head) + _encode_bits(bits, ctx, lanes)


def decode_mask(data: bytes | bytearray | memoryview | np.ndarray, q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_mask`: the mask (bool, ``q.size``) with 0 wherever ``q = 0``."""
    key = _code_bytes(q)
    n = key.size
    reader = _Reader(_as_bytes(data), "mask stream")
    segment = reader.varint(max(n, 1))
    if segment < 1:
        raise reader.fail("segment length 0")
    nlev = reader.u8()
    if not 1 <= nlev <= _MAX_LEVELS:
        raise reader.fail(f"{nlev} levels")
    thresholds = tuple(int(t) for t in reader.take(nlev - 1))
    nclass = reader.u8()
    try:
        _check_geometry(n, segment, -(-n // segment), thresholds, max(nclass, 1))
    except ValueError as err:
        raise reader.fail(str(err)) from None
    nseg = -(-n // segment)
    if nclass == 0:
        raise reader.fail("0 classes")
    if nclass > 1:
        size = reader.varint(reader.buf.size)
        sub = _Reader(reader.take(size), "mask stream (classes)")
        cls = _read_symbols(sub, nseg)
        if cls.size and int(cls.max()) >= nclass:
            raise reader.fail("class index out of range")
    else:
        cls = np.zeros(nseg, np.uint8)
    ctx, lanes = _contexts_kernel(key, segment, cls, _context_table(thresholds, nclass))
    return _decode_bits(reader, ctx, lanes)
