"""Rebuilding task tensors into memory: ``θ̂_t = m_t ? θ_MTL : θ₀``, block by block, in place.

A load plans every chunk it needs (``merged``/``exact``/embedded ``base`` blocks and the task's
mask chunks), fetches them in one concurrent round, then rebuilds each row block on a thread
pool directly inside the destination tensor: the ``merged`` chunk is decoded into it, masked
with the task's bits and XORed with the base. Each block is checked against the CRC-32C
recorded at pack time, so corruption or a wrong base never yields silent weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import crc32c
import numpy as np
import torch

from . import dtypes
from .base import EmbeddedBase
from .checkpoint import TensorInfo
from .errors import CorruptArchiveError, TallstoreError
from .geometry import block_ranges, chunk_elems
from .storage import format as fmt
from .storage import schema
from .storage.chunks import BUFFERS, chunk_key, decode_into, fetch, read_local
from .storage.reading import coalesce, read_many
from .storage.strict import read_error

if TYPE_CHECKING:
    from .archive import Archive

TILE = 1 << 18  # elements combined at a time: a tile and its base stay in the core's cache


@dataclass
class Wanted:
    """One tensor to rebuild: its task listing row and the flat CPU tensor that receives it."""

    key: str
    info: TensorInfo
    source: str
    crcs: list[int]
    out: torch.Tensor


class Chunks:
    """The chunks one load needs, each decoded on demand into caller memory.

    Arrays in the archive's own layout are decoded straight from their stored objects
    (:mod:`~tallstore.storage.chunks`): read by the decoding thread itself from a local folder,
    or fetched beforehand in one concurrent round from a remote store. Any other spec layout is
    read beforehand through zarr, also concurrently.
    """

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._local = None if archive.local_root is None else str(archive.local_root)
        self._keys: list[str] = []
        self._regions: list[tuple[Any, slice]] = []
        self._where: dict[tuple[str, int], tuple[str | None, int, int]] = {}
        self._data: list[Any] = []
        self._fetched = 0

    def add(self, path: str, storage: np.dtype, numel: int, chunk: int, index: int) -> None:
        """Plan to read chunk ``index`` of the flat array ``path`` (``numel`` elements in chunks of ``chunk``)."""
        if (path, index) in self._where:
            return
        codec = self.archive.chunk_codec(path, storage, numel, chunk)
        if codec is not None:
            self._where[path, index] = (codec, len(self._keys), chunk * storage.itemsize)
            self._keys.append(chunk_key(path, index))
        else:
            arr = schema.open_array(self.archive.root, path, storage, numel)
            self._where[path, index] = (None, len(self._regions), 0)
            self._regions.append((arr, slice(index * chunk, min(numel, (index + 1) * chunk))))

    def fetch(self) -> None:
        """Fetch what the decoding threads will not read themselves, concurrently; failures are
        kept and raised where the chunk is used."""
        keys = [] if self._local is not None else self._keys
        self._data = fetch(self.archive.store, keys)
        self._fetched = len(keys)
        if self._regions:
            self._data += read_many(self._regions, return_exceptions=True)

    def decode(self, path: str, index: int, out: np.ndarray) -> None:
        """Decode chunk ``index`` of ``path`` into ``out`` (its first ``out.size`` elements)."""
        codec, slot, nbytes = self._where[path, index]
        key = chunk_key(path, index)
        if codec is not None and self._local is not None:
            with read_local(os.path.join(self._local, key)) as data:
                decode_into(data, codec, out, nbytes, key)
            return
        if codec is None:
            slot += self._fetched
        data, self._data[slot] = self._data[slot], None
        if isinstance(data, BaseException):
            raise CorruptArchiveError(f"chunk {key}: {read_error(data)}")
        if codec is not None:
            decode_into(data, codec, out, nbytes, key)
        else:
            out.reshape(-1)[:] = np.asarray(data).reshape(-1).view(out.dtype)[: out.size]


def load(archive: Archive, task: int, listing: dict[str, list[Any]], targets: dict[str, torch.Tensor]) -> None:
    """Rebuild task ``task``'s tensors ``targets`` (key → flat contiguous CPU tensor) in place."""
    wanted = [_wanted(listing[k], t) for k, t in targets.items()]
    Loader(archive, task).run(wanted)


def _wanted(row: list[Any], out: torch.Tensor) -> Wanted:
    return Wanted(row[0], TensorInfo(dtypes.by_name(row[1]), tuple(row[2])), row[3], row[5], out)


