"""The top-level ``pack``: pack a collection, then open the result."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .archive import Archive, open
from .packing import packer


def pack(
    out: str | os.PathLike[str],
    base: str | os.PathLike[str],
    tasks: Mapping[str, str | os.PathLike[str]],
    *,
    lam: float | Mapping[str, float] | str = packer.DEFAULT_LAM,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> Archive:
    """Pack ``tasks`` (name → checkpoint path) fine-tuned from ``base`` into ``out``; open it.

    ``lam``: one λ, a per-task mapping, ``"auto"`` (weight-space choice from ``lam_grid``) or
    ``"search"`` (``evaluate(task_name, state_dict) -> score`` picks from ``lam_grid``).
    Options: ``merge`` (``"ta"``, or ``"ties"`` with ``ties_top``), ``lam_grid``, ``evaluate``,
    ``embed_base``, ``exact`` (glob patterns stored exactly), ``overwrite``, ``allow_nonfinite``,
    ``block_elems``, ``workers``, ``codecs`` (``"fast"``, ``"compact"`` or a ``Codecs``), ``progress``, ``client`` (a ``dask.distributed``
    client: pack units run as Dask tasks on its workers).
    """
    loc = packer.pack(out, base, tasks, lam=lam, storage_options=storage_options, **options)
    return open(loc, base=base, storage_options=storage_options)
