"""Codec chains, both ways: what the writer puts in each array's metadata, and the bounded decoder.

**Encode.** Weights are stored as their bit patterns, so Blosc's shuffle groups the bytes of
equal significance (sign/exponent bytes compress well) before the compressor. Two presets:
``fast`` (the default, LZ4HC) decodes faster than ``compact`` (zstd), which makes archives a
little smaller; loading a task is bound by that decode (``benchmarks/`` measures both). Masks are
packed bits: ``fast`` codes them with zstd level 3 (130+ MB/s a core, so a pack is not bound by
them; levels 4–12 are slower and no smaller: 1.064 × H at density 0.15 for level 3, 1.074 for
levels 6–12), ``compact`` with level 16 (btopt: 1.02 × H at density 0.15, at 2–16 MB/s; on real
masks 2% smaller than level 3, ``benchmarks/bench_masks.py``).

**Decode.** Every array an archive reader touches is decoded here, from its ``zarr.json``: a
flat (1-D) array with a regular chunk grid, any chain of the Zarr v3 spec codecs ``bytes``,
``transpose``, ``blosc``, ``zstd``, ``gzip``, ``crc32c`` and ``sharding_indexed``, nothing else
(nothing an archive names is ever unpickled or executed). Decoding is bounded: a chunk's
decoded size is known from the metadata (and no chunk is larger than its array, beyond
``SLACK`` bytes), every decompressor writes into a buffer of that size or refuses, and stored
objects larger than any honest encoding of the chunk are refused before they are read.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from typing import Any

import crc32c
import numpy as np
from numcodecs import blosc, zstd
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import CorruptArchiveError, PlanError

SPEC_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "sharding_indexed"})
COMPRESSORS = ("blosc", "zstd", "gzip")
SLACK = 64 << 10
MAX_CHUNKS = 1 << 23
"""Chunks one array may have: a manifest records a CRC-32C per chunk, and a root document of
``chunks.MAX_DOCUMENT`` bytes holds fewer than this many."""
_BLOSC_HEADER = 16
_ZSTD_MAGIC = 0xFD2FB528
_EMPTY = (1 << 64) - 1


@dataclass(frozen=True)
class Codecs:
    """Compression settings for an archive: a value recorded in each array's metadata."""

    weight_cname: str = "lz4hc"
    weight_level: int = 5
    weight_shuffle: str = "shuffle"
    mask_level: int = 3
    file_level: int = 12

    def weights(self, itemsize: int) -> list[BytesBytesCodec]:
        """Codecs for weight bit patterns of ``itemsize`` bytes."""
        return [
            BloscCodec(
                cname=self.weight_cname,
                clevel=self.weight_level,
                shuffle=self.weight_shuffle if itemsize > 1 else "noshuffle",
                typesize=itemsize,
            ),
            Crc32cCodec(),
        ]

    def masks(self) -> list[BytesBytesCodec]:
        """Codecs for packed mask bytes."""
        return [ZstdCodec(level=self.mask_level), Crc32cCodec()]

    def files(self) -> list[BytesBytesCodec]:
        """Codecs for archived non-weight files (configs, tokenizers: text that zstd shrinks well)."""
        return [ZstdCodec(level=self.file_level), Crc32cCodec()]


PRESETS = {
    "fast": Codecs(),
    "compact": Codecs(weight_cname="zstd", weight_level=5, mask_level=16),
}


def preset(name: str) -> Codecs:
    """The named preset (``fast`` or ``compact``); an unknown name is a clear error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PlanError(f"unknown codec preset {name!r}; choose one of {', '.join(PRESETS)}") from None


class DecodeError(ValueError):
    """Stored bytes that do not decode as their metadata says (reported as corruption)."""


def bound(nbytes: int) -> int:
    """The most bytes any spec codec chain stores for ``nbytes`` of data (generous)."""
    return nbytes + nbytes // 8 + SLACK


def codec_names(meta: Any) -> list[str]:
    """Every codec name in an array's metadata, nested (sharding) codecs included."""
    out: list[str] = []
    if isinstance(meta, dict):
        if isinstance(meta.get("name"), str) and ("configuration" in meta or len(meta) == 1):
            out.append(meta["name"])
        for v in meta.values():
            out.extend(codec_names(v))
    elif isinstance(meta, (list, tuple)):
        for v in meta:
            out.extend(codec_names(v))
    return out


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


