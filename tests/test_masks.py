"""TALL-mask math (spec §1): masks against an independent reference, strictness, exact rebuilds.

The reference here is written from the spec with numpy, never with the package's own functions:
``τ_t = θ_t − θ₀`` and ``τ_MTL = Σ_t τ_t`` (summed in task order) in float32, and
``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|``. Archive-level tests decode the mask bits actually stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import save_file

import tallstore
from tall_reference import first_of_equal

from tallstore import dtypes
from tallstore.ops.kernel import pack_mask, rebuild_bits
from tallstore.ops.masks import merged_weights, tall_masks, task_vectors
from tallstore.ops.merges import rule


def merge(name: str, tau: torch.Tensor, params: dict) -> torch.Tensor:
    return rule(name).apply(tau, params)

FLOAT_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]

# Weights: mostly ordinary floats, often small dyadic values so that exact ties are common.
_values = st.one_of(
    st.sampled_from([0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0]),
    st.floats(-100, 100, width=32, allow_subnormal=True),
)


def reference_masks(base: np.ndarray, tasks: list[np.ndarray], lams: list[float]) -> np.ndarray:
    """``(T, n)`` masks computed directly from the spec's formula in float32."""
    theta0 = base.astype(np.float32)
    taus = [t.astype(np.float32) - theta0 for t in tasks]
    distinct = [taus[t] for t in first_of_equal(torch.from_numpy(np.stack(taus)))]  # identical tasks count once
    mtl = distinct[0].copy()
    for tau in distinct[1:]:
        mtl = mtl + tau
    return np.stack([np.abs(tau) > np.float32(lam) * np.abs(mtl - tau) for tau, lam in zip(taus, lams)])


