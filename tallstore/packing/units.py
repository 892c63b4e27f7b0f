"""The packer's independent units of work, each reading its own inputs and writing its own arrays.

A unit is a small frozen, picklable object: ``run()`` does the work in whatever process the
executor chose and returns a small summary; ``absorb(result, state)`` folds that summary into
the driver's :class:`~tallstore.packing.results.PackState`. Units:

- :class:`MaskedBlock` — one row block of one masked tensor across all tasks;
- :class:`SeparateTensor` — a tensor stored exactly per task (or found equal to the base);
- :class:`FileHash` — the SHA-256 of one input file;
- :class:`StoreFile` — one non-weight input file (a config, a tokenizer) archived by content;
- :class:`BlockPass` — a read-only pass function over one row block (TIES, λ selection).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np
import torch
import zarr

from .. import dtypes
from ..checkpoint import Checkpoint
from ..checkpoint.opening import open_file
from ..errors import CheckpointError
from ..ops.kernel import pack_mask, rebuild_bits, shared_bits
from ..ops.masks import merged_weights, tall_masks
from ..ops.merges import TaskArithmetic, Ties
from ..ops.quantize import dequantize_rows, quantize_rows
from ..storage import layout
from ..storage.arrays import WRITE_ALL, create_file, create_weights
from ..storage.codecs import Codecs
from ..storage.digests import block_crc, block_digest
from ..storage.geometry import block_ranges, chunk_elems
from ..storage.manifest import SharedForm
from ..storage.segments import encode_codes, mask_segment
from ..storage.stores import open_store
from .executors import PerProcess
from .inputs import Block, InputSpec, check_finite, inputs, read_block
from .inputs import release as release_inputs
from .plan import KeyPlan
from .results import BlockResult, PackState, SeparateResult


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
        tau_mtl = spec.rule.apply(blk.tau, spec.params)
        base_t = blk.base.to(blk.tasks.dtype)
        base_bits = dtypes.to_storage(base_t)
        code_segment = mask_segments = None
        if spec.shared.quantized:
            q, scales = quantize_rows(tau_mtl.view(b - a, row), spec.shared.bits or 4, spec.shared.method or "absmax")
            tau_hat = dequantize_rows(q, scales).reshape(-1)
            q_flat = q.reshape(-1).numpy()
            masks = tall_masks(blk.tau, tau_hat, ctx.lam) & torch.from_numpy(q_flat != 0)
            merged_bits = shared_bits(blk.base, scales.numpy(), q_flat, b - a, kp.info.dtype)
            merged = dtypes.from_storage(merged_bits, kp.info.dtype, (merged_bits.size,))
            code_segment = encode_codes(scales.numpy(), q_flat)
            mask_segments = [mask_segment(m, q_flat, row) for m in masks.numpy()]
        else:
            masks = tall_masks(blk.tau, tau_mtl, ctx.lam)
            merged = merged_weights(blk.base, blk.tasks, blk.tau, tau_mtl)
        xor = dtypes.to_storage(merged) ^ base_bits
        if not spec.shared.quantized:
            ctx.array(layout.merged_path(kp.node))[a * row : b * row] = xor
        if spec.embed_base:
            ctx.array(layout.base_path(kp.node))[a * row : b * row] = dtypes.to_storage(blk.base)
        packed = pack_mask(masks.numpy())
        T = blk.tasks.shape[0]
        sq_err = np.zeros(T)
        tau_sq = np.zeros(T)
        digests, crcs = [], []
        for t in range(T):  # one task at a time: float64 temporaries stay at one row's size
            out = xor.copy()
            rebuild_bits(out, base_bits, packed[t])
            rebuilt = dtypes.from_storage(out, kp.info.dtype, (out.size,))
            sq_err[t] = float((rebuilt.to(torch.float64) - blk.tasks[t].to(torch.float64)).square().sum())
            tau_sq[t] = float(blk.tau[t].to(torch.float64).square().sum())
            digests.append(block_digest(rebuilt))
            crcs.append(block_crc(rebuilt))
        return BlockResult(
            key=kp.key,
            index=self.index,
            mask_bytes=packed,
            base_digest=block_digest(blk.base),
            base_crc=block_crc(base_t),
            base_bits_crc=block_crc(blk.base),
            merged_crc=crc32c.crc32c(xor.view(np.uint8)),
            task_digests=digests,
            task_crcs=crcs,
            ones=np.array([np.count_nonzero(r) for r in masks.numpy()], dtype=np.int64),
            sq_err=sq_err,
            tau_sq=tau_sq,
            nonzero=bool(xor.any()) or spec.shared.quantized,
            gram=(blk.tau @ blk.tau.T).to(torch.float64).numpy(),
            base_sq=float(blk.base.to(torch.float64).square().sum()),
            code_segment=code_segment,
            mask_segments=mask_segments,
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
                _check_finite(spec, t, kp.key, "the base")
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
                ctx.root, layout.exact_path(kp.node, ti), info.numel, info.dtype.storage,
                chunk_elems(info, spec.block_elems), spec.codecs,
            )
            hashes = []
            crcs = []
            for a, b in block_ranges(info, spec.block_elems):
                t = ck.read(kp.key, a, b)
                _check_finite(spec, t, kp.key, f"task {spec.inputs.names[ti]!r}")
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


def _check_finite(spec: PackSpec, t: torch.Tensor, key: str, who: str) -> None:
    if not spec.inputs.allow_nonfinite and t.dtype.is_floating_point:
        check_finite(t, key, who)


def _equal_to_base(base: Checkpoint, ck: Checkpoint, kp: KeyPlan) -> bool:
    for a, b in kp.blocks:
        if not torch.equal(ck.read(kp.key, a, b), base.read(kp.key, a, b)):
            return False
    return True
