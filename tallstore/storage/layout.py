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
SOURCE_XBASE = "xbase"  # an exact copy stored as its bits XOR the base's (cast to the task's dtype)
SOURCE_DELTA = "delta"  # a per-task delta code against the base (representation delta, spec §10)
SOURCES = (SOURCE_MASKED, SOURCE_BASE, SOURCE_EXACT, SOURCE_XBASE, SOURCE_DELTA)

REPR_TALL = "tall"  # rebuilt from the shared vector and the task's TALL mask (approximate)
REPR_EXACT = "exact"  # every tensor stored bit for bit, none in the shared vector
REPR_DELTA = "delta"  # tensors delta-coded against the base (approximate), the others exact
REPRESENTATIONS = (REPR_TALL, REPR_EXACT, REPR_DELTA)

GROUPS = ("tensors", "tasks", "masks", "meta")
MANIFEST_COPY = "meta/manifest"


def merged_path(node: str) -> str:
    """Bits of ``θ_MTL`` XOR the base (cast to the tasks' dtype), flat."""
    return f"tensors/{node}/merged"


def base_path(node: str) -> str:
    """Bits of the embedded base tensor, flat."""
    return f"tensors/{node}/base"


def exact_path(node: str, task_index: int) -> str:
    """Bits of task ``task_index``'s exact copy of one tensor (source ``xbase``: XOR the base's), flat."""
    return f"tensors/{node}/exact/{task_index}"


def extra_path(node: str, task_index: int) -> str:
    """A grown tensor's rows past the base's (added tokens), task ``task_index``'s, exactly, flat."""
    return f"tensors/{node}/extra/{task_index}"


def task_group(task_index: int) -> str:
    """Group whose attributes describe one task."""
    return f"tasks/{task_index}"


def mask_path(task_index: int) -> str:
    """One task's TALL masks for every masked tensor: packed bits (shared form ``xor``) or a
    stream of coded segments (form ``quantized``), uint8."""
    return f"masks/{task_index}"


DELTAS = "deltas"  # the group of the delta streams; created only when a task is delta-coded


def delta_path(task_index: int) -> str:
    """One delta task's stream of delta segments (one per row block of each delta-coded tensor)."""
    return f"{DELTAS}/{task_index}"


SHARED_CODES = "shared/codes"  # quantized form: per row block, its row scales and coded codes
FORM_XOR = "xor"
FORM_QUANTIZED = "quantized"
FORMS = (FORM_XOR, FORM_QUANTIZED)


def file_path(sha256: str) -> str:
    """One archived non-weight file (a config, a tokenizer…), addressed by its content's SHA-256."""
    return f"files/{sha256}"
