"""Security: no code runs from inputs or archives, and no name reaches outside the archive folder."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import TINY_BLOCK, one_error_line, read_all, run_cli, same_bits, tiny_base, tiny_collection
from safetensors.torch import load_file, save_file

import tallstore
from craft import craft
from tallstore.errors import CheckpointError, CorruptArchiveError, PlanError

PACKAGE = Path(tallstore.__file__).parent


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:  # type: ignore[type-arg]
        return (os.system, (f"touch {self.marker}",))


def malicious_files(folder: Path, marker: Path) -> list[Path]:
    """A torch zip, a legacy raw pickle, a .pt and an HF folder, each with a code-running object."""
    folder.mkdir()
    good = tiny_base()
    zipped = folder / "zip.bin"
    torch.save({**good, "w": RunsCode(marker)}, zipped)
    legacy = folder / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"w": RunsCode(marker)}, protocol=2))
    pt = folder / "model.pt"
    torch.save({"state_dict": {**good, "extra": RunsCode(marker)}}, pt)
    hf = folder / "hf"
    hf.mkdir()
    torch.save([RunsCode(marker)], hf / "pytorch_model.bin")
    return [zipped, legacy, pt, hf]


def test_malicious_pickles_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    base, tasks = tiny_collection(tmp_path / "in")
    for path in malicious_files(tmp_path / "evil", marker):
        with pytest.raises(CheckpointError, match="refused|cannot load"):
            tallstore.pack(tmp_path / "arc", base, {"evil": path})
        with pytest.raises(CheckpointError):
            tallstore.pack(tmp_path / "arc", path, tasks)
        line = one_error_line(run_cli("pack", tmp_path / "arc", "--base", base, "--task", f"evil={path}", "-q"))
        assert str(path) in line
        assert not marker.exists() and not (tmp_path / "arc").exists()


def test_plain_weights_in_a_bin_file_still_load(tmp_path: Path) -> None:
    base, tasks = tiny_collection(tmp_path / "in")
    task = load_file(tasks["t0"])
    torch.save(task, tmp_path / "t0.bin")
    tallstore.pack(tmp_path / "arc", base, {"t0": tmp_path / "t0.bin"})
    assert same_bits(read_all(tmp_path / "arc")["t0"], task)


def test_only_weights_only_torch_loads_and_no_unpickling_or_eval_in_the_package() -> None:
    loads = 0
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {a.name for a in node.names}, source
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("eval", "exec", "pickle.load", "pickle.loads", "marshal.loads", "dill.loads"), (source, name)
            assert "Unpickler" not in name, (source, name)
            if name == "torch.load":
                loads += 1
                assert {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only") == "True", (source, ast.unparse(node))
    assert loads >= 1


CRAFTED = [
    "../../escape", "/abs/escape", "a/../../../b", "..", ".", "", "\x00", "a\x00/../b", "zarr.json", "~",
    "~2e~2e", "A", "a", "tensors", "masks/0", "c/0", "..\\..\\win", "nul", "CON", "é/..", "日本/../x", "x" * 400,
]


def snapshot(folder: Path, skip: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in folder.rglob("*") if p.is_file() and skip not in p.parents}


def test_crafted_tensor_names_cannot_write_outside_the_archive(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    base = tiny_base()
    extra = {name: torch.full((4,), float(i)) for i, name in enumerate(CRAFTED)}
    save_file({**base, **extra}, sandbox / "base.safetensors")
    task = {k: (v + 0.25 if v.is_floating_point() else v) for k, v in {**base, **extra}.items()}
    task.update({f"head/{name}": torch.ones(2, i + 1) for i, name in enumerate(CRAFTED)})
    save_file(task, sandbox / "task.safetensors")
    arc = sandbox / "deep" / "arc"
    before = snapshot(tmp_path, arc)
    tallstore.pack(arc, sandbox / "base.safetensors", {"t": sandbox / "task.safetensors"}, embed_base=True, block_elems=TINY_BLOCK)
    assert snapshot(tmp_path, arc) == before
    assert sorted(p.name for p in (sandbox / "deep").iterdir()) == ["arc"]
    for p in arc.rglob("*"):
        rel = p.relative_to(arc)
        assert all(part not in ("", ".", "..") and "\x00" not in part for part in rel.parts)
        assert p.resolve().is_relative_to(arc.resolve()) and not p.is_symlink()
    assert same_bits(read_all(arc)["t"], load_file(sandbox / "task.safetensors"))


@pytest.mark.parametrize("name", ["../x", "a//b", "a/../b", "/abs", "..", "", ".hidden", "a\x00", "a\n", "x" * 257])
def test_unsafe_task_names_are_refused(tmp_path: Path, name: str) -> None:
    base, tasks = tiny_collection(tmp_path / "in")
    with pytest.raises(PlanError, match="invalid task name"):
        tallstore.pack(tmp_path / "arc", base, {name: tasks["t0"]})
    assert not (tmp_path / "arc").exists()


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    base, tasks = tiny_collection(tmp_path / "in")
    tallstore.pack(tmp_path / "arc", base, tasks, embed_base=True, block_elems=TINY_BLOCK)
    return tmp_path / "arc"


def rewrite(location: Path, path_in_consolidated: str | None, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit the manifest (``None``) or one node's metadata everywhere it lives, digest resealed."""
    if path_in_consolidated is None:
        craft(location, manifest=edit)
    else:
        craft(location, node=(path_in_consolidated, edit))


@pytest.mark.parametrize("node", ["../../outside", "..", ".", "a/b", "/abs", "", "UPPER"])
def test_archive_node_names_that_leave_the_tensors_group_are_refused(packed: Path, node: str) -> None:
    decoy = packed.parent / "outside"
    shutil.copytree(packed / "tensors" / "w", decoy)

    def edit(m: dict) -> None:  # type: ignore[type-arg]
        next(e for e in m["tensors"] if e["key"] == "w")["node"] = node

    rewrite(packed, None, edit)
    with pytest.raises(CorruptArchiveError, match="unsafe or duplicate node name"):
        tallstore.open(packed)
    assert "unsafe or duplicate node name" in one_error_line(run_cli("extract", packed, "t0", "-o", packed.parent / "x.safetensors"))


def test_array_with_a_codec_outside_the_zarr_spec_is_never_decoded(packed: Path) -> None:
    def edit(meta: dict) -> None:  # type: ignore[type-arg]
        meta["codecs"].insert(1, {"name": "numcodecs.zlib", "configuration": {"level": 1}})

    rewrite(packed, "tensors/w/merged", edit)
    with pytest.raises(CorruptArchiveError, match="numcodecs.zlib.*outside the Zarr v3 spec"):
        tallstore.open(packed)["t0"]["w"]
    assert tallstore.open(packed)["t0"]["ids"] is not None
    problems = tallstore.open(packed).verify().problems
    assert any("numcodecs.zlib" in p for p in problems), problems


def test_archive_metadata_is_plain_json_everywhere(packed: Path) -> None:
    for meta in packed.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        names = {c.get("name") for c in doc.get("codecs", [])}
        assert names <= {"bytes", "blosc", "zstd", "crc32c"}, (meta, names)
