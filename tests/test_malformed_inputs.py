"""Bad input never escapes as anything but a tallstore error, and the CLI answers in one line.

Hypothesis generates well over 1,000 malformed inputs across the classes of the issue: broken
safetensors files (headers, lengths, offsets, truncation, flipped bits), torch ``.bin`` garbage,
odd tensor names, NaN/Inf, shape and dtype conflicts between tasks, bad task lists, and damaged
archive metadata. Each case is tiny, so the whole module stays fast.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import TINY_BLOCK, one_error_line, read_all, run_cli, same_bits, tiny_base, tiny_collection
from safetensors.torch import load_file, save_file

import tallstore
from craft import craft
from tallstore.checkpoint import open_checkpoint
from tallstore.errors import ArchiveError, BaseMismatchError, PlanError, TallstoreError
from tallstore.packing.inputs import check_finite
from tallstore.storage import chunks
from tallstore.storage.manifest import MAX_TASKS



def cases(n: int) -> settings:
    """Hypothesis settings for ``n`` deterministic, deadline-free examples."""
    return settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)


def st_file(header: dict[str, Any], data: bytes) -> bytes:
    """A safetensors file from a header dict and the data section."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A valid base and two tasks on disk, shared by the module."""
    return tiny_collection(tmp_path_factory.mktemp("malformed") / "in")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the hypothesis tests of this module reuse between examples."""
    return tmp_path_factory.mktemp("scratch")


def fresh(folder: Path) -> Path:
    """``folder``, emptied: hypothesis examples reuse one scratch folder per test."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def valid_task(inputs: tuple[Path, dict[str, Path]]) -> tuple[dict[str, Any], bytes]:
    """The header dict and data section of a valid task file."""
    raw = inputs[1]["t0"].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys in the same order, with the same dtypes and shapes (rebuilds are lossy)."""
    return [(k, v.dtype, v.shape) for k, v in a.items()] == [(k, v.dtype, v.shape) for k, v in b.items()]


def only_tallstore_errors(fn: Any) -> str:
    """Run ``fn``; return "ok" or the tallstore error's class name; anything else fails the test."""
    try:
        fn()
    except TallstoreError as e:
        assert "\n" not in str(e).strip(), str(e)
        return type(e).__name__
    return "ok"


def cli_ok_or_one_line(*args: object) -> None:
    """The CLI either succeeds or prints exactly one ``error:`` line and exits non-zero."""
    code, _, err = run_cli(*args)
    if code != 0:
        one_error_line((code, "", err))
    else:
        assert "error" not in err


header_mutations = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(["w", "v", "head", "ids", "scale"]), st.sampled_from(["dtype", "shape", "data_offsets"]), json_values),
    st.tuples(st.just("dtype"), st.sampled_from(["w", "v", "ids"]), st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "U16", "C64", ""])),
    st.tuples(st.just("shape"), st.sampled_from(["w", "v", "head", "scale"]), st.lists(st.integers(-3, 2**66), max_size=4)),
    st.tuples(st.just("offsets"), st.sampled_from(["w", "v", "head"]), st.lists(st.integers(-5, 2000), min_size=2, max_size=2)),
    st.tuples(st.just("drop"), st.sampled_from(["w", "v", "head"]), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("header"), json_values),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("duplicate"), st.sampled_from(["w", "v"])),
)


def mutate(header: dict[str, Any], data: bytes, m: tuple[Any, ...]) -> bytes:
    """One malformed safetensors file derived from a valid one."""
    h = json.loads(json.dumps(header))
    kind = m[0]
    if kind == "field":
        h[m[1]][m[2]] = m[3]
    elif kind == "dtype":
        h[m[1]]["dtype"] = m[2]
    elif kind == "shape":
        h[m[1]]["shape"] = m[2]
    elif kind == "offsets":
        h[m[1]]["data_offsets"] = m[2]
    elif kind == "drop":
        del h[m[1]][m[2]]
    elif kind == "header":
        return st_file(m[1], data) if not isinstance(m[1], dict) else st_file({"x": m[1]}, data)
    elif kind == "metadata":
        h["__metadata__"] = m[1]
    elif kind == "length":
        raw = st_file(h, data)
        return struct.pack("<Q", m[1]) + raw[8:]
    elif kind == "truncate":
        raw = st_file(h, data)
        return raw[: int(m[1] * len(raw))]
    elif kind == "flip":
        raw = bytearray(st_file(h, data))
        raw[min(int(m[1] * len(raw)), len(raw) - 1)] ^= 1 << m[2]
        return bytes(raw)
    elif kind == "bytes":
        return m[1]
    elif kind == "duplicate":
        text = json.dumps(h)
        dup = json.dumps({m[1]: {**h[m[1]], "data_offsets": [0, 4]}})[1:-1]
        raw = (text[:-1] + ", " + dup + "}").encode()
        return struct.pack("<Q", len(raw)) + raw + data
    return st_file(h, data)


