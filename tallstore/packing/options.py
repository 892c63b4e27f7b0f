"""Every choice a pack makes, validated once: λ, the merge rule, storage, codecs, parallelism."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..checkpoint.folder_files import DEFAULT_MAX_FILE_BYTES
from ..checkpoint.keymap import parse_key_map
from ..errors import PlanError
from ..ops import merges, ties
from ..storage.codecs import Codecs, preset
from ..storage.layout import FORM_QUANTIZED
from ..storage.manifest import SharedForm
from . import lam as lam_select

DEFAULT_LAM = 0.4
MAX_LAM = 1.0
FIDELITY: Mapping[str, float | None] = MappingProxyType({
    "tall": None, "compact": 6.0, "balanced": 3.0, "high": 1.0, "lossless": None, "auto": None,
})
"""The presets of ``fidelity``: ``tall`` (the paper's TALL masks, the default), the per-task delta
codes with step factor κ (``compact``, ``balanced``, ``high``: a relative error of κ/√12 in every
coded row; see benchmarks/RESULTS.md for what each keeps), ``lossless`` (every task bit for bit),
``auto`` (per task, the coarsest step of ``fidelity_grid`` whose ``evaluate`` score reaches
``fidelity_target`` of the fine-tune's own; exact if none does)."""
DEFAULT_FIDELITY_GRID = (6.0, 3.0, 1.0)
DEFAULT_FIDELITY_TARGET = 0.995
Lam = float | Mapping[str, float] | str


@dataclass(frozen=True)
class PackOptions:
    """How to pack (see :func:`tallstore.pack` for each option); checked on construction.

    ``lam`` is one λ, a per-task mapping (tasks it does not name get ``DEFAULT_LAM``),
    ``"auto"`` or ``"search"`` (with ``evaluate``), the last two choosing from ``lam_grid``.
    """

    lam: Lam = DEFAULT_LAM
    merge: str = "ta"
    ties_top: float = ties.DEFAULT_TOP
    lam_grid: tuple[float, ...] = lam_select.DEFAULT_GRID
    evaluate: lam_select.Evaluate | None = None
    embed_base: bool = False
    exact: tuple[str, ...] = ()
    overwrite: bool = False
    allow_nonfinite: bool = False
    block_elems: int | None = None  # None: geometry.auto_block_elems of the number of tasks
    workers: int = 2
    codecs: Codecs | str = field(default_factory=Codecs)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    key_map: tuple[str, ...] = ()
    allow_unrelated_base: bool = False
    shared_bits: int | None = None
    shared_method: str = "absmax"
    lossless: bool = False
    max_rebuild_error: float | None = None
    fidelity: str = "tall"
    fidelity_grid: tuple[float, ...] = DEFAULT_FIDELITY_GRID
    fidelity_target: float = DEFAULT_FIDELITY_TARGET
    shared: SharedForm = field(init=False)
    delta_step: float | None = field(init=False)
    rule: merges.TaskArithmetic | merges.Ties = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        searched = self.fidelity == "auto"
        set_(self, "lam_grid", lam_select.check(self.lam, self.lam_grid, None if searched else self.evaluate))
        if isinstance(self.lam, Mapping):
            set_(self, "lam", MappingProxyType({str(k): _lam(v, k) for k, v in self.lam.items()}))
        elif not isinstance(self.lam, str):
            set_(self, "lam", _lam(self.lam, None))
        set_(self, "rule", merges.rule(self.merge, **({"top": self.ties_top} if self.merge == "ties" else {})))
        if isinstance(self.codecs, str):
            set_(self, "codecs", preset(self.codecs))
        if not isinstance(self.codecs, Codecs):
            raise PlanError(f"codecs must be 'fast', 'compact' or a Codecs value, got {self.codecs!r}")
        if isinstance(self.exact, str):
            set_(self, "exact", (self.exact,))
        if self.shared_bits is None:
            set_(self, "shared", SharedForm())
        else:
            if isinstance(self.shared_bits, bool) or self.shared_bits not in range(2, 9):
                raise PlanError(f"shared_bits must be a whole number from 2 to 8, got {self.shared_bits!r}")
            if self.shared_method not in ("absmax", "mse"):
                raise PlanError(f"shared_method must be 'absmax' or 'mse', got {self.shared_method!r}")
            set_(self, "shared", SharedForm(FORM_QUANTIZED, self.shared_bits, self.shared_method))
            if self.lam == "search":
                raise PlanError("lam='search' scores rebuilds from the exact shared vector; it cannot be combined "
                                "with shared_bits (use lam='auto' or a fixed λ)")
        set_(self, "key_map", tuple(self.key_map))
        parse_key_map(self.key_map)
        set_(self, "exact", tuple(self.exact))
        if self.block_elems is not None and (
                isinstance(self.block_elems, bool) or not isinstance(self.block_elems, int) or self.block_elems < 1):
            raise PlanError(f"block_elems must be a positive integer, got {self.block_elems!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise PlanError(f"workers must be a positive integer, got {self.workers!r}")
        if not isinstance(self.lossless, bool):
            raise PlanError(f"lossless must be True or False, got {self.lossless!r}")
        self._check_fidelity()
        if self.max_rebuild_error is not None:
            if self.lossless:
                raise PlanError("lossless stores every task exactly: a max_rebuild_error has nothing to choose")
            try:
                floor = float(self.max_rebuild_error)
            except (TypeError, ValueError):
                floor = math.nan
            if isinstance(self.max_rebuild_error, bool) or not math.isfinite(floor) or floor < 0:
                raise PlanError(f"max_rebuild_error must be a finite number ≥ 0 (a relative error, 0.3 say), "
                                f"got {self.max_rebuild_error!r}")
            set_(self, "max_rebuild_error", floor)
        if isinstance(self.max_file_bytes, bool) or not isinstance(self.max_file_bytes, int) or self.max_file_bytes < 0:
            raise PlanError(f"max_file_bytes must be a whole number of bytes ≥ 0, got {self.max_file_bytes!r}")

    def _check_fidelity(self) -> None:
        """``fidelity``: one of :data:`FIDELITY`; a delta preset replaces the TALL machinery, so
        the options that only TALL tasks use are refused with it rather than ignored."""
        if self.fidelity not in FIDELITY:
            raise PlanError(f"fidelity must be one of {', '.join(FIDELITY)}, got {self.fidelity!r}")
        if self.fidelity == "lossless":
            object.__setattr__(self, "lossless", True)
        step = FIDELITY[self.fidelity]
        object.__setattr__(self, "delta_step", step)
        if self.fidelity == "auto":
            self._check_search()
        elif step is None:
            return
        if self.lossless:
            raise PlanError(f"fidelity {self.fidelity!r} codes every task approximately; it cannot be lossless")
        clash = [name for name, used in (
            ("max_rebuild_error", self.max_rebuild_error is not None), ("shared_bits", self.shared_bits is not None),
            ("lam='auto'/'search'", isinstance(self.lam, str)), ("exact", bool(self.exact)),
            ("allow_nonfinite", self.allow_nonfinite),
        ) if used]
        if clash:
            raise PlanError(f"fidelity {self.fidelity!r} codes each task on its own (no shared vector, no masks): "
                            f"{clash[0]} does not apply to it")

    @property
    def delta(self) -> bool:
        """Whether every task is delta-coded on its own (a delta preset, or ``auto``)."""
        return self.delta_step is not None or self.fidelity == "auto"

    def _check_search(self) -> None:
        if self.evaluate is None:
            raise PlanError("fidelity='auto' needs evaluate=fn(task_name, state_dict) -> score (without data, "
                            "pick a preset: compact, balanced or high)")
        try:
            grid = tuple(sorted({float(v) for v in self.fidelity_grid}, reverse=True))
            target = float(self.fidelity_target)
        except (TypeError, ValueError):
            raise PlanError("fidelity_grid must be numbers and fidelity_target a number") from None
        if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
            raise PlanError(f"fidelity_grid must hold step factors > 0, got {self.fidelity_grid!r}")
        if not (math.isfinite(target) and 0 < target <= 1):
            raise PlanError(f"fidelity_target must be a fraction in (0, 1] of each fine-tune's score, got {target!r}")
        object.__setattr__(self, "fidelity_grid", grid)
        object.__setattr__(self, "fidelity_target", target)

    @property
    def selects_lam(self) -> bool:
        """Whether λ is chosen by a pass over the inputs (``auto``/``search``)."""
        return isinstance(self.lam, str)

    def lams(self, names: Iterable[str]) -> list[float]:
        """One λ per task from a single value or a per-task mapping (others get ``DEFAULT_LAM``)."""
        names = list(names)
        if isinstance(self.lam, str):
            raise PlanError(f"λ is chosen by {self.lam!r}, not given")
        if isinstance(self.lam, Mapping):
            unknown = set(self.lam) - set(names)
            if unknown:
                raise PlanError(f"λ given for unknown task {min(unknown)!r}")
            return [float(self.lam.get(n, DEFAULT_LAM)) for n in names]
        return [float(self.lam)] * len(names)


def _lam(v: Any, task: str | None) -> float:
    who = f"for task {task!r} " if task is not None else ""
    try:
        value = float(v)
    except (TypeError, ValueError):
        raise PlanError(f"λ {who}must be a number, got {v!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_LAM:
        raise PlanError(
            f"λ {who}must be a finite number between 0 and {MAX_LAM:g}, got {value:g} (a weight is kept when the task's own change "
            f"exceeds λ times what the other tasks add: above 1 almost nothing is kept; the paper searches 0.2–0.6)"
        )
    return value
