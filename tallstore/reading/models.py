"""Tasks back into ready models: transformers (any ``Auto*`` class), tokenizers, sentence-transformers.

A task packed from a model folder has its own ``config.json`` among its archived files. The model
is built from it with transformers' ``no_init_weights`` (no random initialisation: every weight is
overwritten by the rebuild anyway) and the task is rebuilt straight into its parameters. A key
prefix the model class adds or drops (a ``BertForSequenceClassification`` task loaded as a bare
``AutoModel``) is matched the way transformers matches it. Tokenizers and sentence-transformers
load from folders only: their files are written to a temporary folder, removed afterwards.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import TallstoreError

CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", CONFIG)


class Task(Protocol):
    """What building a model needs of a task (a :class:`~tallstore.TaskView`)."""

    name: str

    def __iter__(self) -> Any: ...

    @property
    def files(self) -> dict[str, int]: ...

    def read_file(self, path: str) -> bytes: ...

    def load_into(self, target: Any, *, strict: bool = True, dtype: torch.dtype | None = None) -> tuple[list[str], list[str]]: ...

    def save(self, out: str | Path, **kwargs: Any) -> Path: ...


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TallstoreError("building a model needs transformers: pip install 'tallstore[hf]'") from None
    return transformers


def _no_init_weights() -> Callable[[], Any]:
    """transformers' context that skips random initialisation (it moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights


def config_of(task: Task) -> dict[str, Any]:
    """The task's own ``config.json`` (packed from a model folder), as a dict."""
    if CONFIG not in task.files:
        raise TallstoreError(
            f"task {task.name!r} has no config.json: it was packed from a weights file, not a model folder, "
            "so there is no architecture to build (load its state_dict into a model you build yourself)"
        )
    try:
        return json.loads(task.read_file(CONFIG))
    except ValueError:
        raise TallstoreError(f"task {task.name!r}: its config.json is not valid JSON") from None


def _model_class(transformers: Any, config: dict[str, Any], model_class: str | type | None) -> Any:
    if model_class is None:
        names = config.get("architectures") or ["AutoModel"]
        model_class = names[0]
    if isinstance(model_class, str):
        try:
            return getattr(transformers, model_class)
        except AttributeError:
            raise TallstoreError(f"transformers has no model class {model_class!r}") from None
    return model_class


def load_pretrained(
    task: Task, model_class: str | type | None = None, *, dtype: torch.dtype | None = None, strict: bool = True,
) -> torch.nn.Module:
    """The task as a transformers model in eval mode, built from its archived config.

    ``model_class``: an ``Auto*`` class or a model class, by name or itself (default: the
    config's ``architectures[0]``); ``dtype`` casts the weights as they are rebuilt; ``strict``:
    every weight of the model must come from the task (tied weights aside).
    """
    transformers = _transformers()
    config_dict = config_of(task)
    cls = _model_class(transformers, config_dict, model_class)
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str):
        raise TallstoreError(f"task {task.name!r}: its config.json names no model_type")
    fields = {k: v for k, v in config_dict.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
        with _no_init_weights()():
            if hasattr(cls, "from_config"):
                model = cls.from_config(config, **({"torch_dtype": dtype} if dtype is not None else {}))
            else:
                model = cls(config)
    except (ValueError, KeyError, TypeError) as e:
        raise TallstoreError(f"task {task.name!r}: transformers cannot build {getattr(cls, '__name__', cls)} ({e})") from None
    if dtype is not None:
        model.to(dtype)
    targets = _targets(model, set(task))
    missing, unexpected = task.load_into(targets, strict=False, dtype=dtype)
    tied = set(_tied_keys(model))
    missing = [k for k in missing if k not in tied and k not in _non_persistent(model)]
    if strict and missing:
        raise TallstoreError(
            f"task {task.name!r} does not hold every weight of {type(model).__name__}: missing "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} (pass strict=False, or another model class)"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _targets(model: torch.nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    """The model's tensors under the task's names: the base-model prefix kept, added or dropped,
    whichever names more of the task's tensors (transformers' rule for loading a head model's
    checkpoint into a bare model and back)."""
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    names: list[Callable[[str], str]] = [lambda k: k]
    if prefix:
        names += [lambda k: f"{prefix}.{k}", lambda k: k[len(prefix) + 1 :] if k.startswith(prefix + ".") else k]
    best = max(names, key=lambda f: sum(f(k) in keys for k in own))
    return {best(k): v for k, v in own.items()}


def _tied_keys(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, "_tied_weights_keys", None) or [])


def _non_persistent(model: torch.nn.Module) -> set[str]:
    """Buffers a model makes itself and never saves (``position_ids``…): never the task's to give."""
    out = set()
    for name, module in model.named_modules():
        for buf in getattr(module, "_non_persistent_buffers_set", ()):
            out.add(f"{name}.{buf}" if name else buf)
    return out


@contextmanager
def _folder(task: Task, names: tuple[str, ...] | None = None) -> Any:
    """A temporary folder holding the task's archived files (``names`` only, if given)."""
    with tempfile.TemporaryDirectory(prefix="tallstore-") as tmp:
        root = Path(tmp)
        for path in task.files:
            if names is None or path in names:
                target = root.joinpath(*path.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(task.read_file(path))
        yield root


def load_tokenizer(task: Task, **kwargs: Any) -> Any:
    """The task's tokenizer (``AutoTokenizer``) from its archived tokenizer files."""
    transformers = _transformers()
    if not any(name in task.files for name in TOKENIZER_FILES if name != CONFIG):
        raise TallstoreError(f"task {task.name!r} has no archived tokenizer files")
    with _folder(task, TOKENIZER_FILES) as folder:
        return transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)


def load_sentence_transformer(task: Task, **kwargs: Any) -> Any:
    """The task as a ``SentenceTransformer`` (for a task packed from a sentence-transformers
    folder: ``modules.json`` and its modules' files). sentence-transformers loads from a folder
    only, so the whole task is extracted to a temporary one first."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise TallstoreError("this needs sentence-transformers: pip install 'tallstore[hf]'") from None
    if "modules.json" not in task.files:
        raise TallstoreError(f"task {task.name!r} was not packed from a sentence-transformers folder (no modules.json)")
    with tempfile.TemporaryDirectory(prefix="tallstore-") as tmp:
        folder = task.save(Path(tmp) / "model")
        return SentenceTransformer(str(folder), **{"device": "cpu", **kwargs})
