"""Content digests: per-tensor tree hashes, the base fingerprint and its quick probe.

A tensor's digest is SHA-256 over the concatenated SHA-256 digests of its row blocks' raw
little-endian bytes, so independent workers can hash blocks and the results still combine.
Each block also gets a CRC-32C, which readers check on every load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import crc32c
import torch

from .. import dtypes
from ..checkpoint import Checkpoint
from ..dtypes import TensorInfo
from ..locations import is_url
from .geometry import block_ranges
from .manifest import canonical

PROBE_THREADS = 16


def block_digest(t: torch.Tensor) -> bytes:
    """SHA-256 of one block's raw bytes."""
    return hashlib.sha256(memoryview(dtypes.to_storage(t)).cast("B")).digest()


def block_crc(t: torch.Tensor) -> int:
    """CRC-32C of one block's raw bytes: cheap enough to check on every read."""
    return crc32c.crc32c(memoryview(dtypes.to_storage(t)).cast("B"))


def combine(block_digests: Iterable[bytes], info: TensorInfo | None = None) -> str:
    """The tensor digest (hex) from its blocks' digests, in block order; with ``info`` (format v2)
    the digest starts with the tensor's ``[dtype, shape]``, so it also pins what the bytes are."""
    h = hashlib.sha256()
    if info is not None:
        h.update(canonical([info.dtype.name, list(info.shape)]) + b"\n")
    for d in block_digests:
        h.update(d)
    return h.hexdigest()


def tensor_digest(ckpt: Checkpoint, key: str, block_elems: int) -> str:
    """The digest of one checkpoint tensor, read block by block."""
    info = ckpt.info(key)
    return combine(block_digest(ckpt.read(key, a, b)) for a, b in block_ranges(info, block_elems))


def _describe(key: str, info: TensorInfo) -> bytes:
    return json.dumps([key, info.dtype.name, list(info.shape)], ensure_ascii=False).encode()


def fingerprint(digests: dict[str, str], infos: dict[str, TensorInfo]) -> str:
    """Fingerprint of a whole model from its tensors' digests, independent of key order."""
    h = hashlib.sha256()
    for key in sorted(digests):
        h.update(_describe(key, infos[key]) + b"\n" + digests[key].encode() + b"\n")
    return "sha256:" + h.hexdigest()


def checkpoint_fingerprint(ckpt: Checkpoint, block_elems: int) -> str:
    """Fingerprint of a checkpoint, hashing every byte (used to name a wrong base)."""
    infos = {k: ckpt.info(k) for k in ckpt.keys}
    return fingerprint({k: tensor_digest(ckpt, k, block_elems) for k in ckpt.keys}, infos)


def probe(ckpt: Checkpoint) -> str:
    """A cheap identity check of a model: structure plus the first, middle and last row bytes.

    Checked on every open instead of the full fingerprint, which would hash the whole model.
    The rows of a remote checkpoint are read concurrently (each read is a request); local rows
    are memory-mapped reads of microseconds, cheaper than any thread hand-off.
    """
    keys = sorted(ckpt.keys)
    infos = [ckpt.info(k) for k in keys]
    reads = [(k, r) for k, info in zip(keys, infos) if info.numel for r in sorted({0, info.rows // 2, info.rows - 1})]

    def row_digest(kr: tuple[str, int]) -> bytes:
        return hashlib.sha256(ckpt.read_bytes(kr[0], kr[1], kr[1] + 1)).digest()

    if any(is_url(f.location) for f in ckpt.files):
        with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
            digests = dict(zip(reads, pool.map(row_digest, reads)))
    else:
        digests = {kr: row_digest(kr) for kr in reads}
    h = hashlib.sha256()
    for key, info in zip(keys, infos):
        h.update(_describe(key, info) + b"\n")
        if info.numel == 0:
            continue
        for r in sorted({0, info.rows // 2, info.rows - 1}):
            h.update(digests[key, r])
    return "sha256:" + h.hexdigest()
