"""Peer methods' stored representations of a collection of fine-tunes, computed from task vectors.

Each method is a pure function of the task vectors τ_t = θ_t − θ₀ (float32) of the shared tensors (the
base's keys), returning an ``Encoded``: the bytes it would store, and a decoder that rebuilds τ̂_t from
those bytes alone, so nothing is counted that the rebuild does not use and nothing is used that is not
counted. The base is external (its key names and shapes are known to the decoder for free); per-task heads
are not handled here: the caller keeps them exact for every method alike.

What is stored (every array serialized by ``serialize``: a JSON header of names, dtypes and shapes, then
each array's bytes compressed by zstd at ``ZSTD_LEVEL``):

- ``emr``: EMR-merging (Huang et al., NeurIPS 2024), as the authors' code computes it: the unified task
  vector (float32, once), per task a sign-agreement mask (1 bit per parameter, ``np.packbits``) and one
  float32 rescaler;
- ``bitdelta``: BitDelta without its distillation step: per task sign(τ_t) (1 bit per parameter) and one
  float32 scale per row, the row's mean |τ_t|;
- ``quantized``: per task τ_t quantized symmetrically per row to ``bits``-bit integers with an absmax scale
  (float32 per row), the codes stored at their natural width (2 bits for int2, 4 bits for int3 and int4,
  packed into bytes) rather than as int8: zstd then comes closer to their entropy, which only helps the peer.

A row is dim 0 of a tensor (``t.reshape(len(t), -1)``); a 1-D tensor (bias, LayerNorm) is one row.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numcodecs import Zstd

ZSTD_LEVEL = 16
TaskVectors = Mapping[str, Mapping[str, torch.Tensor]]  # task → shared key → τ_t (float32)
Shapes = Mapping[str, tuple[int, ...]]


def serialize(arrays: Mapping[str, np.ndarray], level: int = ZSTD_LEVEL) -> bytes:
    """Arrays as bytes: 8-byte header length, JSON header (name, dtype, shape, size), zstd frames."""
    codec = Zstd(level=level)
    frames = [codec.encode(np.ascontiguousarray(a)) for a in arrays.values()]
    header = json.dumps([[name, a.dtype.str, list(a.shape), len(f)]
                         for (name, a), f in zip(arrays.items(), frames, strict=True)]).encode()
    return struct.pack("<Q", len(header)) + header + b"".join(frames)


def deserialize(blob: bytes) -> dict[str, np.ndarray]:
    """The arrays of a ``serialize`` result."""
    (n,) = struct.unpack_from("<Q", blob)
    offset = 8 + n
    codec = Zstd()
    arrays = {}
    for name, dtype, shape, size in json.loads(blob[8:offset]):
        raw = codec.decode(blob[offset : offset + size])
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        offset += size
    return arrays


@dataclass(frozen=True)
class Encoded:
    """What a method stores for a collection, and how a task's τ̂_t is decoded from it."""

    shared: bytes  # stored once for the collection
    per_task: dict[str, bytes]  # each task's own bytes
    decode: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """All stored bytes (shared + every task's)."""
        return len(self.shared) + sum(len(b) for b in self.per_task.values())

    def task_vector(self, task: str) -> dict[str, torch.Tensor]:
        """τ̂_t decoded from the stored bytes only."""
        return self.decode(deserialize(self.shared), deserialize(self.per_task[task]))


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D view, one row per index of dim 0 (a 1-D tensor is a single row)."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def pack_bits(mask: torch.Tensor) -> np.ndarray:
    """A boolean tensor as 1 bit per element (``np.packbits``, flattened)."""
    return np.packbits(mask.reshape(-1).numpy())


def unpack_bits(packed: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of ``pack_bits``."""
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed, count=n).astype(bool)).reshape(shape)


def pack_codes(codes: torch.Tensor, width: int) -> np.ndarray:
    """Unsigned integers < 2**width (width 2, 4 or 8) packed ``8 // width`` to a byte."""
    per = 8 // width
    flat = codes.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % per)]).reshape(-1, per)
    out = torch.zeros(len(flat), dtype=torch.uint8)
    for i in range(per):
        out |= flat[:, i] << (i * width)
    return out.numpy()


