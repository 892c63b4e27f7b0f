"""Which files of a model folder hold its weights: an index's weight map, shards, or one ``.bin``.

One resolver for local folders and object-store prefixes (through :class:`Folder`).
"""

from __future__ import annotations

import json

from ..errors import CheckpointError
from .interface import Checkpoint
from .safetensors_file import SafetensorsCheckpoint
from .sources import Folder, LocalFolder, plain_name
from .torch_file import TorchCheckpoint

INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20


def open_folder(folder: Folder) -> Checkpoint:
    """The checkpoint stored in ``folder``, preferring safetensors over ``.bin``."""
    if folder.is_file(INDEX):
        return _open_indexed(folder)
    shards = folder.names("*.safetensors")
    if shards:
        return SafetensorsCheckpoint([folder.file(n) for n in shards], folder.location, folder=True)
    bins = folder.names("*.bin") + folder.names("*.pt")
    if len(bins) == 1 and isinstance(folder, LocalFolder):
        return TorchCheckpoint(folder.path / bins[0], folder=True)
    if len(bins) == 1:
        raise CheckpointError(f"{folder.where(bins[0])}: torch files are read only from local paths; convert to safetensors")
    raise CheckpointError(f"{folder.location}: no model.safetensors, safetensors shards or single .bin found")


def _open_indexed(folder: Folder) -> Checkpoint:
    where = folder.where(INDEX)
    try:
        index = json.loads(folder.read_bytes(INDEX, MAX_INDEX_BYTES))
        weight_map = index["weight_map"]
        metadata = index.get("metadata")
        if not isinstance(weight_map, dict) or not isinstance(metadata, (dict, type(None))):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{where}: not a valid safetensors index (needs a weight_map)") from None
    names = sorted(set(weight_map.values()), key=str)
    for n in names:
        if not plain_name(n):
            raise CheckpointError(f"{where}: shard name {n!r} is not a plain file name")
        if not folder.is_file(n):
            raise CheckpointError(f"{where}: shard {n} is missing")
    ckpt = SafetensorsCheckpoint([folder.file(n) for n in names], folder.location, only=weight_map,
                                 index_metadata=metadata, folder=True)
    missing = set(weight_map) - set(ckpt.keys)
    if missing:
        ckpt.close()
        raise CheckpointError(f"{where}: tensor {sorted(missing)[0]!r} is not in its shard")
    return ckpt
