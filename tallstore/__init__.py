"""tallstore: store many fine-tunes of one base model as one merged vector plus TALL masks.

``pack`` writes an archive; ``open`` returns it as a read-only mapping of tasks, each a lazy
mapping of tensor names to tensors.

The names that need torch are imported on first use (PEP 562), so that importing a submodule,
the command line's entry point first of all, does not pull in torch before it can handle signals.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    ArchiveError,
    BaseMismatchError,
    CheckpointError,
    CorruptArchiveError,
    IncompleteArchiveError,
    MergeError,
    NewerFormatError,
    OutputExistsError,
    PlanError,
    TallstoreError,
)
from .publishing import WriteError
from .version import VERSION as __version__

_LAZY = {
    "pack": "tallstore.api",
    "Archive": "tallstore.reading.archive",
    "TaskView": "tallstore.reading.archive",
    "open": "tallstore.reading.archive",
    "MergedView": "tallstore.reading.merging",
    "VerifyReport": "tallstore.reading.verify",
    "Codecs": "tallstore.storage.codecs",
}

__all__ = [
    "__version__",
    "Archive",
    "ArchiveError",
    "BaseMismatchError",
    "CheckpointError",
    "Codecs",
    "CorruptArchiveError",
    "IncompleteArchiveError",
    "MergeError",
    "MergedView",
    "NewerFormatError",
    "OutputExistsError",
    "PlanError",
    "TallstoreError",
    "TaskView",
    "VerifyReport",
    "WriteError",
    "open",
    "pack",
]


def __getattr__(name: str) -> Any:
    """Import a public name that needs torch the first time it is asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
