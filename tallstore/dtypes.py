"""What a tensor is, known without its bytes: logical dtypes, their storage views, and shapes.

Zarr 3 has no bfloat16, so every floating dtype is stored as the unsigned integer of its width
(its bit pattern); the logical dtype is recorded next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class DType:
    """One logical dtype: its canonical name, torch dtype, safetensors code and storage dtype."""

    name: str
    torch: torch.dtype
    safetensors: str
    storage: np.dtype

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def is_float(self) -> bool:
        return self.torch.is_floating_point


_TABLE = [
    DType("float64", torch.float64, "F64", np.dtype("<u8")),
    DType("float32", torch.float32, "F32", np.dtype("<u4")),
    DType("float16", torch.float16, "F16", np.dtype("<u2")),
    DType("bfloat16", torch.bfloat16, "BF16", np.dtype("<u2")),
    DType("int64", torch.int64, "I64", np.dtype("<i8")),
    DType("int32", torch.int32, "I32", np.dtype("<i4")),
    DType("int16", torch.int16, "I16", np.dtype("<i2")),
    DType("int8", torch.int8, "I8", np.dtype("i1")),
    DType("uint8", torch.uint8, "U8", np.dtype("u1")),
    DType("bool", torch.bool, "BOOL", np.dtype("?")),
]
_BY_NAME = {d.name: d for d in _TABLE}
_BY_TORCH = {d.torch: d for d in _TABLE}
_BY_ST = {d.safetensors: d for d in _TABLE}

# torch has no uint16/uint32/uint64 views on every version; these signed twins share the bits.
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def by_name(name: str) -> DType:
    """The dtype with this canonical name (as recorded in archives)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {name!r}") from None


def of_tensor(t: torch.Tensor) -> DType:
    """The dtype of a torch tensor; unsupported dtypes are a clear error."""
    try:
        return _BY_TORCH[t.dtype]
    except KeyError:
        raise CheckpointError(f"unsupported tensor dtype {t.dtype}") from None


def from_safetensors(code: str) -> DType:
    """The dtype for a safetensors header code such as ``"BF16"``."""
    try:
        return _BY_ST[code]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {code!r}") from None


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of the tensor's bits in its storage dtype (no copy when contiguous)."""
    d = of_tensor(t)
    flat = t.contiguous().reshape(-1)
    if d.is_float:
        flat = flat.view(_BITS_VIEW[d.itemsize])
    return flat.numpy().view(d.storage)


def from_storage(a: np.ndarray, d: DType, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of logical dtype ``d`` and ``shape`` whose bits are the storage array ``a``."""
    a = np.ascontiguousarray(a)
    if d.is_float:
        t = torch.from_numpy(a.view(np.dtype(f"<i{d.itemsize}"))).view(d.torch)
    else:
        t = torch.from_numpy(a.view(d.storage))
    return t.reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as a same-width integer tensor (floats only)."""
    return t.view(_BITS_VIEW[t.element_size()])


@dataclass(frozen=True)
class TensorInfo:
    """Dtype and shape of one stored tensor, known without reading its bytes."""

    dtype: DType
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Length of dim 0 (1 for a scalar): the unit in which blocks are read."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        """Elements per row of dim 0."""
        return self.numel // self.rows if self.rows else 0
