"""Bit-flip campaign: damage one stored file of a small archive per trial, run every reading command.

``python -m benchmarks.bench_bitflips [--trials N] [--seed S] [--workers W]``

Each trial, drawn from ``--seed`` alone (so a trial is the same whichever worker runs it), picks
one of four small format-v2 archives (base embedded; base external; the 4-bit shared form with
entropy-coded masks; delta-coded tasks, ``--fidelity balanced``), one of its stored files (chunks
and metadata documents alike; for an archive with an external base, now and then the base file it
reads) and damages it: one random bit flipped (most trials), the file truncated, or deleted.
Then it runs every reading command and classifies each outcome against the intact archive's:

- **detected**: a clear one-line error (the CLI exits 2 with one ``error:`` line; the API raises a
  one-line ``TallstoreError``), or ``verify`` reports a problem;
- **harmless**: the output is bit for bit the intact archive's (``verify``: it reports nothing and
  the damage left the file's meaning unchanged, e.g. a JSON document that parses to the same value);
- **silent**: success with another output, or ``verify`` reporting nothing on a meaningful
  change: a defect;
- **traceback**: a Python traceback or the CLI's "internal error" line, an exception of another
  type through the API, a multi-line error, or a command still running after ``TIMEOUT`` s: a defect.

Commands: ``load`` (``arc[task].state_dict()`` of every task, in-process API), ``extract`` (CLI,
one task drawn per trial), ``merge`` (CLI, consensus), ``stats`` (CLI, ``--json``), ``verify`` and
``verify --deep`` (CLI). The CLI runs in-process through its real entry point (it is a Typer app
that catches everything at one boundary), so each trial costs milliseconds, not a Python start;
damage to the external base is outside what shallow ``verify`` reads and is not counted for it.

Results go to ``benchmarks/results/bitflips.json`` (``{"meta", "results"}`` like every module's)
and a section "Bit-flip campaign" of ``benchmarks/RESULTS.md``; :func:`section` renders it from
the results, with the signature of ``report.SECTIONS``, and :func:`run` is the module's entry for
``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tallstore
from tallstore.cli import main as cli_main
from tallstore.errors import TallstoreError

from .common import HERE, RESULTS, Config, load_average, machine, now

NAME = "bitflips"
COMMANDS = ("load", "extract", "merge", "stats", "verify", "verify --deep")
OUTCOMES = ("detected", "harmless", "silent", "traceback")
DEFECTS = ("silent", "traceback")
FIXTURE_OPTIONS: dict[str, dict[str, Any]] = {  # each archive's pack options
    "embedded": {"embed_base": True},
    "external": {},
    "quantized": {"embed_base": True, "shared_bits": 4},  # shared codes and entropy-coded mask streams
    "delta": {"fidelity": "balanced"},  # delta-coded tasks: segment streams, base external
}
FIXTURES = tuple(FIXTURE_OPTIONS)
EXTERNAL = ("external", "delta")  # packed against a base file beside the archive
NO_MERGE = ("delta",)  # delta tasks have no masks: merge is refused by design, so it is not run
TASKS = ("t0", "t1", "t2")
BLOCK_ELEMS = 64
TIMEOUT = 120
TRIALS = 1600
QUICK_TRIALS = 100
WORKERS = 2
BASE_SHARE = 0.1  # of the external archive's trials, those that damage its base file
OPS = {"flip": 0.85, "truncate": 0.10, "delete": 0.05}  # how often each damage is drawn
TITLE = "Bit-flip campaign"


# ── the archives ──────────────────────────────────────────────────────────────────────────────


def write_collection(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A small model (fp32 and bf16 matrices, an fp16 norm, an int buffer, a scalar) and three
    fine-tunes, each with its own head: every kind of tensor an archive stores, in several chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(48, 16, generator=g),
        "layer.0.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(32, generator=g),
        "norm.weight": torch.ones(16, dtype=torch.float16),
        "position_ids": torch.arange(12),
        "scale": torch.tensor(0.5),
    }
    save_file(base, folder / "base.safetensors")
    tasks = {}
    for i, name in enumerate(TASKS):
        sd = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
              for k, v in base.items()}
        sd["head.weight"] = torch.randn(3, 16, generator=g)
        tasks[name] = folder / f"{name}.safetensors"
        save_file(sd, tasks[name])
    return folder / "base.safetensors", tasks


def build(root: Path) -> dict[str, Path]:
    """The pristine archives (``root/<fixture>/arc``), each with the base beside it."""
    base, tasks = write_collection(root / "inputs")
    out = {}
    for fixture in FIXTURES:
        folder = root / fixture
        folder.mkdir()
        shutil.copy(base, folder / "base.safetensors")
        tallstore.pack(folder / "arc", folder / "base.safetensors", tasks, block_elems=BLOCK_ELEMS,
                       **FIXTURE_OPTIONS[fixture])
        out[fixture] = folder
    return out


# ── running one command ───────────────────────────────────────────────────────────────────────


@dataclass
class Run:
    """What one command did: ``ok`` (with a digest of its output), ``error`` (one clear line) or ``defect``."""

    status: str
    output: str = ""
    detail: str = ""


def run_cli(*args: object) -> tuple[int, str, str]:
    """``tallstore ARGS`` through the real entry point, in this process → (exit code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["tallstore", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def cli_run(args: list[str], output: Path | None = None) -> Run:
    """A CLI command as a :class:`Run`; a success digests ``output`` (a written file) or stdout."""
    code, out, err = run_cli(*args)
    lines = err.splitlines()
    if code == 0:
        return Run("ok", file_digest(output) if output is not None else out)
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err:
        return Run("error", detail=lines[0][:300])
    return Run("defect", detail=err[-600:])


def digest(sd: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors' names (in order), dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(json.dumps([k, str(v.dtype), list(v.shape)]).encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """The tensors and metadata of a written safetensors file."""
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open handle, not a dict
        meta = f.metadata()
    return digest(sd) + json.dumps(meta, sort_keys=True)


def load(location: Path, base: Path | None) -> Run:
    """Every task's ``state_dict()`` through the API."""
    try:
        archive = tallstore.open(location, base=base)
        try:
            return Run("ok", "".join(digest(archive[name].state_dict()) for name in archive))
        finally:
            archive.close()
    except TallstoreError as e:
        return Run("error", detail=str(e)[:300]) if "\n" not in str(e) else Run("defect", detail=str(e)[:600])
    except Exception as e:  # noqa: BLE001 - an exception of another type through the API is the defect measured
        return Run("defect", detail=f"{type(e).__name__}: {e}"[:600])


def run_all(fixture: str, folder: Path, scratch: Path, task: str) -> dict[str, Run]:
    """Every command of ``COMMANDS`` on the archive ``folder/arc`` (``extract``: of ``task``), with
    the base ``folder/base.safetensors`` for the external fixture (not the one it was packed from)."""
    location = str(folder / "arc")
    base = folder / "base.safetensors" if fixture in EXTERNAL else None
    opt = ["--base", str(base)] if base is not None else []
    extracted, merged = scratch / "extract.safetensors", scratch / "merge.safetensors"
    runs = {
        "load": load(folder / "arc", base),
        "extract": cli_run(["extract", location, task, "-o", str(extracted), "--force", "-q", *opt], extracted),
        "stats": cli_run(["stats", location, "--json", *opt]),
        "verify": cli_run(["verify", location, "-q", *opt]),
        "verify --deep": cli_run(["verify", location, "--deep", "-q", *opt]),
    }
    if fixture not in NO_MERGE:
        runs["merge"] = cli_run(["merge", location, "-o", str(merged), "--force", "-q", *opt], merged)
    return runs


# ── damage ────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Trial:
    """One trial's damage: ``fixture``, ``file`` (relative to the fixture's folder), ``op``
    (``flip``, ``truncate``, ``delete``), ``offset`` and ``bit``, and the task extracted."""

    index: int
    fixture: str
    file: str
    op: str
    offset: int
    bit: int
    task: str


def kind_of(file: str) -> str:
    """``chunk``, ``metadata`` (a ``zarr.json``), ``manifest copy`` or ``base file``."""
    if file == "base.safetensors":
        return "base file"
    if file.startswith("arc/meta/manifest/c/"):
        return "manifest copy"
    return "metadata" if file.endswith("zarr.json") else "chunk"


def draw(index: int, seed: int, files: dict[str, list[tuple[str, int]]]) -> Trial:
    """Trial ``index`` of the campaign ``seed`` (a function of both alone) over the stored files
    ``files[fixture]`` (``(path, size)``, the external base last)."""
    rng = random.Random(f"{seed}:{index}")
    fixture = FIXTURES[index % len(FIXTURES)]
    *stored, base = files[fixture] if fixture in EXTERNAL else [*files[fixture], None]
    name, size = base if base is not None and rng.random() < BASE_SHARE else rng.choice(stored)
    (op,) = rng.choices(list(OPS), weights=list(OPS.values()))
    offset = rng.randrange(size) if op != "delete" else 0
    return Trial(index, fixture, name, op, offset, rng.randrange(8), rng.choice(TASKS))


@contextlib.contextmanager
def damaged(folder: Path, t: Trial) -> Iterator[bool]:
    """Apply ``t``'s damage for the ``with`` block; yield whether it left the file's meaning
    unchanged (a JSON document that still parses to the same value)."""
    path = folder / t.file
    original = path.read_bytes()
    if t.op == "delete":
        path.unlink()
        data = None
    elif t.op == "truncate":
        data = original[: t.offset]
    else:
        buf = bytearray(original)
        buf[t.offset] ^= 1 << t.bit
        data = bytes(buf)
    if data is not None:
        path.write_bytes(data)
    try:
        yield data is not None and path.name == "zarr.json" and same_json(original, data)
    finally:
        path.write_bytes(original)


def same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def classify(command: str, run: Run, reference: Run, inert: bool) -> str:
    if run.status == "defect":
        return "traceback"
    if command.startswith("verify"):
        if run.status == "error":
            return "detected"
        return "harmless" if inert else "silent"
    if run.status == "error":
        return "detected"
    return "harmless" if run.output == reference.output else "silent"


# ── workers ───────────────────────────────────────────────────────────────────────────────────

_STATE: dict[str, Any] = {}


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout


def _init(pristine: dict[str, str], scratch: str) -> None:
    """A worker: a private copy of each archive (under ``scratch``) and the commands' outputs on it intact."""
    root = Path(tempfile.mkdtemp(prefix="worker-", dir=scratch))
    folders, references = {}, {}
    for fixture, src in pristine.items():
        folders[fixture] = Path(shutil.copytree(src, root / fixture))
        for task in TASKS:
            refs = run_all(fixture, folders[fixture], root, task)
            assert all(r.status == "ok" for r in refs.values()), refs
            references[fixture, task] = refs
    signal.signal(signal.SIGALRM, _alarm)
    _STATE.update(root=root, folders=folders, references=references)


def _trial(t: Trial) -> tuple[Trial, dict[str, str], dict[str, str]]:
    """Damage, run every command, classify: ``(trial, outcome per command, detail per defect)``."""
    folder = _STATE["folders"][t.fixture]
    reference = _STATE["references"][t.fixture, t.task]
    signal.alarm(TIMEOUT)
    try:
        with damaged(folder, t) as inert:
            runs = run_all(t.fixture, folder, _STATE["root"], t.task)
    except Timeout:
        return t, {c: "traceback" for c in reference}, {c: f"still running after {TIMEOUT} s" for c in reference}
    finally:
        signal.alarm(0)
    outcomes = {c: classify(c, runs[c], reference[c], inert) for c in COMMANDS if c in runs}
    if kind_of(t.file) == "base file":  # shallow verify does not read the base (by design)
        del outcomes["verify"]
    details = {c: runs[c].detail or "success with another output" for c, o in outcomes.items() if o in DEFECTS}
    return t, outcomes, details


# ── the campaign ──────────────────────────────────────────────────────────────────────────────


def campaign(trials: int, seed: int, workers: int) -> dict[str, Any]:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bitflips-pristine-") as tmp:
        pristine = build(Path(tmp))
        files = {f: sorted((str(p.relative_to(folder)), p.stat().st_size) for p in (folder / "arc").rglob("*") if p.is_file())
                 for f, folder in pristine.items()}
        for f in EXTERNAL:
            files[f].append(("base.safetensors", (pristine[f] / "base.safetensors").stat().st_size))
        plan = [draw(i, seed, files) for i in range(trials)]
        table = {c: dict.fromkeys(OUTCOMES, 0) for c in COMMANDS}
        by_kind: dict[str, dict[str, dict[str, int]]] = {}
        defects = []
        ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its threads
        with ctx.Pool(workers, initializer=_init, initargs=({k: str(v) for k, v in pristine.items()}, tmp)) as pool:
            for done, (t, outcomes, details) in enumerate(pool.imap_unordered(_trial, plan, chunksize=4), 1):
                kind = by_kind.setdefault(kind_of(t.file), {c: dict.fromkeys(OUTCOMES, 0) for c in COMMANDS})
                for command, outcome in outcomes.items():
                    table[command][outcome] += 1
                    kind[command][outcome] += 1
                    if outcome in DEFECTS:
                        defects.append({**asdict(t), "command": command, "outcome": outcome, "detail": details[command]})
                if done % 100 == 0:
                    print(f"{done}/{trials} trials, {len(defects)} defects", file=sys.stderr, flush=True)
    return {
        "generated": now(), "seconds": round(time.monotonic() - start, 1),
        "config": {"trials": trials, "seed": seed, "workers": workers, "block_elems": BLOCK_ELEMS, "fixtures": list(FIXTURES),
                   "files": {f: len(v) for f, v in files.items()}, "ops": OPS, "base_share": BASE_SHARE},
        "table": table, "by_kind": by_kind, "defects": sorted(defects, key=lambda d: (d["index"], d["command"])),
    }


def run(cfg: Config) -> dict[str, Any]:
    """The campaign as a module of ``benchmarks.run`` (``--quick``: ``QUICK_TRIALS`` trials)."""
    return campaign(QUICK_TRIALS if cfg.quick else TRIALS, 0, WORKERS)


def section(r: dict[str, Any], out: Path | None = None, doc: Path | None = None) -> str:
    """The body of the "Bit-flip campaign" section of RESULTS.md, from the campaign's results
    (``out`` and ``doc``, where ``report.py`` puts plots, are not used: it has none)."""
    c = r["config"]
    rows = ["| command | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|"]
    rows += [f"| {cmd} | " + " | ".join(str(r["table"][cmd][o]) for o in OUTCOMES) + " |" for cmd in COMMANDS]
    kinds = ["| damaged file | trials | detected | harmless | defects |", "|---|---|---|---|---|"]
    for kind, t in sorted(r["by_kind"].items()):
        n = sum(t["load"].values())  # every trial loads
        total = {o: sum(t[cmd][o] for cmd in COMMANDS) for o in OUTCOMES}
        kinds.append(f"| {kind} | {n} | {total['detected']} | {total['harmless']} | {total['silent'] + total['traceback']} |")
    defects = len(r["defects"])
    intro = (
        f"`benchmarks/bench_bitflips.py`, seed {c['seed']}: {c['trials']} trials over {len(c['fixtures'])} small "
        "format-v2 archives (" + ", ".join(
            f"{f}: {c['files'][f] - (f in EXTERNAL)} stored files" for f in c["fixtures"]) + "; "
        f"`block_elems` {c['block_elems']}), each damaging one stored file ({c['ops']['flip']:.0%} one bit flipped, "
        f"{c['ops']['truncate']:.0%} truncated, {c['ops']['delete']:.0%} deleted; an external base file in "
        f"{c['base_share']:.0%} of its archive's trials) and running every command (merge: not on the delta archive, "
        "whose tasks have no masks to merge). *detected*: a one-line error or a problem "
        "reported by `verify`; *harmless*: bit for bit the intact archive's output; *silent* and *traceback* are "
        "defects. Shallow `verify` does not read an external base, so base-file trials are not counted for it. "
        f"Generated {r['generated']} in {r['seconds'] / 60:.1f} min."
    )
    closing = f"{defects} defect{'s' * (defects != 1)}" + (
        ": see `defects` in `benchmarks/results/bitflips.json`." if defects else ".")
    return "\n".join([intro, "", *rows, "", *kinds, "", closing])


def write_section(body: str, path: Path) -> None:
    """Replace (or append) the campaign's section of ``path`` (numbered or not), keeping every other section."""
    doc = path.read_text() if path.exists() else ""
    heading = re.search(rf"^## (\d+\. )?{TITLE}$", doc, re.MULTILINE)
    text = f"{heading.group(0) if heading else '## ' + TITLE}\n\n{body}\n"
    if heading is None:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", heading.end())
        doc = doc[: heading.start()] + text + (doc[end:] if end >= 0 else "")
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args()
    meta = {"module": NAME, "command": " ".join(["python -m benchmarks.bench_bitflips", *sys.argv[1:]]), "quick": False,
            "started": now(), "load_average_before": load_average(), "machine": machine()}
    t = time.perf_counter()
    r = campaign(args.trials, args.seed, args.workers)
    meta |= {"seconds": time.perf_counter() - t, "finished": now(), "load_average_after": load_average()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps({"meta": meta, "results": r}, indent=1) + "\n")
    body = section(r)
    write_section(body, HERE / "RESULTS.md")
    print(body)


if __name__ == "__main__":
    main()
