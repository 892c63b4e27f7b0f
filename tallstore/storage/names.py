"""Tensor names to storage node names: any string maps to one safe, unique node name.

Kept verbatim: ASCII lower-case letters, digits, ``_``, ``-`` and ``.`` (not leading). Everything
else, upper-case letters included (case-insensitive filesystems), becomes ``~`` plus the lower-case
hex of its UTF-8 bytes. A result longer than :data:`MAX_LEN` becomes a prefix plus ``~h`` and the
SHA-256 of the name. The empty name is ``~``; ``zarr.json`` is ``~7aarr.json``. No result contains ``/``, is ``.`` or ``..``, starts
with ``.`` or ``__``, or exceeds a filesystem's name limit, so no name can leave its directory.
"""

from __future__ import annotations

import hashlib

MAX_LEN = 120
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.")


def _escape(ch: str) -> str:
    return "".join(f"~{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))


def encode(name: str) -> str:
    """The storage node name for tensor ``name`` (deterministic and injective)."""
    if name == "":
        return "~"
    if name == "zarr.json":  # the group's own metadata document, in the same folder
        return _escape("z") + name[1:]
    out = []
    for i, ch in enumerate(name):
        leading_special = i == 0 and (ch == "." or (ch == "_" and name.startswith("__")))
        out.append(_escape(ch) if ch not in _SAFE or leading_special else ch)
    node = "".join(out)
    if len(node) > MAX_LEN:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        node = node[: MAX_LEN - 66] + "~h" + digest
    return node
