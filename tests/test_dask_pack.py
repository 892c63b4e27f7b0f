"""Packing on Dask: a LocalCluster of 2 worker processes yields the archive a local pack does.

Failure injection replaces the packer's block unit with subclasses defined in this module, which
Dask ships to the workers by value (cloudpickle); markers on the shared disk make a unit fail once.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import fsspec
import pytest
import torch

import tallstore
from tallstore.cli import main
from tallstore.errors import ArchiveError
from tallstore.packing import driver, units
from tallstore.packing.options import PackOptions
from tallstore.packing.dask_executor import DaskExecutor

from archive_contents import archive_contents, assert_same_archive
from conftest import Collection

distributed = pytest.importorskip("distributed")
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A client of a local cluster: 2 worker processes of one thread each, no dashboard."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
    ) as cluster, distributed.Client(cluster) as c:
        yield c


def _pack_both(tmp_path: Path, collection: Collection, client: Any, **options: Any) -> tuple[Path, Path]:
    base, tasks = collection
    local = tmp_path / "local.tall"
    dask = tmp_path / "dask.tall"
    tallstore.pack(local, base, tasks, block_elems=64, **options)
    tallstore.pack(dask, base, tasks, block_elems=64, client=client, **options)
    return local, dask


@pytest.mark.parametrize(
    "options",
    [{"embed_base": True, "exact": ("norm.*",)}, {"merge": "ties", "ties_top": 30.0, "lam": "auto"}],
    ids=["ta-embedded-base", "ties-auto-lam"],
)
def test_dask_pack_is_identical_to_local_pack(
    tmp_path: Path, collection: Any, client: Any, options: dict[str, Any],
) -> None:
    local, dask = _pack_both(tmp_path, collection(n_tasks=3), client, **options)
    assert_same_archive(archive_contents(str(local)), archive_contents(str(dask)))
    arc = tallstore.open(dask)
    if options.get("merge") == "ties":
        assert arc.describe(sizes=False)["merge"]["params"]["threshold"] == tallstore.open(local).describe(sizes=False)["merge"]["params"]["threshold"]
        assert arc.describe(sizes=False)["lam_selection"]["method"] == "auto"
    assert torch.equal(arc["task1"]["layer.0.attn.weight"], tallstore.open(local)["task1"]["layer.0.attn.weight"])


def test_units_run_in_the_worker_processes(tmp_path: Path, collection: Any, client: Any) -> None:
    base, tasks = collection(n_tasks=2)
    seen: list[str] = []

    class Recording(DaskExecutor):
        def run(self, todo: Any) -> Iterator[tuple[Any, Any]]:
            for wrapped, result in super().run([WithPid(u) for u in todo]):
                seen.append(result[0])
                yield wrapped.unit, result[1]

    driver.pack(tmp_path / "a.tall", base, tasks, PackOptions(block_elems=64), executor=Recording(client))
    workers = {str(pid) for pid in client.run(os.getpid).values()}
    assert seen and set(seen) <= workers
    assert str(os.getpid()) not in workers


@dataclass(frozen=True)
class WithPid:
    """Runs ``unit`` and returns the worker's pid with its result."""

    unit: Any

    def run(self) -> tuple[str, Any]:
        return str(os.getpid()), self.unit.run()


@dataclass(frozen=True)
class FailsOnce(units.MaskedBlock):
    """A masked block unit, except that the first run of the whole pack raises or (``crash``)
    kills its worker process; ``marker`` on the shared disk records that it happened."""

    marker: str = ""
    crash: bool = False

    def run(self) -> Any:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().run()
        if self.crash:
            os._exit(1)
        raise RuntimeError("injected failure")


@dataclass(frozen=True)
class AlwaysFail(units.MaskedBlock):
    """A masked block unit whose second block always raises."""

    def run(self) -> Any:
        if self.index == 1:
            raise RuntimeError("injected failure")
        return super().run()