@dataclass(frozen=True)
class Chain:
    """A parsed codec chain for flat chunks of ``itemsize``-byte elements.

    ``compressors`` in encoding order; ``crcs[i]`` counts the ``crc32c`` trailers added right after
    compressor ``i`` (``crcs[0]``: before any compressor).
    """

    compressors: tuple[str, ...]
    crcs: tuple[int, ...]
    big_endian: bool
    shard: Shard | None
    itemsize: int

    @property
    def direct(self) -> str | None:
        """``"blosc"`` or ``"zstd"`` for the archive's own chain ``bytes → one compressor → crc32c``."""
        if self.shard is None and not self.big_endian and self.crcs == (0, 1) and self.compressors[0] in ("blosc", "zstd"):
            return self.compressors[0]
        return None

    @classmethod
    def parse(cls, codecs: Any, itemsize: int, where: str) -> Chain:
        if not isinstance(codecs, list) or not codecs:
            raise CorruptArchiveError(f"{where} has no codec chain")
        odd = sorted({str(n) for n in codec_names(codecs)} - SPEC_CODECS)
        if odd:
            raise CorruptArchiveError(f"{where} uses codec {odd[0]!r} outside the Zarr v3 spec; refusing to decode it")
        names = [_dict(c).get("name") for c in codecs]
        i = 0
        while i < len(codecs) and names[i] == "transpose":
            order = _dict(_dict(codecs[i]).get("configuration")).get("order")
            if list(order or ()) != [0]:
                raise CorruptArchiveError(f"{where}: transpose order {order!r} does not fit a flat array")
            i += 1
        if i >= len(codecs) or names[i] not in ("bytes", "sharding_indexed"):
            raise CorruptArchiveError(f"{where}: the codec chain has no bytes or sharding codec")
        conf = _dict(_dict(codecs[i]).get("configuration"))
        shard = None
        big = False
        if names[i] == "bytes":
            endian = conf.get("endian", "little")
            if endian not in ("little", "big"):
                raise CorruptArchiveError(f"{where}: bytes codec endian {endian!r} is invalid")
            big = endian == "big" and itemsize > 1
        else:
            shard = Shard.parse(conf, itemsize, where)
        compressors: list[str] = []
        crcs = [0]
        for name in names[i + 1 :]:
            if name == "crc32c":
                crcs[-1] += 1
            elif name in COMPRESSORS:
                compressors.append(name)
                crcs.append(0)
            else:
                raise CorruptArchiveError(f"{where}: codec {name!r} cannot follow the bytes codec")
        return cls(tuple(compressors), tuple(crcs), big, shard, itemsize)

    def decode(self, data: memoryview, out: np.ndarray, valid: int, where: str) -> None:
        """Decode one stored chunk ``data`` into ``out`` (uint8, the chunk's decoded length), of
        which the first ``valid`` bytes belong to the array."""
        try:
            self._decode(data, out, valid)
        except DecodeError as e:
            raise CorruptArchiveError(f"chunk {where}: {e}") from None

    def _decode(self, data: memoryview, out: np.ndarray, valid: int) -> None:
        body = data
        for step in range(len(self.compressors), 0, -1):
            body = _strip_crcs(body, self.crcs[step])
            name = self.compressors[step - 1]
            if step == 1 and self.shard is None:
                _decompress_into(name, body, out)
                self._swap(out)
                return
            body = memoryview(_decompress(name, body, self.stored_bound(out.nbytes)))
        body = _strip_crcs(body, self.crcs[0])
        if self.shard is not None:
            self.shard.decode(body, out, valid)
            return
        if len(body) != out.nbytes:
            raise DecodeError(f"holds {len(body)} bytes, expected {out.nbytes}")
        out[:] = np.frombuffer(body, np.uint8)
        self._swap(out)

    def _swap(self, out: np.ndarray) -> None:
        if self.big_endian:
            out.view(f"<u{self.itemsize}").byteswap(inplace=True)

    def stored_bound(self, nbytes: int) -> int:
        """The most bytes an honest encoding of ``nbytes`` of chunk data takes at any layer."""
        return bound(nbytes) + (self.shard.index_nbytes(nbytes) if self.shard is not None else 0)


