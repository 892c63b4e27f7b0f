"""TIES merge rule (spec §6.1): global thresholds found by streaming, sign election, dis-sum.

Hand examples pin the reference code's corner cases (ties at the threshold keep k+1 entries,
zero sums take the whole model's majority sign, a zero majority keeps negative entries); random
collections are checked against a dense implementation of the spec and the authors' own code.
"""

from __future__ import annotations

import pickle
from functools import partial
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_base, make_task
from hypothesis import given, settings
from hypothesis import strategies as st
from tall_reference import Dense, authors_ties, save_collection, ties_thresholds

import tallstore
from tallstore import PlanError
from tallstore.checkpoint import open_checkpoint
from tallstore.checkpoint.tasks import TaskSource
from tallstore.ops import ties
from tallstore.ops.merges import Ties
from tallstore.packing.executors import ThreadExecutor, Unit
from tallstore.packing import driver
from tallstore.packing.inputs import InputSpec, release
from tallstore.packing.options import PackOptions
from tallstore.packing.passes import tau_pass
from tallstore.packing.plan import make_plan


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def random_collection(dtype: torch.dtype, n_tasks: int = 4, seed: int = 0) -> tuple[dict, list[dict]]:
    base = make_base(dtype, seed)
    return base, [make_task(base, seed * 10 + i, scale=0.02) for i in range(n_tasks)]


def pack(tmp_path: Path, base: dict, tasks: list[dict], **kw: Any) -> tallstore.Archive:
    b, paths = save_collection(tmp_path / "in", base, {f"task{i}": sd for i, sd in enumerate(tasks)})
    return tallstore.pack(tmp_path / "zoo.tall", b, paths, overwrite=True, **kw)


class PickledReversed:
    """An executor that ships every unit through pickle (as Dask would) and runs them backwards."""

    def run(self, units: Sequence[Unit]) -> Iterator[tuple[Any, Any]]:
        for unit in reversed(list(units)):
            yield unit, pickle.loads(pickle.dumps(unit)).run()

    def broadcast(self, fn: Any, *args: Any) -> None:
        fn(*args)


def params_with(executor: Any, tmp_path: Path, top: float = 20.0, block_elems: int = 64) -> dict:
    base, tasks = random_collection(torch.float32)
    b, paths = save_collection(tmp_path / "in", base, {f"t{i}": sd for i, sd in enumerate(tasks)})
    spec = InputSpec("tok-" + type(executor).__name__, str(b), tuple(TaskSource(str(p)) for p in paths.values()), tuple(paths), None, False)
    with open_checkpoint(b) as bc:
        cks = [open_checkpoint(p) for p in paths.values()]
        plan = make_plan(bc, cks, list(paths), block_elems)
        for ck in cks:
            ck.close()
    try:
        numel = sum(kp.info.numel for kp in plan.masked())
        return Ties(top).prepare(tau_pass(executor, spec, plan), numel, spec.names)
    finally:
        release(spec)


# ---- hand-computable examples ------------------------------------------------------------------


def test_entries_equal_to_the_threshold_are_all_kept(tmp_path: Path) -> None:
    # n = 10, top 20 %: k = 2, threshold = the 8th smallest |τ| = 3, and all three 3s are kept.
    base = {"a": torch.zeros(6), "b": torch.zeros(4)}
    t0 = {"a": torch.tensor([3.0, -3, 1, 1, 2, 2]), "b": torch.tensor([2.0, 0, 0, -3])}
    t1 = {"a": torch.tensor([0.5] * 6), "b": torch.tensor([0.25, 0.5, 0.5, 0.5])}
    arc = pack(tmp_path, base, [t0, t1], merge="ties", lam=0.4, block_elems=8)
    p = arc.describe(sizes=False)["merge"]["params"]
    assert p["threshold"] == [3.0, 0.5] and p["kept"] == [3, 9] and p["numel"] == 10 and p["top"] == 20.0
    # τ̂_0 = (3,-3,0,0,0,0 | 0,0,0,-3), τ̂_1 = (.5 ×6 | 0,.5,.5,.5): sums (3.5,-2.5,.5,.5,.5,.5 | 0,.5,.5,-2.5)
    mtl = Ties().apply(torch.stack([torch.cat([t0["a"], t0["b"]]), torch.cat([t1["a"], t1["b"]])]), p)
    assert p["majority_sign"] == 1
    assert mtl.tolist() == [3.5, -3.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5, -3.0]
    assert torch.equal(arc.merge("ties")["a"], mtl[:6]) and torch.equal(arc.merge("ties")["b"], mtl[6:])


