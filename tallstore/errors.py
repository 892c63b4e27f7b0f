"""The exceptions tallstore raises: every user-facing failure is one of these.

Each carries a one-line message fit for a terminal; the CLI prints it and exits non-zero.
"""

from __future__ import annotations


class TallstoreError(Exception):
    """Base class of every error tallstore raises on purpose."""


class CheckpointError(TallstoreError):
    """An input checkpoint is missing, unreadable, malformed or unsafe."""


class PlanError(TallstoreError):
    """The inputs cannot be stored together (conflicting keys, shapes, names, values)."""


class ArchiveError(TallstoreError):
    """An archive is missing, incomplete, of an unknown version or otherwise unreadable."""


class CorruptArchiveError(ArchiveError):
    """Stored bytes fail their checksum or no longer match what was packed."""


class BaseMismatchError(TallstoreError):
    """The base model given at open time is not the one the archive was packed against."""


class MergeError(TallstoreError):
    """A merged model was asked for with a method or arguments the archive cannot serve."""


class OutputExistsError(TallstoreError):
    """The output path exists and overwriting was not asked for."""


class IncompleteArchiveError(ArchiveError):
    """The archive was never finished (its pack failed or is still running)."""


class NewerFormatError(ArchiveError):
    """The archive was written in a format version newer than this tallstore reads."""


class PackWarning(UserWarning):
    """Something in a collection that packs, but that its owner should know (near-duplicate tasks)."""
