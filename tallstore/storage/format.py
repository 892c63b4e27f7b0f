"""The archive format v1: names, paths and the manifest's validation (see spec/FORMAT.md).

The manifest is JSON under the ``"tallstore"`` key of the root group's attributes; per-task
details live in the attributes of ``tasks/<index>``. Readers refuse unknown newer versions and
archives whose completeness marker is not set.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArchiveError

FORMAT = "tallstore"
VERSION = 1
ATTR = "tallstore"
BITORDER = "little"

KIND_MASKED = "masked"
KIND_SEPARATE = "separate"
KIND_BASE = "base"

SOURCE_MASKED = "masked"
SOURCE_EXACT = "exact"
SOURCE_BASE = "base"


def tensor_group(node: str) -> str:
    """Group holding one tensor's arrays."""
    return f"tensors/{node}"


def merged_path(node: str) -> str:
    """Bits of ``θ_MTL`` XOR the base (cast to the tasks' dtype), flat."""
    return f"tensors/{node}/merged"


def base_path(node: str) -> str:
    """Bits of the embedded base tensor, flat."""
    return f"tensors/{node}/base"


def exact_group(node: str) -> str:
    """Group of the exact per-task copies of one tensor."""
    return f"tensors/{node}/exact"


def exact_path(node: str, task_index: int) -> str:
    """Bits of task ``task_index``'s exact copy of one tensor, flat."""
    return f"tensors/{node}/exact/{task_index}"


def task_group(task_index: int) -> str:
    """Group whose attributes describe one task."""
    return f"tasks/{task_index}"


def mask_path(task_index: int) -> str:
    """One task's TALL mask bits for every masked tensor, concatenated (uint8)."""
    return f"masks/{task_index}"


def check_manifest(attrs: dict[str, Any], where: str) -> dict[str, Any]:
    """The manifest in ``attrs``, or a clear :class:`ArchiveError` if it cannot be read."""
    m = attrs.get(ATTR)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArchiveError(f"{where}: not a tallstore archive")
    version = m.get("version")
    if not isinstance(version, int):
        raise ArchiveError(f"{where}: archive has no valid format version")
    if version > VERSION:
        raise ArchiveError(
            f"{where}: archive format version {version} is newer than this tallstore "
            f"reads ({VERSION}); upgrade tallstore"
        )
    if m.get("complete") is not True:
        raise ArchiveError(f"{where}: archive is incomplete (packing did not finish); re-run pack")
    required = ("tasks", "lam", "merge", "base", "tensors", "mask", "block_elems")
    missing = [k for k in required if k not in m]
    if missing:
        raise ArchiveError(f"{where}: archive manifest lacks {missing[0]!r}")
    return m
