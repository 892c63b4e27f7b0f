"""Helpers shared by the benchmark modules: folders, sizes, timing, page-cache control, packing."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import platform
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import tallstore

from .synthetic import write_collection, write_sparse_collection

if TYPE_CHECKING:
    from .zoo import Zoo

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".cache" / "work"

LAM = 0.4  # the fixed λ of every archive unless a benchmark says otherwise
_PACKED: dict[str, dict[str, Any]] = {}
PACK_SECONDS: dict[str, float] = {}


def tree_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def files_under(path: Path) -> list[Path]:
    """Every file under ``path`` (or ``[path]`` for a file)."""
    if path.is_file():
        return [path]
    return [Path(d) / f for d, _, fs in os.walk(path) for f in fs]


def evict(paths: Iterable[Path]) -> None:
    """Drop the page-cache pages of these files (and of every file under a folder).

    Dirty pages are written first (``fsync``), then ``POSIX_FADV_DONTNEED`` drops the clean
    ones, so the next read comes from the disk. Other files' cached pages are untouched.
    """
    for p in paths:
        for f in files_under(Path(p)):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def entropy_bits(p: float) -> float:
    """Binary entropy H(p) in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


@dataclass(frozen=True)
class Collection:
    """A base checkpoint and its fine-tunes, as safetensors files."""

    tag: str  # short unique name, used in file names
    label: str  # what a table shows
    base: Path
    tasks: dict[str, Path]
    dtype: str
    params: int

    @property
    def raw_bytes(self) -> int:
        """Bytes of the T task checkpoints."""
        return sum(p.stat().st_size for p in self.tasks.values())


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def param_count(path: Path) -> int:
    """Number of parameters in a safetensors file."""
    return sum(math.prod(e["shape"]) for k, e in safetensors_header(path).items() if k != "__metadata__")


def synthetic(work: Path, params_m: float, n_tasks: int, dtype: torch.dtype) -> Collection:
    """A generated BERT-like collection (cached under ``work/inputs``)."""
    base, tasks = write_collection(work / "inputs", params_m, n_tasks, dtype)
    d = dtype_name(dtype)
    return Collection(f"syn{params_m:g}M-{d}-T{n_tasks}", f"synthetic {params_m:g}M {d}, T={n_tasks}",
                      base, tasks, d, param_count(base))


def synthetic_sparse(work: Path, hidden: int, n_layers: int, vocab: int, n_tasks: int, dtype: torch.dtype,
                     large: float = 0.08) -> Collection:
    """A generated ``bert_shaped`` collection whose task vectors have a fraction ``large`` of large
    entries (``synthetic.sparse_fine_tune``; cached under ``work/inputs``)."""
    base, tasks = write_sparse_collection(work / "inputs", hidden, n_layers, vocab, n_tasks, dtype, large)
    d = dtype_name(dtype)
    params = param_count(base)
    return Collection(f"sparse-h{hidden}-l{n_layers}-v{vocab}-{d}-T{n_tasks}",
                      f"sparse synthetic {params / 1e6:.0f}M (hidden {hidden}, {n_layers} layers, vocab {vocab}) "
                      f"{d}, T={n_tasks}", base, tasks, d, params)


def zoo_collection(quick: bool, tasks: list[str] | None = None) -> tuple[Collection, Zoo]:
    """The real MiniLM collection of ``benchmarks.zoo`` (built or reused from its cache)."""
    from .zoo import build_zoo  # imports transformers: only where the zoo is used

    zoo = build_zoo(tasks=tasks, quick=quick)
    tag = f"zoo{'-quick' if quick else ''}-T{len(zoo.tasks)}"
    label = f"real MiniLM zoo{' (quick)' if quick else ''} float32, T={len(zoo.tasks)}"
    return Collection(tag, label, zoo.base_path, dict(zoo.task_paths), "float32", param_count(zoo.base_path)), zoo


def archive(work: Path, coll: Collection, embed_base: bool = False, name: str = "", **options: Any) -> Path:
    """Pack ``coll`` (λ = ``LAM`` unless given) into ``work/archives`` once per process; reuse it after."""
    options.setdefault("lam", LAM)
    path = work / "archives" / f"{coll.tag}-{'emb' if embed_base else 'ext'}{'-' + name if name else ''}.tall"
    key = str(path)
    if key in _PACKED:
        if _PACKED[key] != options:
            raise ValueError(f"{path.name} was packed with {_PACKED[key]}, not {options}: give it another name")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tallstore.pack(path, base=coll.base, tasks=coll.tasks, embed_base=embed_base, overwrite=True, **options)
    PACK_SECONDS[key] = time.perf_counter() - t
    _PACKED[key] = dict(options)
    return path


