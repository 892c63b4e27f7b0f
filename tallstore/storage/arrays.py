"""Creating the archive's flat arrays with their chunking and codecs."""

from __future__ import annotations

import numpy as np
import zarr

from .codecs import Codecs

# Every chunk is written, all-zero ones included, so a missing chunk file is always corruption
# (zarr would otherwise skip them and read them back as the fill value, indistinguishably).
WRITE_ALL = {"write_empty_chunks": True}


def create_weights(
    group: zarr.Group, path: str, numel: int, storage: np.dtype, chunk: int, codecs: Codecs
) -> zarr.Array:
    """A flat array of weight bit patterns (``storage`` dtype), one chunk per row block."""
    return group.create_array(
        path,
        shape=(numel,),
        dtype=storage,
        chunks=(max(1, chunk),),
        compressors=codecs.weights(storage.itemsize),
        fill_value=0,
        overwrite=True,
        config=WRITE_ALL,
    )


def create_masks(group: zarr.Group, path: str, nbytes: int, chunk_bytes: int, codecs: Codecs) -> zarr.Array:
    """A flat uint8 array of one task's packed mask bits."""
    return group.create_array(
        path,
        shape=(nbytes,),
        dtype=np.uint8,
        chunks=(max(1, min(chunk_bytes, nbytes)),),
        compressors=codecs.masks(),
        fill_value=0,
        overwrite=True,
        config=WRITE_ALL,
    )


FILE_CHUNK_BYTES = 4 << 20


def create_file(group: zarr.Group, path: str, nbytes: int, codecs: Codecs) -> zarr.Array:
    """A flat uint8 array holding one archived non-weight file, zstd-compressed."""
    return group.create_array(
        path,
        shape=(nbytes,),
        dtype=np.uint8,
        chunks=(max(1, min(FILE_CHUNK_BYTES, nbytes)),),
        compressors=codecs.files(),
        fill_value=0,
        overwrite=True,
        config=WRITE_ALL,
    )
