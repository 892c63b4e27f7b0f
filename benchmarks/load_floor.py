"""The least time a one-task load of an xor-form archive can take on this machine.

A load with the archive open must, at the least: read every stored object it needs (the ``merged``
and ``exact`` chunks of the task's tensors, its mask chunks) from the page cache, decompress them,
compute the CRC-32Cs the spec requires (each stored object's trailer, each decoded chunk, each
rebuilt block: three passes), read the base's bytes, and run the rebuild kernel over every element.
Each stage is timed here on its own, single-threaded, with plain ``os``/``numcodecs``/``crc32c``
calls on the very objects a real load reads (recorded from one), into buffers allocated once: no
tallstore planning, thread hand-off or per-chunk bookkeeping. Their sum divided by the cores is a
floor for a load on all cores; a load's time ÷ that floor is what tallstore's own overhead costs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import crc32c
import numpy as np
from numcodecs import blosc, zstd

import tallstore
from tallstore.ops.kernel import rebuild_bits
from tallstore.storage.chunks import Objects
from tallstore.storage.codecs import zstd_content_size

STAGES = ("read", "decompress", "checksums", "base", "rebuild")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def objects_read(archive: Path, base: Path, task: str) -> list[str]:
    """The stored objects (keys under the archive) that one load of ``task`` reads, archive open."""
    arc = tallstore.open(archive, base=base)
    seen: list[str] = []
    real = Objects.open_local

    def recording(self: Objects, key: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(key)
        return real(self, key, *args, **kwargs)

    with mock.patch.object(Objects, "open_local", recording):
        arc[task].state_dict()
    return list(dict.fromkeys(seen))


def _best(fn: Callable[[], None], rounds: int, before: Callable[[], None] | None = None) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _decoded_size(body: memoryview, is_zstd: bool) -> int:
    """The decoded length a stored chunk's zstd frame header or Blosc header announces."""
    if is_zstd:
        size = zstd_content_size(body)
        return len(zstd.decompress(body)) if size is None else size
    return int.from_bytes(body[4:8], "little")


def measure(archive: Path, base: Path, task: str, itemsize: int, rounds: int = 5) -> dict[str, Any]:
    """Each stage's best single-thread seconds for one load of ``task`` from ``archive`` (base
    external: a safetensors file), their sum, and the floor on this machine's cores."""
    keys = objects_read(archive, base, task)
    paths = [archive / k for k in keys]
    stored = [bytearray(p.stat().st_size) for p in paths]
    bodies = [memoryview(b)[:-4] for b in stored]

    def read() -> None:
        for p, buf in zip(paths, stored, strict=True):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fstat(fd)
                os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)

    read()
    is_zstd = [bytes(b[:4]) == _ZSTD_MAGIC for b in bodies]
    decoded = [bytearray(_decoded_size(b, z)) for b, z in zip(bodies, is_zstd, strict=True)]

    def decompress() -> None:
        for body, out, z in zip(bodies, decoded, is_zstd, strict=True):
            if z:
                zstd.decompress(body, out)
            else:
                blosc.decompress(body, out)

    with open(base, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    base_bytes = bytearray(base.stat().st_size - start)
    fd = os.open(base, os.O_RDONLY)

    def read_base() -> None:
        got = 0
        while got < len(base_bytes):
            got += os.preadv(fd, [memoryview(base_bytes)[got:]], start + got)

    storage = np.dtype(f"<u{itemsize}")
    n = len(base_bytes) // itemsize
    base_bits = np.frombuffer(base_bytes, storage, n)
    xor = base_bits ^ storage.type(1)  # the kernel's cost does not depend on the values
    out = np.empty(n, storage)
    masks = [d for k, d in zip(keys, decoded, strict=True) if k.startswith("masks/")]
    mask = np.frombuffer(b"".join(masks), np.uint8) if masks else np.zeros(0, np.uint8)
    mask = np.resize(mask, (n + 7) // 8) if mask.size else np.full((n + 7) // 8, 0x55, np.uint8)

    def checksums() -> None:
        for body in bodies:
            crc32c.crc32c(body)
        for d in decoded:
            crc32c.crc32c(d)
        crc32c.crc32c(out.view(np.uint8))

    try:
        seconds = {
            "read": _best(read, rounds),
            "decompress": _best(decompress, rounds),
            "checksums": _best(checksums, rounds),
            "base": _best(read_base, rounds),
            "rebuild": _best(lambda: rebuild_bits(out, base_bits, mask), rounds, lambda: np.copyto(out, xor)),
        }
    finally:
        os.close(fd)
    cores = os.cpu_count() or 1
    total = sum(seconds.values())
    return {"objects": len(keys), "stored_bytes": sum(map(len, stored)), "decoded_bytes": sum(map(len, decoded)),
            "base_bytes": len(base_bytes), "seconds": seconds, "sum_seconds": total, "cores": cores,
            "floor_seconds": total / cores}
