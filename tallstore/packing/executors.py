"""Where pack units run: a local thread pool, or (see ``dask_executor``) a Dask cluster.

A unit is a small picklable object with a ``run()`` method; an executor runs units and yields
``(unit, result)`` as each finishes, in any order, so any engine can run them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Generic, Protocol, TypeVar

from ..heap import TRIM_INTERVAL, release_free_memory

T = TypeVar("T")


class Unit(Protocol):
    """An independent piece of pack work: picklable, run in any process."""

    def run(self) -> Any:
        """Do the work and return a small summary."""


class PerProcess(Generic[T]):
    """State the units of one pack share inside one process (open inputs, the open archive),
    made on first use from a token that names the pack, dropped by :meth:`drop`."""

    def __init__(self) -> None:
        self._made: dict[str, T] = {}
        self._lock = threading.Lock()

    def get(self, token: str, make: Callable[[], T]) -> T:
        """The state for ``token``, made by ``make()`` if this process has none yet."""
        with self._lock:
            if token not in self._made:
                self._made[token] = make()
            return self._made[token]

    def drop(self, token: str) -> T | None:
        """Forget the state for ``token``; returns it (or ``None``) so the caller can close it."""
        with self._lock:
            return self._made.pop(token, None)


def run_unit(unit: Unit) -> Any:
    """``unit.run()``, as a plain function an engine can submit; the heap's free pages go back to
    the system every ``TRIM_INTERVAL`` seconds of units (see :mod:`tallstore.heap`), so peak
    memory stays flat in model size."""
    try:
        return unit.run()
    finally:
        release_free_memory(TRIM_INTERVAL)


class Executor(Protocol):
    """Runs independent units and yields their results as they complete."""

    def run(self, units: Sequence[Unit]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(unit, unit.run())`` for each unit; the first failure propagates."""

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` once in every process that may have run units (to drop cached state)."""


class ThreadExecutor:
    """Units on a local thread pool (numpy, torch, zstd and hashing release the GIL).

    At most ``2 × workers`` units are submitted ahead, and a result is dropped as soon as it is
    yielded: memory holds a few units' results, not every result of the pack.
    """

    def __init__(self, workers: int = 2) -> None:
        self.workers = max(1, workers)

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def run(self, units: Sequence[Unit]) -> Iterator[tuple[Any, Any]]:
        pending = iter(units)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            in_flight: dict[Future[Any], Any] = {}

            def submit_next() -> None:
                unit = next(pending, None)
                if unit is not None:
                    in_flight[pool.submit(run_unit, unit)] = unit

            try:
                for _ in range(2 * self.workers):
                    submit_next()
                while in_flight:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for f in done:
                        unit = in_flight.pop(f)
                        result = f.result()
                        submit_next()
                        yield unit, result
            finally:
                for f in in_flight:
                    f.cancel()