def read_everything(path: Path) -> None:
    with open_checkpoint(path) as ck:
        for k in ck.keys:
            ck.read(k)
            if ck.info(k).shape:
                ck.read(k, 0, 1)


@cases(500)
@given(m=header_mutations)
def test_malformed_safetensors_reading_raises_only_checkpoint_errors(
    valid_task: tuple[dict[str, Any], bytes], scratch: Path, m: tuple[Any, ...],
) -> None:
    path = scratch / "bad.safetensors"
    path.write_bytes(mutate(*valid_task, m))
    outcome = only_tallstore_errors(lambda: read_everything(path))
    assert outcome in ("ok", "CheckpointError")


@cases(80)
@given(m=header_mutations, via_cli=st.booleans())
def test_malformed_task_file_fails_pack_cleanly_and_leaves_nothing(
    inputs: tuple[Path, dict[str, Path]], valid_task: tuple[dict[str, Any], bytes],
    scratch: Path, m: tuple[Any, ...], via_cli: bool,
) -> None:
    work = fresh(scratch / "pack-bad")
    bad = work / "bad.safetensors"
    bad.write_bytes(mutate(*valid_task, m))
    base, tasks = inputs
    out = work / "arc"
    if via_cli:
        cli_ok_or_one_line("pack", out, "--base", base, "--task", f"a={bad}", "--task", f"b={tasks['t1']}", "-q")
    else:
        outcome = only_tallstore_errors(lambda: tallstore.pack(out, base, {"a": bad, "b": tasks["t1"]}, block_elems=TINY_BLOCK))
        if outcome == "ok":
            assert same_layout(read_all(out)["a"], load_file(bad))
    assert [p.name for p in work.iterdir() if p.name != "bad.safetensors"] in ([], ["arc"])


@cases(150)
@given(
    kind=st.sampled_from(["bytes", "truncate", "object", "nested", "nontensor"]),
    blob=st.binary(max_size=128),
    cut=st.floats(0, 1),
    via_cli=st.booleans(),
)
def test_malformed_torch_files_raise_only_checkpoint_errors(
    inputs: tuple[Path, dict[str, Path]], scratch: Path,
    kind: str, blob: bytes, cut: float, via_cli: bool,
) -> None:
    path = scratch / "bad.bin"
    good = {k: v for k, v in tiny_base().items()}
    if kind == "bytes":
        path.write_bytes(blob)
    else:
        obj: Any = {
            "truncate": good,
            "object": {"w": blob, "v": good["v"]},
            "nested": {"state_dict": {"w": [good["w"]], "v": {"x": 1}}},
            "nontensor": [good["w"], len(blob)],
        }[kind]
        torch.save(obj, path)
        if kind == "truncate":
            raw = path.read_bytes()
            path.write_bytes(raw[: int(cut * len(raw))])
    if via_cli:
        cli_ok_or_one_line("pack", scratch / "binarc", "--base", inputs[0], "--task", f"a={path}", "-q", "--force")
    else:
        assert only_tallstore_errors(lambda: read_everything(path)) in ("ok", "CheckpointError")


names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12) | st.sampled_from(
    ["/", "..", ".", "../../x", "/abs", "a/../../b", "a\x00b", "\x00", "zarr.json", "~", "", "A", "é", "日本", "x" * 300, "__init__", ".hidden"]
)


@cases(24)
@given(name=names, via_cli=st.booleans())
def test_any_tensor_name_round_trips_or_is_refused(
    inputs: tuple[Path, dict[str, Path]], scratch: Path, name: str, via_cli: bool,
) -> None:
    work = fresh(scratch / "names")
    base, tasks = inputs
    sd = load_file(tasks["t0"])
    sd[name] = torch.arange(5, dtype=torch.float32)
    save_file(sd, work / "named.safetensors")
    if via_cli:
        cli_ok_or_one_line("pack", work / "arc", "--base", base, "--task", f"a={work / 'named.safetensors'}", "-q")
    else:
        tallstore.pack(work / "arc", base, {"a": work / "named.safetensors"}, block_elems=TINY_BLOCK)
        assert same_bits(read_all(work / "arc")["a"], load_file(work / "named.safetensors"))
    assert {p.name for p in work.iterdir()} <= {"arc", "named.safetensors"}


