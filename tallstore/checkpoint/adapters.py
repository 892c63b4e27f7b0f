"""PEFT LoRA adapter folders as checkpoints: the base's tensors with the adapter merged in.

A folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) stores a
fine-tune as low-rank factors. Opened against its base it reads as the merged model, what
peft's ``merge_and_unload()`` gives: an adapted weight is ``W + ΔW · scale`` with ``ΔW = B @ A``
(transposed for embeddings and ``fan_in_fan_out`` layers, reshaped for convolutions) and
``scale = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern`` and
``alpha_pattern`` override both per module as in peft), computed in float32 (float64 for a
float64 tensor) and cast to the base's dtype. Tensors the adapter saves whole
(``modules_to_save``, trained biases, saved embeddings) replace the base's, cast to its dtype;
every other tensor reads through from the base. The adapter's module names are mapped onto the
base's own key names by :func:`~tallstore.checkpoint.keymap.detect_prefix`: a bare ``BertModel``
base (``encoder.…``) serves an adapter trained on ``BertForSequenceClassification``
(``bert.encoder.…``).

Nothing is merged ahead: a read computes only the rows it returns, from those rows of ``W`` and
of ``B`` (``A``, ``r`` rows, is read whole). The update is computed in fixed row blocks of each
tensor (about ``merge_block_elems`` elements), whatever range is asked, so a row range is bitwise
the same rows of a whole read: digests hashed block by block agree with whole-tensor checks.

Whatever would not merge to exactly that is refused with a one-line :class:`CheckpointError`
saying what to do instead: other PEFT methods, LoRA variants and options (DoRA, LoRA biases, …),
initialisations that rewrite the base (PiSSA, …), factors that fit no base tensor.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from ..dtypes import TensorInfo
from ..errors import CheckpointError
from ..locations import is_url, local_path, url_options
from .interface import Checkpoint, WeightLayout
from .keymap import KeyMap, PrefixRule, detect_prefix
from .safetensors_file import SafetensorsCheckpoint
from .sources import ByteSource, Folder, LocalFolder, RemoteFolder
from .torch_file import TorchCheckpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
MERGE_BLOCK_ELEMS = 1 << 20
FACTOR_CACHE = 16

# PEFT methods that add virtual tokens instead of changing weights: there is no merged model.
PROMPT_METHODS = frozenset(
    {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT"}
)
# LoraConfig options (as of peft 0.21) under which the merged weight is not W + B @ A · scale of
# the saved factors: LoRA variants, LoRA biases, parameter and token targets, replicated layers.
UNMERGEABLE_OPTIONS = (
    "use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
    "kasa_config", "velora_config", "monteclora_config", "target_parameters", "trainable_token_indices",
    "layer_replication",
)
# Initialisations that rewrite the base's weights: unless peft converted the adapter when saving
# it, its factors apply to that residual base, not to the original one.
BASE_CHANGING_INITS = frozenset({"pissa", "olora", "corda", "loftq"})
# Module-path parts that are peft's LoRA parameters (the factors, DoRA's magnitude).
LORA_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
# Name endings of the plain factors: which factor, and whether of an embedding.
FACTOR_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}
MERGE_WITH_PEFT = "merge it with peft (merge_and_unload()) and pass the saved model instead"


def _folder(location: Folder | str | os.PathLike[str], storage_options: dict[str, Any] | None) -> Folder:
    """``location`` as a :class:`Folder`: given as one, a local path, or an fsspec URL."""
    if isinstance(location, Folder):
        return location
    if not is_url(location):
        return LocalFolder(local_path(location))
    try:
        fs, path = fsspec.core.url_to_fs(str(location), **url_options(location, storage_options))
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"{location}: cannot open this URL ({e})") from None
    return RemoteFolder(fs, path)


def is_adapter_folder(location: Folder | str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``location`` is a PEFT adapter folder: ``adapter_config.json`` beside adapter weights."""
    folder = _folder(location, storage_options)
    try:
        return folder.is_file(ADAPTER_CONFIG) and any(folder.is_file(n) for n in ADAPTER_WEIGHTS)
    except FileNotFoundError:  # a remote prefix that does not exist
        return False


