"""λ selection (spec §6.3): the paper's validation search and the weight-space ``auto`` rule.

``search`` must hand the callback exactly what ``extract`` returns from an archive packed with
that λ, one task model at a time; ``auto`` must score each grid value by the cosine of the
rebuilt and true task vectors, computed densely here, ties going to the larger λ.
"""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_base, make_task
from tall_reference import Dense, save_collection
from typer.testing import CliRunner

import tallstore
from tallstore import OutputExistsError, PlanError
from tallstore.cli.app import _register_commands, app
from tallstore.packing.lam import DEFAULT_GRID, best, cosine

runner = CliRunner()
_register_commands()


def bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def collection(tmp_path: Path, dtype: torch.dtype = torch.float32, n: int = 3) -> tuple[Path, dict[str, Path], dict, list[dict]]:
    base = make_base(dtype, seed=11)
    tasks = [make_task(base, 110 + i, scale=0.03) for i in range(n)]
    b, paths = save_collection(tmp_path / "in", base, {f"task{i}": sd for i, sd in enumerate(tasks)})
    return b, paths, base, tasks


# ---- pure rules --------------------------------------------------------------------------------


def test_best_takes_the_highest_score_and_the_larger_lambda_on_ties() -> None:
    grid = [0.2, 0.3, 0.4, 0.5, 0.6]
    assert best(grid, [0.9, 0.1, 0.1, 0.1, 0.1]) == 0.2  # lower grid edge
    assert best(grid, [0.1, 0.1, 0.1, 0.1, 0.9]) == 0.6  # upper grid edge
    assert best(grid, [0.5, 0.7, 0.7, 0.2, 0.7]) == 0.6
    assert best(grid, [0.5, 0.7, 0.7, 0.2, 0.1]) == 0.4
    assert best([0.4], [-3.0]) == 0.4


def test_cosine_of_empty_vectors_is_defined() -> None:
    assert cosine(0.0, 0.0, 0.0) == 1.0  # nothing to rebuild, nothing rebuilt
    assert cosine(0.0, 0.0, 4.0) == 0.0  # the rebuild lost the whole task
    assert cosine(0.0, 4.0, 0.0) == 0.0
    assert cosine(2.0, 4.0, 1.0) == 1.0


# ---- auto --------------------------------------------------------------------------------------


def test_auto_on_a_hand_example_picks_the_interior_and_the_edge(tmp_path: Path) -> None:
    # τ_0 = (1, 1), τ_1 = (0, 2): τ_MTL = (1, 3). Task 0 keeps weight 1 only while 1 > 2λ.
    base = {"w": torch.zeros(2)}
    tasks = {"a": {"w": torch.tensor([1.0, 1.0])}, "b": {"w": torch.tensor([0.0, 2.0])}}
    b, paths = save_collection(tmp_path / "in", base, tasks)
    arc = tallstore.pack(tmp_path / "z.tall", b, paths, lam="auto")
    sel = arc.describe(sizes=False)["lam_selection"]
    assert sel["method"] == "auto" and sel["criterion"] == "cosine" and sel["grid"] == list(DEFAULT_GRID)
    interior = 4 / math.sqrt(20)  # cos((1, 3), (1, 1))
    assert sel["scores"]["a"] == pytest.approx([interior] * 3 + [1 / math.sqrt(2)] * 2, abs=1e-12)
    assert sel["scores"]["b"] == pytest.approx([1.0] * 5, abs=1e-12)  # rebuild (0, 3) ∥ (0, 2)
    assert sel["density"]["a"] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert arc.describe(sizes=False)["lam"] == [0.4, 0.6]  # ties → larger λ: 0.4 inside, 0.6 at the edge
    assert [arc.describe(sizes=False)["tasks"][i]["lam"] for i in range(2)] == [0.4, 0.6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["ta", "ties"])
def test_auto_scores_match_a_dense_cosine(tmp_path: Path, dtype: torch.dtype, rule: str) -> None:
    b, paths, base, tasks = collection(tmp_path, dtype, 4)
    grid = (0.1, 0.3, 0.6, 1.0)
    arc = tallstore.pack(tmp_path / "z.tall", b, paths, lam="auto", lam_grid=grid, merge=rule, block_elems=40)
    sel = arc.describe(sizes=False)["lam_selection"]
    dense = Dense(base, tasks, rule)
    for t in range(4):
        want = []
        for lam in grid:
            m = dense.tau[t].abs() > torch.tensor(lam, dtype=torch.float32) * (dense.mtl - dense.tau[t]).abs()
            r = torch.where(m, dense.mtl, torch.zeros(())).double()
            tau = dense.tau[t].double()
            want.append(float(r @ tau / (r.norm() * tau.norm())))
        assert sel["scores"][f"task{t}"] == pytest.approx(want, rel=1e-9)
        assert arc.describe(sizes=False)["lam"][t] == best(grid, want)
    assert arc.describe()["lam_selection"]["method"] == "auto"


