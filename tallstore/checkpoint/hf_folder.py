"""Hugging Face model folders: sharded safetensors with an index, plain safetensors, or ``.bin``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .reader import Checkpoint
from .safetensors_file import SafetensorsCheckpoint
from .torch_file import TorchCheckpoint

INDEX = "model.safetensors.index.json"


def open_folder(folder: Path) -> Checkpoint:
    """The checkpoint stored in ``folder``, preferring safetensors over ``.bin``."""
    index = folder / INDEX
    if index.is_file():
        return _open_indexed(folder, index)
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return SafetensorsCheckpoint(shards)
    bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if len(bins) == 1:
        return TorchCheckpoint(bins[0])
    raise CheckpointError(f"{folder}: no model.safetensors, safetensors shards or single .bin found")


def _open_indexed(folder: Path, index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
    names = sorted(set(weight_map.values()))
    for n in names:
        if not isinstance(n, str) or Path(n).name != n:
            raise CheckpointError(f"{index}: shard name {n!r} is not a plain file name")
        if not (folder / n).is_file():
            raise CheckpointError(f"{index}: shard {n} is missing")
    ckpt = SafetensorsCheckpoint([folder / n for n in names], only=weight_map)
    missing = set(weight_map) - set(ckpt.keys)
    if missing:
        raise CheckpointError(f"{index}: tensor {sorted(missing)[0]!r} is not in its shard")
    return ckpt
