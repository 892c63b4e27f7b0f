"""Publishing: outputs appear whole and durable, never replacing what is not tallstore's.

The final rename never replaces anything (``renameat2(RENAME_NOREPLACE)``, and the fallback that
claims the name first, both exercised); ``--force`` replaces only a tallstore archive, an output
tallstore wrote or an empty folder, and only the very one it checked; every file and folder is
fsynced before the rename and the parent after; leftovers of dead writers are swept; outputs
follow the umask; a full disk is a one-line ``TallstoreError`` naming the output; a remote pack
never clears a prefix holding objects that are not an archive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from reliability_helpers import one_error_line, read_all, run_cli, same_bits, tiny_collection
from safetensors.torch import load_file, save_file

import tallstore
from tallstore import OutputExistsError, TallstoreError, publishing
from tallstore.checkpoint import writer
from tallstore.storage import layout

Inputs = tuple[Path, dict[str, Path], Path]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """A tiny collection and an archive of it."""
    root = tmp_path_factory.mktemp("publishing")
    base, tasks = tiny_collection(root / "in", n_tasks=2)
    tallstore.pack(root / "arc", base, tasks)
    return base, tasks, root / "arc"


@pytest.fixture(params=["renameat2", "claiming"])
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with ``renameat2(RENAME_NOREPLACE)`` and with the fallback that claims the name."""
    if request.param == "claiming":
        monkeypatch.setattr(publishing, "_renameat2", None)
    else:
        assert publishing._renameat2 is not None, "glibc ≥ 2.28 has renameat2"
    return str(request.param)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def once(action: Callable[[], object]) -> Callable[[int], None]:
    """A pack progress callback doing ``action`` on its first call: something happening mid-pack."""
    done: list[bool] = []

    def progress(_: int) -> None:
        if not done:
            done.append(True)
            action()

    return progress


def same_archive(a: Path, b: Path) -> bool:
    got, want = read_all(a), read_all(b)
    return list(got) == list(want) and all(same_bits(got[n], want[n]) for n in want)


# --- never replacing -------------------------------------------------------------------------


@pytest.mark.usefixtures("mechanism")
def test_rename_noreplace_moves_onto_nothing_and_refuses_whatever_is_there(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("new")
    (tmp_path / "file").write_text("new")
    for there in ("a file", "an empty folder", "a folder"):
        dst = tmp_path / "dst"
        if there == "a file":
            dst.write_text("theirs")
        else:
            dst.mkdir()
            if there == "a folder":
                (dst / "theirs").write_text("theirs")
        for src in (tmp_path / "src", tmp_path / "file"):
            with pytest.raises(FileExistsError):
                publishing.rename_noreplace(src, dst)
            assert src.exists()
        assert (dst.read_text() if dst.is_file() else sorted(os.listdir(dst))) in ("theirs", [], ["theirs"])
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    publishing.rename_noreplace(tmp_path / "src", tmp_path / "dir")
    publishing.rename_noreplace(tmp_path / "file", tmp_path / "moved")
    assert (tmp_path / "dir" / "f").read_text() == (tmp_path / "moved").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["dir", "moved"]


def test_the_claiming_fallback_fails_if_the_claimed_folder_is_filled_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publishing, "_renameat2", None)
    rename = os.rename

    def someone_fills_the_claim(src: str, dst: str) -> None:
        (Path(dst) / "theirs").write_text("theirs")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", someone_fills_the_claim)
    (tmp_path / "src").mkdir()
    with pytest.raises(FileExistsError):
        publishing.rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "theirs").read_text() == "theirs" and (tmp_path / "src").is_dir()


@pytest.mark.usefixtures("mechanism")
@pytest.mark.parametrize("overwrite", [False, True])
def test_of_two_packs_racing_to_one_output_exactly_one_publishes(inputs: Inputs, tmp_path: Path, overwrite: bool) -> None:
    base, tasks, _ = inputs
    target = tmp_path / "arc"
    rival = once(lambda: tallstore.pack(target, base, tasks, lam=0.2))
    with pytest.raises(OutputExistsError, match="appeared while tallstore was writing it"):
        tallstore.pack(target, base, tasks, overwrite=overwrite, progress=rival)
    assert tallstore.open(target).describe(sizes=False)["lam"] == [0.2, 0.2]
    assert hidden(tmp_path) == []


