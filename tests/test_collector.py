"""A load runs with Python's cyclic collector paused (its full passes walk every object of the
process) and leaves the collector as it found it, also when loads overlap."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Collection

import tallstore
from tallstore import collector
from tallstore.reading import loading


@pytest.fixture
def eager_collector() -> Iterator[list[int]]:
    """A collector that would run a pass at almost every allocation; the passes started, by generation."""
    passes: list[int] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    threshold = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.enable()
    gc.set_threshold(1, 1, 1)
    gc.callbacks.append(seen)
    try:
        yield passes
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*threshold)
        if not was_enabled:
            gc.disable()


def test_a_load_runs_no_collector_pass_and_resumes_the_collector_after(
    collection: Callable[..., Collection], tmp_path: Path, eager_collector: list[int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, tasks = collection(n_tasks=3)
    arc = tallstore.pack(tmp_path / "a.tall", base, tasks, block_elems=64)
    view = arc[next(iter(tasks))]
    target = {k: torch.empty(view.info(k).shape, dtype=view.info(k).dtype.torch) for k in view}
    during: list[tuple[bool, int]] = []
    rebuild = loading.rebuild_bits

    def watched(*args: Any) -> None:
        during.append((gc.isenabled(), len(eager_collector)))
        rebuild(*args)

    monkeypatch.setattr(loading, "rebuild_bits", watched)
    view.load_into(target)
    assert len(during) > 10
    assert {enabled for enabled, _ in during} == {False}
    assert len({passes for _, passes in during}) == 1, "no pass between the first block rebuilt and the last"
    assert gc.isenabled()
    before = len(eager_collector)
    kept = [[] for _ in range(100)]
    assert kept and len(eager_collector) > before, "the collector runs again once the load is over"


def test_a_collector_the_caller_turned_off_stays_off_after_a_load(
    collection: Callable[..., Collection], tmp_path: Path,
) -> None:
    base, tasks = collection(n_tasks=2)
    arc = tallstore.pack(tmp_path / "a.tall", base, tasks, block_elems=64)
    gc.disable()
    try:
        arc[next(iter(tasks))].state_dict()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_resume_the_collector_only_when_the_last_one_ends() -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with collector.paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with collector.paused():
            second_in.set()
            first_out.wait(5)
            seen["after the first ended"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after the first ended": False}
    assert gc.isenabled()