def test_zero_sums_take_the_majority_sign_of_the_whole_model() -> None:
    tau = torch.tensor([[5.0, 1, 1, 1, -1], [-5.0, 1, 1, 0, 0]])  # sums 0, 2, 2, 1, -1: majority +
    pos, neg = ties.sign_counts(ties.trim(tau, [0.0, 0.0]))
    assert (pos, neg) == (3, 1) and ties.majority(pos, neg) == 1
    assert ties.disjoint_sum(tau, 1).tolist() == [5.0, 2, 2, 1, -1]
    assert ties.disjoint_sum(-tau, -1).tolist() == [-5.0, -2, -2, -1, 1]


def test_a_zero_majority_keeps_the_negative_entries_like_the_reference() -> None:
    tau = torch.tensor([[5.0, 1, -1], [-5.0, 0, 0]])  # sums 0, 1, -1: no majority
    assert ties.majority(*ties.sign_counts(tau)) == 0
    assert ties.disjoint_sum(tau, 0).tolist() == [-5.0, 1, -1]
    assert ties.disjoint_sum(tau, 0).tolist() == authors_ties(tau, 100 - 1e-9).tolist()


def test_dis_sum_adds_only_entries_agreeing_with_the_elected_sign() -> None:
    tau = torch.tensor([[2.0, -1, 0.5], [-1.0, -1, 0.25], [0.5, 3, -4]])  # sums 1.5, 1, -3.25
    assert ties.disjoint_sum(tau, 1).tolist() == [2.5, 3.0, -4.0]


def test_majority_zero_sum_is_resolved_across_tensors_and_blocks(tmp_path: Path) -> None:
    # The cancelling entry sits in tensor "a"; the majority (negative) comes from tensor "b".
    base = {"a": torch.zeros(8), "b": torch.zeros(16)}
    t0 = {"a": torch.tensor([4.0] + [0.0] * 7), "b": torch.full((16,), -1.0)}
    t1 = {"a": torch.tensor([-4.0] + [0.0] * 7), "b": torch.zeros(16)}
    arc = pack(tmp_path, base, [t0, t1], merge="ties", ties_top=100, lam=0.4, block_elems=8)
    p = arc.describe(sizes=False)["merge"]["params"]
    assert p["majority_sign"] == -1 and p["threshold"] == [0.0, 0.0]
    merged = arc.merge("ties")["a"]
    assert merged[0].item() == -4.0


def test_top_100_keeps_everything_and_a_tiny_top_keeps_only_the_maximum(tmp_path: Path) -> None:
    base = {"w": torch.zeros(40)}
    t0 = {"w": torch.arange(40, dtype=torch.float32) - 20}  # |τ| max 20 once
    t1 = {"w": torch.ones(40)}
    p = pack(tmp_path, base, [t0, t1], merge="ties", ties_top=100, lam=0.4).describe(sizes=False)["merge"]["params"]
    assert p["threshold"] == [0.0, 0.0] and p["kept"] == [40, 40]
    p = pack(tmp_path, base, [t0, t1], merge="ties", ties_top=1, lam=0.4).describe(sizes=False)["merge"]["params"]
    assert p["threshold"] == [20.0, 1.0] and p["kept"] == [1, 40]


@pytest.mark.parametrize("top", [0, -5, 100.5, float("nan"), "many"])
def test_a_top_percentage_outside_0_100_is_refused_before_writing(tmp_path: Path, top: Any) -> None:
    base, tasks = random_collection(torch.float32, 2)
    with pytest.raises(PlanError, match="top percentage"):
        pack(tmp_path, base, tasks, merge="ties", ties_top=top)
    assert not (tmp_path / "zoo.tall").exists()


def test_nonfinite_weights_are_refused_in_the_threshold_pass(tmp_path: Path) -> None:
    base, tasks = random_collection(torch.float32, 2)
    tasks[1]["layer.0.mlp.weight"][3, 3] = float("nan")
    with pytest.raises(PlanError, match="layer.0.mlp.weight.*task1.*NaN"):
        pack(tmp_path, base, tasks, merge="ties")


