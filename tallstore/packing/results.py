"""What pack units return, and the driver's state that folds their results together."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    file_hashes: dict[str, str] = field(default_factory=dict)
    block_sums: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    ones: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.ones = np.zeros(self.n_tasks, np.int64)
        for kp in self.plan.masked():
            self.base_blocks[kp.key] = [b""] * len(kp.blocks)
            self.base_crcs[kp.key] = [0] * len(kp.blocks)
            self.base_bits_crcs[kp.key] = [0] * len(kp.blocks)
            self.merged_crcs[kp.key] = [0] * len(kp.blocks)
            self.task_blocks[kp.key] = [[b""] * len(kp.blocks) for _ in range(self.n_tasks)]
            self.task_crcs[kp.key] = [[0] * len(kp.blocks) for _ in range(self.n_tasks)]

    def add_block(self, kp: KeyPlan, r: BlockResult) -> None:
        """Fold in one masked block's summary and hand its mask bytes to the writer."""
        self.writer.put(kp.mask_offset + kp.blocks[r.index][0] * kp.info.row_numel // 8, r.mask_bytes)
        self.base_blocks[r.key][r.index] = r.base_digest
        self.base_crcs[r.key][r.index] = r.base_crc
        self.base_bits_crcs[r.key][r.index] = r.base_bits_crc
        self.merged_crcs[r.key][r.index] = r.merged_crc
        for t, (d, c) in enumerate(zip(r.task_digests, r.task_crcs)):
            self.task_blocks[r.key][t][r.index] = d
            self.task_crcs[r.key][t][r.index] = c
        self.ones += r.ones
        self.block_sums[r.key, r.index] = (r.sq_err, r.tau_sq)
        if r.nonzero:
            self.nonzero.add(r.key)

    def _ordered_sum(self, i: int) -> np.ndarray:
        """Float sums in a fixed block order, not completion order: packs are reproducible."""
        return sum((self.block_sums[k][i] for k in sorted(self.block_sums)), np.zeros(self.n_tasks))

    @property
    def sq_err(self) -> np.ndarray:
        """Per task, the squared rebuild error over every masked block."""
        return self._ordered_sum(0)

    @property
    def tau_sq(self) -> np.ndarray:
        """Per task, the squared norm of τ over every masked block."""
        return self._ordered_sum(1)
