"""The packer's independent units of work, each reading its own inputs and writing its own arrays.

A unit is a small frozen, picklable object: ``run()`` does the work in whatever process the
executor chose and returns a small summary; ``absorb(result, state)`` folds that summary into
the driver's :class:`~tallstore.packing.results.PackState`. Units:

- :class:`MaskedBlock` — one row block of one masked tensor across all tasks;
- :class:`SeparateTensor` — a tensor stored exactly per task (or found equal to the base);
- :class:`ExtraRows` — the rows a grown tensor (added tokens) has past the base's, per task;
- :class:`ExactTensor` — one tensor of a task stored on its own: exactly, or delta-coded;
- :class:`FileHash` — the SHA-256 of one input file;
- :class:`StoreFile` — one non-weight input file (a config, a tokenizer) archived by content;
- :class:`BlockPass` — a read-only pass function over one row block (TIES, λ selection).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np
import torch
import zarr

from .. import dtypes
from ..checkpoint import Checkpoint
from ..checkpoint.opening import open_file
from ..dtypes import DType
from ..errors import CheckpointError
from ..ops import delta
from ..ops.kernel import pack_mask, rebuild_bits, shared_bits
from ..ops.masks import merged_weights, tall_masks
from ..ops.merges import TaskArithmetic, Ties
from ..ops.quantize import dequantize_rows, quantize_rows
from ..ops.sums import squared_distance
from ..storage import layout
from ..storage.arrays import WRITE_ALL, create_file, create_weights
from ..storage.codecs import Codecs
from ..storage.deltas import encode_segment
from ..storage.digests import block_crc, block_digest
from ..storage.geometry import block_ranges, chunk_elems, extra_info
from ..storage.manifest import SharedForm
from ..storage.segments import encode_codes, mask_segment
from ..storage.stores import open_store
from .executors import PerProcess
from .inputs import Block, InputSpec, check_finite, inputs, read_block
from .inputs import release as release_inputs
from .plan import KeyPlan
from .results import BlockResult, ExactResult, PackState, SeparateResult


@dataclass(frozen=True)
class PackSpec:
    """A picklable description of a pack, from which any process can open its own context."""

    token: str
    inputs: InputSpec
    store: str
    storage_options: dict[str, Any] | None
    lams: tuple[float, ...]
    rule: TaskArithmetic | Ties
    params: dict[str, Any]
    codecs: Codecs
    embed_base: bool
    block_elems: int
    shared: SharedForm
    stored: InputSpec | None = None
    stored_index: tuple[int, ...] = ()
    delta_steps: tuple[float | None, ...] = ()  # per stored task: its delta step κ, None if exact
    tall_index: tuple[int, ...] = ()  # the archive index of each TALL input (``inputs.tasks[i]``)

    def archive_index(self, i: int) -> int:
        """The archive's index of TALL input ``i``: where its own arrays (``exact/<t>``…) live."""
        return self.tall_index[i] if self.tall_index else i


@dataclass
class PackContext:
    """What units share in one process: the open archive group, its arrays and the λ tensor."""

    spec: PackSpec
    root: zarr.Group
    lam: torch.Tensor
    _arrays: dict[str, zarr.Array] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def array(self, path: str) -> zarr.Array:
        """The archive array at ``path``, opened once."""
        with self._lock:
            arr = self._arrays.get(path)
            if arr is None:
                arr = self._arrays[path] = self.root[path].with_config(WRITE_ALL)
            return arr


_CONTEXTS: PerProcess[PackContext] = PerProcess()


def context(spec: PackSpec) -> PackContext:
    """This process's context for ``spec``, opened on first use and then shared by its threads."""
    return _CONTEXTS.get(spec.token, lambda: PackContext(
        spec=spec,
        root=zarr.open_group(open_store(spec.store, read_only=False, storage_options=spec.storage_options),
                             mode="r+", zarr_format=3),
        lam=torch.tensor(spec.lams, dtype=torch.float32),
    ))


def release(spec: PackSpec) -> None:
    """Drop this process's context and open inputs for ``spec``, if any."""
    _CONTEXTS.drop(spec.token)
    release_inputs(spec.inputs)
    if spec.stored is not None:
        release_inputs(spec.stored)


