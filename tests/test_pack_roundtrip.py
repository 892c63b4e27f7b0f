"""``tallstore.pack`` / ``open`` / views / ``extract``: what comes out is what the spec says.

Rebuilt tensors are compared bit for bit with a reference written here from spec §1:
``θ̂_t = m_t ? θ_MTL : cast_d(θ₀)``, ``θ_MTL = cast_d(θ₀ + τ_MTL)`` except where ``τ_MTL`` equals
a nonzero ``τ_t`` (then the first such task's own weight).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zarr
from conftest import Collection, make_base, make_task
from tall_reference import first_of_equal
from safetensors.torch import load_file, save_file

import tallstore
from tallstore import (
    ArchiveError,
    BaseMismatchError,
    CorruptArchiveError,
    OutputExistsError,
    PlanError,
)

FLOAT_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]
INDEX = "model.safetensors.index.json"


def header_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file in header order, parsed here without any library."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]


def save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def pack_dicts(
    tmp_path: Path, base: dict[str, torch.Tensor], tasks: dict[str, dict[str, torch.Tensor]], **kw: object
) -> tallstore.Archive:
    paths = {n: save(tmp_path / f"{n}.safetensors", sd) for n, sd in tasks.items()}
    return tallstore.pack(tmp_path / "zoo.tall", base=save(tmp_path / "base.safetensors", base), tasks=paths, **kw)


def reference_rebuild(base: torch.Tensor, tasks: list[torch.Tensor], lams: list[float]) -> list[torch.Tensor]:
    d = tasks[0].dtype
    b32 = base.float()
    taus = [t.float() - b32 for t in tasks]
    distinct = [taus[t] for t in first_of_equal(torch.stack(taus))]  # identical tasks count once
    mtl = distinct[0].clone()
    for tau in distinct[1:]:
        mtl = mtl + tau
    merged = (b32 + mtl).to(d)
    for t in reversed(range(len(tasks))):  # reversed: the first matching task wins
        merged = torch.where((taus[t] == mtl) & (taus[t] != 0), tasks[t], merged)
    lam32 = [torch.tensor(lam, dtype=torch.float32) for lam in lams]
    return [torch.where(tau.abs() > lam * (mtl - tau).abs(), merged, base.to(d)) for tau, lam in zip(taus, lam32)]


def bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(bits(got[k]), bits(w)), k


def entry(arc: tallstore.Archive, key: str) -> dict:
    return next(e for e in arc.describe(sizes=False)["tensors"] if e["key"] == key)


def sources(arc: tallstore.Archive, task: int) -> dict[str, str]:
    return {row["key"]: row["source"] for row in arc.describe(sizes=False)["tasks"][task]["tensors"]}


# --- API basics ------------------------------------------------------------------------------


def test_pack_opens_the_archive_with_tasks_in_pack_order(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(3)
    order = {"zeta": tasks["task2"], "alpha": tasks["task0"], "mid": tasks["task1"]}
    arc = tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=order)
    assert arc.tasks == ["zeta", "alpha", "mid"] == list(arc) and len(arc) == 3
    assert tallstore.open(tmp_path / "zoo.tall").tasks == ["zeta", "alpha", "mid"]
    with pytest.raises(KeyError, match="nope"):
        arc["nope"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_state_dict_matches_the_spec_rebuild_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    base = make_base(dtype)
    tasks = {f"t{i}": make_task(base, i, scale=0.05) for i in range(3)}
    lam = {"t0": 0.4, "t1": 0.2, "t2": 1.0}
    arc = pack_dicts(tmp_path, base, tasks, lam=lam)
    for i, (name, sd) in enumerate(tasks.items()):
        want = {}
        for key in header_keys(tmp_path / f"{name}.safetensors"):
            if key in base and sd[key].is_floating_point():
                want[key] = reference_rebuild(base[key], [s[key] for s in tasks.values()], list(lam.values()))[i]
            else:
                want[key] = sd[key]  # the head (not in the base) and the int buffer are exact
        assert_bitwise(arc[name].state_dict(), want)


def test_task_keeps_its_checkpoints_key_order(tmp_path: Path) -> None:
    base = make_base()
    task = make_task(base, 0)
    shuffled = {k: task[k] for k in ["norm.weight", "head.weight", "embed.weight", "position_ids",
                                     "layer.0.mlp.weight", "layer.0.attn.bias", "layer.0.attn.weight"]}
    torch.save(shuffled, tmp_path / "t.bin")
    arc = tallstore.pack(tmp_path / "zoo.tall", base=save(tmp_path / "b.safetensors", base), tasks={"t": tmp_path / "t.bin"})
    assert list(arc["t"]) == list(shuffled)
    assert list(arc["t"].state_dict()) == list(shuffled)


def test_view_is_a_mapping_with_original_dtypes_and_shapes(tmp_path: Path) -> None:
    base = make_base(torch.bfloat16)
    task = make_task(base, 0)
    arc = pack_dicts(tmp_path, base, {"t": task})
    view = arc["t"]
    assert len(view) == len(task) and set(view) == set(task)
    assert "head.weight" in view and "nope" not in view
    for k, v in task.items():
        assert view.info(k).dtype.torch == v.dtype and view.info(k).shape == tuple(v.shape)
        assert view[k].dtype == v.dtype and view[k].shape == v.shape
    with pytest.raises(KeyError, match="nope"):
        view["nope"]


def test_manifest_records_tasks_lambdas_merge_base_and_every_tensor(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks, lam={"task1": 0.7})
    m = json.loads((tmp_path / "zoo.tall" / "zarr.json").read_text())["attributes"]["tallstore"]
    assert (m["format"], m["version"], m["complete"]) == ("tallstore", 2, True)
    assert m["tasks"] == ["task0", "task1"] and m["lam"] == pytest.approx([0.4, 0.7])
    assert m["merge"] == {"rule": "ta", "params": {}}
    assert m["base"]["keys"] == header_keys(base) and m["base"]["fingerprint"].startswith("sha256:")
    assert m["mask"]["bitorder"] == "little"
    assert [e["key"] for e in m["tensors"]] == header_keys(base) + ["head.weight"]
    for t, name in enumerate(m["tasks"]):
        attrs = json.loads((tmp_path / "zoo.tall" / "tasks" / str(t) / "zarr.json").read_text())["attributes"]["tallstore"]
        assert (attrs["name"], attrs["lam"]) == (name, m["lam"][t])
        original = load_file(tasks[name])
        assert [row[0] for row in attrs["tensors"]] == header_keys(tasks[name])
        assert all(row[1] == str(original[row[0]].dtype).removeprefix("torch.") for row in attrs["tensors"])
        assert all(row[2] == list(original[row[0]].shape) for row in attrs["tensors"])


def test_archive_uses_only_zarr_v3_spec_codecs(tmp_path: Path) -> None:
    base = make_base(torch.bfloat16)
    arc = pack_dicts(tmp_path, base, {"a": make_task(base, 0), "b": make_task(base, 1)}, embed_base=True)
    arrays = {}
    for meta in (tmp_path / "zoo.tall").rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        assert doc["zarr_format"] == 3
        if doc["node_type"] == "array":
            arrays[meta.parent.relative_to(tmp_path / "zoo.tall").as_posix()] = doc
    node = entry(arc, "embed.weight")["node"]
    assert {"masks/0", "masks/1", f"tensors/{node}/merged", f"tensors/{node}/base", "tensors/head.weight/exact/0"} <= set(arrays)
    for path, doc in arrays.items():
        codecs = [c["name"] for c in doc["codecs"]]
        assert doc["fill_value"] == 0, path
        if path.startswith("masks/"):
            assert (doc["data_type"], codecs) == ("uint8", ["bytes", "zstd", "crc32c"]), path
        elif path == "meta/manifest":  # the manifest's copy: plain JSON bytes behind a checksum
            assert (doc["data_type"], codecs) == ("uint8", ["bytes", "crc32c"]), path
        else:
            assert codecs == ["bytes", "blosc", "crc32c"], path
    assert arrays[f"tensors/{node}/merged"]["data_type"] == "uint16"  # bfloat16 bits
    assert arrays["tensors/position_ids/base"]["data_type"] == "int64"


# --- laziness: what a read touches -----------------------------------------------------------


def drop_chunks(archive: Path, array: str) -> None:
    """Delete an array's stored chunks: reading it then yields fill values (zeros), not errors."""
    shutil.rmtree(archive / array / "c")


