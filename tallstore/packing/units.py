"""The packer's independent units of work, each reading its own inputs and writing its own arrays.

A *masked block* is one row block of one masked tensor across all tasks; a *separate tensor*
is a tensor stored exactly per task (or found equal to the base). Units return small summaries
(digests, statistics, packed mask bytes) that the driver combines; nothing else is shared.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .. import dtypes
from ..checkpoint import Checkpoint
from ..digests import block_crc, block_digest, combine
from ..geometry import block_ranges, chunk_elems
from ..ops import merges
from ..ops.masks import merged_weights, tall_masks
from ..storage import format as fmt
from ..storage.arrays import WRITE_ALL, create_weights
from ..storage.codecs import Codecs
from ..storage.stores import open_store
from .inputs import InputSpec, check_finite, inputs, read_block
from .inputs import release as release_inputs
from .plan import KeyPlan


@dataclass(frozen=True)
class PackSpec:
    """A picklable description of a pack, from which any process can open its own context."""

    token: str
    inputs: InputSpec
    store: str
    storage_options: dict[str, Any] | None
    lams: tuple[float, ...]
    rule: str
    params: dict[str, Any]
    codecs: Codecs
    embed_base: bool
    block_elems: int


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


_CONTEXTS: dict[str, PackContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def context(spec: PackSpec) -> PackContext:
    """This process's context for ``spec``, opened on first use and then shared by its threads."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(spec.token)
        if ctx is None:
            store = open_store(spec.store, read_only=False, storage_options=spec.storage_options)
            ctx = _CONTEXTS[spec.token] = PackContext(
                spec=spec,
                root=zarr.open_group(store, mode="r+", zarr_format=3),
                lam=torch.tensor(spec.lams, dtype=torch.float32),
            )
        return ctx


def release(spec: PackSpec) -> None:
    """Drop this process's context and open inputs for ``spec``, if any."""
    with _CONTEXTS_LOCK:
        _CONTEXTS.pop(spec.token, None)
    release_inputs(spec.inputs)


@dataclass
class MaskedBlock:
    """Summary of one masked block: mask bytes for the mask writer plus digests and sums."""

    key: str
    index: int
    mask_bytes: np.ndarray
    base_digest: bytes
    base_crc: int
    task_digests: list[bytes]
    task_crcs: list[int]
    ones: np.ndarray
    sq_err: np.ndarray
    tau_sq: np.ndarray
    nonzero: bool


@dataclass
class SeparateTensor:
    """Summary of one separate tensor: the base digest and each task's source and digest."""

    key: str
    base_digest: str | None
    base_crcs: list[int]
    sources: dict[int, tuple[str, str, list[int]]]
    exact_bytes: dict[int, int]


def _check_finite(spec: PackSpec, t: torch.Tensor, key: str, who: str) -> None:
    if not spec.inputs.allow_nonfinite and t.dtype.is_floating_point:
        check_finite(t, key, who)


def masked_block(spec: PackSpec, kp: KeyPlan, index: int) -> MaskedBlock:
    """Compute and write one row block of a masked tensor for every task."""
    ctx = context(spec)
    a, b = kp.blocks[index]
    row = kp.info.row_numel
    base, tasks, tau = read_block(spec.inputs, kp, index)
    tau_mtl = merges.apply(spec.rule, tau, spec.params)
    masks = tall_masks(tau, tau_mtl, ctx.lam)
    merged = merged_weights(base, tasks, tau, tau_mtl)
    base_t = base.to(tasks.dtype)
    xor = dtypes.bits(merged) ^ dtypes.bits(base_t)
    nonzero = bool(xor.any())
    ctx.array(fmt.merged_path(kp.node))[a * row : b * row] = dtypes.to_storage(xor)
    if spec.embed_base:
        ctx.array(fmt.base_path(kp.node))[a * row : b * row] = dtypes.to_storage(base)
    T = tasks.shape[0]
    sq_err = np.zeros(T)
    tau_sq = np.zeros(T)
    digests = []
    crcs = []
    for t in range(T):  # one task at a time: float64 temporaries stay at one row's size
        rebuilt = torch.where(masks[t], merged, base_t)
        diff = rebuilt.to(torch.float64) - tasks[t].to(torch.float64)
        sq_err[t] = float(diff.square().sum())
        tau_sq[t] = float(tau[t].to(torch.float64).square().sum())
        digests.append(block_digest(rebuilt))
        crcs.append(block_crc(rebuilt))
    rows = masks.numpy()
    return MaskedBlock(
        key=kp.key,
        index=index,
        mask_bytes=np.packbits(rows, axis=1, bitorder=fmt.BITORDER),
        base_digest=block_digest(base),
        base_crc=block_crc(base_t),
        task_digests=digests,
        task_crcs=crcs,
        ones=np.array([np.count_nonzero(r) for r in rows], dtype=np.int64),  # torch's bool sum makes a (T, n) int64
        sq_err=sq_err,
        tau_sq=tau_sq,
        nonzero=nonzero,
    )


def separate_tensor(spec: PackSpec, kp: KeyPlan) -> SeparateTensor:
    """Store each task's copy of a tensor exactly, unless it equals the base's copy."""
    ctx = context(spec)
    got = inputs(spec.inputs)
    base_digest = None
    base_crcs: list[int] = []
    if kp.base_info is not None:
        info = kp.base_info
        arr = None
        if spec.embed_base:
            arr = create_weights(
                ctx.root, fmt.base_path(kp.node), info.numel, info.dtype.storage,
                chunk_elems(info, spec.block_elems), spec.codecs,
            )
        hashes = []
        for a, b in kp.blocks:
            t = got.base.read(kp.key, a, b)
            _check_finite(spec, t, kp.key, "the base")
            hashes.append(block_digest(t))
            base_crcs.append(block_crc(t))
            if arr is not None and t.numel():
                arr[a * info.row_numel : b * info.row_numel] = dtypes.to_storage(t)
        base_digest = combine(hashes)
    sources: dict[int, tuple[str, str, list[int]]] = {}
    sizes: dict[int, int] = {}
    for ti in kp.tasks_with:
        ck = got.tasks[ti]
        info = ck.info(kp.key)
        if info == kp.base_info and base_digest is not None and _equal_to_base(got.base, ck, kp):
            sources[ti] = (fmt.SOURCE_BASE, base_digest, base_crcs)
            continue
        arr = create_weights(
            ctx.root, fmt.exact_path(kp.node, ti), info.numel, info.dtype.storage,
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
        sources[ti] = (fmt.SOURCE_EXACT, combine(hashes), crcs)
        sizes[ti] = info.numel * info.dtype.itemsize
    return SeparateTensor(kp.key, base_digest, base_crcs, sources, sizes)


def _equal_to_base(base: Checkpoint, ck: Checkpoint, kp: KeyPlan) -> bool:
    for a, b in kp.blocks:
        if not torch.equal(ck.read(kp.key, a, b), base.read(kp.key, a, b)):
            return False
    return True


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole input file (a local path or a remote file), read in 8 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(8 << 20):
            h.update(piece)
    return h.hexdigest()
