"""Mask statistics (TALL paper §4): how many tasks select each weight, per layer and per pair.

A weight selected by no task is *catastrophic* (the merge changes it, yet no task needs it; a
weight no task changed counts here too, as in the paper, which defines both from the masks
alone); one selected by exactly one task is *selfish*. Statistics cover every maskable weight
(kinds ``masked`` and ``base``) and are computed from the stored masks only, streaming through
``masks/<t>`` a few chunks (shared form ``quantized``: one row block) at a time. Tasks stored
exactly whole have no mask and are listed apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArchiveError, CorruptArchiveError, TallstoreError
from ..storage import layout
from ..storage.geometry import row_blocks
from ..storage.segments import decode_codes, decode_mask_segment
from .source import ArchiveSource

PIECE = 1 << 20  # mask elements unpacked per task at a time (a multiple of 8)
WINDOW = 4 << 20  # mask bytes read per task at a time (rounded down to whole chunks)
BUDGET = 64 << 20  # bytes of windows (and of unpacked pieces) of all tasks together: many tasks get less each
MAX_TASKS = 1_000
"""Tasks ``stats`` compares: its pairwise overlaps alone grow as the square of the task count."""


def layer_of(key: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric part, else its module.

    ``model.layers.3.mlp.up.weight`` → ``model.layers.3``; ``embed.weight`` → ``embed``.
    """
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else key


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


class _Counts:
    """Accumulated counts for one group of weights."""

    def __init__(self, T: int) -> None:
        self.hist = np.zeros(T + 1, np.int64)
        self.params = 0

    def summary(self) -> dict[str, Any]:
        n = self.params
        return {
            "params": n,
            "histogram": self.hist.tolist(),
            "catastrophic": float(self.hist[0] / n) if n else 0.0,
            "selfish": float(self.hist[1] / n) if n and len(self.hist) > 1 else 0.0,
        }


class _Tally:
    """The counts ``mask_stats`` accumulates from ``(T, n)`` pieces of unpacked mask bits."""

    def __init__(self, T: int) -> None:
        self.overall = _Counts(T)
        self.layers: dict[str, _Counts] = {}
        self.inter = torch.zeros((T, T), dtype=torch.float64)
        self.alone = np.zeros(T, np.int64)
        self.T = T

    def layer(self, key: str) -> _Counts:
        return self.layers.setdefault(layer_of(key), _Counts(self.T))

    def add(self, bits: np.ndarray, layer: _Counts) -> None:
        """Count one piece: ``bits[t, i]`` is 1 where task ``t``'s mask selects weight ``i``."""
        selected = bits.sum(axis=0, dtype=np.int64)
        h = np.bincount(selected, minlength=self.T + 1)
        for c in (self.overall, layer):
            c.hist += h
            c.params += bits.shape[1]
        self.alone += bits[:, selected == 1].sum(axis=1, dtype=np.int64)
        m = torch.from_numpy(bits).to(torch.float32)
        self.inter += (m @ m.T).to(torch.float64)


def mask_stats(source: ArchiveSource) -> dict[str, Any]:
    """Densities, the 0…T selection histogram, catastrophic/selfish fractions overall and per
    layer, the weights each task holds alone, and the pairwise Jaccard overlap of the masks of
    the tasks that have them (a task stored exactly whole has none)."""
    m = source.manifest
    tall = [t for t in range(len(m.tasks)) if source.task(t).tall]
    names = [m.tasks[t] for t in tall]
    T = len(names)
    if T > MAX_TASKS:
        raise ArchiveError(f"{source.location}: stats compares every pair of tasks; {T} tasks are more than it "
                           f"does ({MAX_TASKS})")
    tally = _Tally(T)
    if T and m.shared.quantized:
        _quantized_masks(source, tall, tally)
    elif T:
        _xor_masks(source, tall, tally)
    total = tally.overall.params
    ones = tally.inter.diagonal().round().long().tolist()
    inter = tally.inter
    union = torch.tensor(ones, dtype=torch.float64).view(-1, 1) + torch.tensor(ones, dtype=torch.float64).view(1, -1) - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones((), dtype=torch.float64))
    return {
        "location": source.location,
        "tasks": names,
        "exact_tasks": [n for t, n in enumerate(m.tasks) if t not in tall],
        "masked_params": total,
        "density": {n: ones[t] / total if total else 0.0 for t, n in enumerate(names)},
        **tally.overall.summary(),
        "selfish_by_task": {n: float(tally.alone[t] / total) if total else 0.0 for t, n in enumerate(names)},
        "layers": [{"layer": name, **tally.layers[name].summary()} for name in sorted(tally.layers, key=natural_key)],
        "jaccard": jaccard.tolist(),
    }


