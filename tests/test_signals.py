"""SIGINT and SIGTERM: a command ends with 128 + the signal number, one line, and nothing left behind.

Signals go to real processes: children forked by ``crash_driver.py`` and paused at a named stage
(so the signal lands mid-pack, mid-extract or mid-verify deterministically), and the installed
console script, signalled while it imports torch or while its worker threads pack.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from crash_driver import Driver
from reliability_helpers import read_all, same_bits, tiny_collection
from safetensors.torch import save_file

import tallstore

CONSOLE = Path(sys.executable).with_name("tallstore")
INT, TERM = signal.SIGINT, signal.SIGTERM


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], Path]:
    """A tiny collection and an archive of it."""
    root = tmp_path_factory.mktemp("signals")
    base, tasks = tiny_collection(root / "in", n_tasks=3)
    tallstore.pack(root / "arc", base, tasks)
    return base, tasks, root / "arc"


def pack_argv(target: Path, base: Path, tasks: dict[str, Path]) -> list[object]:
    return ["pack", target, "--base", base, *[a for n, p in tasks.items() for a in ("--task", f"{n}={p}")], "-q"]


def interrupted(driver: Driver, argv: list[object], point: str, sig: int, log: Path) -> tuple[int, str, str]:
    """Run ``argv`` in a forked child, send ``sig`` once it is at ``point`` → (exit code, stdout, stderr)."""
    driver.start(argv, pause=point, output=log)
    code = driver.kill_at(point, sig)
    return code, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def line(command: str, sig: int) -> str:
    return f"error: tallstore {command} interrupted by {signal.Signals(sig).name}; nothing was published\n"


@pytest.mark.parametrize(("point", "sig"), [("temp-created", INT), ("absorbing", INT), ("absorbing", TERM), ("before-publish", TERM)])
def test_an_interrupted_pack_exits_128_plus_the_signal_with_one_line_and_leaves_nothing(
    driver: Driver, inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path, point: str, sig: int,
) -> None:
    base, tasks, _ = inputs
    (tmp_path / "out").mkdir()
    code, out, err = interrupted(driver, pack_argv(tmp_path / "out" / "arc", base, tasks), point, sig, tmp_path / "log")
    assert (code, out, err) == (128 + sig, "", line("pack", sig))
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("sig", [INT, TERM])
@pytest.mark.parametrize("layout", ["x.safetensors", "folder"])
def test_an_interrupted_extract_exits_128_plus_the_signal_with_one_line_and_leaves_nothing(
    driver: Driver, inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path, layout: str, sig: int,
) -> None:
    (tmp_path / "out").mkdir()
    argv: list[object] = ["extract", inputs[2], "t1", "-o", tmp_path / "out" / layout]
    code, out, err = interrupted(driver, argv, "output-half-written", sig, tmp_path / "log")
    assert (code, out, err) == (128 + sig, "", line("extract", sig))
    assert os.listdir(tmp_path / "out") == []


def test_an_interrupted_deep_verify_exits_130_without_a_report(
    driver: Driver, inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path,
) -> None:
    code, out, err = interrupted(driver, ["verify", inputs[2], "--deep"], "verify-rebuilding", INT, tmp_path / "log")
    assert (code, out, err) == (130, "", line("verify", INT))


def test_a_second_signal_while_cleaning_up_ends_at_once_and_the_next_run_sweeps_what_is_left(
    driver: Driver, inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path,
) -> None:
    base, tasks, archive = inputs
    argv = pack_argv(tmp_path / "arc", base, tasks)
    driver.start(argv, pause=["absorbing", "cleaning-up"], output=tmp_path / "log")
    assert driver.line() == "AT absorbing"
    driver.send(INT)
    code = driver.kill_at("cleaning-up", TERM)
    err = (tmp_path / "log.err").read_text()
    assert (code, err) == (143, "error: tallstore pack interrupted by SIGTERM again: stopped without cleaning up\n")
    assert len(list(tmp_path.glob(".arc.*.packing"))) == 1
    assert driver.run(argv) == 0 and same_archive(tmp_path / "arc", archive)
    assert list(tmp_path.glob(".arc.*.packing")) == []


def test_an_interrupted_forced_repack_puts_the_archive_it_was_replacing_back(
    driver: Driver, inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path,
) -> None:
    base, tasks, archive = inputs
    target = tmp_path / "arc"
    shutil.copytree(archive, target)
    argv = [*pack_argv(target, base, tasks), "--force", "--lam", "0.2"]
    code, _, err = interrupted(driver, argv, "mid-replace", TERM, tmp_path / "log")
    assert (code, err) == (143, line("pack", TERM))
    assert same_archive(target, archive) and sorted(os.listdir(tmp_path)) == ["arc", "log.err", "log.out"]


def test_an_interrupt_after_publishing_says_what_was_published(
    driver: Driver, inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path,
) -> None:
    base, tasks, archive = inputs
    target = tmp_path / "arc"
    code, _, err = interrupted(driver, pack_argv(target, base, tasks), "published", INT, tmp_path / "log")
    assert (code, err) == (130, f"error: tallstore pack interrupted by SIGINT after publishing {target}\n")
    assert same_archive(target, archive)


def same_archive(a: Path, b: Path) -> bool:
    got, want = read_all(a), read_all(b)
    return list(got) == list(want) and all(same_bits(got[n], want[n]) for n in want)


def signal_when(proc: subprocess.Popen[str], ready: Callable[[], bool], sig: int) -> tuple[int, str]:
    """Send ``sig`` to ``proc`` as soon as ``ready()`` → (exit code, stderr)."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, f"exited before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "never got ready"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def console(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([str(CONSOLE), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [INT, TERM])
def test_an_interrupt_while_the_console_script_imports_torch_exits_cleanly(
    inputs: tuple[Path, dict[str, Path], Path], tmp_path: Path, sig: int,
) -> None:
    base, tasks, _ = inputs
    proc = console(*pack_argv(tmp_path / "arc", base, tasks))

    def importing_torch() -> bool:
        return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()

    assert signal_when(proc, importing_torch, sig) == (128 + sig, line("pack", sig))
    assert os.listdir(tmp_path) == []


def test_an_interrupted_console_pack_joins_its_worker_threads_quietly(tmp_path: Path) -> None:
    """Real units on real threads when the signal lands: no "Exception ignored", no traceback."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(1024, 512, generator=g) for i in range(8)}
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for t in range(3):
        tasks[f"t{t}"] = tmp_path / f"t{t}.safetensors"
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tasks[f"t{t}"])
    out = tmp_path / "out"
    out.mkdir()
    proc = console(*pack_argv(out / "arc", tmp_path / "base.safetensors", tasks))

    def packing() -> bool:
        return any((p / "arc" / "tensors").exists() for p in out.glob(".arc.*.packing"))

    assert signal_when(proc, packing, INT) == (130, line("pack", INT))
    assert os.listdir(out) == []
