"""The non-weight files of a model folder (configs, tokenizers, sentence-transformers modules…).

An input folder is untrusted: a listing never follows a symlink out of it (a Hugging Face cache
snapshot, whose files are links into its repository's ``blobs/``, is the one exception), refuses
names a folder could not hold safely elsewhere (control characters, backslashes), and refuses
files over a size cap with a clear error. Files that are the checkpoint's own weights, its
index, alternate copies of the weights in other formats and ``.git`` folders are not listed
(the alternates and ``.git`` are reported as skipped, so nothing is left out silently).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from ..errors import CheckpointError
from ..locations import is_url, local_path, url_options
from .interface import Checkpoint

DEFAULT_MAX_FILE_BYTES = 256 << 20
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
ALTERNATE_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".ot")
SKIPPED_DIRS = (".git",)


@dataclass(frozen=True)
class ListedFile:
    """One non-weight file: its path inside the folder (POSIX, relative) and where to read it."""

    path: str
    location: str
    size: int


@dataclass(frozen=True)
class FolderListing:
    """What a model folder holds besides its weights, and what was deliberately not kept."""

    files: tuple[ListedFile, ...]
    skipped: tuple[str, ...]


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(ord(c) < 32 or c in "\\\x7f" for c in name)


def list_folder(
    location: str | os.PathLike[str], ckpt: Checkpoint, storage_options: dict[str, Any] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> FolderListing:
    """The non-weight files of the model folder at ``location`` whose weights ``ckpt`` read.

    A single weights file (not a folder) has none.
    """
    weights = {f.name for f in ckpt.files} | set(INDEXES)
    alternates_skipped = ckpt.layout.format == "safetensors"
    if is_url(location):
        entries = _remote_entries(str(location), storage_options)
    else:
        root = local_path(location)
        if not root.is_dir():
            return FolderListing((), ())
        entries = _local_entries(root)
    files: list[ListedFile] = []
    skipped: list[str] = []
    for path, where, size in entries:
        top, name = path.split("/", 1)[0], posixpath.basename(path)
        if top in SKIPPED_DIRS:
            skipped.append(path)
            continue
        if "/" not in path and name in weights:
            continue
        if alternates_skipped and name.endswith(ALTERNATE_WEIGHTS):
            skipped.append(path)
            continue
        if size > max_file_bytes:
            raise CheckpointError(
                f"{where} is {size / 1e6:,.1f} MB, more than the {max_file_bytes / 1e6:,.0f} MB a non-weight file may be "
                "(raise the cap with --max-file-mb / max_file_bytes=)"
            )
        files.append(ListedFile(path, where, size))
    return FolderListing(tuple(sorted(files, key=lambda f: f.path)), tuple(sorted(skipped)))


def _local_entries(root: Path) -> list[tuple[str, str, int]]:
    """``(relative path, location, size)`` of every file under ``root``, links checked."""
    blobs = _hf_blobs(root)
    real_root = os.path.realpath(root)
    out = []
    for d, dirs, names in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(d, root)
        for name in [*names, *(x for x in dirs if os.path.islink(os.path.join(d, x)))]:
            full = os.path.join(d, name)
            rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
            if not all(_safe_name(part) for part in rel.split("/")):
                raise CheckpointError(f"{full}: a file name with control characters or a backslash cannot be archived safely")
            if os.path.islink(full):
                target = os.path.realpath(full)
                inside = target.startswith(real_root + os.sep) or (blobs is not None and target.startswith(blobs + os.sep))
                if not inside:
                    raise CheckpointError(f"{full} is a symlink out of the input folder (to {target}); refusing to follow it")
                if os.path.isdir(target):
                    continue  # a link to a folder inside: its files are listed where they really are
            if not os.path.isfile(full):
                raise CheckpointError(f"{full} is not a regular file")
            out.append((rel, full, os.path.getsize(full)))
        dirs[:] = [x for x in dirs if not os.path.islink(os.path.join(d, x))]
    return out


def _hf_blobs(root: Path) -> str | None:
    """``…/models--x/blobs`` when ``root`` is a Hugging Face cache snapshot (``…/snapshots/<rev>``)."""
    repo = root.absolute().parent.parent
    if root.absolute().parent.name == "snapshots" and (repo / "blobs").is_dir() and (repo / "refs").is_dir():
        return os.path.realpath(repo / "blobs")
    return None


def _remote_entries(url: str, storage_options: dict[str, Any] | None) -> list[tuple[str, str, int]]:
    fs, path = fsspec.core.url_to_fs(url, **url_options(url, storage_options))
    path = path.rstrip("/")
    if not fs.isdir(path):
        return []
    out = []
    for full, info in fs.find(path, detail=True).items():
        rel = full[len(path) + 1 :]
        if not all(_safe_name(part) for part in rel.split("/")):
            raise CheckpointError(f"{fs.unstrip_protocol(full)}: a file name that cannot be archived safely")
        out.append((rel, fs.unstrip_protocol(full), int(info.get("size") or 0)))
    return out

