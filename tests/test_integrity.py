"""Integrity: every stored chunk is checksummed, corruption is always detected, ``verify`` proves it.

The corruption sweep flips, truncates and deletes files of a packed archive (a deterministic pass
over every file plus hypothesis-drawn cases, well over 200 in all): each case must end in a
tallstore error or in tensors bit-identical to what was packed, and ``verify`` must flag every
damaged chunk file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from reliability_helpers import TINY_BLOCK, one_error_line, read_all, run_cli, same_bits, tiny_collection

from craft import naive_task_edit

import tallstore
from tallstore.errors import ArchiveError, CorruptArchiveError, TallstoreError


class Packed:
    """An archive with an embedded base, its inputs, and what it rebuilt when intact."""

    def __init__(self, root: Path) -> None:
        self.base, self.tasks = tiny_collection(root / "inputs")
        self.location = root / "arc"
        tallstore.pack(self.location, self.base, self.tasks, embed_base=True, block_elems=TINY_BLOCK)
        self.reference = read_all(self.location)
        self.files = sorted(p for p in self.location.rglob("*") if p.is_file())

    @staticmethod
    def is_chunk(path: Path) -> bool:
        return path.name != "zarr.json"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Packed:
    return Packed(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def copy(packed: Packed, tmp_path: Path) -> Path:
    """A private copy of the packed archive, free to damage."""
    return Path(shutil.copytree(packed.location, tmp_path / "arc"))


@contextlib.contextmanager
def damage(path: Path, op: str, where: float, bit: int) -> Iterator[None]:
    """Flip one bit, cut at least one byte off, or delete ``path`` for the duration of the ``with`` block."""
    original = path.read_bytes()
    if op == "delete":
        path.unlink()
    elif op == "truncate":
        path.write_bytes(original[: min(int(where * len(original)), len(original) - 1)])
    else:
        data = bytearray(original)
        data[min(int(where * len(data)), len(data) - 1)] ^= 1 << bit
        path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def check_case(packed: Packed, path: Path, op: str, where: float, bit: int) -> str:
    """Damage one file, then demand a clear error or exact tensors; chunk damage must be flagged."""
    with damage(path, op, where, bit):
        try:
            got = read_all(packed.location)
            outcome = "intact"
            assert all(same_bits(got[n], packed.reference[n]) for n in packed.reference), (path, op, where, bit)
        except TallstoreError:
            outcome = "error"
        try:
            report = tallstore.open(packed.location).verify()
            flagged = not report.ok
        except TallstoreError:
            flagged = True
        if Packed.is_chunk(path):
            assert flagged, (path, op, where, bit)
        if outcome == "error":
            assert flagged, (path, op, where, bit)
    return outcome


def test_every_array_ends_its_codec_chain_with_crc32c(packed: Packed) -> None:
    root = zarr.open_group(packed.location, mode="r")
    arrays = [node for _, node in root.members(max_depth=None) if isinstance(node, zarr.Array)]
    assert len(arrays) == tallstore.open(packed.location).verify().arrays
    for a in arrays:
        assert a.metadata.to_dict()["codecs"][-1]["name"] == "crc32c", a.path


def test_intact_archive_verifies_at_every_level(packed: Packed) -> None:
    report = tallstore.open(packed.location).verify(deep=True, against=packed.tasks)
    assert report.ok, report.problems
    assert report.arrays >= 8 and report.chunks > report.arrays
    assert report.base_checked and report.tasks_rebuilt == 2 and report.tensors_rebuilt == 10
    for a in report.against:
        assert a.files_match and a.tensors == 5
        assert a.relative_error == pytest.approx(a.recorded_error, rel=1e-6)


def test_corrupted_chunk_error_names_archive_tensor_and_task(copy: Path) -> None:
    chunk = copy / "tensors" / "w" / "merged" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptArchiveError) as e:
        tallstore.open(copy)["t1"]["w"]
    assert str(copy) in str(e.value) and "'w'" in str(e.value) and "'t1'" in str(e.value)


@pytest.mark.parametrize("chunk", ["tensors/w/merged/c/2", "tensors/w/base/c/0", "tensors/v/base/c/0", "masks/0/c/0"])
def test_missing_chunk_is_caught_by_rebuild_crc_and_verify(copy: Path, chunk: str) -> None:
    (copy / chunk).unlink()
    with pytest.raises(CorruptArchiveError, match="checksum|corrupt"):
        read_all(copy)
    problems = tallstore.open(copy).verify().problems
    assert any(chunk in p and "missing" in p for p in problems), problems


def test_missing_chunk_is_an_error_even_where_no_checksum_covers_the_result(copy: Path) -> None:
    (copy / "tensors" / "w" / "merged" / "c" / "1").unlink()
    with pytest.raises(CorruptArchiveError, match="chunk tensors/w/merged/c/1 is missing"):
        tallstore.open(copy).merge("consensus", k=1)["w"]


def test_all_zero_chunks_are_stored_so_absence_means_loss(tmp_path: Path) -> None:
    base, tasks = tiny_collection(tmp_path / "in")
    w0 = load_file(base)["w"][:4]
    edited = {}
    for name in ("t0", "t1"):
        task = load_file(tasks[name])
        task["head"] = torch.zeros(3, 8)
        task["w"][:4] = w0
        edited[name] = tmp_path / f"{name}.safetensors"
        save_file(task, edited[name])
    tallstore.pack(tmp_path / "arc", base, edited, block_elems=TINY_BLOCK)
    assert (tmp_path / "arc" / "tensors" / "head" / "exact" / "0" / "c" / "0").is_file()
    assert (tmp_path / "arc" / "tensors" / "w" / "merged" / "c" / "0").is_file()
    report = tallstore.open(tmp_path / "arc").verify()
    assert report.ok and report.chunks == len(list((tmp_path / "arc").rglob("c/*")))


def test_a_torn_or_deleted_root_document_is_read_from_the_checksummed_copy(copy: Path, packed: Packed) -> None:
    root = copy / "zarr.json"
    root.write_bytes(root.read_bytes()[:100])
    assert same_bits(read_all(copy)["t1"], packed.reference["t1"])
    report = tallstore.open(copy).verify()
    assert not report.ok and "root zarr.json is damaged" in report.problems[0]
    root.unlink()
    assert same_bits(read_all(copy)["t0"], packed.reference["t0"])
    assert "root zarr.json is damaged" in one_error_line(run_cli("verify", copy))


def test_without_the_root_document_and_its_copy_the_archive_is_an_archive_error(copy: Path) -> None:
    root = copy / "zarr.json"
    root.write_bytes(root.read_bytes()[:100])
    (copy / "meta" / "manifest" / "c" / "0").unlink()
    with pytest.raises(ArchiveError, match="not a readable tallstore archive"):
        tallstore.open(copy)
    root.unlink()
    with pytest.raises(ArchiveError):
        tallstore.open(copy)
    assert "not a readable tallstore archive" in one_error_line(run_cli("verify", copy))


def test_task_metadata_missing_without_consolidation_is_read_from_the_copy_and_reported(copy: Path, packed: Packed) -> None:
    meta = json.loads((copy / "zarr.json").read_text())
    del meta["consolidated_metadata"]
    (copy / "zarr.json").write_text(json.dumps(meta))
    (copy / "tasks" / "1" / "zarr.json").unlink()
    arc = tallstore.open(copy)
    assert same_bits(arc["t1"].state_dict(), packed.reference["t1"])
    problems = " ".join(arc.verify().problems)
    assert "group tasks/1/zarr.json is missing" in problems and "task 1 metadata is missing" in problems
    (copy / "meta" / "manifest" / "c" / "0").unlink()
    with pytest.raises(CorruptArchiveError, match="task 1 metadata is missing"):
        tallstore.open(copy)


def zero_w_digest(attrs: dict) -> None:  # type: ignore[type-arg]
    row = next(r for r in attrs["tensors"] if r[0] == "w")
    row[4] = "0" * 64


def test_an_edited_task_record_fails_the_manifest_digest_and_the_copy_is_read(copy: Path, packed: Packed) -> None:
    naive_task_edit(copy, 0, zero_w_digest)
    report = tallstore.open(copy).verify(deep=True)
    assert "does not match its digest" in report.problems[0] and report.tasks_rebuilt == 2
    assert same_bits(read_all(copy)["t0"], packed.reference["t0"])
    (copy / "meta" / "manifest" / "c" / "0").unlink()
    with pytest.raises(CorruptArchiveError, match="does not match its digest"):
        tallstore.open(copy)


def test_a_wrong_recorded_digest_in_a_v1_archive_is_found_by_deep_verify_only(tmp_path: Path) -> None:
    v1 = tmp_path / "v1.tall"
    shutil.copytree(Path(__file__).parent / "data" / "v1" / "f32-ties-embedded.tall", v1)

    def edit(attrs: dict) -> None:  # type: ignore[type-arg]
        attrs["tensors"][0][4] = "0" * 64

    naive_task_edit(v1, 0, edit)
    assert tallstore.open(v1).verify().ok
    deep = tallstore.open(v1).verify(deep=True)
    assert not deep.ok and deep.tasks_rebuilt == len(deep.against) + 2
    assert any("of task 't0' rebuilds to sha256" in p for p in deep.problems), deep.problems


def test_verify_against_a_different_checkpoint_reports_the_difference(packed: Packed) -> None:
    report = tallstore.open(packed.location).verify(against={"t0": packed.tasks["t1"]})
    (a,) = report.against
    assert report.ok and not a.files_match
    assert a.relative_error > 2 * a.recorded_error and a.exact_tensors < a.tensors


def test_verify_against_an_unknown_task_is_an_error(packed: Packed) -> None:
    with pytest.raises(ArchiveError, match="no task 'nope'"):
        tallstore.open(packed.location).verify(against={"nope": packed.tasks["t0"]})
    assert "no task 'nope'" in one_error_line(run_cli("verify", packed.location, "--against", f"nope={packed.base}"))


def test_verify_cli_reports_each_level_and_exits_zero(packed: Packed) -> None:
    code, out, err = run_cli("verify", packed.location, "--deep", "--against", f"t1={packed.tasks['t1']}")
    assert code == 0 and err == ""
    assert "chunks present and checksummed" in out and "2 tasks rebuilt" in out and "t1 vs" in out
    code, out, _ = run_cli("verify", packed.location, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_verify_cli_lists_problems_and_ends_in_one_error_line(copy: Path) -> None:
    (copy / "tensors" / "w" / "merged" / "c" / "0").unlink()
    result = run_cli("verify", copy, "--deep")
    line = one_error_line(result)
    assert "verification failed" in line and "chunk tensors/w/merged/c/0 is missing" in line
    assert "problem: " in result[1]


def test_sweep_of_every_file_deleted_truncated_and_flipped(packed: Packed) -> None:
    outcomes = []
    for i, path in enumerate(packed.files):
        for op, where in (("delete", 0.0), ("truncate", 0.5), ("flip", (i * 0.37) % 1.0)):
            outcomes.append(check_case(packed, path, op, where, i % 8))
    assert len(outcomes) >= 100 and "error" in outcomes and "intact" in outcomes


@settings(max_examples=110, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pick=st.integers(min_value=0, max_value=10_000),
    op=st.sampled_from(["flip", "flip", "truncate", "delete"]),
    where=st.floats(min_value=0.0, max_value=1.0),
    bit=st.integers(min_value=0, max_value=7),
    chunks_only=st.booleans(),
)
def test_random_damage_ends_in_an_error_or_exact_tensors(
    packed: Packed, pick: int, op: str, where: float, bit: int, chunks_only: bool,
) -> None:
    pool = [p for p in packed.files if Packed.is_chunk(p)] if chunks_only else packed.files
    check_case(packed, pool[pick % len(pool)], op, where, bit)


def test_verify_on_an_object_store_finds_a_deleted_chunk(tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    import fsspec

    base, tasks = tiny_collection(tmp_path / "in")
    so = s3_server.storage_options
    url = f"{s3_bucket}/arc"
    tallstore.pack(url, base, tasks, embed_base=True, block_elems=TINY_BLOCK, storage_options=so)
    assert tallstore.open(url, storage_options=so).verify(deep=True).ok
    fsspec.filesystem("s3", skip_instance_cache=True, **so).rm(f"{url}/tensors/w/base/c/1")
    with pytest.raises(CorruptArchiveError, match="chunk tensors/w/base/c/1 is missing"):
        tallstore.open(url, storage_options=so)["t0"]["w"]
    problems = tallstore.open(url, storage_options=so).verify().problems
    assert any("tensors/w/base/c/1 is missing" in p for p in problems), problems


def test_verify_flags_a_node_metadata_that_disagrees_with_the_consolidated_copy(copy: Path) -> None:
    own = copy / "tensors" / "w" / "merged" / "zarr.json"
    meta = json.loads(own.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [7]
    own.write_text(json.dumps(meta))
    assert same_bits(read_all(copy)["t0"], tallstore.open(copy)["t0"].state_dict())
    problems = tallstore.open(copy).verify().problems
    assert any("tensors/w/merged/zarr.json" in p for p in problems), problems


def test_chunk_count_matches_the_files_on_disk(packed: Packed) -> None:
    report = tallstore.open(packed.location).verify()
    chunk_files = [p for p in packed.files if Packed.is_chunk(p)]
    assert report.chunks == len(chunk_files) and os.path.isdir(packed.location)


def test_deep_verify_hashes_archived_files_so_a_replaced_file_with_a_valid_chunk_crc_is_found(tmp_path: Path) -> None:
    import crc32c
    from numcodecs import Zstd

    base = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text('{"model_type": "bert"}')
    save_file({"w": base["w"] + 0.01}, tmp_path / "t.safetensors")
    arc = tallstore.pack(tmp_path / "a.tall", tmp_path / "base", {"t": tmp_path / "t.safetensors"})
    (chunk,) = (p for p in (tmp_path / "a.tall" / "files").rglob("c/0"))
    body = bytes(Zstd().encode(b'{"model_type": "gpt2"}'))  # same length, a valid frame and chunk CRC
    chunk.write_bytes(body + crc32c.crc32c(body).to_bytes(4, "little"))
    assert arc.verify().ok
    problems = arc.verify(deep=True).problems
    assert len(problems) == 1 and "config.json" in problems[0] and "SHA-256" in problems[0]