@dataclass
class SharedBlock:
    """One row block's shared data and every task's TALL mask, as the packer stores them: the
    bits of ``θ_MTL`` XOR the base (form ``xor``) or the coded shared segment (form ``quantized``)."""

    info: DType
    masks: torch.Tensor
    packed: np.ndarray
    xor: np.ndarray
    base_bits: np.ndarray
    code_segment: bytes | None = None
    mask_segments: list[bytes] | None = None

    def rebuilt(self, t: int, dtype: DType) -> torch.Tensor:
        """Task ``t``'s rebuild of the block, flat, in its own ``dtype`` (rounded once from the
        shared dtype when they differ): what a reader gets."""
        out = self.xor.copy()
        rebuild_bits(out, self.base_bits, self.packed[t])
        rebuilt = dtypes.from_storage(out, self.info, (out.size,))
        return rebuilt if dtype == self.info else rebuilt.to(dtype.torch)


def shared_block(blk: Block, rule: TaskArithmetic | Ties, params: dict[str, Any], lam: torch.Tensor,
                 shared: SharedForm) -> SharedBlock:
    """The shared data and masks of row block ``blk``: the one computation that both the
    packer's writes and its pre-pack fidelity pass use."""
    rows, row = blk.rows, blk.info.row_numel
    tau_mtl = rule.apply(blk.tau, params)
    base_bits = dtypes.to_storage(blk.base.to(blk.tasks.dtype))
    code_segment = mask_segments = None
    if shared.quantized:
        q, scales = quantize_rows(tau_mtl.view(rows, row), shared.bits or 4, shared.method or "absmax")
        tau_hat = dequantize_rows(q, scales).reshape(-1)
        q_flat = q.reshape(-1).numpy()
        masks = tall_masks(blk.tau, tau_hat, lam) & torch.from_numpy(q_flat != 0)
        merged_bits = shared_bits(blk.base, scales.numpy(), q_flat, rows, blk.info.dtype)
        merged = dtypes.from_storage(merged_bits, blk.info.dtype, (merged_bits.size,))
        code_segment = encode_codes(scales.numpy(), q_flat)
        mask_segments = [mask_segment(m, q_flat, row) for m in masks.numpy()]
    else:
        masks = tall_masks(blk.tau, tau_mtl, lam)
        merged = merged_weights(blk.base, blk.tasks, blk.tau, tau_mtl)
    xor = dtypes.to_storage(merged) ^ base_bits
    return SharedBlock(blk.info.dtype, masks, pack_mask(masks.numpy()), xor, base_bits, code_segment, mask_segments)


def task_rebuilds(sb: SharedBlock, blk: Block) -> Iterator[tuple[torch.Tensor, float, float]]:
    """Each task's rebuild of the block with its squared error and ``Σ τ_t²`` (float64), one
    task at a time, so only one rebuild is held."""
    for t in range(blk.tasks.shape[0]):
        rebuilt = sb.rebuilt(t, blk.dtypes[t])
        yield rebuilt, squared_distance(rebuilt, blk.tasks[t]), squared_distance(blk.tau[t])


def rebuild_sums(block: Block, rule: TaskArithmetic | Ties, params: dict[str, Any], lams: tuple[float, ...],
                 shared: SharedForm) -> tuple[np.ndarray, np.ndarray]:
    """Per task, the block's squared rebuild error and ``Σ τ_t²``, exactly as the packer will
    store the block (a :func:`~tallstore.packing.passes.run_pass` function)."""
    sb = shared_block(block, rule, params, torch.tensor(lams, dtype=torch.float32), shared)
    sums = np.array([(err, tau) for _, err, tau in task_rebuilds(sb, block)]).reshape(-1, 2)
    return sums[:, 0].copy(), sums[:, 1].copy()


