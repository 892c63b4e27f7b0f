"""The local thread executor: every unit runs once, failures propagate, and it never runs far
ahead of its consumer (so a pack holds a few units' results, not all of them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tallstore.packing.executors import ThreadExecutor


@dataclass(frozen=True)
class Call:
    """A unit that calls ``fn(i)``."""

    i: int
    fn: Callable[[int], Any]

    def run(self) -> Any:
        return self.fn(self.i)


def test_every_unit_runs_once_and_yields_itself_with_its_result() -> None:
    units = [Call(i, lambda x: x * x) for i in range(50)]
    got = {u.i: r for u, r in ThreadExecutor(3).run(units)}
    assert got == {i: i * i for i in range(50)}


def test_units_start_at_most_twice_the_workers_ahead_of_the_consumer() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def job(i: int) -> int:
        with lock:
            started.append(i)
        return i

    workers = 2
    consumed = 0
    for _ in ThreadExecutor(workers).run([Call(i, job) for i in range(40)]):
        consumed += 1
        time.sleep(0.002)  # a slow consumer: units would all have started by now without the window
        with lock:
            assert len(started) <= consumed + 2 * workers
    assert sorted(started) == list(range(40))


def test_a_failing_unit_propagates_and_cancels_the_rest() -> None:
    ran: list[int] = []

    def job(i: int) -> int:
        ran.append(i)
        if i == 3:
            raise ValueError("boom")
        return i

    with pytest.raises(ValueError, match="boom"):
        list(ThreadExecutor(2).run([Call(i, job) for i in range(100)]))
    assert len(ran) < 100