@dataclass(frozen=True)
class Shard:
    """A ``sharding_indexed`` codec of a flat array: inner chunks and their index."""

    inner: int
    chain: Chain
    index_chain: Chain
    at_end: bool
    itemsize: int

    @classmethod
    def parse(cls, conf: dict[str, Any], itemsize: int, where: str) -> Shard:
        shape = conf.get("chunk_shape")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] > 0):
            raise CorruptArchiveError(f"{where}: sharding chunk_shape {shape!r} does not fit a flat array")
        location = conf.get("index_location", "end")
        if location not in ("start", "end"):
            raise CorruptArchiveError(f"{where}: sharding index_location {location!r} is invalid")
        chain = Chain.parse(conf.get("codecs"), itemsize, where)
        index = Chain.parse(conf.get("index_codecs"), 8, where)
        if index.compressors or index.shard is not None:
            raise CorruptArchiveError(f"{where}: a compressed or nested shard index is not supported")
        return cls(shape[0], chain, index, location == "end", itemsize)

    def index_nbytes(self, shard_nbytes: int) -> int:
        return 16 * -(-shard_nbytes // (self.inner * self.itemsize)) + 4 * self.index_chain.crcs[0]

    def decode(self, data: memoryview, out: np.ndarray, valid: int) -> None:
        step = self.inner * self.itemsize
        n_inner = -(-out.nbytes // step)
        size = self.index_nbytes(out.nbytes)
        if len(data) < size:
            raise DecodeError("shard is shorter than its index")
        index = np.empty(16 * n_inner, np.uint8)
        self.index_chain._decode(data[len(data) - size :] if self.at_end else data[:size], index, index.nbytes)
        full = np.empty(step, np.uint8)
        for i, (offset, length) in enumerate(index.view("<u8").reshape(n_inner, 2).tolist()):
            piece = out[i * step : (i + 1) * step]
            if offset == _EMPTY and length == _EMPTY:
                piece[:] = 0  # the spec's absent inner chunk: the fill value
                continue
            if i * step >= valid:
                continue
            if offset + length > len(data):
                raise DecodeError(f"inner chunk {i} lies outside the shard")
            self.chain._decode(data[offset : offset + length], full, step)
            piece[:] = full[: piece.nbytes]


def _strip_crcs(body: memoryview, count: int) -> memoryview:
    for _ in range(count):
        if len(body) < 4 or crc32c.crc32c(body[:-4]) != int.from_bytes(body[-4:], "little"):
            raise DecodeError("crc32c checksum mismatch")
        body = body[:-4]
    return body


def zstd_content_size(frame: memoryview) -> int | None:
    """The decompressed size a zstd frame header announces (RFC 8878 §3.1.1.1), ``None`` if absent."""
    if len(frame) < 6 or struct.unpack_from("<I", frame)[0] != _ZSTD_MAGIC:
        raise DecodeError("not a zstd frame")
    fhd = frame[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    if len(frame) < at + size:
        raise DecodeError("truncated zstd frame header")
    value = int.from_bytes(frame[at : at + size], "little")
    return value + 256 if size == 2 else value


def _decompress_into(name: str, body: memoryview, out: np.ndarray) -> None:
    """Decompress ``body`` into ``out``, which must be filled exactly."""
    try:
        if name == "blosc":
            if len(body) < _BLOSC_HEADER or int.from_bytes(body[4:8], "little") != out.nbytes:
                raise DecodeError("its blosc header does not announce the chunk's length")
            blosc.decompress(body, out)
        elif name == "zstd":
            size = zstd_content_size(body)
            if size is not None and size != out.nbytes:
                raise DecodeError(f"holds {size} bytes, expected {out.nbytes}")
            zstd.decompress(body, out)
        else:
            raw = _decompress(name, body, out.nbytes)
            if len(raw) != out.nbytes:
                raise DecodeError(f"holds {len(raw)} bytes, expected {out.nbytes}")
            out[:] = np.frombuffer(raw, np.uint8)
    except (RuntimeError, ValueError) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(f"cannot be decompressed ({e})") from None


def _decompress(name: str, body: memoryview, limit: int) -> bytes:
    """Decompress ``body``, refusing to produce more than ``limit`` bytes."""
    try:
        if name == "blosc":
            if len(body) < _BLOSC_HEADER:
                raise DecodeError("truncated blosc header")
            n = int.from_bytes(body[4:8], "little")
            if n > limit:
                raise DecodeError(f"its blosc header announces {n} bytes, more than {limit}")
            buf = np.empty(n, np.uint8)
            blosc.decompress(body, buf)
            return buf.tobytes()
        if name == "zstd":
            size = zstd_content_size(body)
            if size is None or size > limit:
                raise DecodeError("its zstd frame does not announce a size within bounds")
            buf = np.empty(size, np.uint8)
            zstd.decompress(body, buf)
            return buf.tobytes()
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        raw = d.decompress(body, limit + 1)
        if len(raw) > limit or not d.eof:
            raise DecodeError("its gzip stream is larger than the chunk or truncated")
        return raw
    except (RuntimeError, ValueError, zlib.error) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(f"cannot be decompressed ({e})") from None


@dataclass(frozen=True)
class ArrayFormat:
    """A flat archive array as its ``zarr.json`` describes it, checked: how to find and decode chunks."""

    path: str
    storage: np.dtype
    numel: int
    chunk: int
    separator: str
    v2_keys: bool
    chain: Chain
    crcs: tuple[int, ...] | None = None

    def with_crcs(self, crcs: tuple[int, ...] | None) -> ArrayFormat:
        """This array, its decoded chunks checked against ``crcs`` (one CRC-32C of each chunk's
        array bytes, as the manifest records them) when they are one per chunk; an array another
        tool re-chunked is read without them."""
        if crcs is None or len(crcs) != self.n_chunks:
            return self
        return replace(self, crcs=tuple(crcs))

    @classmethod
    def from_meta(cls, meta: Any, path: str, storage: np.dtype, numel: int) -> ArrayFormat:
        """``meta`` checked to be the flat array the manifest promises (``numel`` of ``storage``)."""
        if not isinstance(meta, dict) or meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
            raise CorruptArchiveError(f"{path} is not a Zarr v3 array")
        if meta.get("storage_transformers"):
            raise CorruptArchiveError(f"{path} uses a storage transformer; refusing to decode it")
        shape, dtype = meta.get("shape"), meta.get("data_type")
        if shape != [numel] or dtype != storage.name:
            raise CorruptArchiveError(f"{path} holds {shape} {dtype}, expected ({numel},) {storage}")
        grid = _dict(meta.get("chunk_grid"))
        chunk = _dict(grid.get("configuration")).get("chunk_shape")
        if grid.get("name") != "regular" or not (isinstance(chunk, list) and len(chunk) == 1
                                                 and isinstance(chunk[0], int) and chunk[0] > 0):
            raise CorruptArchiveError(f"{path} has no regular flat chunk grid")
        if chunk[0] > numel and chunk[0] * storage.itemsize > SLACK:
            raise CorruptArchiveError(f"{path} has chunks of {chunk[0]} elements, larger than the array ({numel})")
        if -(-numel // chunk[0]) > MAX_CHUNKS:
            raise CorruptArchiveError(f"{path} is cut into more than {MAX_CHUNKS} chunks")
        keys = _dict(meta.get("chunk_key_encoding"))
        sep = _dict(keys.get("configuration")).get("separator", "/" if keys.get("name") == "default" else ".")
        if keys.get("name") not in ("default", "v2") or sep not in ("/", "."):
            raise CorruptArchiveError(f"{path} has an unknown chunk key encoding")
        if meta.get("fill_value") not in (0, False):
            raise CorruptArchiveError(f"{path} has a fill value other than 0")
        chain = Chain.parse(meta.get("codecs"), storage.itemsize, path)
        if chain.shard is not None and chunk[0] % chain.shard.inner:
            raise CorruptArchiveError(f"{path}: shards are not whole inner chunks")
        return cls(path, storage, numel, chunk[0], sep, keys["name"] == "v2", chain)

    @property
    def n_chunks(self) -> int:
        return -(-self.numel // self.chunk)

    @property
    def chunk_nbytes(self) -> int:
        """Decoded bytes of every chunk (the last one too: it is stored at full length)."""
        return self.chunk * self.storage.itemsize

    def key(self, index: int) -> str:
        """The store key of chunk ``index``."""
        return f"{self.path}/{index}" if self.v2_keys else f"{self.path}/c{self.separator}{index}"

    @property
    def max_stored(self) -> int:
        """The largest stored object an honest writer makes for one chunk."""
        return self.chain.stored_bound(self.chunk_nbytes)

    def valid_nbytes(self, index: int) -> int:
        """Bytes of chunk ``index`` that belong to the array (all but the last chunk: all)."""
        return min(self.chunk, self.numel - index * self.chunk) * self.storage.itemsize

    def decode(self, index: int, data: memoryview, out: np.ndarray) -> None:
        """Decode chunk ``index`` from its stored bytes into ``out`` (``chunk_nbytes`` of uint8),
        checking the recorded CRC-32C of its array bytes when there is one."""
        valid = self.valid_nbytes(index)
        self.chain.decode(data, out, valid, self.key(index))
        if self.crcs is not None and crc32c.crc32c(out[:valid]) != self.crcs[index]:
            raise CorruptArchiveError(
                f"chunk {self.key(index)} does not hold what was packed (its data fails the manifest's CRC-32C)"
            )
