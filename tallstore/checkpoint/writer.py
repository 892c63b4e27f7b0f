"""Streaming safetensors output: one tensor in memory at a time, published atomically.

``safetensors.torch.save_file`` needs the whole state dict in memory; the header only needs
dtypes and shapes, so it is written first and the tensors' bytes are streamed after it. Output
goes to a temporary sibling and is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import dtypes, publishing
from ..dtypes import TensorInfo
from ..errors import TallstoreError
from .interface import WeightLayout

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX = "model.safetensors.index.json"


@contextmanager
def atomic_path(final: Path, overwrite: bool, is_dir: bool = False) -> Iterator[Path]:
    """A path in a hidden locked sibling, published at ``final`` only if the block completes.

    ``overwrite`` replaces only an output tallstore wrote (or an empty folder), and only if it is
    still the one found now; anything that appears at ``final`` meanwhile is left alone.
    """
    final = Path(final)
    existing = publishing.check(final, overwrite)
    with publishing.staged(final, ".tmp", existing) as target:
        if is_dir:
            target.mkdir()
        yield target


def _counting(get: Callable[[str], torch.Tensor], progress: Callable[[int], None]) -> Callable[[str], torch.Tensor]:
    """``get`` that reports each tensor's byte count to ``progress``."""

    def counted(key: str) -> torch.Tensor:
        t = get(key)
        progress(t.numel() * t.element_size())
        return t

    return counted


def _header(
    items: list[tuple[str, TensorInfo]], metadata: dict[str, str] | None
) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes = []
    for key, info in items:
        size = info.numel * info.dtype.itemsize
        header[key] = {
            "dtype": info.dtype.safetensors,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, sizes


def write_safetensors(
    path: Path,
    items: list[tuple[str, TensorInfo]],
    get: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``items`` (key, info) in order to ``path``, fetching each tensor with ``get``."""
    head, sizes = _header(items, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for (key, info), size in zip(items, sizes):
            t = get(key)
            if tuple(t.shape) != info.shape or dtypes.of_tensor(t) != info.dtype:
                raise ValueError(f"tensor {key!r} does not match its declared dtype/shape")
            data = dtypes.to_storage(t)
            f.write(memoryview(data).cast("B"))
            assert data.nbytes == size


def shard(
    items: list[tuple[str, TensorInfo]], max_bytes: int
) -> list[list[tuple[str, TensorInfo]]]:
    """Split ``items`` in order into groups of at most ``max_bytes`` (a larger tensor stands alone)."""
    groups: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for key, info in items:
        n = info.numel * info.dtype.itemsize
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, info))
        size += n
    return groups


FileSource = tuple[str, Callable[[], bytes]]


def save(
    out: str | os.PathLike[str],
    items: Iterable[tuple[str, TensorInfo]],
    get: Callable[[str], torch.Tensor],
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    layout: WeightLayout | None = None,
    files: Sequence[FileSource] = (),
    command: str = "checkpoint",
) -> Path:
    """Save to a ``.safetensors`` file, or to a model folder when ``out`` has no suffix.

    A folder gets the weights laid out as ``layout`` recorded them (file names, which tensors in
    which file, each file's ``__metadata__``, the index's ``metadata``) unless ``max_shard_bytes``
    asks for transformers-style shards of that size, and every ``(path, read)`` of ``files``. It
    is marked with :data:`publishing.MARKER` (a single file: ``__metadata__`` key
    :data:`publishing.OUTPUT_KEY`, naming ``command``), which is what lets ``overwrite`` replace
    it later. ``progress`` is called with each tensor's byte count as it is written.
    """
    out = Path(out)
    items = list(items)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise TallstoreError(f"the shard size must be positive, got {max_shard_bytes} bytes")
    if progress is not None:
        get = _counting(get, progress)
    recorded = layout.files[0][2] if layout is not None and layout.files and layout.files[0][2] else {}
    if out.suffix == ".safetensors":
        meta = {"format": "pt", **recorded, **(metadata or {}), publishing.OUTPUT_KEY: command}
        with atomic_path(out, overwrite) as tmp:
            write_safetensors(tmp, items, get, meta)
        return out
    groups = _groups(items, layout, max_shard_bytes, metadata)
    with atomic_path(out, overwrite, is_dir=True) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for name, group, meta in groups:
            write_safetensors(tmp / name, group, get, meta)
            for key, info in group:
                weight_map[key] = name
                total += info.numel * info.dtype.itemsize
        index_meta = layout.index_metadata if layout is not None else None
        if len(groups) > 1 or index_meta is not None:
            index = {"metadata": {**(index_meta or {}), "total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False))
        for path, read in files:
            target = tmp.joinpath(*path.split("/"))
            if target.exists():
                raise TallstoreError(f"archived file {path!r} collides with a weight file of the output")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read())
        (tmp / publishing.MARKER).write_text(publishing.marker_document(tmp, command))
    return out


def _groups(
    items: list[tuple[str, TensorInfo]], layout: WeightLayout | None, max_shard_bytes: int | None,
    metadata: dict[str, str] | None,
) -> list[tuple[str, list[tuple[str, TensorInfo]], dict[str, str]]]:
    """``(file name, items, __metadata__)`` per output file: as recorded, or resharded."""
    if layout is not None and layout.folder and layout.format == "safetensors" and max_shard_bytes is None:
        out = []
        at = 0
        for name, count, meta in layout.files:
            out.append((name, items[at : at + count], {**(meta or {}), **(metadata or {})}))
            at += count
        if at == len(items):
            return out
    shards = shard(items, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    recorded = layout.files[0][2] if layout is not None and layout.files and layout.files[0][2] else {}
    meta = {"format": "pt", **recorded, **(metadata or {})}
    if len(shards) == 1:
        return [("model.safetensors", shards[0], meta)]
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", group, meta) for i, group in enumerate(shards, 1)]