@cases(24)
@given(
    who=st.sampled_from(["base", "t0", "t1"]),
    key=st.sampled_from(["w", "v", "head", "scale"]),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    where=st.floats(0, 1),
    allow=st.sampled_from([False, False, True]),
    via_cli=st.booleans(),
)
def test_nonfinite_values_are_refused_by_tensor_name_unless_allowed(
    inputs: tuple[Path, dict[str, Path]], scratch: Path,
    who: str, key: str, value: float, where: float, allow: bool, via_cli: bool,
) -> None:
    work = fresh(scratch / "nonfinite")
    base, tasks = inputs
    paths = {"base": base, **tasks}
    if key == "head" and who == "base":
        key = "w"
    sd = load_file(paths[who])
    flat = sd[key].reshape(-1)
    flat[min(int(where * flat.numel()), flat.numel() - 1)] = value
    paths[who] = work / f"{who}.safetensors"
    save_file(sd, paths[who])
    args = ["pack", work / "arc", "--base", paths["base"], "--task", f"t0={paths['t0']}", "--task", f"t1={paths['t1']}", "-q"]
    if via_cli:
        code, _, err = run_cli(*args, *(["--allow-nonfinite"] if allow else []))
        if allow:
            assert code == 0, err
        else:
            line = one_error_line((code, "", err))
            assert f"'{key}'" in line and "NaN or Inf" in line
    else:
        call = lambda: tallstore.pack(work / "arc", paths["base"], {"t0": paths["t0"], "t1": paths["t1"]}, allow_nonfinite=allow, block_elems=TINY_BLOCK)  # noqa: E731
        if allow:
            call()
            assert read_all(work / "arc")["t0"].keys() == load_file(paths["t0"]).keys()
        else:
            with pytest.raises(PlanError, match=f"'{key}'.*NaN or Inf"):
                call()
    assert (work / "arc").exists() == allow


