"""tallstore: store many fine-tunes of one base model as one merged vector plus TALL masks.

``pack`` writes an archive; ``open`` returns it as a read-only mapping of tasks, each a lazy
mapping of tensor names to tensors.
"""

from __future__ import annotations

from .api import pack
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
from .reading.archive import Archive, TaskView, open
from .reading.merging import MergedView
from .reading.verify import VerifyReport
from .storage.codecs import Codecs
from .version import VERSION as __version__

__all__ = [
    "Archive",
    "ArchiveError",
    "BaseMismatchError",
    "CheckpointError",
    "Codecs",
    "CorruptArchiveError",
    "MergeError",
    "MergedView",
    "OutputExistsError",
    "PlanError",
    "TallstoreError",
    "TaskView",
    "VerifyReport",
    "open",
    "pack",
]
