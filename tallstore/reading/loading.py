"""Rebuilding task tensors into memory: ``θ̂_t = m_t ? θ_MTL : θ₀``, block by block, in place.

A load plans every chunk it needs (``merged``/``exact``/embedded ``base`` blocks and the task's
mask chunks), fetches them in one concurrent round, then rebuilds each row block on a thread
pool directly inside the destination tensor: the ``merged`` chunk is decoded into it and the
rebuild kernel masks it and XORs the base in. Each block is checked against the CRC-32C
recorded at pack time, so corruption or a wrong base never yields silent weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import crc32c
import numpy as np
import torch

from .. import collector, dtypes
from ..errors import CorruptArchiveError, TallstoreError
from ..ops import delta
from ..ops.kernel import TILE, rebuild_bits, shared_bits
from ..storage import layout
from ..storage.chunks import BUFFERS, Batch, coalesce
from ..storage.codecs import ArrayFormat
from ..storage.deltas import decode_segment
from ..storage.geometry import extra_info, row_blocks
from ..storage.manifest import TaskRow, TensorEntry
from ..storage.segments import decode_codes, decode_mask_segment
from .base_model import EmbeddedBase, ExternalBase
from .source import ArchiveSource


@dataclass
class Wanted:
    """One tensor to rebuild: its task listing row and the flat CPU tensor that receives it."""

    row: TaskRow
    out: torch.Tensor
    entry: str


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


def load(source: ArchiveSource, base: ExternalBase | EmbeddedBase, task: int, targets: dict[str, torch.Tensor]) -> None:
    """Rebuild task ``task``'s tensors ``targets`` (key → flat contiguous CPU tensor) in place."""
    record = source.task(task)
    Loader(source, base, task).run([Wanted(record.by_key[k], t, record.entry_key(k)) for k, t in targets.items()])