# ---- search ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["ta", "ties"])
def test_search_evaluates_exactly_what_extract_returns_for_each_lambda(tmp_path: Path, dtype: torch.dtype, rule: str) -> None:
    b, paths, _, _ = collection(tmp_path, dtype)
    grid = (0.2, 0.6)
    expected = {}
    for lam in grid:
        ref = tallstore.pack(tmp_path / f"ref{lam}.tall", b, paths, lam=lam, merge=rule, block_elems=40)
        expected.update({(name, lam): ref[name].state_dict() for name in ref})
    calls: list[tuple[str, dict]] = []
    table = {"task0": [0.9, 0.1], "task1": [0.1, 0.9], "task2": [0.5, 0.5]}

    def evaluate(name: str, sd: dict[str, torch.Tensor]) -> float:
        calls.append((name, sd))
        return table[name][sum(1 for n, _ in calls if n == name) - 1]

    arc = tallstore.pack(tmp_path / "z.tall", b, paths, lam="search", evaluate=evaluate, lam_grid=grid, merge=rule, block_elems=40)
    assert [n for n, _ in calls] == ["task0", "task0", "task1", "task1", "task2", "task2"]
    for (name, sd), lam in zip(calls, grid * 3):
        want = expected[(name, lam)]
        assert list(sd) == list(want)
        for k in want:
            assert sd[k].dtype == want[k].dtype and torch.equal(bits(sd[k]), bits(want[k])), (name, lam, k)
    assert arc.describe(sizes=False)["lam"] == [0.2, 0.6, 0.6]
    sel = arc.describe(sizes=False)["lam_selection"]
    assert sel == {"method": "search", "criterion": "evaluate", "grid": [0.2, 0.6], "scores": table}


def test_search_holds_one_task_model_at_a_time(tmp_path: Path) -> None:
    b, paths, _, _ = collection(tmp_path)
    previous: list[weakref.ref] = []

    def evaluate(name: str, sd: dict[str, torch.Tensor]) -> float:
        gc.collect()
        assert all(r() is None for r in previous), "an earlier state dict is still alive"
        previous.append(weakref.ref(sd["embed.weight"]))
        return 0.0

    tallstore.pack(tmp_path / "z.tall", b, paths, lam="search", evaluate=evaluate)
    assert len(previous) == 3 * len(DEFAULT_GRID)
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".tallstore-lam")]


# ---- errors and CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lam": "search"}, "needs evaluate"),
        ({"lam": "auto", "evaluate": lambda n, sd: 1.0}, "only used with lam='search'"),
        ({"lam": 0.4, "evaluate": lambda n, sd: 1.0}, "only used with lam='search'"),
        ({"lam": "best"}, "'auto' or 'search'"),
        ({"lam": "auto", "lam_grid": []}, "grid is empty"),
        ({"lam": "auto", "lam_grid": [0.2, 0.2]}, "repeated"),
        ({"lam": "auto", "lam_grid": [0.2, -0.1]}, "between 0 and 1"),
        ({"lam": "auto", "lam_grid": [0.2, float("nan")]}, "finite"),
        ({"lam": "auto", "lam_grid": ["x"]}, "must be numbers"),
        ({"lam": "search", "evaluate": lambda n, sd: float("nan")}, "finite number"),
        ({"lam": "search", "evaluate": lambda n, sd: "good"}, "finite number"),
    ],
)
def test_bad_lambda_requests_are_refused_and_write_nothing(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    b, paths, _, _ = collection(tmp_path)
    with pytest.raises(PlanError, match=message):
        tallstore.pack(tmp_path / "z.tall", b, paths, **kw)
    assert not (tmp_path / "z.tall").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_pack_lam_auto_records_and_info_shows_the_choice(tmp_path: Path) -> None:
    b, paths, _, _ = collection(tmp_path)
    out = tmp_path / "z.tall"
    args = ["pack", str(out), "--base", str(b), *[a for n, p in paths.items() for a in ("--task", f"{n}={p}")]]
    r = runner.invoke(app, [*args, "--lam", "auto", "--lam-grid", "0.3,0.6", "--merge", "ties", "--ties-top", "30", "-q"])
    assert r.exit_code == 0, r.output
    arc = tallstore.open(out)
    assert arc.describe(sizes=False)["lam_selection"]["grid"] == [0.3, 0.6] and arc.describe(sizes=False)["merge"]["params"]["top"] == 30.0
    r = runner.invoke(app, ["info", str(out)])
    assert "chosen per task by auto (cosine) from {0.3, 0.6}" in " ".join(r.output.split())
    assert "merge=ties (top 30%)" in r.output


@pytest.mark.parametrize("extra, message", [(["--lam-grid", "0.3"], "--lam-grid is only used"), (["--ties-top", "30"], "--ties-top is only used")])
def test_cli_pack_refuses_options_that_would_be_ignored(tmp_path: Path, extra: list[str], message: str) -> None:
    b, paths, _, _ = collection(tmp_path)
    args = ["pack", str(tmp_path / "z.tall"), "--base", str(b), *[a for n, p in paths.items() for a in ("--task", f"{n}={p}")]]
    r = runner.invoke(app, [*args, *extra, "-q"])
    assert r.exit_code != 0 and message in str(r.exception)


def test_an_existing_output_is_refused_before_any_evaluation(tmp_path: Path) -> None:
    b, paths, _, _ = collection(tmp_path)
    (tmp_path / "z.tall").mkdir()
    calls: list[str] = []
    with pytest.raises(OutputExistsError):
        tallstore.pack(tmp_path / "z.tall", b, paths, lam="search", evaluate=lambda n, sd: calls.append(n) or 0.0)
    assert calls == []
