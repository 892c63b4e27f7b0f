"""The ``tallstore`` command line through its real entry point ``tallstore.cli.main``.

Happy paths run in-process; every user mistake must end with a non-zero exit and exactly one
stderr line starting ``error:``, never a traceback. Two tests run the installed console script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import Cli, Collection, make_base
from safetensors.torch import load_file, save_file

import tallstore


def assert_user_error(result: tuple[int, str, str], *fragments: str) -> str:
    code, _, err = result
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def packed(collection: Callable[..., Collection], tmp_path: Path) -> tuple[Path, Path, dict[str, Path]]:
    """An archive of two tasks (external base) with its inputs."""
    base, tasks = collection(2)
    tallstore.pack(tmp_path / "zoo.tall", base=base, tasks=tasks)
    return tmp_path / "zoo.tall", base, tasks


# --- happy paths -----------------------------------------------------------------------------


def test_pack_with_global_and_per_task_lambda(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(3)
    code, out, err = cli("pack", tmp_path / "z.tall", "--base", base, *[a for n, p in tasks.items() for a in ("--task", f"{n}={p}")],
                         "--lam", "0.3", "--lam", "task2=0.5", "-q")
    assert (code, out, err) == (0, "", "")
    arc = tallstore.open(tmp_path / "z.tall")
    assert arc.tasks == ["task0", "task1", "task2"]
    assert arc.describe(sizes=False)["lam"] == pytest.approx([0.3, 0.3, 0.5])
    assert arc.describe(sizes=False)["base"]["embedded"] is False


def test_pack_prints_a_summary_and_embeds_the_base_on_request(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(1)
    code, out, _ = cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"only={tasks['task0']}", "--embed-base")
    assert code == 0 and "only" in out and "compression" in out
    assert tallstore.open(tmp_path / "z.tall").describe(sizes=False)["base"]["embedded"] is True


def test_pack_codecs_preset_is_recorded_and_shown_by_info(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    tasks_args = [a for n, p in tasks.items() for a in ("--task", f"{n}={p}")]
    code, _, err = cli("pack", tmp_path / "c.tall", "--base", base, *tasks_args, "--codecs", "compact", "-q")
    assert code == 0, err
    code, out, _ = cli("info", tmp_path / "c.tall", "--json")
    assert json.loads(out)["weight_codec"] == "blosc zstd 5"
    code, out, _ = cli("info", tmp_path / "c.tall")
    assert "weights compressed with blosc zstd 5" in " ".join(out.split())
    code, out, err = cli("pack", tmp_path / "d.tall", "--base", base, *tasks_args, "--codecs", "tiny", "-q")
    assert code != 0 and "unknown codec preset 'tiny'" in err and "Traceback" not in err
    assert not (tmp_path / "d.tall").exists()


def test_info_json_describes_the_archive(cli: Cli, packed: tuple[Path, Path, dict[str, Path]]) -> None:
    archive, base, _ = packed
    code, out, err = cli("info", archive, "--json")
    assert code == 0 and err == ""
    d = json.loads(out)
    assert [t["name"] for t in d["tasks"]] == ["task0", "task1"]
    assert [t["lam"] for t in d["tasks"]] == [0.4, 0.4]
    assert d["base"]["location"] == str(base.resolve())
    assert d["base"]["fingerprint"] == tallstore.open(archive).describe(sizes=False)["base"]["fingerprint"]
    assert all(0 < t["mask_density"] <= 1 for t in d["tasks"])
    assert d["weight_codec"] == "blosc lz4hc 5"


def test_info_prints_tables(cli: Cli, packed: tuple[Path, Path, dict[str, Path]]) -> None:
    code, out, _ = cli("info", packed[0])
    assert code == 0 and "task0" in out and "task1" in out and "mask density" in out


def test_extract_writes_the_rebuilt_task(cli: Cli, packed: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    archive, _, _ = packed
    code, out, _ = cli("extract", archive, "task1", "-o", tmp_path / "t1.safetensors")
    assert code == 0 and "t1.safetensors" in out
    want = tallstore.open(archive)["task1"].state_dict()
    got = load_file(tmp_path / "t1.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_extract_to_a_folder_with_a_moved_base(cli: Cli, packed: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    archive, base, _ = packed
    moved = base.rename(tmp_path / "moved.safetensors")
    code, _, _ = cli("extract", archive, "task0", "-o", tmp_path / "t0", "--base", moved)
    assert code == 0
    assert (tmp_path / "t0" / "model.safetensors").is_file()
    assert not (tmp_path / "t0" / "model.safetensors.index.json").exists()  # one file: no index, as transformers writes it


# --- user mistakes: one line, non-zero, no traceback -----------------------------------------


def test_missing_input_file(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, _ = collection(1)
    assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"a={tmp_path / 'nope.safetensors'}", "-q"),
                      "nope.safetensors", "no such file")
    assert not (tmp_path / "z.tall").exists()


@pytest.mark.parametrize("content", [b"", b"garbage that is no checkpoint at all"], ids=["empty", "garbage"])
def test_unreadable_input_file(cli: Cli, collection: Callable[..., Collection], tmp_path: Path, content: bytes) -> None:
    base, _ = collection(1)
    (tmp_path / "bad.safetensors").write_bytes(content)
    (tmp_path / "bad.bin").write_bytes(content)
    for bad in ("bad.safetensors", "bad.bin"):
        assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"a={tmp_path / bad}", "-q"), bad)


def test_input_folder_without_weights(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, _ = collection(1)
    (tmp_path / "empty_model").mkdir()
    assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"a={tmp_path / 'empty_model'}", "-q"),
                      "empty_model")


def test_truncated_safetensors_input(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(1)
    data = tasks["task0"].read_bytes()
    tasks["task0"].write_bytes(data[: len(data) // 2])
    assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"a={tasks['task0']}", "-q"),
                      "task0.safetensors", "truncated")


def test_duplicate_task_name(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"a={tasks['task0']}",
                          "--task", f"a={tasks['task1']}", "-q"), "'a'", "twice")


@pytest.mark.parametrize("name", ["../up", "has space", ".hidden", "x" * 300, "org/", "org//model", "/abs"])
def test_invalid_task_name(cli: Cli, collection: Callable[..., Collection], tmp_path: Path, name: str) -> None:
    base, tasks = collection(1)
    assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"{name}={tasks['task0']}", "-q"),
                      "invalid task name")


def test_hub_style_org_model_names_are_task_names(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(2)
    code, _, err = cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"sentence-transformers/all-MiniLM-L6-v2={tasks['task0']}",
                       "--task", f"org/model@v2={tasks['task1']}", "-q")
    assert code == 0, err
    arc = tallstore.open(tmp_path / "z.tall")
    assert arc.tasks == ["sentence-transformers/all-MiniLM-L6-v2", "org/model@v2"]
    assert torch.equal(arc["org/model@v2"]["embed.weight"], arc["org/model@v2"].state_dict()["embed.weight"])


def test_task_option_without_a_name(cli: Cli, collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(1)
    assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", str(tasks["task0"]), "-q"), "NAME=VALUE")


@pytest.mark.parametrize(
    ("lams", "fragment"),
    [
        (["abc"], "expects a number"),
        (["task0=abc"], "expects a number"),
        (["-1"], "finite number"),
        (["nan"], "finite number"),
        (["inf"], "finite number"),
        (["nope=0.3"], "unknown task 'nope'"),
        (["0.3", "0.4"], "once"),
        (["task0=0.3", "task0=0.4"], "twice"),
    ],
)
def test_bad_lambda(cli: Cli, collection: Callable[..., Collection], tmp_path: Path, lams: list[str], fragment: str) -> None:
    base, tasks = collection(1)
    args = [a for v in lams for a in ("--lam", v)]
    assert_user_error(cli("pack", tmp_path / "z.tall", "--base", base, "--task", f"task0={tasks['task0']}", *args, "-q"), fragment)
    assert not (tmp_path / "z.tall").exists()


def test_archive_not_complete(cli: Cli, packed: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    archive = packed[0]
    meta = json.loads((archive / "zarr.json").read_text())
    meta["attributes"]["tallstore"]["complete"] = False
    (archive / "zarr.json").write_text(json.dumps(meta))
    assert_user_error(cli("info", archive), "incomplete")
    assert_user_error(cli("extract", archive, "task0", "-o", tmp_path / "x.safetensors"), "incomplete")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("what", ["missing", "empty folder", "file"])
def test_not_an_archive(cli: Cli, tmp_path: Path, what: str) -> None:
    p = tmp_path / "thing"
    if what == "empty folder":
        p.mkdir()
    elif what == "file":
        p.write_text("{}")
    assert_user_error(cli("info", p), str(p))


def test_wrong_base(cli: Cli, packed: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    archive = packed[0]
    save_file(make_base(seed=5), tmp_path / "other.safetensors")
    line = assert_user_error(cli("extract", archive, "task0", "-o", tmp_path / "x.safetensors", "--base", tmp_path / "other.safetensors"),
                             tallstore.open(archive).describe(sizes=False)["base"]["fingerprint"])
    assert line.count("sha256:") == 2


def test_unknown_task_in_extract(cli: Cli, packed: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    assert_user_error(cli("extract", packed[0], "nope", "-o", tmp_path / "x.safetensors"), "nope", "task0")


def test_output_exists_without_force(cli: Cli, packed: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    archive, base, tasks = packed
    before = (archive / "zarr.json").read_bytes()
    assert_user_error(cli("pack", archive, "--base", base, "--task", f"a={tasks['task0']}", "-q"), "exists", "--force")
    assert (archive / "zarr.json").read_bytes() == before
    out = tmp_path / "x.safetensors"
    out.write_text("keep")
    assert_user_error(cli("extract", archive, "task0", "-o", out), "exists", "--force")
    assert_user_error(cli("extract", archive, "task0", "-o", out, "--force"), "tallstore did not write", "left alone")
    assert out.read_text() == "keep"
    out.unlink()
    assert cli("extract", archive, "task0", "-o", out)[0] == 0
    assert cli("extract", archive, "task0", "-o", out, "--force")[0] == 0
    assert cli("pack", archive, "--base", base, "--task", f"a={tasks['task0']}", "-q", "--force")[0] == 0
    assert tallstore.open(archive).tasks == ["a"]


def test_usage_errors_exit_non_zero_without_traceback(cli: Cli, tmp_path: Path) -> None:
    for args in (["pack", tmp_path / "z.tall", "--base", "b.safetensors"], ["info"], ["nope"], ["pack", "--bogus"]):
        code, _, err = cli(*args)
        assert code == 2 and "Traceback" not in err and "Error" in err, args


# --- the installed console script ------------------------------------------------------------


def console(*args: object) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("tallstore")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def test_console_script_prints_info_json(packed: tuple[Path, Path, dict[str, Path]]) -> None:
    r = console("info", packed[0], "--json")
    assert r.returncode == 0, r.stderr
    assert [t["name"] for t in json.loads(r.stdout)["tasks"]] == ["task0", "task1"]


def test_console_script_reports_a_user_mistake_in_one_line(collection: Callable[..., Collection], tmp_path: Path) -> None:
    base, tasks = collection(1)
    tasks["task0"].write_bytes(tasks["task0"].read_bytes()[:100])
    r = console("pack", tmp_path / "z.tall", "--base", base, "--task", f"a={tasks['task0']}")
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["pack", "extract", "merge", "verify", "info", "stats"])
def test_help_text_wraps_to_the_terminal_width_not_to_the_source_lines(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    import inspect

    import tallstore.cli.app as app_module

    monkeypatch.setenv("COLUMNS", "2000")
    code, out, _ = cli(command, "--help")
    assert code == 0
    doc = inspect.cleandoc(next(
        i.callback.__doc__ for i in app_module.app.registered_commands if i.callback.__name__ == command))
    prose = [" ".join(p.split()) for p in doc.split("\n\n")]
    lines = [" ".join(line.strip(" │").split()) for line in out.splitlines()]
    for paragraph in prose:
        assert paragraph in lines, paragraph
