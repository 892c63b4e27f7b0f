"""Smoke test of the benchmark suite's measuring and reporting code on a tiny collection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_load, bench_pack, bench_size, load_floor, report  # noqa: E402
from benchmarks.common import Collection, codec_profiles, entropy_bits, fidelity_profiles, param_count  # noqa: E402


def tiny_collection(folder: Path, n_tasks: int = 3) -> Collection:
    """A base of three small tensors and ``n_tasks`` perturbed fine-tunes with heads."""
    g = torch.Generator().manual_seed(0)
    base = {"emb.weight": torch.randn(256, 64, generator=g), "lin.weight": torch.randn(64, 64, generator=g),
            "lin.bias": torch.randn(64, generator=g)}
    save_file(base, folder / "base.safetensors")
    tasks = {}
    for t in range(n_tasks):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        sd["head.weight"] = torch.randn(3, 64, generator=g)
        tasks[f"t{t}"] = folder / f"t{t}.safetensors"
        save_file(sd, tasks[f"t{t}"])
    base_path = folder / "base.safetensors"
    return Collection("tiny", "tiny float32", base_path, tasks, "float32", param_count(base_path))


def test_measure_and_report(tmp_path: Path) -> None:
    coll = tiny_collection(tmp_path)
    profiles = codec_profiles()
    size = bench_size.measure(tmp_path, coll, profiles)
    assert size["sizes"]["raw"] == coll.raw_bytes
    assert 0 < size["fraction_of_raw"]["tallstore_external"] < size["fraction_of_raw"]["tallstore_embedded"] < 1
    assert all(0 < r["density"] < 1 and r["mask_bits_per_param"] > 0 for r in size["per_task"])
    assert set(size["by_profile"]) == {p.name for p in profiles}
    loads = profiles + fidelity_profiles(("balanced",))
    load = bench_load.measure(tmp_path, coll, loads, repeats=1, cold_repeats=1)
    assert set(load["warm"]) == set(load["cold"]) >= {"safetensors", "zipnn", "tallstore", "tallstore_state_dict",
                                                      "tallstore_balanced"}
    assert all(load["by_profile"][p.name]["ratio_warm"] > 0 for p in loads)
    assert load["mask_bytes_task"] < load["mask_bytes_all"]
    floor = load["floor"]
    assert set(floor["seconds"]) == set(load_floor.STAGES) and all(v > 0 for v in floor["seconds"].values())
    assert floor["floor_seconds"] == pytest.approx(floor["sum_seconds"] / floor["cores"])
    assert 0 < floor["stored_bytes"] <= load["by_profile"][profiles[0].name]["archive_bytes"]
    read = load_floor.objects_read(tmp_path / "archives" / "tiny-ext.tall", coll.base, "t0")
    assert any(k.startswith("masks/0/") for k in read) and all(k.startswith(("tensors/", "masks/0/")) for k in read)
    assert any(row[0].startswith("Floor of a one-task load") for row in report.summary_load(
        {"rows": [load], "profiles": {p.name: p.record() for p in loads}}))
    text = report.size_section({"lam": size["lam"], "rows": [size], "profiles": {p.name: p.record() for p in profiles}},
                               tmp_path, tmp_path)
    text += report.load_section({"repeats": 1, "cold_repeats": 1, "rows": [load],
                                 "profiles": {p.name: p.record() for p in loads}}, tmp_path, tmp_path)
    assert "tiny float32" in text and (tmp_path / "size.png").exists() and (tmp_path / "load.png").exists()
    assert "balanced (--fidelity balanced, " in text and "**Floor of a load**" in text


def test_tensors_in_views_a_safetensors_image(tmp_path: Path) -> None:
    sd = {"a": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.int64), "c": torch.randn(2).to(torch.bfloat16),
          "e": torch.empty(0, 2)}
    save_file(sd, tmp_path / "x.safetensors")
    got = bench_load.tensors_in(bytearray((tmp_path / "x.safetensors").read_bytes()))
    want = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])


def test_helpers() -> None:
    assert entropy_bits(0.5) == 1.0 and entropy_bits(0.0) == 0.0 and entropy_bits(1.0) == 0.0
    f = bench_pack.fit([1e9, 2e9, 3e9], [3.0, 5.0, 7.0])
    assert f["a_seconds"] == pytest.approx(1.0) and f["b_seconds_per_gb"] == pytest.approx(2.0)
    assert f["r2"] == pytest.approx(1.0)


def test_summary_sets_each_tallstore_method_at_t8_beside_t20() -> None:
    def collection(n_tasks: int, bits: float, acc: float) -> dict[str, object]:
        method = {"bits_per_param_task": bits, "mean_normalized_test": acc}
        return {"tasks": [f"t{i}" for i in range(n_tasks)],
                "methods": {"tallstore_int4": method, "tallstore_balanced": method, "int3": method}}

    rows = report.summary_amortization({"collections": [collection(8, 1.18, 0.981)]},
                                       {"collections": [collection(20, 0.61, 0.985)]})
    assert [r[0].split(",")[0] for r in rows] == ["tallstore (TALL+TA", "tallstore --fidelity balanced (delta κ=3)"]
    assert rows[0][1] == "1.180 → 0.610 bit; 98.10% → 98.50%" and "T=8 → T=20" in rows[0][0]
    assert "fewer bits" in rows[0][2] and "no amortization" in rows[1][2]