@pytest.mark.parametrize("crash", [False, True], ids=["raises", "worker-dies"])
def test_failed_unit_is_run_again_and_the_archive_is_unchanged(
    tmp_path: Path, collection: Any, client: Any, monkeypatch: pytest.MonkeyPatch, crash: bool,
) -> None:
    base, tasks = collection(n_tasks=2)
    tallstore.pack(tmp_path / "local.tall", base, tasks, block_elems=64)
    marker = tmp_path / "failed-once"
    monkeypatch.setattr(driver, "MaskedBlock", functools.partial(FailsOnce, marker=str(marker), crash=crash))
    tallstore.pack(tmp_path / "dask.tall", base, tasks, block_elems=64, client=client)
    assert marker.exists()
    assert_same_archive(archive_contents(str(tmp_path / "local.tall")), archive_contents(str(tmp_path / "dask.tall")))


def test_unit_failing_every_retry_fails_the_pack_and_leaves_no_archive(
    tmp_path: Path, collection: Any, client: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, tasks = collection(n_tasks=2)
    monkeypatch.setattr(driver, "MaskedBlock", AlwaysFail)
    out = tmp_path / "zoo.tall"
    with pytest.raises(RuntimeError, match="injected failure"):
        tallstore.pack(out, base, tasks, block_elems=64, client=client)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".zoo.tall")] == []
    with pytest.raises(ArchiveError):
        tallstore.open(out)


def test_dask_pack_to_s3_is_identical_to_local_pack(
    tmp_path: Path, collection: Any, client: Any, s3_server: Any, s3_bucket: str,
) -> None:
    base, tasks = collection(n_tasks=2)
    so = s3_server.storage_options
    url = f"{s3_bucket}/zoo.tall"
    tallstore.pack(tmp_path / "local.tall", base, tasks, block_elems=64)
    tallstore.pack(url, base, tasks, block_elems=64, client=client, storage_options=so)
    assert_same_archive(archive_contents(str(tmp_path / "local.tall")), archive_contents(url, so))


def test_dask_workers_read_inputs_from_urls(
    tmp_path: Path, collection: Any, client: Any, s3_server: Any, s3_bucket: str,
) -> None:
    base, tasks = collection(n_tasks=2)
    so = s3_server.storage_options
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **so)
    bucket = s3_bucket.removeprefix("s3://")
    for p in [base, *tasks.values()]:
        fs.put(str(p), f"{bucket}/in/{p.name}")
    urls = {n: f"{s3_bucket}/in/{p.name}" for n, p in tasks.items()}
    tallstore.pack(tmp_path / "local.tall", base, tasks, block_elems=64)
    tallstore.pack(tmp_path / "dask.tall", f"{s3_bucket}/in/{base.name}", urls, block_elems=64, client=client, storage_options=so)
    a, b = archive_contents(str(tmp_path / "local.tall")), archive_contents(str(tmp_path / "dask.tall"))
    assert {k: v for k, v in a.items() if v[0] == "array"} == {k: v for k, v in b.items() if v[0] == "array"}
    assert a["tasks/1"][1]["tallstore"]["tensors"] == b["tasks/1"][1]["tallstore"]["tensors"]


def test_cli_packs_on_the_cluster_at_scheduler_address(
    tmp_path: Path, collection: Any, client: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, tasks = collection(n_tasks=2)
    tallstore.pack(tmp_path / "local.tall", base, tasks)
    args = ["pack", str(tmp_path / "cli.tall"), "--base", str(base), "--quiet", "--scheduler", client.scheduler.address]
    for name, path in tasks.items():
        args += ["--task", f"{name}={path}"]
    monkeypatch.setattr(sys, "argv", ["tallstore", *args])
    main()
    assert_same_archive(archive_contents(str(tmp_path / "local.tall")), archive_contents(str(tmp_path / "cli.tall")))


def test_cli_refuses_scheduler_and_local_workers_together(
    collection: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    base, tasks = collection(n_tasks=1)
    args = ["pack", str(tmp_path / "x.tall"), "--base", str(base), "--task", f"task0={tasks['task0']}",
            "--scheduler", "tcp://127.0.0.1:1", "--dask-workers", "2"]
    monkeypatch.setattr(sys, "argv", ["tallstore", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x.tall").exists()
