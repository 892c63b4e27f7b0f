"""Where pack units run: a local thread pool, or (see ``dask_executor``) a Dask cluster.

An executor takes jobs ``(tag, fn, args)`` and yields ``(tag, result)`` as each finishes, in
any order. Units are plain functions of picklable arguments, so any engine can run them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, Protocol

Job = tuple[Any, Callable[..., Any], tuple[Any, ...]]


class Executor(Protocol):
    """Runs independent jobs and yields their results as they complete."""

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(tag, fn(*args))`` for each job; the first failure propagates."""

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` once in every process that may have run jobs (to drop cached state)."""


class ThreadExecutor:
    """Jobs on a local thread pool (numpy, torch, zstd and hashing release the GIL)."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = max(1, workers)

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Any, Any]]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures: dict[Future[Any], Any] = {pool.submit(fn, *args): tag for tag, fn, args in jobs}
            try:
                for f in as_completed(futures):
                    yield futures[f], f.result()
            finally:
                for f in futures:
                    f.cancel()
