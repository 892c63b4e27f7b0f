"""What pack units return, and the driver's state that folds their results together."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..storage.streams import Segment, StreamWriter
from .mask_writer import MaskWriter
from .plan import KeyPlan, Plan


@dataclass
class BlockResult:
    """Summary of one masked block: mask bytes for the mask writer plus digests and sums."""

    key: str
    index: int
    mask_bytes: np.ndarray
    base_digest: bytes
    base_crc: int
    base_bits_crc: int
    merged_crc: int
    task_digests: list[bytes]
    task_crcs: list[int]
    ones: np.ndarray
    sq_err: np.ndarray
    tau_sq: np.ndarray
    nonzero: bool
    gram: np.ndarray
    base_sq: float
    code_segment: bytes | None = None
    mask_segments: list[bytes] | None = None


@dataclass
class SeparateResult:
    """Summary of one separate tensor: the base's block digests and CRCs, and each task's source
    with its block digests and CRCs."""

    key: str
    base_blocks: list[bytes] | None
    base_crcs: list[int]
    sources: dict[int, tuple[str, list[bytes], list[int]]]
    exact_bytes: dict[int, int]


@dataclass
class ExactResult:
    """One tensor of a task stored on its own: its source (``xbase``, ``exact``, ``base`` or
    ``delta``), the task's block digests and CRCs, the bytes it holds uncompressed, its ``Σ τ²``
    and (``delta``) its squared rebuild error and coded segments."""

    task: int
    key: str
    source: str
    digests: list[bytes]
    crcs: list[int]
    nbytes: int
    tau_sq: float
    sq_err: float = 0.0
    segments: list[bytes] | None = None


@dataclass
class PackState:
    """What the driver accumulates from the units: digests, sums, separate tensors, file hashes."""

    plan: Plan
    n_tasks: int
    writer: MaskWriter
    base_blocks: dict[str, list[bytes]] = field(default_factory=dict)
    base_crcs: dict[str, list[int]] = field(default_factory=dict)
    base_bits_crcs: dict[str, list[int]] = field(default_factory=dict)
    merged_crcs: dict[str, list[int]] = field(default_factory=dict)
    task_blocks: dict[str, list[list[bytes]]] = field(default_factory=dict)
    task_crcs: dict[str, list[list[int]]] = field(default_factory=dict)
    nonzero: set[str] = field(default_factory=set)
    separate: dict[str, SeparateResult] = field(default_factory=dict)
    extra: dict[str, dict[int, tuple[list[bytes], list[int]]]] = field(default_factory=dict)
    exact: dict[int, dict[str, ExactResult]] = field(default_factory=dict)
    file_hashes: dict[str, str] = field(default_factory=dict)
    block_sums: dict[tuple[str, int], tuple[np.ndarray, ...]] = field(default_factory=dict)
    codes: StreamWriter | None = None
    mask_streams: list[StreamWriter] = field(default_factory=list)
    code_segments: dict[str, list[Segment]] = field(default_factory=dict)
    mask_segments: list[list[Segment]] = field(default_factory=list)
    delta_streams: dict[int, StreamWriter] = field(default_factory=dict)
    delta_segments: dict[int, dict[str, list[Segment]]] = field(default_factory=dict)
    ones: np.ndarray = field(init=False)
    _order: dict[tuple[str, int], int] = field(init=False)
    _waiting: dict[int, BlockResult] = field(init=False)
    _next: int = 0

    def __post_init__(self) -> None:
        self.ones = np.zeros(self.n_tasks, np.int64)
        self._order = {(kp.key, i): j for j, (kp, i) in enumerate((kp, i) for kp in self.plan.masked()
                                                                  for i in range(len(kp.blocks)))}
        self._waiting = {}
        self.mask_segments = [[] for _ in range(self.n_tasks)]
        for kp in self.plan.masked():
            self.base_blocks[kp.key] = [b""] * len(kp.blocks)
            self.base_crcs[kp.key] = [0] * len(kp.blocks)
            self.base_bits_crcs[kp.key] = [0] * len(kp.blocks)
            self.merged_crcs[kp.key] = [0] * len(kp.blocks)
            self.task_blocks[kp.key] = [[b""] * len(kp.blocks) for _ in range(self.n_tasks)]
            self.task_crcs[kp.key] = [[0] * len(kp.blocks) for _ in range(self.n_tasks)]

    def add_block(self, kp: KeyPlan, r: BlockResult) -> None:
        """Fold in one masked block's summary and hand its mask bytes (or, quantized form, its
        coded segments, in plan order) to the writers."""
        if r.code_segment is not None:
            self._waiting[self._order[r.key, r.index]] = r
            self._append_ready()
        else:
            self.writer.put(kp.mask_offset + kp.blocks[r.index][0] * kp.info.row_numel // 8, r.mask_bytes)
        self.base_blocks[r.key][r.index] = r.base_digest
        self.base_crcs[r.key][r.index] = r.base_crc
        self.base_bits_crcs[r.key][r.index] = r.base_bits_crc
        self.merged_crcs[r.key][r.index] = r.merged_crc
        for t, (d, c) in enumerate(zip(r.task_digests, r.task_crcs)):
            self.task_blocks[r.key][t][r.index] = d
            self.task_crcs[r.key][t][r.index] = c
        self.ones += r.ones
        self.block_sums[r.key, r.index] = (r.sq_err, r.tau_sq, r.gram, np.array(r.base_sq))
        if r.nonzero:
            self.nonzero.add(r.key)

    def add_exact(self, r: ExactResult) -> None:
        """Fold in one tensor stored on its own; a delta tensor's segments go to its task's stream."""
        if r.segments is not None:
            w = self.delta_streams[r.task]
            self.delta_segments.setdefault(r.task, {})[r.key] = [w.append(seg) for seg in r.segments]
            r.segments = None
        self.exact.setdefault(r.task, {})[r.key] = r

    def _append_ready(self) -> None:
        """Append the waiting segments that come next in plan order; memory holds only those
        that wait for a block still running."""
        assert self.codes is not None
        while self._next in self._waiting:
            r = self._waiting.pop(self._next)
            assert r.code_segment is not None and r.mask_segments is not None
            self.code_segments.setdefault(r.key, []).append(self.codes.append(r.code_segment))
            for t, seg in enumerate(r.mask_segments):
                self.mask_segments[t].append(self.mask_streams[t].append(seg))
            self._next += 1

    def close_streams(self) -> None:
        """Check every block arrived, then finish the stream arrays."""
        for d in self.delta_streams.values():
            d.close()
        if self.codes is None:
            return
        if self._waiting or self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} masked blocks never arrived")
        self.codes.close()
        for w in self.mask_streams:
            w.close()

    def _ordered_sum(self, i: int) -> np.ndarray:
        """Float sums in a fixed block order, not completion order: packs are reproducible."""
        parts = [self.block_sums[k][i] for k in sorted(self.block_sums)]
        return sum(parts[1:], parts[0].copy()) if parts else np.zeros(self.n_tasks)

    @property
    def sq_err(self) -> np.ndarray:
        """Per task, the squared rebuild error over every masked block."""
        return self._ordered_sum(0)

    @property
    def tau_sq(self) -> np.ndarray:
        """Per task, the squared norm of τ over every masked block."""
        return self._ordered_sum(1)

    @property
    def gram(self) -> np.ndarray:
        """The ``(T, T)`` inner products of the task vectors over every masked block."""
        return self._ordered_sum(2)

    @property
    def base_sq(self) -> float:
        """The squared norm of the base over every masked block."""
        return float(self._ordered_sum(3))
