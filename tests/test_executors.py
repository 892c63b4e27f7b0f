"""The local thread executor: every job runs once, failures propagate, and it never runs far
ahead of its consumer (so a pack holds a few units' results, not all of them)."""

from __future__ import annotations

import threading
import time

import pytest

from tallstore.packing.executors import ThreadExecutor


def test_every_job_runs_once_and_yields_its_tag() -> None:
    jobs = [(i, lambda x: x * x, (i,)) for i in range(50)]
    got = dict(ThreadExecutor(3).run(jobs))
    assert got == {i: i * i for i in range(50)}


def test_jobs_start_at_most_twice_the_workers_ahead_of_the_consumer() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def job(i: int) -> int:
        with lock:
            started.append(i)
        return i

    workers = 2
    consumed = 0
    for _ in ThreadExecutor(workers).run([(i, job, (i,)) for i in range(40)]):
        consumed += 1
        time.sleep(0.002)  # a slow consumer: jobs would all have started by now without the window
        with lock:
            assert len(started) <= consumed + 2 * workers
    assert sorted(started) == list(range(40))


def test_a_failing_job_propagates_and_cancels_the_rest() -> None:
    ran: list[int] = []

    def job(i: int) -> int:
        ran.append(i)
        if i == 3:
            raise ValueError("boom")
        return i

    with pytest.raises(ValueError, match="boom"):
        list(ThreadExecutor(2).run([(i, job, (i,)) for i in range(100)]))
    assert len(ran) < 100
