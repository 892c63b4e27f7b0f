"""Where pack units run: a local thread pool, or (see ``dask_executor``) a Dask cluster.

An executor takes jobs ``(tag, fn, args)`` and yields ``(tag, result)`` as each finishes, in
any order. Units are plain functions of picklable arguments, so any engine can run them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

Job = tuple[Any, Callable[..., Any], tuple[Any, ...]]


class Executor(Protocol):
    """Runs independent jobs and yields their results as they complete."""

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(tag, fn(*args))`` for each job; the first failure propagates."""

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` once in every process that may have run jobs (to drop cached state)."""


class ThreadExecutor:
    """Jobs on a local thread pool (numpy, torch, zstd and hashing release the GIL).

    At most ``2 × workers`` jobs are submitted ahead, and a result is dropped as soon as it is
    yielded: memory holds a few units' results, not every result of the pack.
    """

    def __init__(self, workers: int = 2) -> None:
        self.workers = max(1, workers)

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Any, Any]]:
        pending = iter(jobs)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            in_flight: dict[Future[Any], Any] = {}

            def submit_next() -> None:
                job = next(pending, None)
                if job is not None:
                    tag, fn, args = job
                    in_flight[pool.submit(fn, *args)] = tag

            try:
                for _ in range(2 * self.workers):
                    submit_next()
                while in_flight:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for f in done:
                        tag = in_flight.pop(f)
                        result = f.result()
                        submit_next()
                        yield tag, result
            finally:
                for f in in_flight:
                    f.cancel()
