"""Loading a task: ``load_into`` preallocated tensors, the chunk decoder for the archive's own chains
and for any other spec layout, and the weight codec presets. Every path must give the same bits
as ``state_dict``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import Collection
from zarr.codecs import Crc32cCodec, GzipCodec

import tallstore
from tallstore import Codecs, CorruptArchiveError, PlanError, TallstoreError
from tallstore.storage import layout as fmt
from tallstore.storage.chunks import BufferPool, Objects
from tallstore.storage.codecs import ArrayFormat, Chain


def node_of(arc: tallstore.Archive, key: str) -> str:
    return next(e["node"] for e in arc.describe(sizes=False)["tensors"] if e["key"] == key)


def consolidated(archive: Path, path: str) -> dict:
    return json.loads((archive / "zarr.json").read_text())["consolidated_metadata"]["metadata"][path]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k].view(-1).view(torch.uint8), want[k].view(-1).view(torch.uint8)), k


def empty_like_task(view: tallstore.TaskView) -> dict[str, torch.Tensor]:
    return {k: torch.full(view.info(k).shape, 7, dtype=view.info(k).dtype.torch) for k in view}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("embed", [False, True], ids=["external", "embedded"])
def test_load_into_overwrites_preallocated_tensors_with_the_state_dict(
    collection: Callable[..., Collection], tmp_path: Path, dtype: torch.dtype, embed: bool,
) -> None:
    base, tasks = collection(n_tasks=3, dtype=dtype)
    arc = tallstore.pack(tmp_path / "a.tall", base, tasks, block_elems=64, embed_base=embed)
    for name in tasks:
        target = empty_like_task(arc[name])
        ptrs = {k: t.data_ptr() for k, t in target.items()}
        arc[name].load_into(target)
        assert {k: t.data_ptr() for k, t in target.items()} == ptrs
        assert_same(target, arc[name].state_dict())


def module_like(view: tallstore.TaskView) -> torch.nn.Module:
    """A module whose state dict has the task's keys: float tensors as parameters, others as buffers."""
    root = torch.nn.Module()
    for key in view:
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        info = view.info(key)
        t = torch.zeros(info.shape, dtype=info.dtype.torch)
        if info.dtype.is_float:
            mod.register_parameter(leaf, torch.nn.Parameter(t))
        else:
            mod.register_buffer(leaf, t)
    return root


def test_load_into_a_module_fills_its_parameters_and_buffers(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=2)
    view = tallstore.pack(tmp_path / "a.tall", base, tasks)["task1"]
    module = module_like(view)
    view.load_into(module)
    got = module.state_dict()
    assert_same({k: got[k] for k in view}, view.state_dict())
    assert all(p.requires_grad for p in module.parameters())


def test_load_into_non_contiguous_targets_goes_through_a_copy(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=2)
    arc = tallstore.pack(tmp_path / "a.tall", base, tasks)
    view = arc["task0"]
    target = empty_like_task(view)
    key = "layer.0.mlp.weight"
    holder = torch.zeros(tuple(reversed(view.info(key).shape)))
    target[key] = holder.t()
    assert not target[key].is_contiguous()
    view.load_into(target)
    assert torch.equal(holder.t(), view[key])


def test_load_into_refuses_wrong_keys_dtypes_and_shapes(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=2)
    view = tallstore.pack(tmp_path / "a.tall", base, tasks)["task0"]
    target = empty_like_task(view)
    with pytest.raises(TallstoreError, match="unexpected: head.weight"):  # the task has it, the target not
        view.load_into({k: v for k, v in target.items() if k != "head.weight"})
    with pytest.raises(TallstoreError, match="missing: extra"):  # the target has it, the task not
        view.load_into({**target, "extra": torch.zeros(1)})
    missing, unexpected = view.load_into({"head.weight": target["head.weight"], "extra": torch.zeros(1)}, strict=False)
    assert missing == ["extra"] and set(unexpected) == set(view) - {"head.weight"}
    assert torch.equal(target["head.weight"], view["head.weight"])
    with pytest.raises(TallstoreError, match="embed.weight.*stores torch.float32"):
        view.load_into({**target, "embed.weight": target["embed.weight"].double()})
    with pytest.raises(TallstoreError, match="embed.weight"):
        view.load_into({**target, "embed.weight": target["embed.weight"][:3]})


