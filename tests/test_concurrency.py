"""Concurrency: many threads and processes reading tasks of one archive get the right tensors."""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_base, make_task
from safetensors.torch import save_file

import tallstore
from tallstore import Archive

THREADS = 8


def digests(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of each tensor's dtype, shape and bytes."""
    return {
        k: hashlib.sha256(f"{v.dtype}{tuple(v.shape)}".encode() + v.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in sd.items()
    }


def read_task_in_process(location: str, base: str | None, task: str) -> dict[str, str]:
    """Open the archive in a fresh process and digest one task."""
    return digests(tallstore.open(location, base=base)[task].state_dict())


@pytest.fixture(scope="module", params=["embedded", "external"])
def packed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path | None, dict[str, dict[str, str]]]:
    """An archive of 5 tasks (several chunks per tensor), its base if external, and serial digests."""
    root = tmp_path_factory.mktemp(f"concurrency-{request.param}")
    base = make_base(torch.bfloat16)
    save_file(base, root / "base.safetensors")
    tasks = {}
    for i in range(5):
        tasks[f"task{i}"] = root / f"task{i}.safetensors"
        save_file(make_task(base, i), tasks[f"task{i}"])
    embedded = request.param == "embedded"
    tallstore.pack(root / "arc", root / "base.safetensors", tasks, embed_base=embedded, block_elems=128)
    ext = None if embedded else root / "base.safetensors"
    arc = tallstore.open(root / "arc", base=ext)
    return root / "arc", ext, {name: digests(arc[name].state_dict()) for name in arc}


def test_eight_threads_reading_every_task_of_one_archive_match_serial_reads(packed: tuple) -> None:  # type: ignore[type-arg]
    location, base, serial = packed
    arc: Archive = tallstore.open(location, base=base)
    names = list(serial)
    jobs = [names[(i + j) % len(names)] for i in range(THREADS) for j in range(len(names))]

    def read(task: str) -> tuple[str, dict[str, str]]:
        view = arc[task]
        whole = digests(view.state_dict())
        one_by_one = digests({k: view[k] for k in reversed(list(view))})
        assert whole == one_by_one
        return task, whole

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(read, jobs))
    assert len(results) == THREADS * len(names)
    for task, got in results:
        assert got == serial[task], task


def test_separately_opened_archives_in_threads_match_serial_reads(packed: tuple) -> None:  # type: ignore[type-arg]
    location, base, serial = packed
    jobs = [name for name in serial for _ in range(2)]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda t: (t, digests(tallstore.open(location, base=base)[t].state_dict())), jobs))
    assert all(got == serial[task] for task, got in results)


@pytest.fixture(scope="module")
def processes() -> Iterator[ProcessPoolExecutor]:
    """Two fresh (spawned) reader processes, shared by the module's tests."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def test_processes_reading_different_tasks_match_serial_reads(packed: tuple, processes: ProcessPoolExecutor) -> None:  # type: ignore[type-arg]
    location, base, serial = packed
    futures = {n: processes.submit(read_task_in_process, str(location), str(base) if base else None, n) for n in serial}
    assert {n: f.result(timeout=300) for n, f in futures.items()} == serial