def unpack_codes(packed: np.ndarray, width: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The integer codes of ``pack_codes``, as int16 of ``shape``."""
    per = 8 // width
    data = torch.from_numpy(packed.copy())
    parts = [(data >> (i * width)) & ((1 << width) - 1) for i in range(per)]
    return torch.stack(parts, 1).reshape(-1)[: int(np.prod(shape))].reshape(shape).to(torch.int16)


def emr_elect(tau: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EMR's elected unified tensor and per-task masks for one shared tensor.

    As in the authors' ``emr_merge``: the sign is that of Σ_t τ_t (0 counts as −1); a task's mask keeps
    the entries where τ_t agrees with it strictly; the magnitude is the largest |τ_t| over agreeing tasks.
    """
    sign = torch.where(torch.stack(tau).sum(0) > 0, 1.0, -1.0)
    masks = [t * sign > 0 for t in tau]
    magnitude = torch.stack([torch.where(m, t.abs(), 0.0) for t, m in zip(tau, masks, strict=True)]).amax(0)
    return sign * magnitude, masks


def emr(taus: TaskVectors) -> Encoded:
    """EMR-merging: unified vector u, masks m_t, rescalers r_t; τ̂_t = r_t · m_t ⊙ u.

    r_t = Σ_k mean|τ_t[k]| ÷ Σ_k mean|m_t[k] ⊙ u[k]| over the shared tensors k, a sum of per-tensor means
    as in the authors' code (not one ratio of totals).
    """
    tasks = list(taus)
    keys = list(taus[tasks[0]])
    unified: dict[str, np.ndarray] = {}
    masks: dict[str, dict[str, np.ndarray]] = {t: {} for t in tasks}
    scale_num = dict.fromkeys(tasks, 0.0)
    scale_den = dict.fromkeys(tasks, 0.0)
    for k in keys:
        u, ms = emr_elect([taus[t][k] for t in tasks])
        unified[k] = u.numpy()
        for t, m in zip(tasks, ms, strict=True):
            masks[t][k] = pack_bits(m)
            scale_num[t] += float(taus[t][k].abs().mean())
            scale_den[t] += float(torch.where(m, u.abs(), 0.0).mean())
    per_task = {t: serialize({**masks[t], "rescaler": np.float32([scale_num[t] / scale_den[t]])}) for t in tasks}

    def decode(shared: dict[str, np.ndarray], own: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        r = float(own["rescaler"][0])
        return {k: torch.from_numpy(u.copy()) * unpack_bits(own[k], u.shape) * r for k, u in shared.items()}

    return Encoded(serialize(unified), per_task, decode)


def bitdelta(taus: TaskVectors) -> Encoded:
    """BitDelta without distillation: τ̂_t = s ⊙ sign(τ_t), s = mean |τ_t| of each row (sign(0) = +1)."""
    shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in next(iter(taus.values())).items()}
    per_task = {}
    for t, tau in taus.items():
        arrays = {}
        for k, v in tau.items():
            arrays[f"{k}.sign"] = pack_bits(v >= 0)
            arrays[f"{k}.scale"] = rows(v).abs().mean(1).numpy()
        per_task[t] = serialize(arrays)

    def decode(shared: dict[str, np.ndarray], own: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for k, shape in shapes.items():
            sign = torch.where(unpack_bits(own[f"{k}.sign"], shape), 1.0, -1.0)
            out[k] = (rows(sign) * torch.from_numpy(own[f"{k}.scale"].copy())[:, None]).reshape(shape)
        return out

    return Encoded(serialize({}), per_task, decode)


def code_width(bits: int) -> int:
    """Bits each ``bits``-bit code takes when packed: the next of 2, 4 and 8 (whole codes per byte)."""
    return next(w for w in (2, 4, 8) if bits <= w)


def quantized(taus: TaskVectors, bits: int) -> Encoded:
    """τ_t rounded per row to integers in [−q, q], q = 2^(bits−1) − 1, scale = row absmax ÷ q."""
    q = 2 ** (bits - 1) - 1
    width = code_width(bits)
    shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in next(iter(taus.values())).items()}
    per_task = {}
    for t, tau in taus.items():
        arrays = {}
        for k, v in tau.items():
            r = rows(v)
            scale = r.abs().amax(1) / q
            safe = torch.where(scale > 0, scale, 1.0)[:, None]
            arrays[f"{k}.codes"] = pack_codes(torch.clamp(torch.round(r / safe), -q, q).to(torch.int16) + q, width)
            arrays[f"{k}.scale"] = scale.numpy()
        per_task[t] = serialize(arrays)

    def decode(shared: dict[str, np.ndarray], own: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for k, shape in shapes.items():
            scale = torch.from_numpy(own[f"{k}.scale"].copy())
            codes = unpack_codes(own[f"{k}.codes"], width, (len(scale), int(np.prod(shape)) // len(scale)))
            out[k] = ((codes - q).float() * scale[:, None]).reshape(shape)
        return out

    return Encoded(serialize({}), per_task, decode)