@cases(20)
@given(
    key=st.sampled_from(["w", "v", "ids", "scale", "head"]),
    change=st.sampled_from(["reshape", "dtype", "drop", "grow"]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool, torch.uint8]),
)
def test_shape_and_dtype_conflicts_between_tasks_are_stored_or_refused(
    inputs: tuple[Path, dict[str, Path]], scratch: Path, key: str, change: str, dtype: torch.dtype,
) -> None:
    work = fresh(scratch / "conflict")
    base, tasks = inputs
    sd = load_file(tasks["t1"])
    if change == "reshape":
        sd[key] = sd[key].reshape(-1)[: max(1, sd[key].numel() // 2)].clone()
    elif change == "dtype":
        sd[key] = sd[key].to(dtype)
    elif change == "drop":
        del sd[key]
    else:
        sd[key] = torch.cat([sd[key].reshape(-1), sd[key].reshape(-1)])
    save_file(sd, work / "t1.safetensors")
    outcome = only_tallstore_errors(
        lambda: tallstore.pack(work / "arc", base, {"t0": tasks["t0"], "t1": work / "t1.safetensors"}, block_elems=TINY_BLOCK)
    )
    if outcome == "ok":
        got = read_all(work / "arc")["t1"]
        sd = load_file(work / "t1.safetensors")
        assert same_layout(got, sd)
        if key in sd and not masked(work / "arc", key):  # masked (mixed dtype, grown rows) rebuilds approximately
            assert same_bits({key: got[key]}, {key: sd[key]})
    else:
        assert outcome == "PlanError" and not (work / "arc").exists()


def masked(arc: Path, key: str) -> bool:
    """Whether the archive stores ``key`` masked (rebuilt from the shared vector, approximately)."""
    tensors = json.loads((arc / "zarr.json").read_text())["attributes"]["tallstore"]["tensors"]
    return any(t["key"] == key and t["kind"] == "masked" for t in tensors)


@cases(250)
@given(
    names_=st.lists(st.text(max_size=140) | st.sampled_from(["a", "a\n", "../x", "a/b", "org//m", "a/", "", ".", "-x", "ok", "é", "x" * 257]), max_size=3),
    via_cli=st.booleans(),
)
def test_bad_task_lists_are_refused_before_any_input_is_opened(
    inputs: tuple[Path, dict[str, Path]], scratch: Path, names_: list[str], via_cli: bool,
) -> None:
    missing = scratch / "no-such-base.safetensors"
    task = inputs[1]["t0"]
    def word_like(part: str) -> bool:
        return bool(part) and (part[0].isalnum() or part[0] == "_") and all(c.isalnum() or c in "_.+-@:" for c in part)

    valid = bool(names_) and len(set(names_)) == len(names_) and all(
        0 < len(n) <= 256 and all(word_like(part) for part in n.split("/")) for n in names_  # org/model parts
    )
    if via_cli and names_:
        line = one_error_line(run_cli("pack", scratch / "tasklist", "--base", missing, *[a for n in names_ for a in ("--task", f"{n}={task}")]))
        assert not valid or "no such file" in line
        return
    outcome = only_tallstore_errors(lambda: tallstore.pack(scratch / "tasklist", missing, {n: task for n in names_}))
    if len(set(names_)) == len(names_):
        assert outcome == ("CheckpointError" if valid else "PlanError"), (names_, outcome)


def test_duplicate_task_names_on_the_command_line_are_refused(inputs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base, tasks = inputs
    line = one_error_line(run_cli("pack", tmp_path / "a", "--base", base, "--task", f"x={tasks['t0']}", "--task", f"x={tasks['t1']}"))
    assert "'x' given twice" in line
    with pytest.raises(PlanError, match="no tasks given"):
        tallstore.pack(tmp_path / "a", base, {})


@pytest.fixture(scope="module")
def archive(inputs: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Any]:
    """A packed archive (embedded base), its root ``zarr.json`` as parsed JSON, and its tasks."""
    out = tmp_path_factory.mktemp("malformed-archive") / "arc"
    tallstore.pack(out, inputs[0], inputs[1], embed_base=True, block_elems=TINY_BLOCK)
    return out, json.loads((out / "zarr.json").read_text()), read_all(out)


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_paths(v, (*prefix, i))
    return out


def metadata_targets(root: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Paths into the manifest and the (consolidated) task attributes, which readers act on."""
    cons = root["consolidated_metadata"]["metadata"]
    paths = json_paths(root["attributes"]["tallstore"], ("attributes", "tallstore"))
    for t in ("tasks/0", "tasks/1"):
        paths += json_paths(cons[t]["attributes"]["tallstore"], ("consolidated_metadata", "metadata", t, "attributes", "tallstore"))
    for a in ("tensors/w/merged", "masks/0", "tensors/w/base"):
        paths += json_paths(cons[a], ("consolidated_metadata", "metadata", a))[1:]
    return paths


@cases(220)
@given(pick=st.integers(0, 100_000), op=st.sampled_from(["replace", "replace", "delete"]), value=json_values, via_cli=st.booleans())
def test_damaged_archive_metadata_gives_only_tallstore_errors(
    archive: tuple[Path, dict[str, Any], Any],
    pick: int, op: str, value: Any, via_cli: bool,
) -> None:
    location, root, reference = archive
    doc = json.loads(json.dumps(root))
    targets = metadata_targets(doc)
    path = targets[pick % len(targets)]
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "delete":
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    meta = location / "zarr.json"
    original = meta.read_bytes()
    meta.write_text(json.dumps(doc))
    try:
        if via_cli:
            cli_ok_or_one_line("info", location, "--json")
            return
        got: dict[str, dict[str, torch.Tensor]] = {}
        outcome = only_tallstore_errors(lambda: got.update(read_all(location)))
    finally:
        meta.write_bytes(original)
    if outcome == "ok" and list(got) == list(reference):
        for name in got:
            for k, t in got[name].items():
                want = reference[name].get(k)
                assert want is not None and t.reshape(-1).view(torch.uint8).equal(want.reshape(-1).view(torch.uint8)), (path, k)


def edit_manifest(location: Path, edit: Any) -> None:
    craft(location, manifest=edit)


def test_archive_from_a_newer_format_version_is_refused(archive: tuple[Path, dict[str, Any], Any], tmp_path: Path) -> None:
    work = Path(shutil.copytree(archive[0], tmp_path / "arc"))
    edit_manifest(work, lambda m: m.update(version=3))
    with pytest.raises(ArchiveError, match="version 3 is newer"):
        tallstore.open(work)
    assert "upgrade tallstore" in one_error_line(run_cli("info", work))


def test_archive_without_completeness_marker_is_refused(archive: tuple[Path, dict[str, Any], Any], tmp_path: Path) -> None:
    work = Path(shutil.copytree(archive[0], tmp_path / "arc"))
    edit_manifest(work, lambda m: m.pop("complete"))
    with pytest.raises(ArchiveError, match="incomplete"):
        tallstore.open(work)
    assert "incomplete" in one_error_line(run_cli("extract", work, "t0", "-o", tmp_path / "x.safetensors"))


def test_wrong_base_is_refused_naming_both_fingerprints(inputs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base, tasks = inputs
    tallstore.pack(tmp_path / "arc", base, tasks, block_elems=TINY_BLOCK)
    other = tiny_base(seed=9)
    save_file(other, tmp_path / "other.safetensors")
    with pytest.raises(BaseMismatchError, match="sha256:.*sha256:"):
        tallstore.open(tmp_path / "arc", base=tmp_path / "other.safetensors")
    line = one_error_line(run_cli("extract", tmp_path / "arc", "t0", "-o", tmp_path / "x.safetensors", "--base", tmp_path / "other.safetensors"))
    assert "is not the base this archive was packed against" in line


def test_existing_outputs_are_never_overwritten_without_force(archive: tuple[Path, dict[str, Any], Any], inputs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base, tasks = inputs
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "keep").write_text("keep me")
    assert "exists" in one_error_line(run_cli("extract", archive[0], "t0", "-o", out))
    assert "exists" in one_error_line(run_cli("pack", tmp_path / "arc", "--base", base, "--task", f"a={tasks['t0']}", "-q"))
    assert "tallstore did not write" in one_error_line(run_cli("extract", archive[0], "t0", "-o", out, "--force"))
    assert "left alone" in one_error_line(run_cli("pack", tmp_path / "arc", "--base", base, "--task", f"a={tasks['t0']}", "-q", "--force"))
    assert out.read_bytes() == b"keep me" and (tmp_path / "arc" / "keep").read_text() == "keep me"
    out.unlink()
    assert run_cli("extract", archive[0], "t0", "-o", out)[0] == 0
    assert run_cli("extract", archive[0], "t0", "-o", out, "--force")[0] == 0
    assert same_bits(load_file(out), read_all(archive[0])["t0"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_finiteness_check_finds_one_bad_value_in_every_float_dtype(dtype: torch.dtype, value: float) -> None:
    t = torch.randn(64, 33).to(dtype)
    check_finite(t, "w", "the base")
    check_finite(torch.empty(0, 3, dtype=dtype), "w", "the base")
    for i in (0, 1000, t.numel() - 1):
        bad = t.clone()
        bad.view(-1)[i] = value
        with pytest.raises(PlanError, match="'w' of the base contains NaN or Inf"):
            check_finite(bad, "w", "the base")
        with pytest.raises(PlanError):  # a strided view: every bad position is in an even column
            check_finite(bad[:, ::2], "w", "the base")


@pytest.mark.parametrize("what", ["its manifest copy", "its root zarr.json"])
def test_a_pack_whose_metadata_readers_would_refuse_fails_and_publishes_nothing(
    inputs: tuple[Path, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str,
) -> None:
    base, tasks = inputs
    small = tallstore.pack(tmp_path / "probe", base, tasks, block_elems=TINY_BLOCK)
    copy = (tmp_path / "probe" / "meta" / "manifest" / "c" / "0").stat().st_size - 4
    root = (tmp_path / "probe" / "zarr.json").stat().st_size
    assert copy < root
    small.close()
    limit = copy - 1 if what == "its manifest copy" else root - 1  # the reader's 64 MiB, scaled to this archive
    monkeypatch.setattr(chunks, "MAX_DOCUMENT", limit)
    with pytest.raises(PlanError, match=f"metadata would take .*MiB \\({what}\\), more than readers accept"):
        tallstore.pack(tmp_path / "arc", base, tasks, block_elems=TINY_BLOCK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]


def test_more_tasks_than_readers_accept_are_refused_before_any_work(tmp_path: Path) -> None:
    names = [f"t{i}" for i in range(MAX_TASKS + 1)]
    with pytest.raises(PlanError, match=f"{MAX_TASKS + 1} tasks given: an archive holds at most {MAX_TASKS}"):
        tallstore.pack(tmp_path / "arc", tmp_path / "missing-base.safetensors", dict.fromkeys(names, tmp_path / "x"))
    assert not any(tmp_path.iterdir())
