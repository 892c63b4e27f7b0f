"""Merged models from an archive alone (spec §6.2): Consensus Merging, plain TA and TIES.

Exact checks use a reference built from the same θ_MTL the packer stores (spec §1); looser
checks compare with the dense formula ``θ₀ + α·(m_cons ⊙ τ_MTL)`` on the exact ``τ_MTL``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_base, make_task
from safetensors.torch import load_file
from tall_reference import HAND_COUNT, HAND_MTL, Dense, hand_collection, save_collection
from typer.testing import CliRunner

import tallstore
from tallstore import MergeError
from tallstore.cli.app import _register_commands, app

runner = CliRunner()
_register_commands()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def hand_archive(tmp_path: Path, **kw: Any) -> tallstore.Archive:
    base, tasks = hand_collection()
    b, paths = save_collection(tmp_path / "in", base, tasks)
    return tallstore.pack(tmp_path / "hand.tall", b, paths, lam=0.5, **kw)


def random_archive(tmp_path: Path, dtype: torch.dtype, rule: str, **kw: Any) -> tuple[tallstore.Archive, dict, list[dict]]:
    base = make_base(dtype, seed=7)
    tasks = [make_task(base, 70 + i, scale=0.05) for i in range(4)]
    b, paths = save_collection(tmp_path / "in", base, {f"task{i}": sd for i, sd in enumerate(tasks)})
    arc = tallstore.pack(tmp_path / "zoo.tall", b, paths, merge=rule, lam=0.3, block_elems=40, **kw)
    return arc, base, tasks


# ---- hand-computable ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, selected",
    [
        (0, [1, 1, 1, 1, 1, 1, 1, 1]),  # k = 0: the plain merge
        (1, [1, 1, 0, 1, 0, 1, 1, 1]),  # drops only the catastrophic weights
        (2, [0, 1, 0, 1, 0, 0, 1, 0]),  # the paper's default
        (3, [0, 0, 0, 1, 0, 0, 0, 0]),
        (4, [0, 0, 0, 0, 0, 0, 0, 0]),  # k > T: the base
    ],
)
def test_consensus_keeps_weights_selected_by_at_least_k_tasks(tmp_path: Path, k: int, selected: list[int]) -> None:
    assert selected == [int(c >= k) for c in HAND_COUNT]
    arc = hand_archive(tmp_path)
    w = 10 + torch.arange(8, dtype=torch.float32)
    want = w + torch.tensor(selected, dtype=torch.float32) * torch.tensor(HAND_MTL)
    assert torch.equal(arc.merge("consensus", k=k)["w"], want)
    half = w + 0.5 * torch.tensor(selected, dtype=torch.float32) * torch.tensor(HAND_MTL)
    assert torch.equal(arc.merge("consensus", k=k, alpha=0.5)["w"], half)


def test_default_consensus_is_k_2_alpha_1_and_plain_ta_is_k_0(tmp_path: Path) -> None:
    arc = hand_archive(tmp_path)
    assert torch.equal(arc.merge()["w"], arc.merge("consensus", k=2, alpha=1.0)["w"])
    assert torch.equal(arc.merge("ta")["w"], arc.merge("consensus", k=0)["w"])
    assert torch.equal(arc.merge("ta", alpha=0.0)["w"], 10 + torch.arange(8, dtype=torch.float32))


def test_tensors_the_base_lacks_are_left_out_and_others_are_the_base_copy(tmp_path: Path) -> None:
    arc = hand_archive(tmp_path)
    view = arc.merge()
    assert list(view) == arc.describe(sizes=False)["base"]["keys"]
    assert set(view) == {"ids", "w"} and view.omitted == ["head"]
    assert "head" not in view
    with pytest.raises(KeyError, match="head"):
        view["head"]
    assert torch.equal(view["ids"], torch.arange(4))


def test_unchanged_tensors_come_from_the_base_in_the_tasks_dtype(tmp_path: Path) -> None:
    base = make_base(torch.float32)
    tasks = [make_task(base, i) for i in range(2)]
    for sd in tasks:
        sd["norm.weight"] = base["norm.weight"].clone()
    b, paths = save_collection(tmp_path / "in", base, {f"t{i}": sd for i, sd in enumerate(tasks)})
    arc = tallstore.pack(tmp_path / "z.tall", b, paths)
    assert next(e for e in arc.describe(sizes=False)["tensors"] if e["key"] == "norm.weight")["kind"] == "base"
    assert torch.equal(arc.merge("consensus", k=0)["norm.weight"], base["norm.weight"])


# ---- against references ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["ta", "ties"])
def test_merges_match_the_reference_built_from_stored_theta_mtl(tmp_path: Path, dtype: torch.dtype, rule: str) -> None:
    arc, base, tasks = random_archive(tmp_path, dtype, rule)
    dense = Dense(base, tasks, rule, lams=[0.3] * 4)
    count = dense.masks.sum(dim=0)
    b32 = dense.base.float()
    base_d = dense.base.to(dtype)
    tau_stored = dense.merged.float() - b32
    for k in (0, 1, 2, 3, 4, 5):
        for alpha in (1.0, 0.7):
            keep = count >= k
            chosen = dense.merged if alpha == 1.0 else (b32 + alpha * tau_stored).to(dtype)
            exact = dense.split(torch.where(keep, chosen, base_d))
            loose = dense.split(torch.where(keep, (b32 + alpha * dense.mtl).to(dtype), base_d))
            view = arc.merge("consensus", k=k, alpha=alpha)
            for key in dense.keys:
                got = view[key]
                assert got.dtype == dtype and torch.equal(bits(got), bits(exact[key])), (k, alpha, key)
                tol = 2**-7 if dtype == torch.bfloat16 else 1e-6
                torch.testing.assert_close(got.float(), loose[key].float(), rtol=tol, atol=tol)
    plain = arc.merge(rule)
    for key in dense.keys:
        assert torch.equal(bits(plain[key]), bits(dense.split(dense.merged)[key]))


def test_merge_reads_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tallstore.storage.chunks import Batch

    arc, _, _ = random_archive(tmp_path, torch.float32, "ta")
    calls: list[list[str]] = []
    real = Batch.fetch

    def spy(self: Batch) -> None:
        calls.append(sorted({k.rsplit("/c/", 1)[0] for k in self._keys}))
        real(self)

    monkeypatch.setattr(Batch, "fetch", spy)
    view = arc.merge("consensus")
    view["layer.0.attn.weight"]
    assert len(calls) == 1
    paths = calls[0]
    merged = [p for p in paths if p.endswith("/merged")]
    assert len(merged) == 1 and "layer.0.attn.weight" in merged[0]
    assert sorted(p for p in paths if p.startswith("masks/")) == [f"masks/{t}" for t in range(4)]


# ---- output ------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["merged.safetensors", "merged_folder"])
def test_save_streams_the_merged_model_to_safetensors_or_an_hf_folder(tmp_path: Path, out: str) -> None:
    arc, _, _ = random_archive(tmp_path, torch.bfloat16, "ties")
    view = arc.merge("consensus", k=2)
    path = view.save(tmp_path / out, max_shard_bytes=1000)
    if path.is_dir():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        loaded: dict[str, torch.Tensor] = {}
        for f in sorted(set(index["weight_map"].values())):
            loaded.update(load_file(path / f))
    else:
        loaded = load_file(path)
    assert set(loaded) == set(view)
    for k in view:
        assert torch.equal(bits(loaded[k]) if loaded[k].is_floating_point() else loaded[k],
                           bits(view[k]) if view[k].is_floating_point() else view[k])


def test_merge_works_with_an_embedded_base_and_no_inputs(tmp_path: Path) -> None:
    arc = hand_archive(tmp_path, embed_base=True)
    for f in (tmp_path / "in").iterdir():
        f.unlink()
    arc = tallstore.open(tmp_path / "hand.tall")
    assert arc.merge("consensus", k=2)["w"].tolist() == [10, 13, 12, 13.5, 14, 15, 21, 17]


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, kw, message",
    [
        ("ties", {}, "packed with --merge ties"),
        ("average", {}, "unknown merge method"),
        ("ta", {"k": 2}, "consensus merging only"),
        ("consensus", {"k": -1}, "whole number from 0 to"),
        ("consensus", {"k": 1.5}, "whole number from 0 to"),
        ("consensus", {"k": 10}, "whole number from 0 to"),
        ("consensus", {"alpha": float("inf")}, "finite"),
        ("consensus", {"alpha": -3}, "≥ 0"),
        ("consensus", {"alpha": "big"}, "must be a number"),
    ],
)
def test_impossible_merges_are_one_line_errors(tmp_path: Path, method: str, kw: dict, message: str) -> None:
    arc = hand_archive(tmp_path)
    with pytest.raises(MergeError, match=message):
        arc.merge(method, **kw)


def test_cli_merge_writes_the_model_and_names_what_it_left_out(tmp_path: Path) -> None:
    hand_archive(tmp_path)
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", str(tmp_path / "hand.tall"), "--method", "consensus", "--k", "1", "--alpha", "0.5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "consensus k=1 α=0.5" in r.output and "head" in r.output
    w = load_file(out)["w"]
    assert w.tolist() == (10 + torch.arange(8) + 0.5 * torch.tensor([1.0, 1, 0, 1, 0, 1, 1, 1]) * torch.tensor(HAND_MTL)).tolist()


def test_cli_merge_with_the_wrong_method_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tallstore.cli import main

    hand_archive(tmp_path)
    monkeypatch.setattr("sys.argv", ["tallstore", "merge", str(tmp_path / "hand.tall"), "--method", "ties", "-o", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
