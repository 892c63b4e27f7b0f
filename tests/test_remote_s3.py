"""Archives and checkpoints on S3, against a real S3-compatible endpoint (moto's server, 127.0.0.1).

The server counts the bytes it serves per object, so the partial-read property is measured on
the wire: loading one task fetches the merged vector, that task's mask and exact tensors, and
never another task's mask.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import save_file

import tallstore
from tallstore.checkpoint import open_checkpoint
from tallstore.checkpoint.writer import save
from tallstore.cli import main
from tallstore.errors import ArchiveError, CheckpointError, OutputExistsError, TallstoreError
from tallstore.packing import units
from tallstore.storage.chunks import coalesce
from tallstore.storage.stores import read_concurrency

from archive_contents import archive_contents, assert_same_archive
from conftest import make_task


def _fs(server: Any) -> Any:
    return fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options)


def _upload(server: Any, bucket: str, files: list[Path]) -> list[str]:
    fs = _fs(server)
    for f in files:
        fs.put(str(f), f"{bucket.removeprefix('s3://')}/{f.name}")
    return [f"{bucket}/{f.name}" for f in files]


def _cli(monkeypatch: pytest.MonkeyPatch, *args: object) -> None:
    monkeypatch.setattr(sys, "argv", ["tallstore", *map(str, args)])
    main()


def _sizes(server: Any, root: str) -> dict[str, int]:
    root = root.removeprefix("s3://")
    return {p[len(root) + 1 :]: int(s) for p, s in _fs(server).du(root, total=False).items()}


def _fetched(server: Any, url: str) -> dict[str, int]:
    """Bytes served per object of the archive at ``url``, relative to its root."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return {k[len(prefix) + 1 :]: b for k, b in server.fetched_keys(bucket).items() if k.startswith(prefix + "/")}