def open_adapter(
    location: Folder | str | os.PathLike[str],
    base: Checkpoint,
    *,
    rules: Sequence[PrefixRule] = (),
    storage_options: dict[str, Any] | None = None,
) -> AdapterCheckpoint:
    """The adapter folder at ``location`` merged into ``base`` (which stays the caller's to close).

    ``rules`` (:func:`~tallstore.checkpoint.keymap.parse_key_map`) rename the adapter's module
    names before the prefix difference to the base is detected.
    """
    folder = _folder(location, storage_options)
    where = folder.where(ADAPTER_CONFIG)
    try:
        config = json.loads(folder.read_bytes(ADAPTER_CONFIG, MAX_CONFIG_BYTES))
    except ValueError:
        raise CheckpointError(f"{where}: not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    weights = _open_weights(folder)
    config_file: ByteSource | None = None
    try:
        config_file = folder.file(ADAPTER_CONFIG)
        return AdapterCheckpoint(weights, config, base, where=folder.location, rules=rules, config_file=config_file)
    except BaseException:
        weights.close()
        if config_file is not None:
            config_file.close()
        raise


def _open_weights(folder: Folder) -> Checkpoint:
    """The adapter's own tensors, safetensors preferred over ``.bin``."""
    name = next((n for n in ADAPTER_WEIGHTS if folder.is_file(n)), None)
    if name is None:
        raise CheckpointError(f"{folder.location}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")
    if name.endswith(".safetensors"):
        return SafetensorsCheckpoint([folder.file(name)], folder.where(name))
    if isinstance(folder, LocalFolder):
        return TorchCheckpoint(folder.path / name)
    raise CheckpointError(f"{folder.where(name)}: torch files are read only from local paths; convert to safetensors")


def _is_rank(v: object) -> bool:
    return type(v) is int and v > 0


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class _Settings:
    """What ``adapter_config.json`` says about merging, checked."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules_to_save: tuple[str, ...]

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """The rank peft gives ``module`` and the scale of its update."""
        r = _pattern(self.rank_pattern, module, self.r)
        alpha = _pattern(self.alpha_pattern, module, self.alpha)
        return r, alpha / (math.sqrt(r) if self.rslora else r)

    def saves_whole(self, name: str) -> bool:
        """Whether tensor ``name`` belongs to a ``modules_to_save`` module (matched as peft does)."""
        paths = [name[:i] for i, c in enumerate(name) if c == "."]
        return any(p.endswith(m) for p in paths for m in self.modules_to_save)


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override: the value of the first pattern matching the end of ``module``."""
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", module)), default)


def _settings(config: Mapping[str, Any], where: str) -> _Settings:
    """The merge settings of a LoRA config; anything else is refused with what to do instead."""
    kind = config.get("peft_type")
    if kind in PROMPT_METHODS:
        raise CheckpointError(
            f"{where}: a {kind} adapter adds virtual tokens, not weights: it has no merged model to store"
        )
    if kind != "LORA":
        raise CheckpointError(f"{where}: a {kind} adapter; only LoRA adapters are merged here: {MERGE_WITH_PEFT}")
    used = next((o for o in UNMERGEABLE_OPTIONS if config.get(o)), None)
    if used is not None:
        raise CheckpointError(f"{where}: the adapter uses {used}, which is not plain LoRA: {MERGE_WITH_PEFT}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0] in BASE_CHANGING_INITS:
        raise CheckpointError(
            f"{where}: init_lora_weights={init!r} rewrote the base weights: save the adapter with peft's "
            "path_initial_model_for_weight_conversion to make it plain LoRA, or pass the merged model"
        )

    def field(name: str, ok: Callable[[Any], bool], expect: str, default: Any) -> Any:
        value = config.get(name)
        value = default if value is None else value
        if not ok(value):
            raise CheckpointError(f"{where}: {name} is {value!r}, not {expect}")
        return value

    def pattern(name: str, ok: Callable[[Any], bool], expect: str) -> dict[str, Any]:
        value = field(name, lambda v: isinstance(v, dict), "a map", {})
        for p, v in value.items():
            try:
                re.compile(p)
            except (re.error, TypeError):
                raise CheckpointError(f"{where}: {name} key {p!r} is not a regular expression") from None
            if not ok(v):
                raise CheckpointError(f"{where}: {name}[{p!r}] is {v!r}, not {expect}")
        return value

    saved = field(
        "modules_to_save", lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v), "a list of names", []
    )
    return _Settings(
        r=field("r", _is_rank, "a positive integer", None),
        alpha=field("lora_alpha", _is_number, "a number", None),
        rslora=field("use_rslora", lambda v: isinstance(v, bool), "true or false", False),
        fan_in_fan_out=field("fan_in_fan_out", lambda v: isinstance(v, bool), "true or false", False),
        rank_pattern=pattern("rank_pattern", _is_rank, "a positive integer"),
        alpha_pattern=pattern("alpha_pattern", _is_number, "a number"),
        modules_to_save=tuple(saved),
    )


@dataclass(frozen=True)
class _Lora:
    """One module's factors: ``ΔW = B @ A`` (``transposed``: its transpose) times ``scale``."""

    a: str
    b: str
    scale: float
    transposed: bool


@dataclass(frozen=True)
class _Entry:
    """A tensor the adapter changes: where its rows come from, what it is, the update to add."""

    source: Checkpoint
    key: str
    info: TensorInfo
    lora: _Lora | None


def _clamp(info: TensorInfo, start: int, stop: int | None) -> tuple[int, int]:
    stop = info.rows if stop is None else max(0, min(stop, info.rows))
    return min(max(start, 0), stop), stop


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter's ``weights`` and ``config`` merged lazily into ``base`` (module doc).

    Closing it closes the adapter's files, never ``base``. ``key_report`` says how the adapter's
    names were mapped onto the base's.
    """

    def __init__(
        self,
        weights: Checkpoint,
        config: Mapping[str, Any],
        base: Checkpoint,
        *,
        where: str,
        rules: Sequence[PrefixRule] = (),
        config_file: ByteSource | None = None,
        merge_block_elems: int = MERGE_BLOCK_ELEMS,
    ) -> None:
        self.path = where
        self._weights = weights
        self._base = base
        self._config_file = config_file
        self._block_elems = merge_block_elems
        self._factor = functools.lru_cache(maxsize=FACTOR_CACHE)(weights.read)
        settings = _settings(config, f"{where}/{ADAPTER_CONFIG}")
        loras, targets, whole = self._parse(settings)
        infos = {n: weights.info(k) for n, k in whole.items()} | targets
        km = detect_prefix({k: base.info(k) for k in base.keys}, infos, rules)
        if km.report.ambiguous:
            raise CheckpointError(f"{where}: {km.report}")
        self.key_report = km.report
        self._entries: dict[str, _Entry] = {}
        for name, lora in loras.items():
            self._add(*self._merged(name, lora, targets[name], whole.get(name), km))
        for name, key in whole.items():
            if name not in loras:
                self._add(*self._replaced(name, key, settings, km))
        self.keys = list(base.keys) + [k for k in self._entries if k not in base]

    def _parse(self, settings: _Settings) -> tuple[dict[str, _Lora], dict[str, TensorInfo], dict[str, str]]:
        """The adapter's factors by target name, the targets' shapes, and its whole tensors by name."""
        factors: dict[str, dict[str, str]] = {}
        embedding: dict[str, bool] = {}
        whole: dict[str, str] = {}
        for key in self._weights.keys:
            if not key.startswith(PEFT_PREFIX):
                raise CheckpointError(f"{self.path}: tensor {key!r} is not a PEFT adapter key ({PEFT_PREFIX}…)")
            name = key[len(PEFT_PREFIX) :]
            suffix = next((s for s in FACTOR_SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                module = name[: -len(suffix)]
                role, emb = FACTOR_SUFFIXES[suffix]
                if embedding.setdefault(module, emb) != emb:
                    raise CheckpointError(f"{self.path}: {module} mixes linear and embedding LoRA factors")
                factors.setdefault(module, {})[role] = key
            elif LORA_PARTS.intersection(name.split(".")):
                raise CheckpointError(f"{self.path}: tensor {key!r} is not a plain LoRA factor: {MERGE_WITH_PEFT}")
            else:
                plain = ".".join(p for p in name.split(".") if p != "base_layer")
                if plain in whole:
                    raise CheckpointError(f"{self.path}: tensors {whole[plain]!r} and {key!r} are both {plain!r}")
                whole[plain] = key
        loras: dict[str, _Lora] = {}
        targets: dict[str, TensorInfo] = {}
        for module, pair in factors.items():
            if len(pair) < 2:
                raise CheckpointError(f"{self.path}: {module} has only one of its two LoRA factors")
            target = f"{module}.weight"
            loras[target], targets[target] = self._factors(module, pair["a"], pair["b"], embedding[module], settings)
        return loras, targets, whole

    def _factors(self, module: str, a_key: str, b_key: str, emb: bool, settings: _Settings) -> tuple[_Lora, TensorInfo]:
        """One module's factors checked against its rank, and the shape of the weight they update."""
        a, b = self._weights.info(a_key), self._weights.info(b_key)
        r, scale = settings.rank_and_scale(module)
        dims = len(a.shape)
        ok = (
            a.dtype.is_float and b.dtype.is_float
            and (dims == 2 if emb else dims >= 2) and len(b.shape) == dims
            and a.shape[0] == r and b.shape[1] == r and all(s == 1 for s in b.shape[2:])
        )
        if not ok:
            raise CheckpointError(
                f"{self.path}: the LoRA factors of {module} ({a.dtype.name} {list(a.shape)}, {b.dtype.name} "
                f"{list(b.shape)}) are not a rank-{r} pair (r in {ADAPTER_CONFIG}; grouped convolutions are not merged)"
            )
        transposed = emb or (settings.fan_in_fan_out and dims == 2)
        shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], *a.shape[1:])
        return _Lora(a_key, b_key, scale, transposed), TensorInfo(a.dtype, shape)

    def _base_name(self, name: str, km: KeyMap) -> str:
        """The base's name for adapter tensor ``name``: mapped, moved by the detected prefix, or as is."""
        if name in km.mapping:
            return km.mapping[name]
        moved = km.report.prefix.apply(name) if km.report.prefix else None
        return moved if moved is not None and moved in self._base else name

    def _merged(self, name: str, lora: _Lora, target: TensorInfo, saved: str | None, km: KeyMap) -> tuple[str, _Entry]:
        """The entry of a LoRA-updated weight: the saved tensor (a saved embedding) or the base's, plus ΔW."""
        out = self._base_name(name, km)
        if saved is None and out not in self._base:
            raise CheckpointError(
                f"{self.path}: {lora.a!r} updates {out!r}, which the base does not hold: is this the adapter's "
                "base? (otherwise map the names with OLD_PREFIX=NEW_PREFIX rules)"
            )
        source, key = (self._weights, saved) if saved is not None else (self._base, out)
        info = source.info(key)
        if info.shape != target.shape:
            raise CheckpointError(
                f"{self.path}: the LoRA update of {out!r} is {list(target.shape)} but the tensor is "
                f"{list(info.shape)}: the adapter was trained on another base"
            )
        if not info.dtype.is_float:
            raise CheckpointError(f"{self.path}: the LoRA update of {out!r} targets a {info.dtype.name} tensor")
        dtype = self._base.info(out).dtype if out in self._base else info.dtype
        return out, _Entry(source, key, TensorInfo(dtype, info.shape), lora)

    def _replaced(self, name: str, key: str, settings: _Settings, km: KeyMap) -> tuple[str, _Entry]:
        """The entry of a tensor the adapter saves whole: a base tensor it replaces, or a saved module's."""
        out = self._base_name(name, km)
        if out not in self._base and not settings.saves_whole(name):
            raise CheckpointError(
                f"{self.path}: tensor {key!r} matches no base tensor (tried {out!r}): is this the adapter's base? "
                "(otherwise map the names with OLD_PREFIX=NEW_PREFIX rules)"
            )
        info = self._weights.info(key)
        dtype = self._base.info(out).dtype if out in self._base else info.dtype
        return out, _Entry(self._weights, key, TensorInfo(dtype, info.shape), None)

    def _add(self, out: str, entry: _Entry) -> None:
        if out in self._entries:
            raise CheckpointError(
                f"{self.path}: two adapter tensors, {self._entries[out].key!r} and {entry.key!r}, give {out!r}"
            )
        self._entries[out] = entry

    def info(self, key: str) -> TensorInfo:
        entry = self._entries.get(key)
        return self._base.info(key) if entry is None else entry.info

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        entry = self._entries.get(key)
        if entry is None:
            return self._base.read(key, start, stop)
        start, stop = _clamp(entry.info, start, stop)
        rows = entry.source.read(entry.key, start, stop)
        if entry.lora is None or start == stop:
            return rows.to(entry.info.dtype.torch)
        delta = self._delta(entry, entry.lora, start, stop)
        return (rows.to(delta.dtype) + delta).to(entry.info.dtype.torch)

    def read_bytes(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        if key not in self._entries:
            return self._base.read_bytes(key, start, stop)
        return super().read_bytes(key, start, stop)

    def _delta(self, entry: _Entry, lora: _Lora, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``ΔW · scale``, computed block by block on the tensor's fixed grid."""
        info = entry.info
        per = max(1, self._block_elems // max(1, info.row_numel))
        first = start - start % per
        blocks = [self._delta_block(entry, lora, a, min(a + per, info.rows)) for a in range(first, stop, per)]
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks))[start - first : stop - first]

    def _delta_block(self, entry: _Entry, lora: _Lora, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``ΔW · scale``: ``B[rows] @ A``, or ``(B @ A[:, rows])ᵀ`` transposed."""
        compute = torch.promote_types(torch.float32, entry.info.dtype.torch)
        a = self._factor(lora.a).to(compute)
        if lora.transposed:
            b = self._factor(lora.b).to(compute)
            return (b @ a[:, start:stop]).T * lora.scale
        b = self._weights.read(lora.b, start, stop).to(compute)
        rows = b.reshape(stop - start, -1) @ a.reshape(a.shape[0], -1)
        return rows.reshape(stop - start, *entry.info.shape[1:]) * lora.scale

    @property
    def files(self) -> list[ByteSource]:
        """The adapter's weights and its config (the base is recorded as the base)."""
        return self._weights.files + ([self._config_file] if self._config_file is not None else [])

    @property
    def layout(self) -> WeightLayout:
        """The base's layout, the tensors only the adapter has counted in its last file: a merged
        model is laid out as the model it was merged into."""
        lay = self._base.layout
        *head, (name, count, meta) = lay.files
        extra = len(self.keys) - len(self._base.keys)
        return WeightLayout(lay.format, (*head, (name, count + extra, meta)), lay.index_metadata, lay.folder)

    def close(self) -> None:
        self._factor.cache_clear()
        self._weights.close()
        if self._config_file is not None:
            self._config_file.close()