def test_of_two_console_packs_started_together_exactly_one_succeeds(inputs: Inputs, tmp_path: Path) -> None:
    base, tasks, _ = inputs
    argv = [str(Path(sys.executable).with_name("tallstore")), "pack", str(tmp_path / "arc"), "--base", str(base), "-q",
            *[a for n, p in tasks.items() for a in ("--task", f"{n}={p}")]]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.communicate()[1]) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert results[1][1].startswith(f"error: {tmp_path / 'arc'}") and len(results[1][1].splitlines()) == 1
    assert same_archive(tmp_path / "arc", inputs[2]) and hidden(tmp_path) == []


@pytest.mark.usefixtures("mechanism")
def test_a_folder_made_at_the_output_while_packing_is_left_alone(inputs: Inputs, tmp_path: Path) -> None:
    base, tasks, _ = inputs
    target = tmp_path / "arc"

    def user_makes_a_folder() -> None:
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    with pytest.raises(OutputExistsError, match="left alone"):
        tallstore.pack(target, base, tasks, progress=once(user_makes_a_folder))
    assert os.listdir(target) == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert hidden(tmp_path) == []


@pytest.mark.usefixtures("mechanism")
@pytest.mark.parametrize("name", ["x.safetensors", "folder"])
def test_extract_never_overwrites_what_appeared_at_its_output_meanwhile(inputs: Inputs, tmp_path: Path, name: str) -> None:
    view = tallstore.open(inputs[2])["t0"]
    out = tmp_path / name
    calls: list[str] = []

    def get(key: str) -> torch.Tensor:
        if not calls:
            out.write_text("mine") if name.endswith(".safetensors") else out.mkdir()
        calls.append(key)
        return view[key]

    with pytest.raises(OutputExistsError, match="appeared while"):
        writer.save(out, [(k, view.info(k)) for k in view], get)
    assert (out.read_text() == "mine") if out.is_file() else os.listdir(out) == []
    assert hidden(tmp_path) == []


def hf_folder(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    """A model folder as Hugging Face writes it (not tallstore)."""
    folder.mkdir()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: "model.safetensors" for k in sd}}))
    (folder / "config.json").write_text("{}")


def test_force_refuses_to_replace_what_tallstore_did_not_write(inputs: Inputs, tmp_path: Path) -> None:
    base, tasks, archive = inputs
    model = tmp_path / "model"
    hf_folder(model, load_file(tasks["t0"]))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    plain = tmp_path / "plain.safetensors"
    shutil.copy(tasks["t1"], plain)
    for out, what in ((model, "config.json, model.safetensors, model.safetensors.index.json"),
                      (plain, "a file tallstore did not write")):
        for argv in (["pack", out, "--base", base, "--task", f"a={tasks['t0']}", "-q"], ["extract", archive, "t0", "-o", out]):
            line = one_error_line(run_cli(*argv, "--force"))
            assert str(out) in line and what in line and "left alone" in line
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert plain.read_bytes() == tasks["t1"].read_bytes() and hidden(tmp_path) == []


def test_force_replaces_archives_outputs_tallstore_wrote_and_empty_folders(inputs: Inputs, tmp_path: Path) -> None:
    base, tasks, archive = inputs
    pack = ["--base", base, *[a for n, p in tasks.items() for a in ("--task", f"{n}={p}")], "-q", "--force"]
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    root = {"zarr_format": 3, "node_type": "group", "attributes": {layout.ATTR: {"complete": False}}}
    (incomplete / "zarr.json").write_text(json.dumps(root))
    (tmp_path / "empty").mkdir()
    for target in (incomplete, tmp_path / "empty"):
        assert run_cli("pack", target, *pack)[0] == 0 and same_archive(target, archive)
    assert run_cli("pack", incomplete, *pack[:-1], "--lam", "0.2", "--force")[0] == 0
    assert tallstore.open(incomplete).describe(sizes=False)["lam"] == [0.2, 0.2]
    for out in (tmp_path / "x.safetensors", tmp_path / "folder"):
        assert run_cli("extract", archive, "t0", "-o", out)[0] == 0
        assert run_cli("extract", archive, "t1", "-o", out, "--force")[0] == 0
        assert run_cli("merge", archive, "-o", out, "--force")[0] == 0
        assert run_cli("merge", archive, "-o", out, "--force", "--method", "ta")[0] == 0
    assert hidden(tmp_path) == []