@pytest.fixture
def wide_collection(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A ~0.8M-parameter base and 3 fine-tunes, so that metadata is small next to the weights."""
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(2000, 256, generator=g),
        "layer.0.weight": torch.randn(512, 256, generator=g),
        "layer.0.bias": torch.randn(512, generator=g),
        "layer.1.weight": torch.randn(256, 512, generator=g),
        "norm.weight": torch.ones(256),
    }
    save_file(base, tmp_path / "wbase.safetensors")
    tasks = {}
    for i in range(3):
        tasks[f"task{i}"] = tmp_path / f"wtask{i}.safetensors"
        sd = make_task(base, i)
        sd["head.weight"] = torch.randn(3, 256, generator=g)
        save_file(sd, tasks[f"task{i}"])
    return tmp_path / "wbase.safetensors", tasks


WideArchive = tuple[str, Path, dict[str, Path], tallstore.Archive]


@pytest.fixture
def wide_archive(wide_collection: tuple[Path, dict[str, Path]], s3_server: Any, s3_bucket: str) -> WideArchive:
    """``wide_collection`` packed straight to S3 in 64K-element blocks: (url, base, tasks, archive)."""
    base, tasks = wide_collection
    url = f"{s3_bucket}/zoo.tall"
    arc = tallstore.pack(url, base, tasks, storage_options=s3_server.storage_options, block_elems=1 << 16)
    return url, base, tasks, arc


def test_pack_to_s3_writes_the_archive_a_local_pack_writes(
    tmp_path: Path, collection: Callable[..., Any], s3_server: Any, s3_bucket: str,
) -> None:
    base, tasks = collection(n_tasks=3)
    so = s3_server.storage_options
    url = f"{s3_bucket}/zoo.tall"
    local = tallstore.pack(tmp_path / "local.tall", base, tasks, block_elems=64, embed_base=True)
    remote = tallstore.pack(url, base, tasks, block_elems=64, embed_base=True, storage_options=so)
    assert_same_archive(archive_contents(str(tmp_path / "local.tall")), archive_contents(url, so))
    for name in tasks:
        got, want = remote[name].state_dict(), local[name].state_dict()
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_loading_one_task_fetches_the_merged_vector_and_its_own_mask_only(wide_archive: WideArchive, s3_server: Any) -> None:
    url, base, tasks, _ = wide_archive
    sizes = _sizes(s3_server, url)
    merged = sum(s for k, s in sizes.items() if k.startswith("tensors/") and "/merged/c/" in k)
    for t, name in enumerate(tasks):
        s3_server.reset()
        tallstore.open(url, base=base, storage_options=s3_server.storage_options)[name].state_dict()
        fetched = _fetched(s3_server, url)
        mask = sum(s for k, s in sizes.items() if k.startswith(f"masks/{t}/c/"))
        assert not [k for k in fetched if k.startswith("masks/") and not k.startswith(f"masks/{t}/")]
        assert all(b == sizes[k] for k, b in fetched.items()), "an object was fetched twice or in part"
        assert {k for k in sizes if "/merged/c/" in k or k.startswith(f"masks/{t}/c/")} <= set(fetched)
        assert sum(fetched.values()) / (merged + mask) <= 1.05


def test_reading_one_tensor_fetches_only_its_own_chunks(wide_archive: WideArchive, s3_server: Any) -> None:
    url, _, _, arc = wide_archive
    view = arc["task2"]
    s3_server.reset()
    view["layer.0.weight"]
    node = next(e["node"] for e in arc.describe(sizes=False)["tensors"] if e["key"] == "layer.0.weight")
    fetched = set(_fetched(s3_server, url))
    assert fetched and all(k.startswith((f"tensors/{node}/merged/c/", "masks/2/c/")) for k in fetched)


def test_quantized_archive_reads_from_s3_as_it_does_locally(
    tmp_path: Path, wide_collection: tuple[Path, dict[str, Path]], s3_server: Any, s3_bucket: str,
) -> None:
    """Code and mask segments lie back to back in shared stream chunks: a chunk that several
    blocks' segments share is fetched once and serves each of them."""
    base, tasks = wide_collection
    local = tallstore.pack(tmp_path / "q.tall", base, tasks, shared_bits=4, block_elems=1 << 15)
    assert len(list((tmp_path / "q.tall/shared/codes/c").iterdir())) == 1  # embed.weight alone has 16 blocks
    url = f"{s3_bucket}/q.tall"
    _fs(s3_server).put(str(tmp_path / "q.tall"), url.removeprefix("s3://"), recursive=True)
    remote = tallstore.open(url, base=base, storage_options=s3_server.storage_options)
    for name in tasks:
        got, want = remote[name].state_dict(), local[name].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    got, want = remote.merge("consensus", k=2).state_dict(), local.merge("consensus", k=2).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_inputs_and_base_at_urls_pack_and_extract(
    tmp_path: Path, collection: Callable[..., Any], s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, tasks = collection(n_tasks=2)
    so = s3_server.storage_options
    base_url, *task_urls = _upload(s3_server, s3_bucket, [base, *tasks.values()])
    from_urls = tallstore.pack(tmp_path / "urls.tall", base_url, dict(zip(tasks, task_urls, strict=True)), block_elems=64, storage_options=so)
    from_paths = tallstore.pack(tmp_path / "paths.tall", base, tasks, block_elems=64)
    a, b = archive_contents(str(tmp_path / "urls.tall")), archive_contents(str(tmp_path / "paths.tall"))
    assert {k: v for k, v in a.items() if v[0] == "array"} == {k: v for k, v in b.items() if v[0] == "array"}
    assert from_urls.describe(sizes=False)["base"]["location"] == base_url
    assert from_urls.describe(sizes=False)["base"]["files"] == from_paths.describe(sizes=False)["base"]["files"]
    assert from_urls.describe(sizes=False)["tasks"][1]["tensors"] == from_paths.describe(sizes=False)["tasks"][1]["tensors"]
    reopened = tallstore.open(tmp_path / "urls.tall", storage_options=so)
    with pytest.raises(ArchiveError, match="does not fetch on its own"):  # a recorded URL is never followed unasked
        reopened["task1"]["embed.weight"]
    reopened = tallstore.open(tmp_path / "urls.tall", base=base_url, storage_options=so)
    assert torch.equal(reopened["task1"]["embed.weight"], from_paths["task1"]["embed.weight"])

    out = tmp_path / "extracted.safetensors"
    args = ["extract", tmp_path / "paths.tall", "task1", "-o", out, "--base", base_url]
    for k, v in so.items():
        args += ["--storage-option", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"]
    _cli(monkeypatch, *args)
    with open_checkpoint(out) as got:
        assert all(torch.equal(got.read(k), from_paths["task1"][k]) for k in got.keys)


def test_cli_reaches_s3_through_the_usual_environment_variables(
    tmp_path: Path, collection: Callable[..., Any], s3_server: Any, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    base, tasks = collection(n_tasks=2)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    url = f"{s3_bucket}/cli.tall"
    args: list[object] = ["pack", url, "--base", base, "--quiet"]
    for name, path in tasks.items():
        args += ["--task", f"{name}={path}"]
    _cli(monkeypatch, *args)
    capsys.readouterr()
    _cli(monkeypatch, "info", url, "--json")
    assert [t["name"] for t in json.loads(capsys.readouterr().out)["tasks"]] == ["task0", "task1"]
    _cli(monkeypatch, "extract", url, "task0", "-o", tmp_path / "extracted.safetensors")
    with open_checkpoint(tmp_path / "extracted.safetensors") as got, open_checkpoint(tasks["task0"]) as want:
        assert list(got.keys) == list(want.keys)


def test_failed_pack_to_s3_never_opens_as_complete(
    collection: Callable[..., Any], s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, tasks = collection(n_tasks=2)

    run = units.MaskedBlock.run

    def broken(unit: units.MaskedBlock) -> Any:
        if unit.index == 1:
            raise RuntimeError("injected failure")
        return run(unit)

    monkeypatch.setattr(units.MaskedBlock, "run", broken)
    url = f"{s3_bucket}/zoo.tall"
    with pytest.raises(RuntimeError, match="injected failure"):
        tallstore.pack(url, base, tasks, block_elems=64, storage_options=s3_server.storage_options)
    with pytest.raises(ArchiveError, match="incomplete"):
        tallstore.open(url, storage_options=s3_server.storage_options)


def test_pack_refuses_to_replace_a_remote_archive_unless_asked(
    collection: Callable[..., Any], s3_server: Any, s3_bucket: str,
) -> None:
    base, tasks = collection(n_tasks=1)
    so = s3_server.storage_options
    url = f"{s3_bucket}/zoo.tall"
    tallstore.pack(url, base, tasks, storage_options=so)
    with pytest.raises(OutputExistsError):
        tallstore.pack(url, base, tasks, storage_options=so)
    assert tallstore.pack(url, base, tasks, storage_options=so, overwrite=True, lam=0.3).describe(sizes=False)["lam"] == [0.3]


def test_remote_checkpoint_reads_rows_with_range_requests(
    tmp_path: Path, collection: Callable[..., Any], s3_server: Any, s3_bucket: str,
) -> None:
    base, _ = collection(n_tasks=1)
    (url,) = _upload(s3_server, s3_bucket, [base])
    bucket = s3_bucket.removeprefix("s3://")
    with open_checkpoint(base) as local, open_checkpoint(url, s3_server.storage_options) as remote:
        assert remote.keys == local.keys
        assert [f.name for f in remote.files] == ["base.safetensors"]
        assert remote.files[0].size == base.stat().st_size
        s3_server.reset()
        rows = remote.read("embed.weight", 10, 20)
        assert torch.equal(rows, local.read("embed.weight", 10, 20))
        assert s3_server.fetched(bucket) == 10 * 16 * 4
        assert all(torch.equal(remote.read(k), local.read(k)) for k in local.keys)


def test_remote_hf_folder_with_index_reads_like_the_local_one(
    tmp_path: Path, collection: Callable[..., Any], s3_server: Any, s3_bucket: str,
) -> None:
    base, _ = collection(n_tasks=1)
    folder = tmp_path / "hf"
    with open_checkpoint(base) as ck:
        save(folder, [(k, ck.info(k)) for k in ck.keys], ck.read, max_shard_bytes=2000)
    files = sorted(folder.iterdir())
    assert len(files) > 2
    _fs(s3_server).put([str(f) for f in files], f"{s3_bucket.removeprefix('s3://')}/hf/")
    with open_checkpoint(folder) as local, open_checkpoint(f"{s3_bucket}/hf", s3_server.storage_options) as remote:
        assert remote.keys == local.keys
        assert all(torch.equal(remote.read(k), local.read(k)) for k in local.keys)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:5], "shorter than 8 bytes"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "exceeds the file"),
        (lambda raw: raw[:-7], "truncated"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "not valid JSON"),
    ],
    ids=["tiny", "header-length", "truncated-data", "bad-json"],
)
def test_remote_checkpoint_refuses_damaged_files(
    tmp_path: Path, collection: Callable[..., Any], s3_server: Any, s3_bucket: str,
    damage: Callable[[bytes], bytes], message: str,
) -> None:
    base, _ = collection(n_tasks=1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(base.read_bytes()))
    (url,) = _upload(s3_server, s3_bucket, [bad])
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(url, s3_server.storage_options)


def test_remote_checkpoint_errors_name_the_url(s3_server: Any, s3_bucket: str) -> None:
    so = s3_server.storage_options
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(f"{s3_bucket}/missing.safetensors", so)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint(f"{s3_bucket}/nothing-here", so)
    with pytest.raises(CheckpointError, match="convert to safetensors"):
        open_checkpoint(f"{s3_bucket}/model.bin", so)


def test_opening_a_missing_remote_archive_is_a_clear_error(s3_server: Any, s3_bucket: str) -> None:
    with pytest.raises(ArchiveError, match="not a readable tallstore archive"):
        tallstore.open(f"{s3_bucket}/nothing.tall", storage_options=s3_server.storage_options)


def test_concurrency_caps_the_requests_in_flight(wide_archive: WideArchive, s3_server: Any, s3_bucket: str) -> None:
    url, base, _, _ = wide_archive
    bucket = s3_bucket.removeprefix("s3://")
    s3_server.set_latency(20)
    seen = {}
    for limit in (1, 8):
        arc = tallstore.open(url, base=base, storage_options=s3_server.storage_options, concurrency=limit)
        s3_server.reset()
        arc["task0"].state_dict()
        seen[limit] = s3_server.max_in_flight(bucket)
    s3_server.set_latency(0)
    assert seen[1] == 1
    assert 1 < seen[8] <= 8


def test_read_concurrency_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TALLSTORE_CONCURRENCY", raising=False)
    assert read_concurrency("s3://b/x") == 64
    assert read_concurrency("/data/x.tall") is None
    assert read_concurrency("/data/x.tall", base="s3://b/base.safetensors") == 64
    assert read_concurrency("s3://b/x", 5) == 5
    monkeypatch.setenv("TALLSTORE_CONCURRENCY", "12")
    assert read_concurrency("/data/x.tall") == 12
    monkeypatch.setenv("TALLSTORE_CONCURRENCY", "many")
    with pytest.raises(TallstoreError, match="whole number"):
        read_concurrency("s3://b/x")
    with pytest.raises(TallstoreError, match="at least 1"):
        read_concurrency("s3://b/x", 0)


def test_mask_ranges_sharing_a_chunk_are_fetched_together() -> None:
    assert coalesce([(0, 10), (10, 30), (120, 130), (250, 260)], 100) == [(0, 30), (120, 130), (250, 260)]
    assert coalesce([(0, 30), (95, 105), (120, 130)], 100) == [(0, 130)]
    assert coalesce([(150, 160), (0, 120)], 100) == [(0, 160)]
    assert coalesce([], 100) == []
