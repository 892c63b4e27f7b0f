"""Task tensors under their base's names: explicit prefix rules, prefix detection, a renaming view.

A fine-tune saved through another class than its base names the same tensors differently: a
``BertForSequenceClassification`` saves ``bert.encoder.…`` where its base ``BertModel`` says
``encoder.…`` (other common ones: ``model.``, ``base_model.model.``, ``transformer.``,
``roberta.``, and either side may carry the prefix). Matched by name, such a task shares nothing
with its base. :func:`detect_prefix` finds the difference, :class:`RenamedCheckpoint` serves the
task under the base's names, and :meth:`RenamedCheckpoint.original_key` gives the task's own names
back for rebuilding.

Detection, in order:

1. Explicit rules (``OLD_PREFIX=NEW_PREFIX``, :func:`parse_key_map`) rename every task key they
   match, the longest matching ``OLD`` winning; detection never touches a key they renamed.
2. A task key whose name is a base tensor of the same shape keeps its name.
3. Every other task key proposes the prefix differences under which it becomes a base tensor of
   the same shape, a prefix removed (``bert.encoder.x`` → ``encoder.x``) or added; a base tensor
   that the task already holds by name is never a target. Each candidate scores the parameters
   (elements) it maps.
4. The best candidate is used only if it maps at least :data:`MIN_SHARE` of the parameters of the
   task tensors left by steps 1–2 (so it explains the naming, not a coincidence) and at least
   :data:`MARGIN` times what the runner-up maps. When the first holds and the second does not, the
   detection is *ambiguous*: nothing is renamed, and the report says so and names the candidates.

Keys the chosen prefix does not carry onto a base tensor (heads such as ``classifier.*``) keep
their own names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..dtypes import TensorInfo
from ..errors import PlanError
from .interface import Checkpoint, WeightLayout
from .sources import ByteSource

MIN_SHARE = 0.5
MARGIN = 2.0


@dataclass(frozen=True)
class PrefixRule:
    """Keys starting with ``old`` start with ``new`` instead (``new`` may be empty, or ``old``)."""

    old: str
    new: str

    def apply(self, key: str) -> str | None:
        """``key`` renamed by this rule, or None when it does not start with ``old``."""
        return self.new + key[len(self.old) :] if key.startswith(self.old) else None

    @property
    def spec(self) -> str:
        """The rule as a user writes it: ``OLD=NEW``."""
        return f"{self.old}={self.new}"

    def __str__(self) -> str:
        return f"{self.old!r}→{self.new!r}"


def parse_key_map(specs: Iterable[str]) -> tuple[PrefixRule, ...]:
    """User rules such as ``["bert.=", "model.decoder.=decoder."]``, each ``OLD_PREFIX=NEW_PREFIX``."""
    rules: list[PrefixRule] = []
    for spec in specs:
        old, eq, new = spec.partition("=")
        if not eq:
            raise PlanError(f"key map rule {spec!r} is not OLD_PREFIX=NEW_PREFIX (e.g. 'bert.=')")
        if old == new:
            raise PlanError(f"key map rule {spec!r} renames nothing: OLD_PREFIX and NEW_PREFIX are the same")
        if any(r.old == old for r in rules):
            raise PlanError(f"key map gives two rules for the prefix {old!r}: keep one")
        rules.append(PrefixRule(old, new))
    return tuple(rules)


@dataclass(frozen=True)
class Candidate:
    """A prefix difference seen between task and base, with the parameters it maps."""

    rule: PrefixRule
    params: int


@dataclass(frozen=True)
class KeyMapReport:
    """What detection found: the chosen prefix, how much it renamed, how much of the base it covers."""

    prefix: PrefixRule | None
    renamed: int
    covered: float
    candidates: tuple[Candidate, ...]
    ambiguous: bool

    def __str__(self) -> str:
        if self.ambiguous:
            a, b = self.candidates[:2]
            return (
                f"ambiguous key prefixes: {a.rule} maps {a.params:,} parameters and {b.rule} {b.params:,}; "
                f"choose one with a key map rule such as {a.rule.spec!r}"
            )
        how = f"key prefix {self.prefix}" if self.prefix else "the given key map" if self.renamed else "no key prefix difference"
        return f"{how}: {self.renamed} tensors renamed; the task covers {self.covered:.1%} of the base's parameters"


@dataclass(frozen=True)
class KeyMap:
    """Task key → base key for the keys that change, and the report of how it was found."""

    mapping: dict[str, str]
    report: KeyMapReport


def _explicit(keys: Iterable[str], rules: Sequence[PrefixRule]) -> dict[str, str]:
    """Task key → new name for every key some rule matches (the longest ``old`` wins)."""
    by_length = sorted(rules, key=lambda r: len(r.old), reverse=True)
    out: dict[str, str] = {}
    for k in keys:
        new = next((n for r in by_length if (n := r.apply(k)) is not None), None)
        if new is not None and new != k:
            out[k] = new
    return out


def _check_unique(keys: Iterable[str], mapping: Mapping[str, str], where: str) -> list[str]:
    """The new names of ``keys`` in order, refusing two keys that end up with one name."""
    seen: dict[str, str] = {}
    for k in keys:
        new = mapping.get(k, k)
        if new in seen:
            raise PlanError(f"{where}: renaming gives {seen[new]!r} and {k!r} the same name {new!r}")
        seen[new] = k
    return list(seen)


def _dotted_prefixes(key: str) -> Iterable[str]:
    """``a.``, ``a.b.``, … of ``a.b.c``: the prefixes that end at a dot, shortest first."""
    at = key.find(".")
    while 0 <= at < len(key) - 1:
        yield key[: at + 1]
        at = key.find(".", at + 1)


def _candidates(
    base: Mapping[str, TensorInfo], free: set[str], left: Mapping[str, TensorInfo]
) -> dict[PrefixRule, int]:
    """Every prefix removal or addition that carries a ``left`` task tensor onto a ``free`` base one."""
    scores: dict[PrefixRule, int] = {}
    for name, info in left.items():
        for p in _dotted_prefixes(name):
            target = name[len(p) :]
            if target in free and base[target].shape == info.shape:
                rule = PrefixRule(p, "")
                scores[rule] = scores.get(rule, 0) + info.numel
    for target in free:
        for q in _dotted_prefixes(target):
            name = target[len(q) :]
            if name in left and base[target].shape == left[name].shape:
                rule = PrefixRule("", q)
                scores[rule] = scores.get(rule, 0) + left[name].numel
    return scores


def detect_prefix(
    base: Mapping[str, TensorInfo], task: Mapping[str, TensorInfo], rules: Sequence[PrefixRule] = ()
) -> KeyMap:
    """How ``task``'s keys map onto ``base``'s: ``rules`` first, then one detected prefix (module doc)."""
    mapping = _explicit(task, rules)
    names = dict(zip(_check_unique(task, mapping, "key map"), task))
    matched = {n for n, k in names.items() if n in base and base[n].shape == task[k].shape}
    left = {n: task[k] for n, k in names.items() if n not in matched and k not in mapping}
    free = {b for b in base if b not in names}
    ranked = sorted(
        (Candidate(r, p) for r, p in _candidates(base, free, left).items()), key=lambda c: (-c.params, c.rule.spec)
    )
    first, second = ([c.params for c in ranked] + [0, 0])[:2]
    plausible = first > 0 and first >= MIN_SHARE * sum(i.numel for i in left.values())
    ambiguous = plausible and first < MARGIN * second
    prefix = ranked[0].rule if plausible and not ambiguous else None
    if prefix is not None:
        for n, info in left.items():
            target = prefix.apply(n)
            if target is not None and target in free and base[target].shape == info.shape:
                mapping[names[n]] = target
                matched.add(target)
    total = sum(i.numel for i in base.values())
    covered = sum(base[b].numel for b in matched) / total if total else 0.0
    return KeyMap(mapping, KeyMapReport(prefix, len(mapping), covered, tuple(ranked), ambiguous))


class RenamedCheckpoint(Checkpoint):
    """``ckpt`` with some keys renamed (``mapping``: original → new); reads go to the original tensors."""

    def __init__(self, ckpt: Checkpoint, mapping: Mapping[str, str]) -> None:
        unknown = next((k for k in mapping if k not in ckpt), None)
        if unknown is not None:
            raise PlanError(f"{ckpt.path}: cannot rename {unknown!r}: the checkpoint has no such tensor")
        self.path = ckpt.path
        self.keys = _check_unique(ckpt.keys, mapping, ckpt.path)
        self._inner = ckpt
        self._original = dict(zip(self.keys, ckpt.keys))

    def original_key(self, key: str) -> str:
        """The wrapped checkpoint's own name for ``key`` (what a rebuilt task must be called)."""
        return self._original[key]

    @property
    def renames(self) -> dict[str, str]:
        """Original name → new name, for the keys that changed."""
        return {old: new for new, old in self._original.items() if old != new}

    def info(self, key: str) -> TensorInfo:
        return self._inner.info(self._original[key])

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._inner.read(self._original[key], start, stop)

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        self._inner.read_into(self._original[key], start, stop, out)

    def read_bytes(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        return self._inner.read_bytes(self._original[key], start, stop)

    @property
    def files(self) -> list[ByteSource]:
        return self._inner.files

    @property
    def layout(self) -> WeightLayout:
        return self._inner.layout

    def close(self) -> None:
        self._inner.close()


def align_keys(
    base: Checkpoint, task: Checkpoint, rules: Sequence[PrefixRule] = ()
) -> tuple[RenamedCheckpoint, KeyMapReport]:
    """``task`` under ``base``'s names (see :func:`detect_prefix`); an ambiguous detection is refused."""
    km = detect_prefix({k: base.info(k) for k in base.keys}, {k: task.info(k) for k in task.keys}, rules)
    if km.report.ambiguous:
        raise PlanError(f"{task.path} (against base {base.path}): {km.report}")
    return RenamedCheckpoint(task, km.mapping), km.report
