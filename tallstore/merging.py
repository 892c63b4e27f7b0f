"""Merged models from an archive alone: Consensus Merging, and the plain merge (``ta``/``ties``).

Every masked tensor stores ``θ_MTL`` (bits XOR the base) and each task's mask, so without the
original checkpoints:

- ``consensus``: ``θ₀ + α · (m_cons ⊙ τ_MTL)`` with ``m_cons = Σ_t m_t ≥ k`` (TALL paper, §5);
  ``k = 0`` is the plain merge, ``k > T`` the base;
- ``ta`` / ``ties``: ``θ₀ + α · τ_MTL``, the archive's own merge (its rule must match).

``τ_MTL`` is recovered as ``θ_MTL − θ₀`` in float32, so it carries the rounding of ``θ_MTL`` to
the tasks' dtype (bf16 archives: bf16 rounding). With ``α = 1`` a selected entry is ``θ_MTL``
itself, bit for bit; otherwise ``cast_d(θ₀ + α·τ_MTL)``. Unselected entries are ``cast_d(θ₀)``.

Tensors that are not masked have no merged value: a tensor the base holds is the base's copy
(tensors every task left at the base, integer buffers, ``exact`` patterns); a tensor the base
lacks (per-task heads) is omitted and listed in ``omitted``. One tensor is read at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import dtypes
from .checkpoint import TensorInfo
from .checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, save
from .errors import CorruptArchiveError, MergeError, TallstoreError
from .ops.masks import consensus_mask
from .storage import format as fmt
from .storage.reading import read_many

if TYPE_CHECKING:
    from .archive import Archive

METHODS = ("consensus", "ta", "ties")
DEFAULT_K = 2


class MergedView(Mapping[str, torch.Tensor]):
    """A merged model as a lazy ``Mapping[str, Tensor]`` in the base's key order."""

    def __init__(self, archive: Archive, method: str = "consensus", *, k: int | None = None, alpha: float = 1.0) -> None:
        rule = archive.manifest["merge"]["rule"]
        if method not in METHODS:
            raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
        if method != "consensus" and k is not None:
            raise MergeError(f"k applies to consensus merging only, not to {method!r}")
        if method in ("ta", "ties") and method != rule:
            raise MergeError(
                f"the {method!r} model needs an archive packed with --merge {method}; "
                f"{archive.location} was packed with {rule!r} (use 'consensus' or {rule!r})"
            )
        if method == "consensus":
            k = DEFAULT_K if k is None else k
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                raise MergeError(f"k must be an integer ≥ 0, got {k!r}")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise MergeError(f"alpha must be a number, got {alpha!r}") from None
        if not math.isfinite(alpha):
            raise MergeError(f"alpha must be finite, got {alpha}")
        self.archive = archive
        self.method = method
        self.k = None if k is None else int(k)
        self.alpha = alpha
        base_keys = archive.manifest["base"]["keys"]
        known = set(base_keys)
        self._keys = [key for key in base_keys if key in archive.entries]
        self.omitted = [e["key"] for e in archive.manifest["tensors"] if e["key"] not in known]

    def describe(self) -> str:
        """A short description such as ``consensus k=2 α=1.0``."""
        k = f" k={self.k}" if self.k is not None else ""
        return f"{self.method}{k} α={self.alpha:g}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self.archive.entries and key not in self.omitted

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of ``key`` in the merged model."""
        e = self._entry(key)
        name = e["dtype"] if e["kind"] != fmt.KIND_SEPARATE else e.get("base_dtype", e["dtype"])
        return TensorInfo(dtypes.by_name(name), tuple(e["shape"]))

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        info = self.info(key)
        base = self.archive.base.read(key)
        if e["kind"] != fmt.KIND_MASKED:
            return base.to(info.dtype.torch)
        return self._merge(e, info, base.reshape(-1)).reshape(info.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the merged model (all in memory: prefer ``save`` for large models)."""
        return {key: self[key] for key in self._keys}

    def save(
        self, out: str | os.PathLike[str], *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> Path:
        """Stream the merged model to a safetensors file or HF folder, one tensor at a time."""
        items = [(key, self.info(key)) for key in self._keys]
        meta = {"tallstore_merge": self.describe()}
        return save(out, items, self.__getitem__, overwrite=overwrite, max_shard_bytes=max_shard_bytes, metadata=meta)

    def _entry(self, key: str) -> dict[str, Any]:
        if key not in self:
            raise KeyError(f"the merged model has no tensor {key!r}")
        return self.archive.entries[key]

    def _merge(self, e: dict[str, Any], info: TensorInfo, base: torch.Tensor) -> torch.Tensor:
        arc = self.archive
        n = info.numel
        lo, hi = e["mask_offset"], e["mask_offset"] + (n + 7) // 8
        reads = [(arc.root[fmt.merged_path(e["node"])], slice(None))]
        if self.method == "consensus":
            reads += [(arc.root[fmt.mask_path(t)], slice(lo, hi)) for t in range(len(arc))]
        try:
            xor, *masks = read_many(reads)
        except TallstoreError:
            raise
        except Exception as err:
            raise CorruptArchiveError(
                f"{arc.location}: tensor {e['key']!r}: stored data is unreadable or corrupt ({type(err).__name__}: {err})"
            ) from None
        base_d = base.to(info.dtype.torch)
        bb = dtypes.bits(base_d)
        merged = (bb ^ torch.from_numpy(xor.view(bb.numpy().dtype))).view(info.dtype.torch)
        if self.alpha != 1.0:
            tau_mtl = merged.to(torch.float32) - base.to(torch.float32)
            merged = (base.to(torch.float32) + self.alpha * tau_mtl).to(info.dtype.torch)
        if self.method != "consensus":
            return merged
        assert self.k is not None
        count = np.zeros(n, np.int32)
        for m in masks:
            count += np.unpackbits(m, count=n, bitorder=fmt.BITORDER)
        return torch.where(consensus_mask(torch.from_numpy(count), self.k), merged, base_d)