def test_force_refuses_an_extracted_folder_someone_added_a_file_to_or_changed(inputs: Inputs, tmp_path: Path) -> None:
    _, _, archive = inputs
    out = tmp_path / "folder"
    assert run_cli("extract", archive, "t0", "-o", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    line = one_error_line(run_cli("extract", archive, "t1", "-o", out, "--force"))
    assert str(out) in line and "left alone" in line and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")  # resized: no longer what tallstore wrote
    one_error_line(run_cli("extract", archive, "t1", "-o", out, "--force"))
    assert weights.read_bytes().endswith(b"\0")


def test_force_moves_aside_only_the_archive_it_checked(inputs: Inputs, tmp_path: Path) -> None:
    base, tasks, archive = inputs
    target = tmp_path / "arc"
    shutil.copytree(archive, target)

    def swap_in_a_user_folder() -> None:
        target.rename(tmp_path / "moved")
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    with pytest.raises(OutputExistsError, match="changed while"):
        tallstore.pack(target, base, tasks, overwrite=True, progress=once(swap_in_a_user_folder))
    assert os.listdir(target) == ["notes.txt"] and same_archive(tmp_path / "moved", archive)
    assert hidden(tmp_path) == []


def test_force_keeps_an_empty_folder_that_filled_up_meanwhile(inputs: Inputs, tmp_path: Path) -> None:
    base, tasks, _ = inputs
    target = tmp_path / "arc"
    target.mkdir()
    with pytest.raises(OutputExistsError, match="changed while"):
        tallstore.pack(target, base, tasks, overwrite=True, progress=once(lambda: (target / "notes.txt").write_text("mine")))
    assert (target / "notes.txt").read_text() == "mine" and os.listdir(target) == ["notes.txt"]


def test_a_remote_pack_leaves_objects_that_are_not_an_archive_alone_even_with_force(
    inputs: Inputs, s3_server: Any, s3_bucket: str,
) -> None:
    base, tasks, _ = inputs
    so = s3_server.storage_options
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **so)
    url = f"{s3_bucket}/models"
    fs.pipe(f"{url}/notes.txt", b"mine")
    with pytest.raises(OutputExistsError, match="exists"):
        tallstore.pack(url, base, tasks, storage_options=so)
    with pytest.raises(OutputExistsError, match="no tallstore archive"):
        tallstore.pack(url, base, tasks, storage_options=so, overwrite=True)
    assert fs.find(url) == [f"{url}/notes.txt".removeprefix("s3://")] and fs.cat(f"{url}/notes.txt") == b"mine"


def test_the_markers_publishing_reads_are_the_ones_the_writers_write(inputs: Inputs, tmp_path: Path) -> None:
    assert publishing.ARCHIVE_KEY == layout.ATTR and publishing.COPY_CHUNK == (*layout.MANIFEST_COPY.split("/"), "c", "0")
    assert publishing.kind_of(inputs[2]) == publishing.ARCHIVE
    tallstore.open(inputs[2]).extract("t0", tmp_path / "x.safetensors")
    tallstore.open(inputs[2]).extract("t0", tmp_path / "folder")
    assert publishing.kind_of(tmp_path / "x.safetensors") == publishing.kind_of(tmp_path / "folder") == publishing.OUTPUT