def ops_rebuilds(base: torch.Tensor, tasks: torch.Tensor, lams: list[float]) -> torch.Tensor:
    """Every task rebuilt through the package's pure ops and the one rebuild kernel, as the packer,
    the loader and the merge all combine them."""
    tau = task_vectors(base, tasks)
    mtl = merge("ta", tau, {})
    masks = tall_masks(tau, mtl, torch.tensor(lams))
    merged = merged_weights(base, tasks, tau, mtl)
    d = dtypes.of_tensor(tasks)
    base_bits = dtypes.to_storage(base.to(tasks.dtype))
    out = []
    for m in masks:
        bits_ = dtypes.to_storage(merged) ^ base_bits
        rebuild_bits(bits_, base_bits, pack_mask(m.numpy()))
        out.append(dtypes.from_storage(bits_, d, tuple(merged.shape)))
    return torch.stack(out)


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bit patterns of a float tensor (so ``-0.0``/``0.0`` and NaNs compare exactly)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def changed_copy(base: torch.Tensor, new: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``new`` where ``where`` holds and the value really changes; elsewhere ``base``'s bits.

    ``new`` is drawn independently of ``base``, so ``θ₀ + (θ_t − θ₀)`` often rounds away from
    ``θ_t`` (e.g. ``θ₀ = 1``, ``θ_t = 1e-10``): exactness must come from the method, not luck.

    A weight whose only change is the sign of a zero has ``τ = 0`` and rebuilds as the base's
    zero: the method cannot see such a change, so the generators do not make one.
    """
    moved = new.to(base.dtype)
    return torch.where(where & (moved != base), moved, base)


@st.composite
def stacks(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[float]]:
    n = draw(st.integers(1, 70))
    t = draw(st.integers(1, 8))
    base = draw(hnp.arrays(np.float32, n, elements=_values))
    tasks = draw(hnp.arrays(np.float32, (t, n), elements=_values))
    lams = draw(st.lists(st.floats(0, 2, width=32), min_size=t, max_size=t))
    return base, tasks, lams


# --- the pure ops ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(stacks())
@example((np.array([0.0, 0.25], np.float32), np.array([[-0.0, 0.0], [0.0, 0.0]], np.float32), [0.0, 1.0]))
def test_masks_match_the_reference_formula(case: tuple[np.ndarray, np.ndarray, list[float]]) -> None:
    base, tasks, lams = case
    tau = task_vectors(torch.from_numpy(base), torch.from_numpy(tasks))
    got = tall_masks(tau, merge("ta", tau, {}), torch.tensor(lams)).numpy()
    np.testing.assert_array_equal(got, reference_masks(base, list(tasks), lams))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 9), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_merged_task_vector_is_the_in_order_float32_sum(t: int, n: int, seed: int) -> None:
    """``τ_MTL`` must not depend on how a tensor is cut into blocks, so it is summed in task order."""
    rng = np.random.default_rng(seed)
    tau = (rng.standard_normal((t, n)) * np.logspace(-6, 2, t)[:, None]).astype(np.float32)
    expected = tau[0].copy()
    for row in tau[1:]:
        expected = expected + row
    np.testing.assert_array_equal(merge("ta", torch.from_numpy(tau), {}).numpy(), expected)


def test_mask_is_false_where_the_task_and_the_residual_are_both_zero() -> None:
    tau = torch.zeros(2, 4)
    assert not tall_masks(tau, tau.sum(0), torch.tensor([0.4, 0.0])).any()


def test_mask_is_strict_at_an_exact_tie() -> None:
    # τ = (1, 2): τ_MTL = 3, so task 0 has |τ| = 1 = 0.5·|3 − 1| (a tie) and task 1 wins.
    tau = torch.tensor([[1.0], [2.0]])
    masks = tall_masks(tau, tau.sum(0), torch.tensor([0.5, 0.5]))
    assert masks[:, 0].tolist() == [False, True]


def test_each_task_uses_its_own_lambda() -> None:
    tau = torch.tensor([[1.0], [2.0]])
    masks = tall_masks(tau, tau.sum(0), torch.tensor([0.49, 2.0]))
    # task 0: 1 > 0.49·2; task 1: 2 > 2·1 is a tie, so false.
    assert masks[:, 0].tolist() == [True, False]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@settings(max_examples=60, deadline=None)
@given(
    base=hnp.arrays(np.float32, st.integers(1, 70), elements=_values),
    data=st.data(),
    lam=st.floats(0, 2, width=32),
)
def test_single_task_rebuild_is_bit_exact(dtype: torch.dtype, base: np.ndarray, data: st.DataObject, lam: float) -> None:
    b = torch.from_numpy(base).to(dtype)
    new = torch.from_numpy(data.draw(hnp.arrays(np.float32, base.shape, elements=_values)))
    changed = torch.from_numpy(data.draw(hnp.arrays(np.bool_, base.shape)))
    task = changed_copy(b, new, changed)
    np.testing.assert_array_equal(bits(ops_rebuilds(b, task[None], [lam])[0]), bits(task))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@settings(max_examples=60, deadline=None)
@given(
    base=hnp.arrays(np.float32, st.integers(1, 70), elements=_values),
    data=st.data(),
    n_tasks=st.integers(2, 6),
)
def test_disjoint_supports_rebuild_every_task_exactly(
    dtype: torch.dtype, base: np.ndarray, data: st.DataObject, n_tasks: int
) -> None:
    b = torch.from_numpy(base).to(dtype)
    owner = torch.from_numpy(data.draw(hnp.arrays(np.int64, base.shape, elements=st.integers(-1, n_tasks - 1))))
    lams = data.draw(st.lists(st.floats(0, 2, width=32), min_size=n_tasks, max_size=n_tasks))
    tasks = []
    for t in range(n_tasks):
        new = torch.from_numpy(data.draw(hnp.arrays(np.float32, base.shape, elements=_values)))
        tasks.append(changed_copy(b, new, owner == t))
    stacked = torch.stack(tasks)
    np.testing.assert_array_equal(bits(ops_rebuilds(b, stacked, lams)), bits(stacked))


# --- masks as stored in an archive -----------------------------------------------------------


def pack_dicts(
    tmp_path: Path, base: dict[str, torch.Tensor], tasks: dict[str, dict[str, torch.Tensor]], **kw: object
) -> tallstore.Archive:
    save_file(base, tmp_path / "base.safetensors")
    paths = {}
    for name, sd in tasks.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, paths[name])
    return tallstore.pack(tmp_path / "zoo.tall", base=tmp_path / "base.safetensors", tasks=paths, **kw)


def stored_mask(arc: tallstore.Archive, task: int, key: str) -> np.ndarray:
    """Mask bits of ``key`` read straight from ``masks/<task>`` with plain zarr and numpy."""
    entry = next(e for e in arc.describe(sizes=False)["tensors"] if e["key"] == key)
    n = int(np.prod(entry["shape"], dtype=np.int64))
    group = zarr.open_group(arc.location, mode="r")
    raw = group[f"masks/{task}"][entry["mask_offset"] : entry["mask_offset"] + (n + 7) // 8]
    unpacked = np.unpackbits(raw, bitorder="little")
    assert not unpacked[n:].any(), "padding bits must be zero"
    return unpacked[:n].astype(bool)


def random_collection(dtype: torch.dtype, n_tasks: int, seed: int = 0) -> tuple[dict, dict]:
    """Odd shapes (blocks with partial bytes), scales spread so masks are neither all 0 nor all 1.

    ``w.far`` moves every weight to near zero, where ``θ₀ + (θ_t − θ₀)`` does not round to ``θ_t``.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {"w.a": (37, 13), "w.b": (29,), "w.c": (5, 3, 7), "w.scalar": (), "w.far": (19,)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    tasks = {}
    for t in range(n_tasks):
        scale = 10.0 ** (-3 + t % 3)
        sd = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        sd["w.far"] = (1e-6 * torch.randn(19, generator=g)).to(dtype)
        tasks[f"t{t}"] = sd
    return base, tasks


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stored_masks_equal_the_reference(tmp_path: Path, dtype: torch.dtype) -> None:
    base, tasks = random_collection(dtype, n_tasks=5)
    lam = {"t0": 0.4, "t1": 0.1, "t2": 0.8, "t3": 0.0, "t4": 1.0}
    arc = pack_dicts(tmp_path, base, tasks, lam=lam, block_elems=40)
    assert arc.describe(sizes=False)["lam"] == pytest.approx(list(lam.values()))
    checked = 0
    for key in base:
        ref = reference_masks(
            base[key].float().reshape(-1).numpy(),
            [sd[key].float().reshape(-1).numpy() for sd in tasks.values()],
            list(lam.values()),
        )
        for t in range(len(tasks)):
            np.testing.assert_array_equal(stored_mask(arc, t, key), ref[t], err_msg=f"{key} task {t}")
            checked += ref[t].size
    assert checked == 5 * (37 * 13 + 29 + 105 + 1 + 19)


def test_stored_masks_are_strict_at_ties_and_use_per_task_lambda(tmp_path: Path) -> None:
    base = {"w": torch.zeros(4)}
    # element 0: every task equals the base (τ = 0 and τ_MTL − τ = 0): no mask anywhere.
    # element 1: τ = (1, 2), τ_MTL = 3: a tie for task a at λ = 0.5, a win at λ = 0.49.
    a = {"w": torch.tensor([0.0, 1.0, 1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 2.0, 0.0, 0.0])}
    arc = pack_dicts(tmp_path, base, {"a": a, "b": b}, lam={"a": 0.5, "b": 0.5})
    assert stored_mask(arc, 0, "w").tolist() == [False, False, True, False]
    assert stored_mask(arc, 1, "w").tolist() == [False, True, False, False]
    arc = pack_dicts(tmp_path, base, {"a": a, "b": b}, lam={"a": 0.49}, overwrite=True)
    assert stored_mask(arc, 0, "w").tolist() == [False, True, True, False]
    assert arc.describe(sizes=False)["lam"] == pytest.approx([0.49, 0.4])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_single_task_archive_rebuilds_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    base, tasks = random_collection(dtype, n_tasks=1)
    arc = pack_dicts(tmp_path, base, tasks, block_elems=40)
    got = arc["t0"].state_dict()
    for key, want in tasks["t0"].items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape
        np.testing.assert_array_equal(bits(got[key].reshape(-1)), bits(want.reshape(-1)), err_msg=key)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_disjoint_support_archive_rebuilds_every_task_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(41, 9, generator=g).to(dtype), "v": torch.randn(77, generator=g).to(dtype)}
    owner = {key: torch.randint(-1, 4, v.shape, generator=g) for key, v in base.items()}  # -1: nobody
    tasks = {
        f"t{t}": {
            key: torch.where(owner[key] == t, (1e-6 * torch.randn(v.shape, generator=g)).to(dtype), v)
            for key, v in base.items()
        }
        for t in range(4)
    }
    arc = pack_dicts(tmp_path, base, tasks, lam=0.4, block_elems=64)
    for name, want in tasks.items():
        got = arc[name].state_dict()
        for key in base:
            np.testing.assert_array_equal(bits(got[key].reshape(-1)), bits(want[key].reshape(-1)), err_msg=f"{name} {key}")


def test_tasks_equal_on_every_probe_but_one_element_both_enter_the_merge() -> None:
    from tallstore.ops.merges import SAMPLE_STRIDE, TaskArithmetic

    tau = torch.zeros(3, 4 * SAMPLE_STRIDE)
    tau[:, ::SAMPLE_STRIDE] = 1.0
    tau[1] = tau[0]
    tau[2] = tau[0]
    tau[2, 5] = 0.25  # off the probed positions: only the full comparison sees it
    got = TaskArithmetic().apply(tau, {})
    assert torch.equal(got, tau[0] + tau[2])


def test_tasks_equal_in_value_enter_the_merge_once_even_with_signed_zeros() -> None:
    from tallstore.ops.merges import distinct

    tau = torch.tensor([[0.0, 1.0, -2.0], [-0.0, 1.0, -2.0], [0.0, 1.0, 2.0]])
    assert distinct(tau) == [0, 2]


@pytest.mark.parametrize("dtypes_ab", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                       (torch.float64, torch.float16)])
@pytest.mark.parametrize("n", [0, 5, 8, 1003])
def test_squared_distance_is_the_float64_sum_of_squared_differences(dtypes_ab: tuple[torch.dtype, torch.dtype], n: int) -> None:
    from tallstore.ops.sums import squared_distance

    g = torch.Generator().manual_seed(n)
    a = (torch.randn(n, generator=g) * 1e3).to(dtypes_ab[0])
    b = (torch.randn(n, generator=g) * 1e3).to(dtypes_ab[1])
    want = float((a.to(torch.float64) - b.to(torch.float64)).square().sum())
    assert squared_distance(a, b) == pytest.approx(want, rel=1e-12)
    assert squared_distance(a) == pytest.approx(float(a.to(torch.float64).square().sum()), rel=1e-12)
