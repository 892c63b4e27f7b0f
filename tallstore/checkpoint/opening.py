"""From a path or URL to the reader that serves it: a safetensors file, a model folder, a ``.bin``."""

from __future__ import annotations

import os
from typing import Any

import fsspec

from ..errors import CheckpointError
from ..locations import is_url, local_path, url_options
from .index import open_folder
from .interface import Checkpoint
from .safetensors_file import SafetensorsCheckpoint
from .sources import ByteSource, LocalFile, LocalFolder, RemoteFile, RemoteFolder
from .torch_file import TorchCheckpoint

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def open_checkpoint(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Open a ``.safetensors`` file, a Hugging Face folder or a torch ``.bin``/``.pt`` state dict.

    An fsspec URL (``s3://…``) opens safetensors files or folders remotely with ``storage_options``.
    """
    if is_url(path):
        return _open_remote(str(path), storage_options)
    p = local_path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        return open_folder(LocalFolder(p))
    if p.suffix in TORCH_SUFFIXES:
        return TorchCheckpoint(p)
    return SafetensorsCheckpoint([LocalFile(p)], str(p))


def _open_remote(url: str, storage_options: dict[str, Any] | None) -> Checkpoint:
    try:
        fs, path = fsspec.core.url_to_fs(url, **url_options(url, storage_options))
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"{url}: cannot open this URL ({e})") from None
    path = path.rstrip("/")
    if path.endswith(TORCH_SUFFIXES):
        raise CheckpointError(f"{url}: torch files are read only from local paths; convert to safetensors")
    try:
        if path.endswith(".safetensors"):
            return SafetensorsCheckpoint([RemoteFile(fs, path)], url)
        if not fs.isdir(path):
            raise CheckpointError(f"{url}: no such file or folder")
        folder = RemoteFolder(fs, path)
        if not folder.names("*.safetensors") and not folder.is_file("model.safetensors.index.json"):
            raise CheckpointError(f"{url}: no safetensors files found in this folder")
        return open_folder(folder)
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no such file or folder") from None
    except PermissionError as e:
        raise CheckpointError(f"{url}: access denied ({e})") from None


def open_file(location: str, storage_options: dict[str, Any] | None = None) -> ByteSource:
    """One file, local or at a URL, for byte-range reads (hashing an input, say)."""
    if not is_url(location):
        return LocalFile(local_path(location))
    fs, path = fsspec.core.url_to_fs(location, **url_options(location, storage_options))
    return RemoteFile(fs, path)