@dataclass(frozen=True)
class Profile:
    """A weight codec profile of ``tallstore.storage.codecs.PRESETS``, as the benchmarks pack it, or
    (``shared_bits`` set) the quantized shared form ``tallstore.pack(..., shared_bits=k)``, or
    (``fidelity`` set) every task in a ``--fidelity`` preset's delta code, with the library's
    default codecs."""

    name: str  # the preset's name ("fast", "compact"), "q4" for a quantized form, "balanced" for a fidelity preset
    codecs: Any  # its ``tallstore.storage.codecs.Codecs``
    default: bool  # equal to the library's default ``Codecs()``, lossless shared form: packed with no options
    shared_bits: int | None = None  # the quantized shared form at this many bits (None: the lossless ``xor`` form)
    fidelity: str | None = None  # a ``--fidelity`` preset other than ``tall`` (None: TALL masks)

    @property
    def suffix(self) -> str:
        """What this profile's result keys end with: nothing for the default (keys keep their old names)."""
        return "" if self.default else f"_{self.name}"

    @property
    def quantized(self) -> bool:
        """Whether archives of this profile store τ_MTL quantized (form ``quantized``)."""
        return self.shared_bits is not None

    def archive(self, work: Path, coll: Collection, embed_base: bool = False) -> Path:
        """``coll`` packed with this profile's codecs (the default one under the unsuffixed archive name)."""
        if self.default:
            return archive(work, coll, embed_base=embed_base)
        if self.quantized:
            return archive(work, coll, embed_base=embed_base, name=self.name, shared_bits=self.shared_bits)
        if self.fidelity is not None:
            return archive(work, coll, embed_base=embed_base, name=self.name, fidelity=self.fidelity)
        return archive(work, coll, embed_base=embed_base, name=self.name, codecs=self.codecs)

    def record(self) -> dict[str, Any]:
        """JSON-ready: the codec settings, whether they are the default, the result keys' suffix, the
        form (``xor``, ``quantized`` with its bits, or ``delta`` with its fidelity preset)."""
        form = "quantized" if self.quantized else "delta" if self.fidelity else "xor"
        return {**dataclasses.asdict(self.codecs), "default": self.default, "suffix": self.suffix,
                "form": form, "shared_bits": self.shared_bits, "fidelity": self.fidelity}


def codec_profiles() -> list[Profile]:
    """Every codec preset, the library's default first (a "default" profile if no preset is it)."""
    from tallstore.storage.codecs import PRESETS, Codecs

    default = Codecs()
    profiles = [Profile(n, c, c == default) for n, c in PRESETS.items()]
    if not any(p.default for p in profiles):
        profiles.append(Profile("default", default, True))
    return sorted(profiles, key=lambda p: not p.default)


def quantized_profiles(bits: Iterable[int] = (4,)) -> list[Profile]:
    """The quantized shared form at each of ``bits`` (default codecs), named ``q<bits>``."""
    from tallstore.storage.codecs import Codecs

    return [Profile(f"q{b}", Codecs(), False, b) for b in bits]


def fidelity_profiles(presets: Iterable[str] = ("balanced",)) -> list[Profile]:
    """Every task in the delta code of each ``--fidelity`` preset (default codecs), named after it."""
    from tallstore.storage.codecs import Codecs

    return [Profile(f, Codecs(), False, fidelity=f) for f in presets]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).split(".")[-1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """The machine and software a run used."""
    import numpy
    import safetensors
    import zarr

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_ram_gib(), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "safetensors": safetensors.__version__,
        "tallstore": tallstore.__version__,
        "git": _git_commit(),
        "torch_threads": torch.get_num_threads(),
    }


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (how busy the machine was)."""
    return [round(x, 2) for x in os.getloadavg()]


@dataclass(frozen=True)
class Config:
    """What every benchmark module's ``run`` receives."""

    work: Path  # generated inputs (cached between runs) and archives
    quick: bool = False  # small smoke configuration
    zoo_tasks: list[str] | None = None  # a subset of the real zoo's tasks (default: all)


ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def main_dtype(path: Path) -> str:
    """The safetensors dtype code (``F32``, ``BF16``…) holding most of a file's bytes."""
    sizes: dict[str, int] = {}
    for k, e in safetensors_header(path).items():
        if k != "__metadata__":
            sizes[e["dtype"]] = sizes.get(e["dtype"], 0) + e["data_offsets"][1] - e["data_offsets"][0]
    return max(sizes, key=lambda d: sizes[d])


def zipnn_file(work: Path, src: Path) -> Path:
    """``src`` compressed whole by ZipNN (lossless) for its main dtype; cached under ``work/zipnn``."""
    from zipnn import ZipNN

    tag = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:10]
    dst = work / "zipnn" / f"{src.stem}-{tag}.znn"
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(src.read_bytes())  # ZipNN.compress modifies its input in place
    out = ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[main_dtype(src)]).compress(data)
    tmp = dst.with_suffix(".tmp")
    tmp.write_bytes(out)
    tmp.replace(dst)
    return dst


def zipnn_decompress(path: Path, dtype_code: str) -> bytearray:
    """The original bytes of a file written by ``zipnn_file``."""
    from zipnn import ZipNN

    return ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dtype_code]).decompress(path.read_bytes())


@functools.cache
def zstd_bytes(src: Path, level: int = 3) -> int:
    """Size of ``src`` compressed whole by zstd at ``level`` (numcodecs' libzstd); once per process."""
    from numcodecs import Zstd

    return len(Zstd(level=level).encode(src.read_bytes()))
