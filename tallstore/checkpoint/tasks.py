"""How a task's input is opened: a plain checkpoint under the base's key names, or an adapter.

A fine-tune saved by transformers may name the base's tensors with a prefix (``bert.…``); a PEFT
LoRA folder holds factors, not weights. :func:`resolve_task` finds out which, once, on the
driver; the resulting :class:`TaskSource` is picklable and reopens the very same view in any
worker process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .adapters import is_adapter_folder, open_adapter
from .interface import Checkpoint
from .keymap import KeyMapReport, RenamedCheckpoint, align_keys, parse_key_map
from .opening import open_checkpoint


@dataclass(frozen=True)
class TaskSource:
    """A task input as the packer reads it: where, whether it is an adapter merged into the base,
    the user's key-map rules, and the renames that map its names to the base's."""

    location: str
    adapter: bool = False
    rules: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()

    def open(self, base: Checkpoint, storage_options: dict[str, Any] | None = None) -> Checkpoint:
        """The task's tensors under the base's names (``base`` stays the caller's to close)."""
        if self.adapter:
            return open_adapter(self.location, base, rules=parse_key_map(self.rules), storage_options=storage_options)
        ckpt = open_checkpoint(self.location, storage_options)
        return RenamedCheckpoint(ckpt, dict(self.renames)) if self.renames else ckpt


def resolve_task(
    location: str | os.PathLike[str], base: Checkpoint, rules: tuple[str, ...] = (),
    storage_options: dict[str, Any] | None = None,
) -> tuple[TaskSource, Checkpoint, KeyMapReport]:
    """Open a task input against ``base``: detect an adapter folder or a key prefix, once."""
    where = str(location)
    if is_adapter_folder(where, storage_options):
        ckpt = open_adapter(where, base, rules=parse_key_map(rules), storage_options=storage_options)
        return TaskSource(where, True, rules), ckpt, ckpt.key_report
    raw = open_checkpoint(where, storage_options)
    try:
        view, report = align_keys(base, raw, parse_key_map(rules))
    except BaseException:
        raw.close()
        raise
    renames = tuple(sorted(view.renames.items()))
    return TaskSource(where, False, rules, renames), (view if renames else raw), report


def original_key(ckpt: Checkpoint, key: str) -> str:
    """The input's own name of ``key`` (a renamed view knows it; any other checkpoint: ``key``)."""
    return ckpt.original_key(key) if isinstance(ckpt, RenamedCheckpoint) else key