def test_load_into_casts_to_a_dtype_and_fills_a_meta_device_module(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=2)
    view = tallstore.pack(tmp_path / "a.tall", base, tasks)["task0"]
    want = view.state_dict()
    half = {k: torch.empty(view.info(k).shape, dtype=torch.float16 if view.info(k).dtype.is_float else view.info(k).dtype.torch)
            for k in view}
    float_keys = [k for k in view if view.info(k).dtype.is_float]
    assert view.load_into({k: half[k] for k in float_keys}, dtype=torch.float16, strict=False) == ([], [k for k in view if k not in float_keys])
    assert all(torch.equal(half[k], want[k].half()) for k in float_keys)
    module = torch.nn.Module()
    with torch.device("meta"):
        module.register_parameter("w", torch.nn.Parameter(torch.empty(view.info("embed.weight").shape)))
    target = {"embed.weight": module.w}
    with pytest.raises(TallstoreError, match="meta device"):
        view.load_into(target, strict=False)


def rewrite_with(archive: Path, path: str, compressors: list) -> None:
    """Rewrite one array of ``archive`` with other (spec) codecs, as another Zarr tool might."""
    root = zarr.open_group(archive, mode="r+", zarr_format=3)
    old = root[path]
    data, chunks, attrs = old[...], old.chunks, dict(old.attrs)
    del root[path]
    new = root.create_array(path, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=compressors,
                            fill_value=0, config={"write_empty_chunks": True})
    new[...] = data
    new.attrs.update(attrs)
    zarr.consolidate_metadata(archive)


def test_arrays_in_another_spec_layout_are_read_by_the_general_decoder(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=3)
    out = tmp_path / "a.tall"
    arc = tallstore.pack(out, base, tasks, block_elems=64)
    want = {name: arc[name].state_dict() for name in tasks}
    node = node_of(arc, "embed.weight")
    rewrite_with(out, fmt.merged_path(node), [GzipCodec(level=1), Crc32cCodec()])
    rewrite_with(out, fmt.mask_path(1), [GzipCodec(level=1)])
    again = tallstore.open(out, base=base)
    meta = consolidated(out, fmt.merged_path(node))
    assert ArrayFormat.from_meta(meta, fmt.merged_path(node), np.dtype("<u4"), 800).chain.direct is None
    for name in tasks:
        assert_same(again[name].state_dict(), want[name])
    assert tallstore.open(out, base=base).verify().ok


def test_an_archive_without_consolidated_metadata_still_loads(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=2)
    out = tmp_path / "a.tall"
    arc = tallstore.pack(out, base, tasks, block_elems=64)
    want = arc["task1"].state_dict()
    doc = json.loads((out / "zarr.json").read_text())
    del doc["consolidated_metadata"]
    (out / "zarr.json").write_text(json.dumps(doc))
    again = tallstore.open(out, base=base)
    assert again._source.nodes is None
    assert_same(again["task1"].state_dict(), want)


def test_a_corrupt_chunk_is_reported_with_its_tensor(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=2)
    out = tmp_path / "a.tall"
    arc = tallstore.pack(out, base, tasks, block_elems=64)
    node = node_of(arc, "layer.0.mlp.weight")
    chunk = out / "tensors" / node / "merged" / "c" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[20] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    view = tallstore.open(out, base=base)["task0"]
    with pytest.raises(CorruptArchiveError, match=r"'layer.0.mlp.weight' of task 'task0'.*crc32c"):
        view.state_dict()
    assert torch.equal(view["embed.weight"], arc["task0"]["embed.weight"])