# --- durable ---------------------------------------------------------------------------------


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (of the path its descriptor names), publishing rename and tree removal, in order."""
    seen: list[tuple[str, str]] = []
    fsync, rename, rmtree = os.fsync, publishing.rename_noreplace, shutil.rmtree

    def spy_fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_rename(src: Path, dst: Path) -> None:
        seen.append(("rename", str(dst)))
        rename(src, dst)

    def spy_rmtree(path: str | Path, *args: object, **kwargs: object) -> None:
        seen.append(("rmtree", str(path)))
        rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(publishing, "rename_noreplace", spy_rename)
    monkeypatch.setattr(shutil, "rmtree", spy_rmtree)
    return seen


def assert_synced_then_published(events: list[tuple[str, str]], final: Path) -> int:
    """Every file and folder of ``final`` was fsynced (folders after their entries) before the
    rename that published it, and the parent after; returns the index of that parent fsync."""
    publish = events.index(("rename", str(final)))
    synced: dict[Path, int] = {}
    for i, (what, path) in enumerate(events[:publish]):
        staged = Path(path)
        if what == "fsync" and final.name in staged.parts:
            synced[staged.relative_to(*staged.parts[: staged.parts.index(final.name) + 1])] = i
    tree = [Path(".")] + [p.relative_to(final) for p in final.rglob("*")] if final.is_dir() else [Path(".")]
    assert set(tree) <= set(synced), sorted(set(tree) - set(synced))
    for rel in tree:
        if rel != Path("."):
            assert synced[rel.parent] > synced[rel], f"{rel.parent} synced before {rel}"
    parent = events.index(("fsync", str(final.parent)), publish)
    return parent


@pytest.mark.parametrize("output", ["arc", "x.safetensors", "folder"])
def test_every_file_and_folder_is_fsynced_before_the_rename_and_the_parent_after(
    inputs: Inputs, tmp_path: Path, events: list[tuple[str, str]], output: str,
) -> None:
    base, tasks, archive = inputs
    final = tmp_path / output
    if output == "arc":
        tallstore.pack(final, base, tasks)
    else:
        tallstore.open(archive).extract("t0", final)
    assert_synced_then_published(events, final)


def test_a_replaced_archive_is_deleted_only_after_the_new_one_is_durable(
    inputs: Inputs, tmp_path: Path, events: list[tuple[str, str]],
) -> None:
    base, tasks, archive = inputs
    final = tmp_path / "arc"
    shutil.copytree(archive, final)
    events.clear()
    tallstore.pack(final, base, tasks, overwrite=True, lam=0.2)
    durable = assert_synced_then_published(events, final)
    (removed,) = [i for i, (what, path) in enumerate(events) if what == "rmtree" and path.endswith(".old")]
    assert removed > durable and hidden(tmp_path) == []


# --- stale hidden folders, permissions, full disks ---------------------------------------------


def test_a_new_writer_sweeps_dead_writers_folders_but_not_live_ones_or_folders_without_a_lock(tmp_path: Path) -> None:
    final = tmp_path / "x.safetensors"
    dead = tmp_path / ".x.safetensors.deadbeef.tmp"
    dead.mkdir()
    (dead / publishing.LOCK).touch()
    (dead / "x.safetensors").write_text("partial")
    users = tmp_path / ".x.safetensors.backup.tmp"
    users.mkdir()
    with publishing.Staging(final, ".tmp") as live:
        assert live.folder is not None and not dead.exists()
        with publishing.Staging(final, ".tmp") as other:
            assert live.folder.is_dir() and users.is_dir()
        assert other.folder is not None and not other.folder.exists()
    assert hidden(tmp_path) == [users.name]


def test_outputs_follow_the_umask(inputs: Inputs, tmp_path: Path) -> None:
    base, tasks, archive = inputs
    previous = os.umask(0o027)
    try:
        tallstore.pack(tmp_path / "arc", base, tasks)
        tallstore.open(archive).extract("t0", tmp_path / "x.safetensors")
        tallstore.open(archive).extract("t0", tmp_path / "folder")
    finally:
        os.umask(previous)
    for path in (tmp_path / "arc", tmp_path / "arc" / "tensors", tmp_path / "folder"):
        assert path.stat().st_mode & 0o777 == 0o750, path
    for path in (tmp_path / "arc" / "zarr.json", tmp_path / "x.safetensors", tmp_path / "folder" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o640, path


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mount (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_a_tallstore_error_naming_the_output_and_leaves_nothing(full_disk: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1024, 512, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": base["w"] + 0.1 * torch.randn(1024, 512, generator=g)}, tmp_path / "t.safetensors")
    tasks = {"t": tmp_path / "t.safetensors"}
    archive = tallstore.pack(tmp_path / "arc", tmp_path / "base.safetensors", tasks)
    for write, out in ((lambda o: tallstore.pack(o, tmp_path / "base.safetensors", tasks), full_disk / "arc"),
                       (lambda o: archive.extract("t", o), full_disk / "x.safetensors")):
        with pytest.raises(TallstoreError, match="no space left on device") as e:
            write(out)
        assert str(out) in str(e.value) and os.listdir(full_disk) == []
    code, _, err = run_cli("extract", tmp_path / "arc", "t", "-o", full_disk / "folder")
    assert code == 2 and err == f"error: cannot write {full_disk / 'folder'}: no space left on device; nothing was published\n"
    assert os.listdir(full_disk) == []
