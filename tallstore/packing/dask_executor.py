"""Pack units as Dask tasks: each worker opens its own inputs and writes its own archive regions.

Units are small picklable objects (:mod:`~tallstore.packing.units`), so they run unchanged on
``dask.distributed`` workers. Only their small summaries (digests, sums and
packed mask bytes) travel back to the driver, which writes the mask chunks, the metadata and
the completeness marker once every unit has succeeded. A unit that raises is retried by Dask
(``retries``); a unit lost with its worker is rescheduled by the scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from .executors import Unit, run_unit

if TYPE_CHECKING:
    from distributed import Client

DEFAULT_RETRIES = 2
STOP_TIMEOUT_S = 600
POLL_S = 0.05


def _holding(keys: list[Any], dask_worker: Any) -> int:
    """How many of ``keys`` this worker still knows in any state: queued, running or finished
    (run on each worker by ``client.run``)."""
    return sum(1 for k in keys if k in dask_worker.state.tasks)


class DaskExecutor:
    """Units as Dask futures on ``client``'s cluster, yielded as they complete."""

    def __init__(self, client: Client, retries: int = DEFAULT_RETRIES) -> None:
        self.client = client
        self.retries = retries

    def run(self, units: Sequence[Unit]) -> Iterator[tuple[Any, Any]]:
        from distributed import as_completed

        futures = {self.client.submit(run_unit, u, retries=self.retries, pure=False): u for u in units}
        try:
            for future in as_completed(list(futures)):
                unit = futures.pop(future)
                result = future.result()
                future.release()
                yield unit, result
        finally:
            if futures:
                self._stop(list(futures))

    def _stop(self, futures: list[Any]) -> None:
        """Cancel the outstanding units, then wait until no worker holds any of them.

        A cancelled unit that had already started keeps running on its worker (Dask cannot
        interrupt it) and may still write, and one still queued there may start before the
        worker hears of the cancellation; the pack's clean-up must come after both. A worker
        forgets a unit only once it is released and not running.
        """
        keys = [f.key for f in futures]
        with suppress(OSError, TimeoutError):  # a lost cluster must not hide the pack's own error
            self.client.cancel(futures)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while any(self.client.run(_holding, keys).values()) and time.monotonic() < deadline:
                time.sleep(POLL_S)

    def broadcast(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)
        with suppress(OSError, TimeoutError):  # only drops caches: never worth failing a pack
            self.client.run(fn, *args)


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Client | None]:
    """A client of the cluster at ``scheduler``, or of a new local cluster of ``n_workers`` processes.

    Yields ``None`` when neither is given (pack on local threads).
    """
    if scheduler is None and not n_workers:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        yield client