def test_a_stream_chunk_shared_by_many_segments_is_read_once_per_load(
    collection: Callable[..., Collection], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, tasks = collection(n_tasks=2)
    arc = tallstore.pack(tmp_path / "q.tall", base, tasks, shared_bits=4, block_elems=64)
    want = arc["task1"].state_dict()
    reads: list[str] = []
    real = Objects.open_local

    def counted(self: Objects, key: str, limit: int, what: str = "chunk") -> Any:
        reads.append(key)
        return real(self, key, limit, what)

    monkeypatch.setattr(Objects, "open_local", counted)
    got = tallstore.open(tmp_path / "q.tall", base=base)["task1"].state_dict()
    assert_same(got, want)
    streams = [k for k in reads if k.startswith(("shared/codes/", "masks/"))]
    assert streams and len(streams) == len(set(streams))


@pytest.mark.parametrize("preset", ["fast", "compact"])
def test_codec_presets_store_the_same_bits_with_their_own_compressor(
    collection: Callable[..., Collection], tmp_path: Path, preset: str,
) -> None:
    base, tasks = collection(n_tasks=2)
    ref = tallstore.pack(tmp_path / "ref.tall", base, tasks, codecs=Codecs(weight_cname="blosclz", weight_level=1))
    arc = tallstore.pack(tmp_path / f"{preset}.tall", base, tasks, codecs=preset)
    meta = consolidated(tmp_path / f"{preset}.tall", fmt.merged_path(node_of(arc, "embed.weight")))
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"][0]["configuration"]
    assert blosc["cname"] == {"fast": "lz4hc", "compact": "zstd"}[preset]
    for name in tasks:
        assert_same(arc[name].state_dict(), ref[name].state_dict())


def test_an_unknown_codec_preset_is_a_plan_error(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(n_tasks=2)
    with pytest.raises(PlanError, match="unknown codec preset 'tiny'"):
        tallstore.pack(tmp_path / "a.tall", base, tasks, codecs="tiny")
    assert not (tmp_path / "a.tall").exists()


def chain(*middle: dict) -> dict:
    return {
        "shape": [10], "data_type": "uint32", "zarr_format": 3, "node_type": "array", "fill_value": 0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, *middle, {"name": "crc32c"}],
        "attributes": {}, "storage_transformers": [],
    }


def direct(meta: dict) -> str | None:
    return ArrayFormat.from_meta(meta, "x", np.dtype("<u4"), 10).chain.direct


def test_only_the_archives_own_codec_chains_take_the_direct_decoder() -> None:
    blosc = {"name": "blosc", "configuration": {"cname": "lz4hc", "clevel": 5, "shuffle": "shuffle", "typesize": 4}}
    assert direct(chain(blosc)) == "blosc"
    assert direct(chain({"name": "zstd", "configuration": {"level": 3}})) == "zstd"
    assert ArrayFormat.from_meta(chain(blosc), "x", np.dtype("<u4"), 10).chunk == 4
    assert direct(chain({"name": "gzip", "configuration": {"level": 1}})) is None
    assert direct(chain(blosc, blosc)) is None
    v2 = ArrayFormat.from_meta({**chain(blosc), "chunk_key_encoding": {"name": "v2"}}, "x", np.dtype("<u4"), 10)
    assert v2.key(3) == "x/3"
    with pytest.raises(CorruptArchiveError, match="no bytes or sharding codec"):
        Chain.parse([True, blosc, {"name": "crc32c"}], 4, "x")
    with pytest.raises(CorruptArchiveError, match="storage transformer"):
        direct({**chain(blosc), "storage_transformers": [{"name": "x"}]})


def test_buffer_pool_reuses_buffers_and_never_hands_one_out_twice() -> None:
    pool = BufferPool(keep=2)
    with pool.take(100) as a, pool.take(50) as b:
        assert a.obj is not b.obj and len(a) == 100 and len(b) == 50
        first = a.obj
    with pool.take(80) as c:
        assert c.obj is first