def _xor_masks(source: ArchiveSource, tall: list[int], tally: _Tally) -> None:
    """Shared form ``xor``: stream the tasks' flat mask arrays a window at a time."""
    m = source.manifest
    T = len(tall)
    entries = sorted(
        (e for e in m.tensors if e.kind in (layout.KIND_MASKED, layout.KIND_BASE) and e.mask_offset is not None),
        key=lambda e: e.mask_offset or 0,
    )
    segments = [(e.mask_offset, e.info.numel, tally.layer(e.key)) for e in entries]
    window = _window(T, m.mask.chunk_bytes)
    piece = _piece(T) // 8  # mask bytes unpacked per task at a time (as float32 too)
    total_bytes = m.mask.nbytes
    s = 0
    for w0 in range(0, total_bytes, window):
        w1 = min(w0 + window, total_bytes)
        data = _read_window(source, tall, w0, w1)
        while s < len(segments) and segments[s][0] < w1:
            lo, n, counts = segments[s]
            a, b = max(lo, w0), min(lo + (n + 7) // 8, w1)
            for p in range(a, b, piece):
                q = min(p + piece, b)
                count = min((q - p) * 8, n - (p - lo) * 8)
                tally.add(np.unpackbits(data[:, p - w0 : q - w0], axis=1, count=count, bitorder=layout.BITORDER), counts)
            if lo + (n + 7) // 8 > w1:
                break
            s += 1


def _quantized_masks(source: ArchiveSource, tall: list[int], tally: _Tally) -> None:
    """Shared form ``quantized``: per row block of each masked tensor, decode the shared codes
    and every task's mask segment under them."""
    m = source.manifest
    try:
        codes = source.codes_array()
        streams = [(source.mask_stream(t), source.task(t).masks) for t in tall]
        piece = _piece(len(tall))
        for e in m.tensors:
            if e.kind != layout.KIND_MASKED or e.codes is None or e.mask_block is None:
                continue
            counts = tally.layer(e.key)
            row = e.info.row_numel
            for i, (a, b) in enumerate(row_blocks(e.info, None, m.block_elems)):
                where = f"block {i} of {e.key!r}"
                code = e.codes[i]
                batch = source.reader.batch()
                batch.add_range(codes, code[0], code[0] + code[1])
                for stream, segs in streams:
                    assert segs is not None
                    batch.add_range(stream, segs[e.mask_block + i][0], sum(segs[e.mask_block + i][:2]))
                batch.fetch()
                raw = np.empty(code[1], np.uint8)
                batch.read_range(codes, code[0], raw)
                _, q = decode_codes(raw, code[2], b - a, (b - a) * row, f"the shared codes of {where}")
                packed = []
                for stream, segs in streams:
                    assert segs is not None
                    seg = segs[e.mask_block + i]
                    raw = np.empty(seg[1], np.uint8)
                    batch.read_range(stream, seg[0], raw)
                    packed.append(decode_mask_segment(raw, seg[2], q, f"a mask of {where}"))
                bits = np.stack(packed)
                n = (b - a) * row
                for p in range(0, n, piece):
                    tally.add(np.unpackbits(bits[:, p // 8 : (min(p + piece, n) + 7) // 8], axis=1,
                                            count=min(piece, n - p), bitorder=layout.BITORDER), counts)
    except TallstoreError as e:
        raise CorruptArchiveError(f"{source.location}: mask data is unreadable or corrupt ({e})") from None


def _piece(T: int) -> int:
    """Mask elements unpacked per task at a time (a multiple of 8): ``PIECE``, less for many tasks."""
    return min(PIECE, max(8, BUDGET // 4 // T)) // 8 * 8


def _window(T: int, chunk: int) -> int:
    """Mask bytes read per task at a time: ``WINDOW``, or less when ``T`` tasks would exceed
    ``BUDGET``, in whole chunks where one fits (each chunk is then decoded once)."""
    share = min(WINDOW, max(8, BUDGET // T))
    return share - share % chunk if share >= chunk else share


def _read_window(source: ArchiveSource, tall: list[int], w0: int, w1: int) -> np.ndarray:
    """Bytes ``[w0, w1)`` of the masks of tasks ``tall``, as a ``(T, w1 − w0)`` uint8 array."""
    m = source.manifest
    out = np.empty((len(tall), w1 - w0), np.uint8)
    try:
        arrays = [source.reader.array(layout.mask_path(t), np.dtype(np.uint8), m.mask.nbytes, source.task(t).mask_crcs)
                  for t in tall]
        source.reader.read_into([(a, w0, out[t]) for t, a in enumerate(arrays)])
    except TallstoreError as e:
        raise CorruptArchiveError(f"{source.location}: mask data is unreadable or corrupt ({e})") from None
    return out


def plot(stats: dict[str, Any], out: str | Path) -> Path:
    """A PNG: the selection histogram, the Jaccard overlap and the per-layer breakdown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TallstoreError("--plot needs matplotlib (pip install 'tallstore[plot]')") from None
    names = stats["tasks"]
    T = len(names)
    hist = np.array(stats["histogram"], dtype=float)
    frac = hist / max(hist.sum(), 1)
    colors = {"catastrophic": "#d62728", "selfish": "#ff7f0e", "shared": "#1f77b4"}
    fig = plt.figure(figsize=(13, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[1.4, 1], height_ratios=[1, 1.1])
    fig.suptitle(
        f"TALL mask statistics: {T} tasks, {stats['masked_params']:,} maskable weights — "
        f"catastrophic {stats['catastrophic']:.1%}, selfish {stats['selfish']:.1%}",
        fontsize=13,
    )

    ax = fig.add_subplot(grid[0, 0])
    bar_colors = [colors["catastrophic"], colors["selfish"]] + [colors["shared"]] * (T - 1)
    bars = ax.bar(range(T + 1), frac * 100, color=bar_colors[: T + 1])
    for rect, f in zip(bars, frac):
        ax.annotate(f"{f:.1%}", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(T + 1))
    ax.set_xlabel("number of tasks whose mask selects the weight")
    ax.set_ylabel("% of weights")
    ax.set_title("How many tasks use each weight (0 = catastrophic, 1 = selfish)")

    ax = fig.add_subplot(grid[0, 1])
    im = ax.imshow(np.array(stats["jaccard"]), vmin=0, vmax=1, cmap="viridis")
    labels = [n if len(n) <= 14 else n[:13] + "…" for n in names]
    # names come from the archive: "$…$" in one must not be read as mathtext
    ax.set_xticks(range(T), labels, rotation=60, ha="right", fontsize=8, parse_math=False)
    ax.set_yticks(range(T), labels, fontsize=8, parse_math=False)
    ax.set_title("Mask overlap between tasks (Jaccard)")
    if T <= 12:
        for i in range(T):
            for j in range(T):
                v = stats["jaccard"][i][j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)

    ax = fig.add_subplot(grid[1, :])
    layers = stats["layers"]
    x = np.arange(len(layers))
    cat = np.array([layer["catastrophic"] for layer in layers]) * 100
    sel = np.array([layer["selfish"] for layer in layers]) * 100
    ax.bar(x, cat, color=colors["catastrophic"], label="catastrophic (0 tasks)")
    ax.bar(x, sel, bottom=cat, color=colors["selfish"], label="selfish (1 task)")
    ax.bar(x, 100 - cat - sel, bottom=cat + sel, color=colors["shared"], alpha=0.35, label="shared (2+ tasks)")
    step = max(1, len(layers) // 40)
    ax.set_xticks(x[::step], [layers[i]["layer"] for i in range(0, len(layers), step)], rotation=70, ha="right", fontsize=7,
                  parse_math=False)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of the layer's weights")
    ax.set_title("Per layer (layers in name order)", pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncols=3, frameon=False)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
