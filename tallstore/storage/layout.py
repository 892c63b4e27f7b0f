"""Where everything lives in an archive (spec §2): the format's names and its array paths."""

from __future__ import annotations

FORMAT = "tallstore"
VERSION = 2
READABLE = (1, 2)
ATTR = "tallstore"
BITORDER = "little"

KIND_MASKED = "masked"
KIND_SEPARATE = "separate"
KIND_BASE = "base"
KINDS = (KIND_MASKED, KIND_BASE, KIND_SEPARATE)

SOURCE_MASKED = "masked"
SOURCE_EXACT = "exact"
SOURCE_BASE = "base"
SOURCES = (SOURCE_MASKED, SOURCE_BASE, SOURCE_EXACT)

GROUPS = ("tensors", "tasks", "masks", "meta")
MANIFEST_COPY = "meta/manifest"


def merged_path(node: str) -> str:
    """Bits of ``θ_MTL`` XOR the base (cast to the tasks' dtype), flat."""
    return f"tensors/{node}/merged"


def base_path(node: str) -> str:
    """Bits of the embedded base tensor, flat."""
    return f"tensors/{node}/base"


def exact_path(node: str, task_index: int) -> str:
    """Bits of task ``task_index``'s exact copy of one tensor, flat."""
    return f"tensors/{node}/exact/{task_index}"


def task_group(task_index: int) -> str:
    """Group whose attributes describe one task."""
    return f"tasks/{task_index}"


def mask_path(task_index: int) -> str:
    """One task's TALL masks for every masked tensor: packed bits (shared form ``xor``) or a
    stream of coded segments (form ``quantized``), uint8."""
    return f"masks/{task_index}"


SHARED_CODES = "shared/codes"  # quantized form: per row block, its row scales and coded codes
FORM_XOR = "xor"
FORM_QUANTIZED = "quantized"
FORMS = (FORM_XOR, FORM_QUANTIZED)


def file_path(sha256: str) -> str:
    """One archived non-weight file (a config, a tokenizer…), addressed by its content's SHA-256."""
    return f"files/{sha256}"