def _batches(jobs: list[tuple[int, Callable[[], None]]]) -> list[list[Callable[[], None]]]:
    """Consecutive jobs grouped into batches of at least ``TILE`` elements: a thread hand-off per
    small tensor (a bias, a norm) would cost more than rebuilding it."""
    out: list[list[Callable[[], None]]] = []
    size = TILE
    for n, job in jobs:
        if size >= TILE:
            out.append([])
            size = 0
        out[-1].append(job)
        size += n
    return out


class Loader:
    """One load of some of a task's tensors: plan, fetch, then rebuild every block on threads."""

    def __init__(self, archive: Archive, task: int) -> None:
        self.archive = archive
        self.task = task
        self.block_elems: int = archive.manifest["block_elems"]
        self.embedded = isinstance(archive.base, EmbeddedBase)
        self.chunks = Chunks(archive)
        self._mask_runs: list[tuple[int, int]] = []
        self._mask_bufs: list[np.ndarray] = []
        self._mask_errors: dict[int, Exception] = {}

    def run(self, wanted: Sequence[Wanted]) -> None:
        """Rebuild every tensor of ``wanted`` into its ``out``, checking every block's CRC-32C."""
        jobs: list[tuple[int, Callable[[], None]]] = []
        mask_ranges: list[tuple[int, int]] = []
        for w in wanted:
            try:
                jobs += self._plan(w, mask_ranges)
            except TallstoreError as e:
                raise self._corrupt(w.key, e) from None
        self._plan_masks(mask_ranges)
        self.chunks.fetch()
        batches = _batches(jobs)
        workers = self.archive.concurrency or os.cpu_count() or 2
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(batches) + len(self._mask_runs)))) as pool:
            list(pool.map(self._decode_mask_chunk, self._mask_chunks()))
            list(pool.map(lambda batch: [job() for job in batch], batches))

    def _plan(self, w: Wanted, mask_ranges: list[tuple[int, int]]) -> list[tuple[int, Callable[[], None]]]:
        """Plan ``w``'s chunk reads; one ``(elements, job)`` per row block."""
        e = self.archive.entries[w.key]
        bits = dtypes.to_storage(w.out)
        ranges = list(block_ranges(w.info, self.block_elems))
        if len(ranges) != len(w.crcs):
            raise CorruptArchiveError(f"{len(w.crcs)} block checksums recorded for {len(ranges)} blocks")
        if w.info.numel == 0:
            return [(0, lambda: self._check(w, 0, 0))]
        chunk = chunk_elems(w.info, self.block_elems)
        row = w.info.row_numel
        node = e["node"]
        data_path = None
        if w.source == fmt.SOURCE_MASKED:
            data_path = fmt.merged_path(node)
            lo = e["mask_offset"]
            mask_ranges.append((lo, lo + (w.info.numel + 7) // 8))
        elif w.source == fmt.SOURCE_EXACT:
            data_path = fmt.exact_path(node, self.task)
        base_info = None
        if w.source != fmt.SOURCE_EXACT:
            base_info = TensorInfo(dtypes.by_name(e["base_dtype"]), w.info.shape)
        jobs = []
        for i, (a, b) in enumerate(ranges):
            if data_path is not None:
                self.chunks.add(data_path, w.info.dtype.storage, w.info.numel, chunk, i)
            if base_info is not None and self.embedded:
                self.chunks.add(fmt.base_path(node), base_info.dtype.storage, base_info.numel, chunk, i)
            jobs.append(((b - a) * row, self._block_job(w, e, i, a * row, b * row, a, b, data_path, base_info, bits)))
        return jobs

    def _block_job(
        self, w: Wanted, e: dict[str, Any], i: int, lo: int, hi: int, a: int, b: int,
        data_path: str | None, base_info: TensorInfo | None, bits: np.ndarray,
    ) -> Callable[[], None]:
        def job() -> None:
            out = bits[lo:hi]
            try:
                if data_path is not None:
                    self.chunks.decode(data_path, i, out)
                if base_info is None:
                    crc = crc32c.crc32c(out.view(np.uint8))
                else:
                    with self._base_bits(w, e, i, a, b, base_info, hi - lo) as base:
                        crc = self._combine(w, out, base, e.get("mask_offset", 0) + lo // 8)
            except Exception as err:
                if isinstance(err, TallstoreError) and not isinstance(err, CorruptArchiveError):
                    raise
                raise self._corrupt(w.key, err) from None
            self._check(w, i, crc)

        return job

    def _combine(self, w: Wanted, out: np.ndarray, base: np.ndarray, mask_at: int) -> int:
        """``out ← base XOR (out AND mask)`` (masked) or ``out ← base``, tile by tile while the
        tile is in cache; the CRC-32C of the result."""
        crc = 0
        for t in range(0, out.size, TILE):
            o, bt = out[t : t + TILE], base[t : t + TILE]
            if w.source == fmt.SOURCE_MASKED:
                keep = np.unpackbits(self._mask_bytes(mask_at + t // 8, o.size), count=o.size, bitorder=fmt.BITORDER)
                np.multiply(o, keep, out=o)
                np.bitwise_xor(o, bt, out=o)
            else:
                o[:] = bt
            crc = crc32c.crc32c(o.view(np.uint8), crc)
        return crc

    @contextmanager
    def _base_bits(
        self, w: Wanted, e: dict[str, Any], i: int, a: int, b: int, info: TensorInfo, n: int,
    ) -> Iterator[np.ndarray]:
        """Rows ``a:b`` of the base tensor, cast to the task's dtype, as storage bits."""
        if not self.embedded:
            t = self.archive.base.read(w.key, a, b).reshape(-1)
            yield dtypes.to_storage(t.to(w.info.dtype.torch))
            return
        with BUFFERS.take(n * info.dtype.itemsize) as buf:
            raw = np.frombuffer(buf, info.dtype.storage)
            self.chunks.decode(fmt.base_path(e["node"]), i, raw)
            t = dtypes.from_storage(raw, info.dtype, (n,))
            yield dtypes.to_storage(t.to(w.info.dtype.torch))

    def _plan_masks(self, ranges: list[tuple[int, int]]) -> None:
        """Plan the task's mask chunks covering ``ranges``, decoded into one buffer per run."""
        if not ranges:
            return
        m = self.archive.manifest["mask"]
        chunk, nbytes = m["chunk_bytes"], m["nbytes"]
        for a, b in coalesce(ranges, chunk):
            first, last = a // chunk, (b - 1) // chunk
            self._mask_runs.append((first * chunk, min(nbytes, (last + 1) * chunk)))
            self._mask_bufs.append(np.empty(self._mask_runs[-1][1] - self._mask_runs[-1][0], np.uint8))
            for c in range(first, last + 1):
                self.chunks.add(fmt.mask_path(self.task), np.dtype(np.uint8), nbytes, min(chunk, nbytes), c)

    def _mask_chunks(self) -> list[tuple[int, int]]:
        """``(run, chunk index)`` of every planned mask chunk."""
        chunk = self.archive.manifest["mask"]["chunk_bytes"]
        return [(r, c) for r, (a, b) in enumerate(self._mask_runs) for c in range(a // chunk, (b - 1) // chunk + 1)]

    def _decode_mask_chunk(self, rc: tuple[int, int]) -> None:
        r, c = rc
        chunk = self.archive.manifest["mask"]["chunk_bytes"]
        start = c * chunk - self._mask_runs[r][0]
        buf = self._mask_bufs[r]
        try:
            self.chunks.decode(fmt.mask_path(self.task), c, buf[start : start + chunk])
        except Exception as err:  # raised by the blocks that need this chunk, naming their tensor
            self._mask_errors[c] = err

    def _mask_bytes(self, lo: int, n: int) -> np.ndarray:
        """The mask bytes of ``n`` bits starting at byte ``lo``."""
        chunk = self.archive.manifest["mask"]["chunk_bytes"]
        for c in range(lo // chunk, (lo + (n + 7) // 8 - 1) // chunk + 1):
            if c in self._mask_errors:
                raise self._mask_errors[c]
        for (a, b), buf in zip(self._mask_runs, self._mask_bufs):
            if a <= lo < b:
                return buf[lo - a : lo - a + (n + 7) // 8]
        raise CorruptArchiveError(f"mask byte {lo} was not read")

    def _check(self, w: Wanted, i: int, crc: int) -> None:
        if crc != w.crcs[i]:
            raise CorruptArchiveError(
                f"{self.archive.location}: tensor {w.key!r} of task {self.archive.tasks[self.task]!r} does not "
                "match its recorded checksum (corrupt or missing data, or a modified base)"
            )

    def _corrupt(self, key: str | None, e: BaseException) -> CorruptArchiveError:
        """A one-line error naming the archive, the task and, when known, the tensor."""
        name = self.archive.tasks[self.task]
        what = f"tensor {key!r} of task {name!r}" if key is not None else f"task {name!r}"
        detail = str(e) if isinstance(e, TallstoreError) else read_error(e)
        return CorruptArchiveError(f"{self.archive.location}: {what}: stored data is unreadable or corrupt ({detail})")
