"""tallstore: store many fine-tunes of one base model as one merged vector plus TALL masks.

``pack`` writes an archive; ``open`` returns it as a read-only mapping of tasks, each a lazy
mapping of tensor names to tensors.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .archive import Archive, TaskView, open
from .errors import (
    ArchiveError,
    BaseMismatchError,
    CheckpointError,
    CorruptArchiveError,
    MergeError,
    OutputExistsError,
    PlanError,
    TallstoreError,
)
from .api import pack
from .storage.codecs import Codecs

__all__ = [
    "Archive",
    "ArchiveError",
    "BaseMismatchError",
    "CheckpointError",
    "Codecs",
    "CorruptArchiveError",
    "MergeError",
    "OutputExistsError",
    "PlanError",
    "TallstoreError",
    "TaskView",
    "open",
    "pack",
]