@dataclass(frozen=True)
class MaskedBlock:
    """Compute and write one row block of a masked tensor for every task."""

    spec: PackSpec
    kp: KeyPlan
    index: int
    weight: int

    def run(self) -> BlockResult:
        spec, kp = self.spec, self.kp
        ctx = context(spec)
        a, b = kp.blocks[self.index]
        row = kp.info.row_numel
        blk = read_block(spec.inputs, kp, self.index)
        sb = shared_block(blk, spec.rule, spec.params, ctx.lam, spec.shared)
        if not spec.shared.quantized:
            ctx.array(layout.merged_path(kp.node))[a * row : b * row] = sb.xor
        if spec.embed_base:
            ctx.array(layout.base_path(kp.node))[a * row : b * row] = dtypes.to_storage(blk.base)
        T = blk.tasks.shape[0]
        sq_err, tau_sq = np.zeros(T), np.zeros(T)
        digests, crcs = [], []
        for t, (rebuilt, err, tau) in enumerate(task_rebuilds(sb, blk)):
            sq_err[t], tau_sq[t] = err, tau
            digests.append(block_digest(rebuilt))
            crcs.append(block_crc(rebuilt))
        return BlockResult(
            key=kp.key,
            index=self.index,
            mask_bytes=sb.packed,
            base_digest=block_digest(blk.base),
            base_crc=block_crc(blk.base.to(blk.tasks.dtype)),
            base_bits_crc=block_crc(blk.base),
            merged_crc=crc32c.crc32c(sb.xor.view(np.uint8)),
            task_digests=digests,
            task_crcs=crcs,
            ones=np.array([np.count_nonzero(r) for r in sb.masks.numpy()], dtype=np.int64),
            sq_err=sq_err,
            tau_sq=tau_sq,
            nonzero=bool(sb.xor.any()) or spec.shared.quantized,
            gram=(blk.tau @ blk.tau.T).to(torch.float64).numpy(),
            base_sq=squared_distance(blk.base),
            code_segment=sb.code_segment,
            mask_segments=sb.mask_segments,
        )

    def absorb(self, result: BlockResult, state: PackState) -> None:
        state.add_block(self.kp, result)


@dataclass(frozen=True)
class SeparateTensor:
    """Store each task's copy of a tensor exactly, unless it equals the base's copy."""

    spec: PackSpec
    kp: KeyPlan
    weight: int

    def run(self) -> SeparateResult:
        spec, kp = self.spec, self.kp
        ctx = context(spec)
        got = inputs(spec.inputs)
        base_blocks = None
        base_crcs: list[int] = []
        if kp.base_info is not None:
            info = kp.base_info
            arr = None
            if spec.embed_base:
                arr = create_weights(
                    ctx.root, layout.base_path(kp.node), info.numel, info.dtype.storage,
                    chunk_elems(info, spec.block_elems), spec.codecs,
                )
            base_blocks = []
            for a, b in kp.blocks:
                t = got.base.read(kp.key, a, b)
                _check_finite(spec.inputs, t, kp.key, "the base")
                base_blocks.append(block_digest(t))
                base_crcs.append(block_crc(t))
                if arr is not None and t.numel():
                    arr[a * info.row_numel : b * info.row_numel] = dtypes.to_storage(t)
        sources: dict[int, tuple[str, list[bytes], list[int]]] = {}
        sizes: dict[int, int] = {}
        for ti in kp.tasks_with:
            ck = got.tasks[ti]
            info = ck.info(kp.key)
            if info == kp.base_info and base_blocks is not None and _equal_to_base(got.base, ck, kp):
                sources[ti] = (layout.SOURCE_BASE, base_blocks, base_crcs)
                continue
            arr = create_weights(
                ctx.root, layout.exact_path(kp.node, spec.archive_index(ti)), info.numel, info.dtype.storage,
                chunk_elems(info, spec.block_elems), spec.codecs,
            )
            hashes = []
            crcs = []
            for a, b in block_ranges(info, spec.block_elems):
                t = ck.read(kp.key, a, b)
                _check_finite(spec.inputs, t, kp.key, f"task {spec.inputs.names[ti]!r}")
                hashes.append(block_digest(t))
                crcs.append(block_crc(t))
                if t.numel():
                    arr[a * info.row_numel : b * info.row_numel] = dtypes.to_storage(t)
            sources[ti] = (layout.SOURCE_EXACT, hashes, crcs)
            sizes[ti] = info.numel * info.dtype.itemsize
        return SeparateResult(kp.key, base_blocks, base_crcs, sources, sizes)

    def absorb(self, result: SeparateResult, state: PackState) -> None:
        state.separate[self.kp.key] = result


