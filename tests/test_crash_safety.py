"""Crash safety: ``pack``, ``extract`` and ``merge`` killed by SIGKILL never publish a partial result.

A driver process (``crash_driver.py``) imports tallstore once and forks each command, so killing
at a dozen points costs one interpreter start. Kills land at named stages (temporary folder made,
units running, before and after the completeness marker, just before the rename, between the
two renames of ``--force``, half-way through an output file) and at fractions of a measured
run. Afterwards the final path is absent or a complete, correct result, and re-running succeeds
and removes the hidden folder the killed run left, but never that of a run still going.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from crash_driver import Driver
from reliability_helpers import read_all, same_bits, tiny_collection
from safetensors.torch import load_file

import tallstore
from tallstore.errors import ArchiveError


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, dict]]:  # type: ignore[type-arg]
    """A tiny collection and what a complete, uninterrupted pack of it rebuilds."""
    root = tmp_path_factory.mktemp("crash")
    base, tasks = tiny_collection(root / "in", n_tasks=3)
    tallstore.pack(root / "reference", base, tasks)
    return base, tasks, read_all(root / "reference")


def pack_argv(target: Path, base: Path, tasks: dict[str, Path], *extra: object) -> list[object]:
    return ["pack", target, "--base", base, *[a for n, p in tasks.items() for a in ("--task", f"{n}={p}")], "-q", *extra]


def assert_nothing_partial(target: Path, reference: dict) -> bool:  # type: ignore[type-arg]
    """The target is absent (False), or a complete archive rebuilding ``reference`` (True)."""
    if not target.exists():
        with pytest.raises(ArchiveError):
            tallstore.open(target)
        return False
    got = read_all(target)
    assert list(got) == list(reference) and all(same_bits(got[n], reference[n]) for n in got)
    return True


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def leftovers(folder: Path, suffix: str) -> list[Path]:
    """The hidden folders a writer builds its output in (``.NAME.<random><suffix>``)."""
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(suffix))


@pytest.mark.parametrize("point", ["temp-created", "units-running", "before-marker", "marker-written", "before-publish"])
def test_pack_killed_at_each_stage_publishes_nothing_and_rerun_succeeds(
    driver: Driver, inputs: tuple, tmp_path: Path, point: str,  # type: ignore[type-arg]
) -> None:
    base, tasks, reference = inputs
    target = tmp_path / "arc"
    argv = pack_argv(target, base, tasks)
    driver.start(argv, pause=point)
    driver.kill_at(point)
    assert not assert_nothing_partial(target, reference)
    assert visible(tmp_path) == [] and len(leftovers(tmp_path, ".packing")) == 1
    assert driver.run(argv) == 0
    assert assert_nothing_partial(target, reference) and visible(tmp_path) == ["arc"]
    assert leftovers(tmp_path, ".packing") == []


def test_a_pack_never_removes_the_hidden_folder_of_a_pack_still_running(
    driver: Driver, inputs: tuple, tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    base, tasks, reference = inputs
    target = tmp_path / "arc"
    argv = pack_argv(target, base, tasks)
    driver.start(argv, pause="units-running")
    assert driver.line() == "AT units-running"
    (running,) = leftovers(tmp_path, ".packing")
    tallstore.pack(target, base, tasks)
    assert leftovers(tmp_path, ".packing") == [running] and (running / "arc" / "zarr.json").exists()
    driver.kill()
    assert driver.run([*argv, "--force"]) == 0 and assert_nothing_partial(target, reference)
    assert leftovers(tmp_path, ".packing") == []


def test_pack_killed_at_random_moments_never_leaves_a_partial_archive(
    driver: Driver, inputs: tuple, tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    base, tasks, reference = inputs
    started = time.monotonic()
    assert driver.run(pack_argv(tmp_path / "timed", base, tasks)) == 0
    duration = time.monotonic() - started
    published = 0
    for i, fraction in enumerate([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.1]):
        target = tmp_path / f"arc{i}"
        argv = pack_argv(target, base, tasks)
        driver.start(argv)
        time.sleep(fraction * duration)
        driver.kill()
        if assert_nothing_partial(target, reference):
            published += 1
        else:
            assert driver.run(argv) == 0 and assert_nothing_partial(target, reference)
    assert published < 8


def packed_before(inputs: tuple, tmp_path: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    """An archive already at ``tmp_path/arc`` (λ 0.2, unlike the repack) and its rebuilt tensors."""
    base, tasks, _ = inputs
    target = tmp_path / "arc"
    tallstore.pack(target, base, tasks, lam=0.2)
    return target, read_all(target)


def killed_forced_repack(driver: Driver, argv: list, point: str) -> None:  # type: ignore[type-arg]
    """Start ``pack --force`` and kill it at ``point``."""
    driver.start(argv, pause=point)
    driver.kill_at(point)


def test_forced_repack_killed_between_renames_keeps_the_old_archive_whole(
    driver: Driver, inputs: tuple, tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    base, tasks, reference = inputs
    target, old = packed_before(inputs, tmp_path)
    argv = pack_argv(target, base, tasks, "--force")
    killed_forced_repack(driver, argv, "mid-replace")
    assert not assert_nothing_partial(target, reference)
    (kept,) = [p / "arc" for p in tmp_path.iterdir() if p.name.endswith(".old")]
    got = read_all(kept)
    assert all(same_bits(got[n], old[n]) for n in old)
    assert driver.run(argv) == 0 and assert_nothing_partial(target, reference)


def test_forced_repack_killed_before_publishing_leaves_the_old_archive_in_place(
    driver: Driver, inputs: tuple, tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    base, tasks, _ = inputs
    target, old = packed_before(inputs, tmp_path)
    killed_forced_repack(driver, pack_argv(target, base, tasks, "--force"), "before-publish")
    got = read_all(target)
    assert all(same_bits(got[n], old[n]) for n in old)


@pytest.mark.parametrize("point", ["output-half-written", "before-publish"])
@pytest.mark.parametrize("layout", ["x.safetensors", "folder"])
def test_extract_killed_never_leaves_a_file_under_its_final_name(
    driver: Driver, inputs: tuple, tmp_path: Path, point: str, layout: str,  # type: ignore[type-arg]
) -> None:
    base, tasks, reference = inputs
    archive = tmp_path / "arc"
    tallstore.pack(archive, base, tasks)
    out = tmp_path / "out" / layout
    argv = ["extract", archive, "t1", "-o", out]
    driver.start(argv, pause=point)
    driver.kill_at(point)
    assert not out.exists() and len(leftovers(out.parent, ".tmp")) == 1
    assert driver.run(argv) == 0
    got = load_file(out) if layout.endswith(".safetensors") else load_file(out / "model.safetensors")
    assert same_bits(got, reference["t1"])
    assert leftovers(out.parent, ".tmp") == []


def test_merge_killed_half_way_never_leaves_a_file_under_its_final_name(
    driver: Driver, inputs: tuple, tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    base, tasks, _ = inputs
    archive = tmp_path / "arc"
    tallstore.pack(archive, base, tasks)
    out = tmp_path / "merged.safetensors"
    argv = ["merge", archive, "-o", out]
    driver.start(argv, pause="output-half-written")
    driver.kill_at("output-half-written")
    assert not out.exists()
    assert driver.run(argv) == 0
    assert same_bits(load_file(out), tallstore.open(archive).merge().state_dict())