# ---- the streaming selection -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e-40, -3e-39]),
                              st.floats(-1e6, 1e6, width=32)), min_size=1, max_size=300),
    pieces=st.integers(1, 7),
    top=st.floats(0.01, 100),
)
def test_two_histogram_passes_find_exactly_the_kth_magnitude(values: list[float], pieces: int, top: float) -> None:
    tau = torch.tensor([values, values[::-1]], dtype=torch.float32)
    n = tau.shape[1]
    rank = ties.keep_rank(n, top)
    blocks = torch.tensor_split(tau, pieces, dim=1)
    if rank == 0:
        assert ties_thresholds(tau, top) == [0.0, 0.0]
        return
    high = sum(ties.high_histogram(b) for b in blocks)
    found = [ties.locate(high[t], rank) for t in range(2)]
    low = sum(ties.low_histogram(b, [f[0] for f in found]) for b in blocks)
    got = [ties.bits_to_float((b << 16) | ties.locate(low[t], rank - under)[0]) for t, (b, under) in enumerate(found)]
    assert got == ties_thresholds(tau, top)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top", [20.0, 55.5])
def test_ties_archive_rebuilds_match_the_dense_spec_reference(tmp_path: Path, dtype: torch.dtype, top: float) -> None:
    base, tasks = random_collection(dtype)
    lams = [0.2, 0.4, 0.5, 0.6]
    arc = pack(tmp_path, base, tasks, merge="ties", ties_top=top, lam=dict(zip([f"task{i}" for i in range(4)], lams)), block_elems=48)
    dense = Dense(base, tasks, "ties", top, lams)
    p = arc.describe(sizes=False)["merge"]["params"]
    assert p["threshold"] == ties_thresholds(dense.tau, top)
    assert p["kept"] == [int((dense.tau[t].abs() >= p["threshold"][t]).sum()) for t in range(4)]
    for t in range(4):
        want = dense.split(torch.where(dense.masks[t], dense.merged, dense.base.to(dtype)))
        for k, v in want.items():
            assert torch.equal(bits(arc[f"task{t}"][k]), bits(v)), (t, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_agrees_with_the_authors_reference_code(tmp_path: Path, dtype: torch.dtype) -> None:
    base, tasks = random_collection(dtype, seed=3)
    arc = pack(tmp_path, base, tasks, merge="ties", block_elems=100)
    dense = Dense(base, tasks, "ties")
    theirs = authors_ties(dense.tau, 20)
    ours = dense.split(dense.mtl)
    assert torch.equal(torch.sign(theirs), torch.sign(dense.mtl))
    torch.testing.assert_close(dense.mtl, theirs, rtol=1e-6, atol=1e-9)
    stored = arc.merge("ties")
    for k, v in ours.items():
        torch.testing.assert_close(stored[k].float() - base[k].float(), v, rtol=0.02, atol=0.02 if dtype == torch.bfloat16 else 1e-6)


def test_ties_result_does_not_depend_on_block_size(tmp_path: Path) -> None:
    base, tasks = random_collection(torch.float32, seed=5)
    small = pack(tmp_path / "s", base, tasks, merge="ties", block_elems=24)
    large = pack(tmp_path / "l", base, tasks, merge="ties", block_elems=1 << 20)
    assert small.describe(sizes=False)["merge"] == large.describe(sizes=False)["merge"]
    for k in small.merge("ties"):
        assert torch.equal(small.merge("ties")[k], large.merge("ties")[k]), k


def test_threshold_units_survive_pickling_and_any_completion_order(tmp_path: Path) -> None:
    threaded = params_with(ThreadExecutor(2), tmp_path / "a")
    shipped = params_with(PickledReversed(), tmp_path / "b")
    assert shipped == threaded
    assert threaded["kept"] == [int(np.floor(threaded["numel"] * 0.2)) + 1] * 4


def test_pack_runs_the_threshold_pass_on_the_given_executor(tmp_path: Path) -> None:
    seen: list[str] = []

    class Recording(PickledReversed):
        def run(self, units: Sequence[Unit]) -> Iterator[tuple[Any, Any]]:
            seen.extend(_describe(u) for u in units)
            yield from super().run(units)

    base, tasks = random_collection(torch.float32, 2)
    b, paths = save_collection(tmp_path / "in", base, {f"task{i}": sd for i, sd in enumerate(tasks)})
    driver.pack(tmp_path / "zoo.tall", b, paths, PackOptions(merge="ties"), executor=Recording())
    assert {"high_histogram", "low_histogram", "distinct_sign_counts", "MaskedBlock"} <= set(seen)


def _describe(unit: Any) -> str:
    """A pass unit by the function it runs on τ, any other unit by its class."""
    fn = getattr(unit, "fn", None)
    if fn is None:
        return type(unit).__name__
    inner = fn.args[0] if isinstance(fn, partial) else fn
    return getattr(inner, "func", inner).__name__