class Loader:
    """One load of some of a task's tensors: plan, fetch, then rebuild every block on threads."""

    def __init__(self, source: ArchiveSource, base: ExternalBase | EmbeddedBase, task: int) -> None:
        self.source = source
        self.base = base
        self.task = task
        self.block_elems = source.manifest.block_elems
        self.batch: Batch = source.reader.batch()
        self._mask: ArrayFormat | None = None
        self._codes: ArrayFormat | None = None
        self._stream: ArrayFormat | None = None
        self._deltas: ArrayFormat | None = None
        self._mask_runs: list[tuple[int, int]] = []
        self._mask_bufs: list[np.ndarray] = []
        self._mask_errors: dict[int, Exception] = {}

    def run(self, wanted: Sequence[Wanted]) -> None:
        """Rebuild every tensor of ``wanted`` into its ``out``, checking every block's CRC-32C (with
        the cyclic collector paused: see ``tallstore.collector``)."""
        with collector.paused():
            self._run(wanted)

    def _run(self, wanted: Sequence[Wanted]) -> None:
        jobs: list[tuple[int, Callable[[], None]]] = []
        mask_ranges: list[tuple[int, int]] = []
        for w in wanted:
            try:
                jobs += self._plan(w, mask_ranges)
            except TallstoreError as e:
                raise self._corrupt(w.row.key, e) from None
        self._plan_masks(mask_ranges)
        self.batch.fetch()
        batches = _batches(jobs)
        workers = self.source.concurrency or os.cpu_count() or 2
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(batches) + len(self._mask_runs)))) as pool:
            list(pool.map(self._decode_mask_run, range(len(self._mask_runs))))
            list(pool.map(lambda batch: [job() for job in batch], batches))

    def _plan(self, w: Wanted, mask_ranges: list[tuple[int, int]]) -> list[tuple[int, Callable[[], None]]]:
        """Plan ``w``'s chunk reads; one ``(elements, job)`` per row block."""
        e = self.source.manifest.entries[w.entry]
        info = w.row.info
        grown = w.row.source == layout.SOURCE_MASKED and bool(e.shape) and info.rows > e.shape[0]
        ranges = row_blocks(info, e.shape[0] if grown else None, self.block_elems)
        if len(ranges) != len(w.row.crcs):
            raise CorruptArchiveError(f"{len(w.row.crcs)} block checksums recorded for {len(ranges)} blocks")
        if info.numel == 0:
            return [(0, lambda: self._check(w, 0, 0))]
        extra: list[tuple[int, Callable[[], None]]] = []
        if grown:
            extra = self._plan_extra(w, e, ranges)
            ranges = [r for r in ranges if r[0] < e.shape[0]]
        data = None
        reader = self.source.reader
        quantized = self.source.manifest.shared.quantized
        if w.row.source == layout.SOURCE_MASKED and quantized:
            return self._plan_quantized(w, e, ranges) + extra
        if w.row.source == layout.SOURCE_DELTA:
            return self._plan_delta(w, e, ranges)
        if w.row.source == layout.SOURCE_MASKED:
            data = reader.array(layout.merged_path(e.node), e.dtype.storage, e.info.numel, e.crcs)
            mask_ranges.append(e.mask_range)
        elif w.row.source == layout.SOURCE_EXACT:
            data = reader.array(layout.exact_path(e.node, self.task), info.dtype.storage, info.numel, w.row.crcs)
        elif w.row.source == layout.SOURCE_XBASE:  # its chunks hold XOR bits: the block CRCs check the result
            data = reader.array(layout.exact_path(e.node, self.task), info.dtype.storage, info.numel)
        base_arr = None
        if w.row.source != layout.SOURCE_EXACT and isinstance(self.base, EmbeddedBase):
            base_arr = self.base.array(e)
        row = info.row_numel
        bits = dtypes.to_storage(w.out)
        jobs = []
        for i, (a, b) in enumerate(ranges):
            if data is not None:
                self.batch.add_range(data, a * row, b * row)
            if base_arr is not None:
                self.batch.add_range(base_arr, a * row, b * row)
            jobs.append(((b - a) * row, self._block_job(w, e, i, a, b, data, base_arr, bits[a * row : b * row])))
        return jobs + extra

    def _plan_extra(self, w: Wanted, e: TensorEntry, ranges: list[tuple[int, int]]) -> list[tuple[int, Callable[[], None]]]:
        """Plan the exact rows a grown tensor has past the base's (read from ``extra/<t>``)."""
        base_rows = e.shape[0]
        info = extra_info(w.row.info, base_rows)
        data = self.source.reader.array(layout.extra_path(e.node, self.task), info.dtype.storage, info.numel)
        row = info.row_numel
        bits = dtypes.to_storage(w.out)
        jobs = []
        for i, (a, b) in enumerate(ranges):
            if a < base_rows:
                continue
            self.batch.add_range(data, (a - base_rows) * row, (b - base_rows) * row)
            jobs.append(((b - a) * row, self._extra_job(w, i, (a - base_rows) * row, data, bits[a * row : b * row])))
        return jobs

    def _extra_job(self, w: Wanted, i: int, lo: int, data: ArrayFormat, out: np.ndarray) -> Callable[[], None]:
        def body(visit: Callable[[np.ndarray], None]) -> None:
            self.batch.read_range(data, lo, out)
            visit(out)

        return self._checked(w, i, body)

    def _checked(self, w: Wanted, i: int, body: Callable[[Callable[[np.ndarray], None]], None]) -> Callable[[], None]:
        """Block ``i`` of ``w`` as a job: ``body(visit)`` rebuilds it, handing every finished tile of
        the output to ``visit``; their CRC-32C must then be the recorded one. Any failure inside
        becomes one error naming the archive, the task and the tensor."""

        def job() -> None:
            crc = 0

            def visit(tile: np.ndarray) -> None:
                nonlocal crc
                crc = crc32c.crc32c(tile.view(np.uint8), crc)

            try:
                body(visit)
            except Exception as err:
                if isinstance(err, TallstoreError) and not isinstance(err, CorruptArchiveError):
                    raise
                raise self._corrupt(w.row.key, err) from None
            self._check(w, i, crc)

        return job

    def _block_job(
        self, w: Wanted, e: TensorEntry, i: int, a: int, b: int,
        data: ArrayFormat | None, base_arr: ArrayFormat | None, out: np.ndarray,
    ) -> Callable[[], None]:
        row = w.row.info.row_numel

        def body(visit: Callable[[np.ndarray], None]) -> None:
            if w.row.source == layout.SOURCE_EXACT:
                assert data is not None
                self.batch.read_range(data, a * row, out)
                visit(out)
            elif w.row.source in (layout.SOURCE_BASE, layout.SOURCE_XBASE):
                xbase = w.row.source == layout.SOURCE_XBASE
                if xbase:
                    assert data is not None
                    self.batch.read_range(data, a * row, out)
                with self._base_rows(w, e, a, b, base_arr) as base:
                    rebuild_bits(out, dtypes.to_storage(base.to(w.row.dtype.torch)), True if xbase else None, visit)
            else:
                assert data is not None and e.mask_offset is not None
                mask = self._mask_bytes(e.mask_offset + a * row // 8, out.size)
                with self._in_shared_dtype(w, e, out, visit) as work, self._base_rows(w, e, a, b, base_arr) as base:
                    self.batch.read_range(data, a * row, work)
                    rebuild_bits(work, dtypes.to_storage(base.to(e.dtype.torch)), mask, None if work is not out else visit)

        return self._checked(w, i, body)

    @contextmanager
    def _in_shared_dtype(self, w: Wanted, e: TensorEntry, out: np.ndarray, visit: Callable[[np.ndarray], None]) -> Iterator[np.ndarray]:
        """Where a block is rebuilt: ``out`` itself, or — a task of another dtype than the tensor's
        shared one (mixed dtypes) — a pooled buffer in the shared dtype, cast into ``out`` (and
        checksummed) on the way out, rounded once."""
        if w.row.dtype == e.dtype:
            yield out
            return
        with BUFFERS.take(out.size * e.dtype.itemsize) as buf:
            work = np.frombuffer(buf, e.dtype.storage)
            yield work
            cast = dtypes.from_storage(work, e.dtype, (out.size,)).to(w.row.dtype.torch)
            out[:] = dtypes.to_storage(cast)
            visit(out)

    @contextmanager
    def _base_rows(self, w: Wanted, e: TensorEntry, a: int, b: int, base_arr: ArrayFormat | None) -> Iterator[torch.Tensor]:
        """Rows ``a:b`` of the base tensor, flat, in the base's dtype (valid inside the block), read
        into a pooled buffer (a fresh one per block would cost its page faults every load)."""
        info = e.base_info
        assert info is not None
        n = (b - a) * info.row_numel
        with BUFFERS.take(n * info.dtype.itemsize) as buf:
            raw = np.frombuffer(buf, info.dtype.storage)
            rows = dtypes.from_storage(raw, info.dtype, (n,))
            if base_arr is None:
                assert isinstance(self.base, ExternalBase)
                self.base.read_into(w.entry, a, b, rows)
            else:
                self.batch.read_range(base_arr, a * info.row_numel, raw)
            yield rows

    def _plan_quantized(self, w: Wanted, e: TensorEntry, ranges: list[tuple[int, int]]) -> list[tuple[int, Callable[[], None]]]:
        """Plan a masked tensor of the quantized form: its code segments and this task's mask
        segments, the embedded base's blocks."""
        assert e.codes is not None and e.mask_block is not None
        if self._codes is None:
            self._codes = self.source.codes_array()
            self._stream = self.source.mask_stream(self.task)
        masks = self.source.task(self.task).masks
        assert masks is not None and self._stream is not None
        base_arr = self.base.array(e) if isinstance(self.base, EmbeddedBase) else None
        row = w.row.info.row_numel
        bits = dtypes.to_storage(w.out)
        jobs = []
        for i, (a, b) in enumerate(ranges):
            code, mask = e.codes[i], masks[e.mask_block + i]
            self.batch.add_range(self._codes, code[0], code[0] + code[1])
            self.batch.add_range(self._stream, mask[0], mask[0] + mask[1])
            if base_arr is not None:
                self.batch.add_range(base_arr, a * row, b * row)
            jobs.append(((b - a) * row, self._quantized_job(w, e, i, a, b, code, mask, base_arr, bits[a * row : b * row])))
        return jobs

    def _quantized_job(
        self, w: Wanted, e: TensorEntry, i: int, a: int, b: int, code: tuple[int, int, int],
        mask: tuple[int, int, int], base_arr: ArrayFormat | None, out: np.ndarray,
    ) -> Callable[[], None]:
        def body(visit: Callable[[np.ndarray], None]) -> None:
            assert self._codes is not None and self._stream is not None
            where = f"block {i} of {w.entry!r}"
            raw = np.empty(code[1], np.uint8)
            self.batch.read_range(self._codes, code[0], raw)
            scales, q = decode_codes(raw, code[2], b - a, out.size, f"the shared codes of {where}")
            raw = np.empty(mask[1], np.uint8)
            self.batch.read_range(self._stream, mask[0], raw)
            packed = decode_mask_segment(raw, mask[2], q, f"the mask of {where}")
            with self._in_shared_dtype(w, e, out, visit) as work, self._base_rows(w, e, a, b, base_arr) as base:
                base_bits = dtypes.to_storage(base.to(e.dtype.torch))
                shared_bits(base, scales, q, b - a, e.dtype, out=work)
                np.bitwise_xor(work, base_bits, out=work)
                rebuild_bits(work, base_bits, packed, None if work is not out else visit)

        return self._checked(w, i, body)

    def _plan_delta(self, w: Wanted, e: TensorEntry, ranges: list[tuple[int, int]]) -> list[tuple[int, Callable[[], None]]]:
        """Plan a delta-coded tensor: its segments in the task's delta stream, the embedded base's blocks."""
        record = self.source.task(self.task).delta
        assert record is not None
        if self._deltas is None:
            self._deltas = self.source.delta_stream(self.task)
        segments = record.segments[w.row.key]
        base_arr = self.base.array(e) if isinstance(self.base, EmbeddedBase) else None
        row = w.row.info.row_numel
        stream = delta.tensor_seed(record.seed, w.entry)
        bits = dtypes.to_storage(w.out)
        jobs = []
        for i, (a, b) in enumerate(ranges):
            seg = segments[i]
            self.batch.add_range(self._deltas, seg[0], seg[0] + seg[1])
            if base_arr is not None:
                self.batch.add_range(base_arr, a * row, b * row)
            jobs.append(((b - a) * row, self._delta_job(w, e, i, a, b, seg, stream, base_arr, bits[a * row : b * row])))
        return jobs

    def _delta_job(
        self, w: Wanted, e: TensorEntry, i: int, a: int, b: int, seg: tuple[int, int, int], stream: int,
        base_arr: ArrayFormat | None, out: np.ndarray,
    ) -> Callable[[], None]:
        def body(visit: Callable[[np.ndarray], None]) -> None:
            assert self._deltas is not None
            row = w.row.info.row_numel
            raw = np.empty(seg[1], np.uint8)
            self.batch.read_range(self._deltas, seg[0], raw)
            u = delta.dither(stream, a * row, (b - a) * row).reshape(b - a, row)
            block = decode_segment(raw, seg[2], u, f"the delta code of block {i} of {w.row.key!r}")
            with self._base_rows(w, e, a, b, base_arr) as base:
                rows = base.reshape(b - a, row)
                if w.row.dtype.torch == torch.float32:  # rebuilt in place
                    delta.rebuild_block(block, rows, u, out=dtypes.from_storage(out, w.row.dtype, (b - a, row)))
                else:
                    out[:] = dtypes.to_storage(delta.rebuild_block(block, rows, u).to(w.row.dtype.torch).reshape(-1))
            visit(out)

        return self._checked(w, i, body)

    def _plan_masks(self, ranges: list[tuple[int, int]]) -> None:
        """Plan the task's mask bytes covering ``ranges``, decoded into one buffer per run."""
        if not ranges:
            return
        nbytes = self.source.manifest.mask.nbytes
        crcs = self.source.task(self.task).mask_crcs
        self._mask = self.source.reader.array(layout.mask_path(self.task), np.dtype(np.uint8), nbytes, crcs)
        chunk = self._mask.chunk
        for a, b in coalesce(ranges, chunk):
            lo, hi = (a // chunk) * chunk, min(nbytes, ((b - 1) // chunk + 1) * chunk)
            self._mask_runs.append((lo, hi))
            self._mask_bufs.append(np.empty(hi - lo, np.uint8))
            self.batch.add_range(self._mask, lo, hi)

    def _decode_mask_run(self, r: int) -> None:
        assert self._mask is not None
        try:
            self.batch.read_range(self._mask, self._mask_runs[r][0], self._mask_bufs[r])
        except Exception as err:  # raised by the blocks that need this run, naming their tensor
            self._mask_errors[r] = err

    def _mask_bytes(self, lo: int, n: int) -> np.ndarray:
        """The mask bytes of ``n`` bits starting at byte ``lo``."""
        for r, ((a, b), buf) in enumerate(zip(self._mask_runs, self._mask_bufs)):
            if a <= lo < b:
                if r in self._mask_errors:
                    raise self._mask_errors[r]
                return buf[lo - a : lo - a + (n + 7) // 8]
        raise CorruptArchiveError(f"mask byte {lo} was not read")

    def _check(self, w: Wanted, i: int, crc: int) -> None:
        if crc != w.row.crcs[i]:
            raise CorruptArchiveError(
                f"{self.source.location}: tensor {w.row.key!r} of task {self.source.manifest.tasks[self.task]!r} does "
                "not match its recorded checksum (corrupt or missing data, or a modified base)"
            )

    def _corrupt(self, key: str, e: BaseException) -> CorruptArchiveError:
        """A one-line error naming the archive, the task and the tensor."""
        name = self.source.manifest.tasks[self.task]
        detail = str(e) if isinstance(e, TallstoreError) else f"{type(e).__name__}: {e}"
        return CorruptArchiveError(
            f"{self.source.location}: tensor {key!r} of task {name!r}: stored data is unreadable or corrupt ({detail})"
        )
