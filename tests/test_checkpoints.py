"""Checkpoint readers: safetensors files, HF folders (sharded + index), torch .bin/.pt files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tallstore import CheckpointError
from tallstore.checkpoint import open_checkpoint

INDEX = "model.safetensors.index.json"


def tensors() -> dict[str, torch.Tensor]:
    """A state dict whose key order is neither sorted nor grouped by dtype."""
    g = torch.Generator().manual_seed(0)
    return {
        "z.weight": torch.randn(6, 4, generator=g),
        "a.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "m.ids": torch.arange(5, dtype=torch.int32),
        "b.scale": torch.tensor(2.5, dtype=torch.float16),
    }


_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}


def raw_safetensors(sd: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """Header and data of ``sd`` in exactly its key order (``save_file`` would reorder the keys)."""
    header, data, offset = {}, b"", 0
    for key, t in sd.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return header, data


def write_raw(path: Path, header: object, data: bytes = b"") -> Path:
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def assert_same(ckpt_sd: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(ckpt_sd) == list(want)
    for k, v in want.items():
        assert ckpt_sd[k].dtype == v.dtype and ckpt_sd[k].shape == v.shape, k
        assert torch.equal(ckpt_sd[k], v), k


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.read(k).clone() for k in ck.keys}


# --- safetensors files -----------------------------------------------------------------------


def test_safetensors_file_keeps_header_key_order_dtypes_and_shapes(tmp_path: Path) -> None:
    sd = tensors()
    p = write_raw(tmp_path / "m.safetensors", *raw_safetensors(sd))
    with open_checkpoint(p) as ck:
        assert ck.keys == list(sd)
        assert [(ck.info(k).dtype.torch, ck.info(k).shape) for k in ck.keys] == [(v.dtype, tuple(v.shape)) for v in sd.values()]
    assert_same(read_all(p), sd)


def test_safetensors_reads_row_ranges(tmp_path: Path) -> None:
    sd = tensors()
    save_file(sd, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ck:
        assert torch.equal(ck.read("z.weight", 2, 5), sd["z.weight"][2:5])
        assert torch.equal(ck.read("z.weight", 4), sd["z.weight"][4:])
        assert torch.equal(ck.read("b.scale"), sd["b.scale"])


def test_missing_path_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")


def _valid() -> tuple[dict, bytes]:
    return raw_safetensors({"w": torch.ones(2, 3)})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "shorter than 8 bytes"),
        (lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "header length .* exceeds the file"),
        (lambda p: write_raw(p, b"{not json"), "not valid JSON"),
        (lambda p: write_raw(p, b"\xff\xfe"), "not valid JSON"),
        (lambda p: write_raw(p, [1, 2]), "not a JSON object"),
        (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "malformed header entry"),
        (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [1]}}), "malformed header entry"),
        (lambda p: write_raw(p, {"w": "x"}), "malformed header entry"),
        (lambda p: write_raw(p, {"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unsupported safetensors dtype"),
        (lambda p: write_raw(p, _valid()[0], _valid()[1][:-4]), "outside the file"),
        (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "outside the file"),
        (lambda p: write_raw(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "outside the file"),
    ],
    ids=["tiny", "huge-header", "bad-json", "not-utf8", "not-object", "negative-dim",
         "no-offsets", "entry-not-object", "unknown-dtype", "truncated", "size-mismatch", "reversed-offsets"],
)
def test_malformed_safetensors_header_is_a_one_line_checkpoint_error(tmp_path: Path, make, message: str) -> None:
    p = tmp_path / "bad.safetensors"
    make(p)
    with pytest.raises(CheckpointError, match=message) as err:
        open_checkpoint(p)
    assert "\n" not in str(err.value) and str(p) in str(err.value)


def test_truncated_real_safetensors_file_is_detected_before_reading(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(tensors(), p)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(p)


# --- Hugging Face folders --------------------------------------------------------------------


def write_sharded(folder: Path, sd: dict[str, torch.Tensor], split: int) -> dict[str, str]:
    folder.mkdir()
    items = list(sd.items())
    shards = {"model-00001-of-00002.safetensors": dict(items[:split]), "model-00002-of-00002.safetensors": dict(items[split:])}
    weight_map = {}
    for name, part in shards.items():
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_hf_sharded_folder_reads_every_tensor_from_its_shard(tmp_path: Path) -> None:
    sd = tensors()
    write_sharded(tmp_path / "m", sd, split=2)
    got = read_all(tmp_path / "m")
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype
    with open_checkpoint(tmp_path / "m") as ck:
        assert {p.name for p in ck.files} == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_hf_index_decides_which_shard_holds_a_tensor(tmp_path: Path) -> None:
    sd = tensors()
    write_sharded(tmp_path / "m", sd, split=2)
    stale = {"z.weight": torch.zeros(6, 4)}  # a leftover copy in the other shard is ignored
    save_file({**stale, "m.ids": sd["m.ids"], "b.scale": sd["b.scale"]}, tmp_path / "m" / "model-00002-of-00002.safetensors")
    assert torch.equal(read_all(tmp_path / "m")["z.weight"], sd["z.weight"])


def test_hf_folder_without_index_reads_model_safetensors(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    save_file(tensors(), tmp_path / "m" / "model.safetensors")
    assert sorted(read_all(tmp_path / "m")) == sorted(tensors())


def test_hf_folder_with_one_bin_reads_it(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    torch.save(tensors(), tmp_path / "m" / "pytorch_model.bin")
    assert_same(read_all(tmp_path / "m"), tensors())


def test_same_tensor_in_two_unindexed_shards_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "m" / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "m" / "b.safetensors")
    with pytest.raises(CheckpointError, match="appears in two files"):
        open_checkpoint(tmp_path / "m")


def test_folder_without_weights_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "m")


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("{oops", "not a valid safetensors index"),
        (json.dumps({"metadata": {}}), "not a valid safetensors index"),
        (json.dumps({"weight_map": ["a"]}), "not a valid safetensors index"),
        (json.dumps({"weight_map": {"w": "missing.safetensors"}}), "shard missing.safetensors is missing"),
        (json.dumps({"weight_map": {"w": "../model.safetensors"}}), "not a plain file name"),
        (json.dumps({"weight_map": {"w": "model.safetensors", "ghost": "model.safetensors"}}), "'ghost' is not in its shard"),
    ],
    ids=["bad-json", "no-weight-map", "weight-map-not-object", "missing-shard", "path-in-shard-name", "tensor-not-in-shard"],
)
def test_bad_hf_index_is_a_checkpoint_error(tmp_path: Path, index: str, message: str) -> None:
    (tmp_path / "m").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "m" / "model.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")  # what "../" would reach
    (tmp_path / "m" / INDEX).write_text(index)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "m")


# --- torch .bin / .pt ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_file_keeps_dict_order_and_reads_row_ranges(tmp_path: Path, suffix: str) -> None:
    sd = tensors()
    p = tmp_path / f"m{suffix}"
    torch.save(sd, p)
    assert_same(read_all(p), sd)
    with open_checkpoint(p) as ck:
        assert torch.equal(ck.read("z.weight", 1, 3), sd["z.weight"][1:3])


def test_legacy_torch_serialization_is_read(tmp_path: Path) -> None:
    torch.save(tensors(), tmp_path / "m.bin", _use_new_zipfile_serialization=False)
    assert_same(read_all(tmp_path / "m.bin"), tensors())


def test_torch_file_with_a_state_dict_entry_is_unwrapped(tmp_path: Path) -> None:
    torch.save({"state_dict": tensors(), "epoch": 3}, tmp_path / "m.pt")
    assert_same(read_all(tmp_path / "m.pt"), tensors())


class _Payload:
    """Unpickling this would create ``marker``: the reader must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_torch_file_holding_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused") as err:
        open_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "\n" not in str(err.value)


