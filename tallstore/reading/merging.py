"""Merged models from an archive alone: Consensus Merging, and the plain merge (``ta``/``ties``).

Every masked tensor stores ``θ_MTL`` (bits XOR the base, or quantized codes) and each TALL
task's mask, so without the original checkpoints:

- ``consensus``: ``θ₀ + α · (m_cons ⊙ τ_MTL)`` with ``m_cons = Σ_t m_t ≥ k`` (TALL paper, §5)
  over the T tasks that have masks; ``k = 0`` is the plain merge, ``k = T + 1`` the base;
- ``ta`` / ``ties``: ``θ₀ + α · τ_MTL``, the archive's own merge (its rule must match).

Tasks stored exactly whole (``--lossless``, ``--max-rebuild-error``) are not in ``τ_MTL`` and
have no mask: they are not part of the merge and are listed in ``excluded``.

``τ_MTL`` is recovered as ``θ_MTL − θ₀`` in float32, so it carries the rounding of ``θ_MTL`` to
the tasks' dtype (bf16 archives: bf16 rounding). With ``α = 1`` a selected entry is ``θ_MTL``
itself, bit for bit (the value a task load selects); otherwise ``cast_d(θ₀ + α·τ_MTL)``.
Unselected entries are ``cast_d(θ₀)``.

Tensors that are not masked have no merged value: a tensor the base holds is the base's copy
(tensors every task left at the base, integer buffers, ``exact`` patterns); a tensor the base
lacks (per-task heads) is omitted and listed in ``omitted``. One tensor is read at a time,
through the same checked chunk reader and rebuild kernel as task loads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .. import dtypes
from ..checkpoint.writer import save
from ..dtypes import TensorInfo
from ..errors import CorruptArchiveError, MergeError, TallstoreError
from ..ops.kernel import pack_mask, rebuild_bits, shared_bits
from ..ops.masks import consensus_mask
from ..ops.merges import RULES
from ..storage import layout
from ..storage.chunks import allocating
from ..storage.geometry import row_blocks
from ..storage.manifest import TensorEntry
from ..storage.segments import decode_codes, decode_mask_segment
from .base_model import EmbeddedBase, ExternalBase, read_checked
from .source import ArchiveSource

CONSENSUS = "consensus"
METHODS = (CONSENSUS, *RULES)
DEFAULT_K = 2


class MergedView(Mapping[str, torch.Tensor]):
    """A merged model as a lazy ``Mapping[str, Tensor]`` in the base's key order."""

    def __init__(
        self, source: ArchiveSource, base: ExternalBase | EmbeddedBase, method: str = CONSENSUS, *,
        k: int | None = None, alpha: float = 1.0,
    ) -> None:
        m = source.manifest
        rule = m.merge.rule
        if method not in METHODS:
            raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
        if method != CONSENSUS and k is not None:
            raise MergeError(f"k applies to consensus merging only, not to {method!r}")
        if method in RULES and method != rule:
            raise MergeError(
                f"the {method!r} model needs an archive packed with --merge {method}; "
                f"{source.location} was packed with {rule!r} (use 'consensus' or {rule!r})"
            )
        tall = [t for t in range(len(m.tasks)) if source.task(t).tall]
        if not tall:
            raise MergeError(f"every task of {source.location} is stored on its own (exactly or delta-coded): there "
                             "is no shared vector or mask to merge; extract the tasks instead")
        if method == CONSENSUS:
            k = DEFAULT_K if k is None else k
            T = len(tall)
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= T + 1:
                raise MergeError(f"k must be a whole number from 0 to {T + 1} ({T} task{'s' * (T != 1)} with masks: 0 gives the "
                                 f"plain merge, {T + 1} the base), got {k!r}")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise MergeError(f"alpha must be a number, got {alpha!r}") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise MergeError(f"alpha must be a finite number ≥ 0 (it scales the merged task vector), got {alpha:g}")
        self._tall = tall
        self.excluded = [m.tasks[t] for t in range(len(m.tasks)) if t not in tall]
        self._source = source
        self._base = base
        self.method = method
        self.k = None if k is None else int(k)
        self.alpha = alpha
        known = set(m.base.keys)
        self._keys = [key for key in m.base.keys if key in m.entries]
        self.omitted = [e.key for e in m.tensors if e.key not in known]

    def describe(self) -> str:
        """A short description such as ``consensus k=2 α=1.0``."""
        k = f" k={self.k}" if self.k is not None else ""
        return f"{self.method}{k} α={self.alpha:g}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._source.manifest.entries and key not in self.omitted

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of ``key`` in the merged model."""
        e = self._entry(key)
        d = e.dtype if e.kind != layout.KIND_SEPARATE else (e.base_dtype or e.dtype)
        return TensorInfo(d, e.shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        info = self.info(key)
        with allocating(f"{self._source.location}: tensor {key!r} ({info.nbytes} bytes)"):
            return self._read(key, e, info)

    def _read(self, key: str, e: TensorEntry, info: TensorInfo) -> torch.Tensor:
        base = read_checked(self._base, e, self._source.manifest.block_elems)
        if e.kind != layout.KIND_MASKED:
            return base.to(info.dtype.torch)
        try:
            return self._merge(e, info, base.reshape(-1)).reshape(info.shape)
        except TallstoreError as err:
            if not isinstance(err, CorruptArchiveError):
                raise
            raise CorruptArchiveError(
                f"{self._source.location}: tensor {key!r}: stored data is unreadable or corrupt ({err})"
            ) from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the merged model (all in memory: prefer ``save`` for large models)."""
        return {key: self[key] for key in self._keys}

    def save(
        self, out: str | os.PathLike[str], *, overwrite: bool = False, max_shard_bytes: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Stream the merged model to a safetensors file or a folder (with the base folder's
        archived files: its config, tokenizer…), one tensor at a time."""
        items = [(key, self.info(key)) for key in self._keys]
        meta = {"tallstore_merge": self.describe()}
        files = [(f.path, partial(self._source.read_file, f)) for f in self._source.manifest.base.folder]
        return save(out, items, self.__getitem__, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                    metadata=meta, progress=progress, files=files, command="merge")

    def _entry(self, key: str) -> TensorEntry:
        if key not in self:
            raise KeyError(f"the merged model has no tensor {key!r}")
        return self._source.manifest.entries[key]

    def _merge(self, e: TensorEntry, info: TensorInfo, base: torch.Tensor) -> torch.Tensor:
        """The merged tensor: ``θ_MTL`` (α-scaled) where the selection holds, the base elsewhere."""
        base_bits = dtypes.to_storage(base.to(info.dtype.torch))
        quantized = self._source.manifest.shared.quantized
        xor, count = (self._quantized if quantized else self._xor)(e, info, base, base_bits)
        if count is None:
            rebuild_bits(xor, base_bits, True)
        else:
            assert self.k is not None
            rebuild_bits(xor, base_bits, pack_mask(consensus_mask(torch.from_numpy(count), self.k).numpy()))
        return dtypes.from_storage(xor, info.dtype, (info.numel,))

    def _scaled(self, merged: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``cast_d(θ₀ + α·τ_MTL)`` with ``τ_MTL = θ_MTL − θ₀`` in float32."""
        return (base.to(torch.float32) + self.alpha * (merged.to(torch.float32) - base.to(torch.float32))).to(dtype)

    def _xor(self, e: TensorEntry, info: TensorInfo, base: torch.Tensor,
             base_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Shared form ``xor``: ``θ_MTL`` XOR the base, and (consensus) how many masks select each entry."""
        source = self._source
        reader = source.reader
        n = info.numel
        lo, hi = e.mask_range
        merged_arr = reader.array(layout.merged_path(e.node), info.dtype.storage, n, e.crcs)
        batch = reader.batch()
        batch.add_range(merged_arr, 0, n)
        masks = []
        if self.method == CONSENSUS:
            nbytes = source.manifest.mask.nbytes
            masks = [reader.array(layout.mask_path(t), np.dtype(np.uint8), nbytes, source.task(t).mask_crcs)
                     for t in self._tall]
            for m in masks:
                batch.add_range(m, lo, hi)
        batch.fetch()
        xor = np.empty(n, info.dtype.storage)
        batch.read_range(merged_arr, 0, xor)
        if self.alpha != 1.0:
            merged = dtypes.from_storage(xor ^ base_bits, info.dtype, (n,))
            xor = dtypes.to_storage(self._scaled(merged, base, info.dtype.torch)) ^ base_bits
        if self.method != CONSENSUS:
            return xor, None
        count = np.zeros(n, np.int32)
        bits = np.empty(hi - lo, np.uint8)
        for m in masks:
            batch.read_range(m, lo, bits)
            count += np.unpackbits(bits, count=n, bitorder=layout.BITORDER)
        return xor, count

    def _quantized(self, e: TensorEntry, info: TensorInfo, base: torch.Tensor,
                   base_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Shared form ``quantized``: per row block, ``θ₀ + s·q`` from the codes, XOR the base,
        and (consensus) the count of the tasks' mask segments decoded under those codes."""
        source = self._source
        assert e.codes is not None and e.mask_block is not None
        codes = source.codes_array()
        consensus = self.method == CONSENSUS
        streams = [(source.mask_stream(t), source.task(t).masks) for t in self._tall] if consensus else []
        ranges = row_blocks(info, None, source.manifest.block_elems)
        if len(ranges) != len(e.codes):
            raise CorruptArchiveError(f"{len(e.codes)} code segments recorded for {len(ranges)} blocks")
        batch = source.reader.batch()
        for i in range(len(ranges)):
            batch.add_range(codes, e.codes[i][0], e.codes[i][0] + e.codes[i][1])
            for stream, segs in streams:
                assert segs is not None
                seg = segs[e.mask_block + i]
                batch.add_range(stream, seg[0], seg[0] + seg[1])
        batch.fetch()
        row = info.row_numel
        xor = np.empty(info.numel, info.dtype.storage)
        count = np.zeros(info.numel, np.int32) if consensus else None
        for i, (a, b) in enumerate(ranges):
            where = f"block {i} of {e.key!r}"
            raw = np.empty(e.codes[i][1], np.uint8)
            batch.read_range(codes, e.codes[i][0], raw)
            scales, q = decode_codes(raw, e.codes[i][2], b - a, (b - a) * row, f"the shared codes of {where}")
            block = base[a * row : b * row]
            if self.alpha == 1.0:
                merged_bits = shared_bits(block, scales, q, b - a, info.dtype)
            else:
                merged = dtypes.from_storage(shared_bits(block, scales, q, b - a, info.dtype), info.dtype, (block.numel(),))
                merged_bits = dtypes.to_storage(self._scaled(merged, block, info.dtype.torch))
            np.bitwise_xor(merged_bits, base_bits[a * row : b * row], out=xor[a * row : b * row])
            for stream, segs in streams:
                assert segs is not None and count is not None
                seg = segs[e.mask_block + i]
                raw = np.empty(seg[1], np.uint8)
                batch.read_range(stream, seg[0], raw)
                packed = decode_mask_segment(raw, seg[2], q, f"a mask of {where}")
                count[a * row : b * row] += np.unpackbits(packed, count=(b - a) * row, bitorder=layout.BITORDER)
        return xor, count