def test_views_and_listings_read_no_tensor_data(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    for chunks in list((tmp_path / "zoo.tall").rglob("c")):
        shutil.rmtree(chunks)
    view = tallstore.open(tmp_path / "zoo.tall")["task0"]
    assert list(view) and all(view.info(k).numel > 0 for k in view)
    with pytest.raises(CorruptArchiveError, match="embed.weight"):
        view["embed.weight"]


def test_loading_one_task_reads_only_its_own_mask_bits(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(3)
    arc = tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    want = arc["task0"].state_dict()
    drop_chunks(tmp_path / "zoo.tall", "masks/1")
    drop_chunks(tmp_path / "zoo.tall", "masks/2")
    drop_chunks(tmp_path / "zoo.tall", "tensors/head.weight/exact/1")
    reopened = tallstore.open(tmp_path / "zoo.tall")
    assert_bitwise(reopened["task0"].state_dict(), want)
    with pytest.raises(CorruptArchiveError, match="task1"):
        reopened["task1"].state_dict()


def test_loading_one_tensor_reads_only_that_tensors_arrays(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    arc = tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    want = arc["task0"]["layer.0.attn.weight"]
    drop_chunks(tmp_path / "zoo.tall", "tensors/embed.weight/merged")
    view = tallstore.open(tmp_path / "zoo.tall")["task0"]
    assert torch.equal(bits(view["layer.0.attn.weight"]), bits(want))
    with pytest.raises(CorruptArchiveError):
        view["embed.weight"]


# --- what is stored exactly, and what costs nothing ------------------------------------------


@pytest.mark.parametrize("embed", [False, True], ids=["external", "embedded"])
def test_tensors_that_cannot_be_masked_are_stored_exactly_per_task(tmp_path: Path, embed: bool) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(8, 8, generator=g), "ids": torch.arange(6), "reshaped": torch.randn(4, 6, generator=g),
            "only.base": torch.randn(5, generator=g), "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    a = {"w": base["w"] + 0.1, "ids": torch.arange(6), "reshaped": torch.randn(4, 6, generator=g),
         "head": torch.randn(3, 8, generator=g), "only.base": base["only.base"].clone(),
         "flags": base["flags"].clone(), "empty": torch.zeros(0, 4)}
    b = {"w": base["w"] - 0.1, "ids": torch.arange(6) * 2, "reshaped": torch.randn(6, 4, generator=g),
         "head": torch.randn(2, 8, generator=g), "flags": torch.tensor([False, False, True]), "empty": torch.zeros(0, 4)}
    arc = pack_dicts(tmp_path, base, {"a": a, "b": b}, embed_base=embed)
    kinds = {e["key"]: e["kind"] for e in arc.describe(sizes=False)["tensors"]}
    assert kinds == {"w": "masked"} | {k: "separate" for k in ("ids", "reshaped", "only.base", "flags", "empty", "head")}
    assert sources(arc, 0) == {"w": "masked", "ids": "base", "reshaped": "exact", "head": "exact", "only.base": "base",
                               "flags": "base", "empty": "base"}
    assert sources(arc, 1) == {"w": "masked", "ids": "exact", "reshaped": "exact", "head": "exact", "flags": "exact",
                               "empty": "base"}
    for name, sd in {"a": a, "b": b}.items():
        got = arc[name].state_dict()
        assert set(got) == set(sd)
        assert_bitwise({k: got[k] for k in sd if k != "w"}, {k: v for k, v in sd.items() if k != "w"})


def test_an_embedded_fp32_base_rebuilds_bf16_tasks_like_the_external_one(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(40, 8, generator=g), "s": torch.tensor(2.5)}
    tasks = {n: {"w": (base["w"] + 0.05 * torch.randn(40, 8, generator=g)).to(torch.bfloat16),
                 "s": torch.tensor(2.5).to(torch.bfloat16)} for n in ("a", "b")}
    (tmp_path / "ext").mkdir()
    (tmp_path / "emb").mkdir()
    ext = pack_dicts(tmp_path / "ext", base, tasks)
    arc = pack_dicts(tmp_path / "emb", base, tasks, embed_base=True)
    for n in tasks:
        got = arc[n].state_dict()
        assert got["w"].dtype == torch.bfloat16
        assert_bitwise(got, ext[n].state_dict())


def test_tasks_disagreeing_on_a_float_dtype_are_masked_in_float32_and_rebuilt_each_in_its_own(tmp_path: Path) -> None:
    base = {"w": torch.randn(8, 8), "v": torch.randn(16)}
    a = {"w": (base["w"] + 0.1 * torch.randn(8, 8)).to(torch.bfloat16), "v": base["v"] + 0.1}
    b = {"w": base["w"] - 0.1 * torch.randn(8, 8), "v": base["v"] - 0.1}
    arc = pack_dicts(tmp_path, base, {"a": a, "b": b})
    assert (entry(arc, "w")["kind"], entry(arc, "w")["dtype"]) == ("masked", "float32")
    want = reference_rebuild(base["w"], [a["w"].float(), b["w"]], [0.4, 0.4])  # bf16 values are exact in float32
    assert_bitwise({"w": arc["a"]["w"]}, {"w": want[0].to(torch.bfloat16)})  # rounded once, to the task's dtype
    assert_bitwise({"w": arc["b"]["w"]}, {"w": want[1]})


def test_bf16_tasks_of_an_fp32_base_rebuild_in_bf16(tmp_path: Path) -> None:
    base = make_base(torch.float32)
    tasks = {f"t{i}": {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                       for k, v in make_task(base, i, scale=0.05, head=False).items()} for i in range(2)}
    arc = pack_dicts(tmp_path, base, tasks)
    e = entry(arc, "embed.weight")
    assert (e["kind"], e["dtype"], e["base_dtype"]) == ("masked", "bfloat16", "float32")
    key = "layer.0.mlp.weight"
    want = reference_rebuild(base[key], [sd[key] for sd in tasks.values()], [0.4, 0.4])
    for i, name in enumerate(tasks):
        assert_bitwise({key: arc[name][key]}, {key: want[i]})


def test_tensors_equal_to_the_base_in_every_task_store_no_arrays(tmp_path: Path) -> None:
    base = make_base()
    tasks = {}
    for i in range(2):
        sd = make_task(base, i, head=False)
        sd["norm.weight"] = base["norm.weight"].clone()
        tasks[f"t{i}"] = sd
    arc = pack_dicts(tmp_path, base, tasks)
    norm = entry(arc, "norm.weight")
    assert norm["kind"] == "base"
    node = tmp_path / "zoo.tall" / "tensors" / norm["node"]
    assert not (node / "merged").exists() and not (node / "exact").exists()
    assert not (tmp_path / "zoo.tall" / "tensors" / entry(arc, "position_ids")["node"] / "exact").exists()
    assert all(sources(arc, t)["norm.weight"] == sources(arc, t)["position_ids"] == "base" for t in (0, 1))
    root = zarr.open_group(str(tmp_path / "zoo.tall"), mode="r")
    n = base["norm.weight"].numel()
    assert not root["masks/0"][norm["mask_offset"] : norm["mask_offset"] + n // 8].any()
    assert torch.equal(arc["t1"]["norm.weight"], base["norm.weight"])


# --- the base: external, embedded, recorded, wrong --------------------------------------------


def test_external_base_is_recorded_by_absolute_path_and_used_by_default(
    collection: Callable[..., Collection], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tasks = collection(2)
    monkeypatch.chdir(tmp_path)
    arc = tallstore.pack("zoo.tall", base="base.safetensors", tasks=tasks)
    assert arc.describe(sizes=False)["base"]["location"] == str(base.resolve())
    assert arc.describe(sizes=False)["base"]["embedded"] is False
    assert not list((tmp_path / "zoo.tall").rglob("base"))  # no base arrays inside
    want = arc["task0"].state_dict()
    moved = tmp_path / "elsewhere.safetensors"
    base.rename(moved)
    lost = tallstore.open("zoo.tall")  # metadata needs no base: opening works, the first read says where it went
    assert lost.describe()["tasks"][0]["name"] == "task0" and lost.verify().ok
    with pytest.raises(ArchiveError, match="not embedded and not found at"):
        lost["task0"].state_dict()
    assert_bitwise(tallstore.open("zoo.tall", base=moved)["task0"].state_dict(), want)


def test_embedded_base_makes_the_archive_self_contained(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    external = tallstore.pack(tmp_path / "ext.tall", base=base, tasks=tasks)
    embedded = tallstore.pack(tmp_path / "emb.tall", base=base, tasks=tasks, embed_base=True)
    assert embedded.describe(sizes=False)["base"]["embedded"] is True
    assert embedded.describe(sizes=False)["base"]["fingerprint"] == external.describe(sizes=False)["base"]["fingerprint"]
    wants = {t: external[t].state_dict() for t in tasks}
    base.unlink()
    reopened = tallstore.open(tmp_path / "emb.tall")
    for t in tasks:
        assert_bitwise(reopened[t].state_dict(), wants[t])


def test_wrong_base_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    right, other = make_base(seed=0), make_base(seed=1)
    task = make_task(right, 0)
    arc = pack_dicts(tmp_path, right, {"t": task})
    save(tmp_path / "other.safetensors", other)
    other_fp = tallstore.pack(tmp_path / "o.tall", base=tmp_path / "other.safetensors", tasks={"t": tmp_path / "t.safetensors"},
                              allow_unrelated_base=True)  # deliberately the wrong base: only its fingerprint is wanted
    expected, got = arc.describe(sizes=False)["base"]["fingerprint"], other_fp.describe(sizes=False)["base"]["fingerprint"]
    assert expected != got and expected.startswith("sha256:")
    with pytest.raises(BaseMismatchError) as err:
        tallstore.open(tmp_path / "zoo.tall", base=tmp_path / "other.safetensors")
    assert expected in str(err.value) and got in str(err.value)


def test_base_with_other_tensors_is_a_wrong_base(tmp_path: Path) -> None:
    base = make_base()
    arc = pack_dicts(tmp_path, base, {"t": make_task(base, 0)})
    smaller = dict(base)
    del smaller["norm.weight"]
    save(tmp_path / "smaller.safetensors", smaller)
    with pytest.raises(BaseMismatchError, match=arc.describe(sizes=False)["base"]["fingerprint"]):
        tallstore.open(tmp_path / "zoo.tall", base=tmp_path / "smaller.safetensors")


# --- extract ---------------------------------------------------------------------------------


def test_extract_to_a_safetensors_file(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    arc = tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    out = arc.extract("task1", tmp_path / "out" / "task1.safetensors")
    assert out == tmp_path / "out" / "task1.safetensors"
    want = arc["task1"].state_dict()
    assert header_keys(out) == list(want)
    loaded = load_file(out)
    assert_bitwise({k: loaded[k] for k in want}, want)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["task1.safetensors"]  # no temporaries left


def test_extract_to_a_folder_writes_hf_shards_and_index(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    arc = tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    want = arc["task0"].state_dict()
    out = arc.extract("task0", tmp_path / "task0", max_shard_bytes=2500)
    index = json.loads((out / INDEX).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert list(index["weight_map"]) == list(want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for key, shard in index["weight_map"].items():
        assert torch.equal(bits(load_file(out / shard)[key]), bits(want[key]))
    repacked = tallstore.pack(tmp_path / "again.tall", base=base, tasks={"x": out})  # an HF folder is an input too
    assert_bitwise(repacked["x"].state_dict(), want)


def test_extract_refuses_an_existing_output_unless_overwriting(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(1)
    arc = tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    out = tmp_path / "x.safetensors"
    out.write_text("keep me")
    with pytest.raises(OutputExistsError):
        arc.extract("task0", out)
    with pytest.raises(OutputExistsError, match="tallstore did not write"):
        arc.extract("task0", out, overwrite=True)
    assert out.read_text() == "keep me"
    out.unlink()
    arc.extract("task0", out)
    arc.extract("task0", out, overwrite=True)
    assert set(load_file(out)) == set(arc["task0"])


def test_pack_refuses_an_existing_output_unless_overwriting(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(1)
    (tmp_path / "zoo.tall").mkdir()
    with pytest.raises(OutputExistsError):
        tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    assert tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks, overwrite=True).tasks == ["task0"]


# --- inputs and streaming --------------------------------------------------------------------


def test_hf_folder_and_bin_inputs_pack_like_safetensors_files(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    plain = tallstore.pack(tmp_path / "plain.tall", base=base, tasks=tasks)
    folder = tmp_path / "base_hf"
    tallstore.pack(tmp_path / "tmp.tall", base=base, tasks={"b": base}).extract("b", folder, max_shard_bytes=3000)
    assert len(list(folder.glob("*.safetensors"))) > 1
    torch.save(load_file(tasks["task1"]), tmp_path / "task1.bin")
    mixed = tallstore.pack(tmp_path / "mixed.tall", base=folder, tasks={"task0": tasks["task0"], "task1": tmp_path / "task1.bin"})
    for t in tasks:
        got, want = mixed[t].state_dict(), plain[t].state_dict()
        assert_bitwise({k: got[k] for k in want}, want)


def streaming_collection(n_tasks: int = 6) -> tuple[dict, dict]:
    """Small base values (so τ_MTL's last bits reach θ_MTL) and odd shapes (partial blocks)."""
    g = torch.Generator().manual_seed(7)
    base = {"a": 1e-3 * torch.randn(53, 11, generator=g), "b": 1e-3 * torch.randn(101, generator=g),
            "c": torch.randn(3, 5, 7, generator=g)}
    tasks = {f"t{i}": {k: v + 10.0 ** (-i % 4) * torch.randn(v.shape, generator=g) for k, v in base.items()}
             for i in range(n_tasks)}
    return base, tasks


def test_small_row_blocks_give_the_same_archive_contents_as_one_block(tmp_path: Path) -> None:
    base, tasks = streaming_collection()
    results = []
    for block_elems in (8, 40, 1 << 22):
        sub = tmp_path / str(block_elems)
        sub.mkdir()
        arc = pack_dicts(sub, base, tasks, block_elems=block_elems, allow_unrelated_base=True)  # random, not fine-tunes
        assert arc.describe(sizes=False)["block_elems"] == block_elems
        root = zarr.open_group(str(sub / "zoo.tall"), mode="r")
        masks = [root[f"masks/{t}"][:] for t in range(len(tasks))]
        merged = {k: root[f"tensors/{entry(arc, k)['node']}/merged"][:] for k in base}
        results.append((masks, merged, {t: arc[t].state_dict() for t in tasks}))
    (masks0, merged0, sds0), rest = results[0], results[1:]
    for masks, merged, sds in rest:
        for m0, m in zip(masks0, masks):
            assert (m0 == m).all()
        for k in base:
            assert (merged0[k] == merged[k]).all(), k
        for t in tasks:
            assert_bitwise(sds[t], sds0[t])
    for i, name in enumerate(tasks):  # and each matches the spec's rebuild
        for k in base:
            want = reference_rebuild(base[k], [s[k] for s in tasks.values()], [0.4] * len(tasks))[i]
            assert torch.equal(bits(sds0[name][k]), bits(want)), (name, k)


def test_row_blocks_are_stored_as_separate_chunks(tmp_path: Path) -> None:
    base, tasks = streaming_collection(2)
    arc = pack_dicts(tmp_path, base, tasks, block_elems=40, allow_unrelated_base=True)  # random, not fine-tunes
    # "a" has rows of 11: 8 rows (88 elements, a multiple of 8) per block, 7 blocks for 53 rows
    chunks = zarr.open_group(str(tmp_path / "zoo.tall"), mode="r")[f"tensors/{entry(arc, 'a')['node']}/merged"].chunks
    assert chunks == (88,)


def test_invalid_lambda_is_refused(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    with pytest.raises(PlanError, match="finite number"):
        tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks, lam=-0.1)
    with pytest.raises(PlanError, match="unknown task"):
        tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks, lam={"nope": 0.3})
    assert not (tmp_path / "zoo.tall").exists()


@pytest.mark.parametrize(("n_tasks", "block_elems"), [(1, 1 << 22), (8, 1 << 21), (20, 1 << 19), (1000, 1 << 18)])
def test_default_row_block_shrinks_as_the_tasks_grow_in_number(n_tasks: int, block_elems: int) -> None:
    from tallstore.storage.geometry import auto_block_elems

    assert auto_block_elems(n_tasks) == block_elems


def test_a_pack_without_block_elems_records_the_block_its_task_count_picks(tmp_path: Path) -> None:
    from tallstore.storage.geometry import auto_block_elems

    base, tasks = streaming_collection()
    arc = pack_dicts(tmp_path, base, tasks, allow_unrelated_base=True)
    assert arc.describe(sizes=False)["block_elems"] == auto_block_elems(len(tasks))