def test_torch_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="not a state dict of named tensors"):
        open_checkpoint(tmp_path / "m.pt")


def test_garbage_torch_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "m.bin").write_bytes(b"this is not a pickle or a zip archive")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "m.bin")
    assert "\n" not in str(err.value)


def saved(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """``sd`` written to ``path``: safetensors, or a torch file for any other suffix."""
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_read_bytes_are_the_stored_bytes_of_the_same_rows_as_read(tmp_path: Path, fmt: str) -> None:
    from tallstore import dtypes

    sd = {"m": torch.randn(5, 3), "s": torch.tensor(3.0), "h": torch.randn(4).to(torch.bfloat16),
          "e": torch.empty(0, 2), "i": torch.arange(6).reshape(3, 2)}
    with open_checkpoint(saved(sd, tmp_path / f"x.{fmt}")) as ck:
        for key in sd:
            for a, b in [(0, 1), (1, 2), (0, None), (2, 5)]:
                assert ck.read_bytes(key, a, b) == dtypes.to_storage(ck.read(key, a, b)).tobytes(), (key, a, b)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("into", [torch.float32, torch.bfloat16])
def test_read_into_fills_the_given_tensor_with_the_rows_read_gives(tmp_path: Path, fmt: str, into: torch.dtype) -> None:
    sd = {"m": torch.randn(7, 3), "h": torch.randn(4, 2).to(torch.bfloat16)}
    with open_checkpoint(saved(sd, tmp_path / f"x.{fmt}")) as ck:
        for key in sd:
            for a, b in [(0, 1), (1, 3), (2, 4)]:
                out = torch.full(((b - a) * sd[key].shape[1],), float("nan"), dtype=into)
                ck.read_into(key, a, b, out)
                assert torch.equal(out, ck.read(key, a, b).reshape(-1).to(into)), (key, a, b)


def test_read_into_a_truncated_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"m": torch.randn(64, 4)}, path)
    with open_checkpoint(path) as ck:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
        with pytest.raises(CheckpointError, match="truncated"):
            ck.read_into("m", 0, 64, torch.empty(256))