@dataclass(frozen=True)
class ExtraRows:
    """A grown masked tensor's rows past the base's (added tokens), stored exactly per task."""

    spec: PackSpec
    kp: KeyPlan
    weight: int

    def run(self) -> dict[int, tuple[list[bytes], list[int]]]:
        spec, kp = self.spec, self.kp
        ctx = context(spec)
        got = inputs(spec.inputs)
        base_rows = kp.info.rows
        out = {}
        for t in sorted(kp.grown):
            info = extra_info(got.tasks[t].info(kp.key), base_rows)
            arr = create_weights(ctx.root, layout.extra_path(kp.node, spec.archive_index(t)), info.numel, info.dtype.storage,
                                 chunk_elems(info, spec.block_elems), spec.codecs)
            digests, crcs = [], []
            for a, b in block_ranges(info, spec.block_elems):
                block = got.tasks[t].read(kp.key, base_rows + a, base_rows + b)
                _check_finite(spec.inputs, block, kp.key, f"task {spec.inputs.names[t]!r}")
                digests.append(block_digest(block))
                crcs.append(block_crc(block))
                arr[a * info.row_numel : b * info.row_numel] = dtypes.to_storage(block)
            out[t] = (digests, crcs)
        return out

    def absorb(self, result: dict[int, tuple[list[bytes], list[int]]], state: PackState) -> None:
        state.extra[self.kp.key] = result


@dataclass(frozen=True)
class ExactTensor:
    """One tensor of a task stored exactly whole (``--lossless``, ``--max-rebuild-error``): as its
    bits XOR the base's where the base holds it in that shape (mostly zero bits, which the codecs
    shrink), as is where it does not, or not at all where it equals the base."""

    spec: PackSpec
    position: int
    key: str
    node: str
    weight: int

    def run(self) -> ExactResult:
        spec = self.spec
        assert spec.stored is not None
        got = inputs(spec.stored)
        ck, t = got.tasks[self.position], spec.stored_index[self.position]
        info = ck.info(self.key)
        base_info = got.base.info(self.key) if self.key in got.base else None
        against = base_info is not None and base_info.shape == info.shape and (
            base_info.dtype == info.dtype or (base_info.dtype.is_float and info.dtype.is_float))
        step = spec.delta_steps[self.position] if spec.delta_steps else None
        if step is not None and delta_codable(ck, got.base, self.key):
            return self._delta(got, ck, t, step)
        arr: zarr.Array | None = None
        same: list[tuple[int, int]] = []  # leading blocks equal to the base's, written once one differs
        digests, crcs = [], []
        tau_sq = 0.0
        row = info.row_numel
        who = f"task {spec.stored.names[self.position]!r}"
        for a, b in block_ranges(info, spec.block_elems):
            x = ck.read(self.key, a, b)
            _check_finite(spec.stored, x, self.key, who)
            digests.append(block_digest(x))
            crcs.append(block_crc(x))
            bits = dtypes.to_storage(x.reshape(-1))
            if against:
                base = got.base.read(self.key, a, b).reshape(-1)
                bits = bits ^ dtypes.to_storage(base.to(info.dtype.torch))
                if info.dtype.is_float:
                    tau_sq += squared_distance(x, base)
                if arr is None and not bits.any():
                    same.append((a, b))
                    continue
            if arr is None:
                arr = create_weights(context(spec).root, layout.exact_path(self.node, t), info.numel,
                                     info.dtype.storage, chunk_elems(info, spec.block_elems), spec.codecs)
                for a0, b0 in same:
                    arr[a0 * row : b0 * row] = np.zeros((b0 - a0) * row, info.dtype.storage)
            if bits.size:
                arr[a * row : b * row] = bits
        source = layout.SOURCE_EXACT if not against else layout.SOURCE_XBASE if arr is not None else layout.SOURCE_BASE
        return ExactResult(t, self.key, source, digests, crcs, 0 if source == layout.SOURCE_BASE else info.nbytes, tau_sq)

    def _delta(self, got: Any, ck: Checkpoint, t: int, step: float) -> ExactResult:
        """The tensor as delta segments (spec §10), one per row block, with the digests and CRCs
        of what the reader will rebuild from them (the same kernel) and its squared error."""
        assert self.spec.stored is not None
        who = f"task {self.spec.stored.names[self.position]!r}"
        segments, digests, crcs = [], [], []
        tau_sq = sq_err = 0.0
        for x, base, u, block, rebuilt in delta_blocks(ck, got.base, self.key, step, t, self.spec.block_elems):
            _check_finite(self.spec.stored, x, self.key, who)
            segments.append(encode_segment(block, u))
            digests.append(block_digest(rebuilt))
            crcs.append(block_crc(rebuilt))
            tau_sq += squared_distance(x, base)
            sq_err += squared_distance(rebuilt, x)
        return ExactResult(t, self.key, layout.SOURCE_DELTA, digests, crcs, 0, tau_sq, sq_err, segments)

    def absorb(self, result: ExactResult, state: PackState) -> None:
        state.add_exact(result)


