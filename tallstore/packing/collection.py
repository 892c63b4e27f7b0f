"""The opened inputs of a pack: the base, the distinct tasks, how each was read and its files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.folder_files import FolderListing, list_folder
from ..checkpoint.keymap import KeyMapReport
from ..checkpoint.tasks import TaskSource, resolve_task
from ..locations import absolute
from .duplicates import identical_inputs
from .options import PackOptions


@dataclass
class Collection:
    """The opened inputs of a pack: the base (and its absolute location), the distinct tasks (an
    input given twice is packed once, the other name an alias), how each was read, their λ and
    their folders' other files (``listings[0]`` the base's, ``listings[t + 1]`` task ``t``'s)."""

    base_location: str
    base: Checkpoint
    names: list[str]
    sources: list[TaskSource]
    tasks: list[Checkpoint]
    key_maps: list[KeyMapReport]
    listings: list[FolderListing]
    lams: list[float]
    aliases: dict[str, str]


def open_collection(
    base: str | os.PathLike[str], tasks: Mapping[str, str | os.PathLike[str]], options: PackOptions,
    storage_options: dict[str, Any] | None, stack: ExitStack,
) -> Collection:
    """Open the base and every task (the caller's ``stack`` closes them), aliasing duplicates."""
    names = list(tasks)
    lams = [] if options.selects_lam else options.lams(names)
    # absolute, as the units open them: their file lists key the file hashes when the pack ends
    location = absolute(base)
    base_ck = stack.enter_context(open_checkpoint(location, storage_options))
    sources, cks, key_maps = [], [], []
    for n in names:
        source, ck, report = resolve_task(absolute(tasks[n]), base_ck, options.key_map, storage_options)
        stack.enter_context(ck)
        sources.append(source)
        cks.append(ck)
        key_maps.append(report)
    twins = identical_inputs(cks, storage_options)
    aliases = {names[i]: names[j] for i, j in twins.items() if not lams or lams[i] == lams[j]}
    keep = [i for i, n in enumerate(names) if n not in aliases]
    listings = [list_folder(location, base_ck, storage_options, options.max_file_bytes)]
    for i in keep:
        own = list_folder(sources[i].location, cks[i], storage_options, options.max_file_bytes)
        listings.append(_with_base_files(own, listings[0]) if sources[i].adapter else own)
    return Collection(location, base_ck, [names[i] for i in keep], [sources[i] for i in keep],
                      [cks[i] for i in keep], [key_maps[i] for i in keep], listings,
                      [lams[i] for i in keep] if lams else [], aliases)


def _with_base_files(own: FolderListing, base: FolderListing) -> FolderListing:
    """An adapter task's files: the base folder's (its config, tokenizer: the merged model is the
    base's architecture) overlaid with the adapter folder's own."""
    mine = {f.path for f in own.files}
    files = sorted([*own.files, *(f for f in base.files if f.path not in mine)], key=lambda f: f.path)
    return FolderListing(tuple(files), own.skipped)