@dataclass(frozen=True)
class FileHash:
    """The SHA-256 of one input file (a local path or a URL)."""

    location: str
    storage_options: dict[str, Any] | None
    weight: int = 0

    def run(self) -> str:
        src = open_file(self.location, self.storage_options)
        try:
            return src.sha256()
        finally:
            src.close()

    def absorb(self, result: str, state: PackState) -> None:
        state.file_hashes[self.location] = result


@dataclass(frozen=True)
class StoreFile:
    """Archive one non-weight input file at ``files/<sha256>`` (content-addressed: stored once)."""

    spec: PackSpec
    location: str
    sha256: str
    size: int
    weight: int = 0

    def run(self) -> None:
        src = open_file(self.location, self.spec.storage_options)
        try:
            data = src.read(0, src.size)
        finally:
            src.close()
        if data.size != self.size or hashlib.sha256(data).hexdigest() != self.sha256:
            raise CheckpointError(f"{self.location} changed while it was packed")
        arr = create_file(context(self.spec).root, layout.file_path(self.sha256), data.size, self.spec.codecs)
        if data.size:
            arr[:] = data

    def absorb(self, result: None, state: PackState) -> None:
        pass


@dataclass(frozen=True)
class BlockPass:
    """A read-only pass over one row block: ``fn(block)`` on the inputs' block ``index`` of ``kp``."""

    inputs: InputSpec
    kp: KeyPlan
    index: int
    fn: Callable[[Block], Any]

    def run(self) -> Any:
        return self.fn(read_block(self.inputs, self.kp, self.index))


def delta_codable(ck: Checkpoint, base: Checkpoint, key: str) -> bool:
    """Whether task tensor ``key`` can be delta-coded (spec §10): floating, two or more dimensions,
    and held by the base in its shape with a floating dtype."""
    info = ck.info(key)
    if key not in base or len(info.shape) < 2 or not info.dtype.is_float:
        return False
    b = base.info(key)
    return b.shape == info.shape and b.dtype.is_float


def delta_blocks(
    ck: Checkpoint, base: Checkpoint, key: str, step: float, seed: int, block_elems: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, delta.DeltaBlock, torch.Tensor]]:
    """Each row block of a delta-coded tensor: the task's rows and the base's (float32, 2-D), the
    dither, the code and the rebuild in the task's dtype, exactly as a reader gets it."""
    info = ck.info(key)
    row = info.row_numel
    stream = delta.tensor_seed(seed, key)
    for a, b in block_ranges(info, block_elems):
        x = ck.read(key, a, b).reshape(b - a, row)
        base_rows = base.read(key, a, b).to(torch.float32).reshape(b - a, row)
        u = delta.dither(stream, a * row, (b - a) * row).reshape(b - a, row)
        code = delta.encode_block(x.to(torch.float32) - base_rows, base_rows, step, u)
        yield x, base_rows, u, code, delta.rebuild_block(code, base_rows, u).to(info.dtype.torch)


def _check_finite(spec: InputSpec, t: torch.Tensor, key: str, who: str) -> None:
    if not spec.allow_nonfinite and t.dtype.is_floating_point:
        check_finite(t, key, who)


def _equal_to_base(base: Checkpoint, ck: Checkpoint, kp: KeyPlan) -> bool:
    for a, b in kp.blocks:
        if not torch.equal(ck.read(kp.key, a, b), base.read(kp.key, a, b)):
            return False
    return True
