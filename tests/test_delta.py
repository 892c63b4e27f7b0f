"""Delta-coded tasks (``fidelity=compact|balanced|high``, spec §10): the code's math, its segment
bytes, and what a pack with a delta preset stores, rebuilds, verifies and refuses."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
from conftest import Cli, make_base, make_task
from safetensors.torch import load_file, save_file

import tallstore
from tallstore.errors import CorruptArchiveError, MergeError, PlanError
from tallstore.ops import delta
from tallstore.packing.options import FIDELITY
from tallstore.storage.deltas import decode_segment, encode_segment

PINNED_DITHER = "70ad9178349f95b3baf8fdb2e06ea021afbe251992c7cd45282136c395f9b332"


def _randn(rows: int, cols: int, seed: int, scale: float) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def _block(rows: int = 48, cols: int = 96, kappa: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, delta.DeltaBlock]:
    base = _randn(rows, cols, 1, 0.05)
    tau = _randn(rows, cols, 2, 1e-3)
    tau[:8] = base[:8] * -3e-5  # rows only weight decay moved
    tau[8:10] = 0.0  # rows that did not move
    u = delta.dither(delta.tensor_seed(0, "w"), 0, rows * cols).reshape(rows, cols)
    return base, tau, u, delta.encode_block(tau, base, kappa, u)


# --- the math -----------------------------------------------------------------------------------


def test_the_dither_is_pinned_exact_in_range_and_the_same_for_a_block_read_alone() -> None:
    s = delta.tensor_seed(7, "w")
    u = delta.dither(s, 0, 4096)
    assert hashlib.sha256(u.numpy().tobytes()).hexdigest() == PINNED_DITHER  # part of the format
    assert float(u.min()) >= -0.5 and float(u.max()) < 0.5
    k = (u.double() + 0.5) * 2**delta.DITHER_BITS
    assert torch.equal(k, k.round())
    assert torch.equal(delta.dither(s, 1000, 96), u[1000:1096])
    assert delta.tensor_seed(7, "w") != delta.tensor_seed(8, "w") != delta.tensor_seed(8, "v")
    with pytest.raises(ValueError):
        delta.tensor_seed(1 << 32, "w")


def test_weight_decay_rows_are_flagged_and_rebuilt_from_the_base_and_still_rows_rebuild_exactly() -> None:
    base, tau, u, block = _block()
    assert block.decay[:8].all() and not block.decay[8:].any()
    assert block.decay_scale == pytest.approx(-3e-5, rel=1e-3)
    rebuilt = delta.rebuild_block(block, base, u) - base
    assert torch.allclose(rebuilt[:8], tau[:8], rtol=0, atol=1e-8)  # float32 rounding of θ₀ + τ
    assert bool((rebuilt[8:10] == 0).all())
    assert block.codes.shape == (40, 96) and block.steps.shape == (40,)
    still = torch.zeros(4, 96)
    alone = delta.encode_block(still, base[:4], 3.0, u[:4])
    assert alone.decay.all() and alone.decay_scale == 0.0
    assert torch.equal(delta.rebuild_block(alone, base[:4], u[:4]), base[:4])


@pytest.mark.parametrize("kappa", [1.0, 3.0, 6.0])
def test_the_rebuild_error_is_within_half_a_step_about_kappa_over_root_12_and_uncorrelated(kappa: float) -> None:
    base, tau, u, block = _block(256, 256, kappa)
    err = (delta.rebuild_block(block, base, u) - base - tau)[~block.decay]
    live = tau[~block.decay]
    assert bool((err.abs() <= block.steps[:, None] / 2 * (1 + 1e-5) + 1e-9).all())
    assert float(err.norm() / live.norm()) == pytest.approx(kappa / math.sqrt(12), rel=0.05)
    assert abs(float((err * live).sum() / (err.norm() * live.norm()))) < 0.03
    assert torch.equal(block.steps, delta.bf16_round(block.steps))


# --- the segment bytes ----------------------------------------------------------------------------


def test_the_rebuild_is_the_spec_formula_in_float32_bit_for_bit_in_place_or_not() -> None:
    base, tau, u, block = _block(kappa=6.0)
    live = ~block.decay
    want = torch.empty_like(base)
    want[block.decay] = base[block.decay] + base[block.decay] * torch.tensor(block.decay_scale, dtype=torch.float32)
    want[live] = base[live] + (block.codes.to(torch.float32) - u[live]) * block.steps[:, None]
    assert block.decay.any() and (block.steps == 0).any() and block.decay_scale != 0
    got = delta.rebuild_block(block, base, u)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    into = torch.full_like(base, math.nan)
    assert delta.rebuild_block(block, base.to(torch.bfloat16).to(torch.float32), u, out=into) is into
    assert torch.equal(into, delta.rebuild_block(block, base.to(torch.bfloat16), u))


def test_a_segment_decodes_to_exactly_the_block_it_was_encoded_from() -> None:
    _, _, u, block = _block()
    data = np.frombuffer(encode_segment(block, u), np.uint8)
    got = decode_segment(data, crc32c.crc32c(data), u, "seg")
    assert torch.equal(got.decay, block.decay) and got.decay_scale == block.decay_scale
    assert torch.equal(got.steps, block.steps) and torch.equal(got.codes, block.codes)


def test_a_segment_with_a_wrong_crc_or_crafted_lengths_is_a_corrupt_archive_error() -> None:
    _, _, u, block = _block()
    good = bytearray(encode_segment(block, u))
    with pytest.raises(CorruptArchiveError, match="CRC-32C"):
        decode_segment(np.frombuffer(bytes(good), np.uint8), crc32c.crc32c(bytes(good)) ^ 1, u, "seg")
    at = 4 + (48 + 7) // 8 + 2 * 40
    crafted = [bytes(good[:at]), bytes(good) + b"\0", bytes(good[:at]) + (1 << 31).to_bytes(4, "little"), b"\1\2"]
    for bad in crafted:  # each with a valid CRC: only the decoder's own checks stand
        with pytest.raises(CorruptArchiveError):
            decode_segment(np.frombuffer(bad, np.uint8), crc32c.crc32c(bad), u, "seg")


def test_every_truncation_and_byte_change_of_a_segment_with_its_crc_fixed_fails_cleanly_or_decodes_its_shape() -> None:
    _, _, u, block = _block(kappa=8.0)
    good = encode_segment(block, u)
    variants = [good[:k] for k in range(len(good))]
    variants += [good[:i] + bytes([good[i] ^ x]) + good[i + 1:] for i in range(len(good)) for x in (0x01, 0x80, 0xFF)]
    decoded = 0
    for bad in variants:  # each with a valid CRC: only the compiled stream checks stand
        data = np.frombuffer(bad, np.uint8)
        try:
            got = decode_segment(data, crc32c.crc32c(data), u, "seg")
        except CorruptArchiveError as e:
            assert str(e).startswith("seg ") and "\n" not in str(e)
            continue
        decoded += 1
        assert got.codes.shape == (48 - int(got.decay.sum()), 96) and got.steps.numel() == got.codes.shape[0]
    assert decoded < len(variants) // 2


# --- packs --------------------------------------------------------------------------------------


@pytest.fixture
def trio(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    base = make_base()
    save_file(base, tmp_path / "base.safetensors")
    tasks = {}
    for i in range(3):
        t = make_task(base, seed=i + 1)
        if i == 2:
            t = {k: v.half() if v.is_floating_point() else v for k, v in t.items()}
        save_file(t, tmp_path / f"t{i}.safetensors")
        tasks[f"t{i}"] = str(tmp_path / f"t{i}.safetensors")
    return tmp_path / "base.safetensors", tasks, base


@pytest.mark.parametrize("preset", ["compact", "balanced", "high"])
def test_a_delta_preset_rebuilds_each_task_near_kappa_over_root_12_in_its_own_dtype_with_1d_tensors_exact(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]], preset: str,
) -> None:
    base_path, tasks, base = trio
    kappa = FIDELITY[preset]
    assert kappa is not None
    arc = tallstore.pack(tmp_path / "a.tall", base_path, tasks, fidelity=preset)
    described = {t["name"]: t for t in arc.describe()["tasks"]}
    for name, path in tasks.items():
        orig = load_file(path)
        got = dict(arc[name].items())
        num = den = 0.0
        for key, want in orig.items():
            assert got[key].dtype == want.dtype and got[key].shape == want.shape
            row = {r["key"]: r for r in described[name]["tensors"]}[key]
            if want.dim() < 2 or key not in base:
                assert torch.equal(got[key], want) and row["source"] != "delta"
                continue
            assert row["source"] == "delta"
            num += float((got[key].double() - want.double()).square().sum())
            den += float((want.double() - base[key].double()).square().sum())
        measured = math.sqrt(num / den)
        assert measured == pytest.approx(kappa / math.sqrt(12), rel=0.15)
        assert described[name]["representation"] == "delta" and described[name]["delta_step"] == kappa
        assert described[name]["rebuild_error"] == pytest.approx(measured, rel=0.02)
    report = arc.verify(deep=True)
    assert report.ok and report.tasks_rebuilt == 3


def test_a_delta_archive_has_nothing_to_merge_and_says_so(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]],
) -> None:
    base_path, tasks, _ = trio
    arc = tallstore.pack(tmp_path / "a.tall", base_path, tasks, fidelity="balanced", embed_base=True)
    with pytest.raises(MergeError, match="delta-coded"):
        arc.merge("consensus")


def test_a_flipped_bit_in_a_delta_stream_fails_the_load_and_verify(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]],
) -> None:
    base_path, tasks, _ = trio
    tallstore.pack(tmp_path / "a.tall", base_path, tasks, fidelity="high")
    chunk = tmp_path / "a.tall" / "deltas" / "0" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    arc = tallstore.open(tmp_path / "a.tall", base=base_path)
    with pytest.raises(CorruptArchiveError, match="t0"):
        dict(arc["t0"].items())
    assert not arc.verify().ok


@pytest.mark.parametrize("extra", [{"shared_bits": 4}, {"lam": "auto"}, {"max_rebuild_error": 0.5},
                                   {"lossless": True}, {"exact": ("head.*",)}, {"allow_nonfinite": True}])
def test_a_delta_preset_refuses_the_options_only_tall_tasks_use_before_writing(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]], extra: dict,
) -> None:
    base_path, tasks, _ = trio
    with pytest.raises(PlanError):
        tallstore.pack(tmp_path / "a.tall", base_path, tasks, fidelity="balanced", **extra)
    assert not (tmp_path / "a.tall").exists()


def test_an_unknown_fidelity_is_refused_and_lossless_is_the_lossless_option(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]],
) -> None:
    base_path, tasks, _ = trio
    with pytest.raises(PlanError, match="fidelity must be one of"):
        tallstore.pack(tmp_path / "a.tall", base_path, tasks, fidelity="medium")
    arc = tallstore.pack(tmp_path / "b.tall", base_path, tasks, fidelity="lossless")
    for name, path in tasks.items():
        got = dict(arc[name].items())
        assert all(torch.equal(got[k], v) for k, v in load_file(path).items())


def test_the_cli_packs_a_delta_preset_shows_its_step_per_task_and_refuses_an_unknown_one(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]], cli: Cli,
) -> None:
    base_path, tasks, _ = trio
    task_args = [a for n, p in tasks.items() for a in ("--task", f"{n}={p}")]
    code, _, err = cli("pack", tmp_path / "a.tall", "--base", base_path, *task_args, "--fidelity", "compact", "-q")
    assert code == 0, err
    code, out, _ = cli("info", tmp_path / "a.tall")
    assert code == 0 and out.count("delta κ=6") == 3
    code, _, err = cli("pack", tmp_path / "b.tall", "--base", base_path, *task_args, "--fidelity", "tiny")
    assert code != 0 and "fidelity must be one of" in err and "Traceback" not in err
    assert not (tmp_path / "b.tall").exists()


def test_auto_fidelity_keeps_per_task_the_coarsest_step_whose_stored_model_scores_enough_else_exact(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]],
) -> None:
    base_path, tasks, base = trio
    originals = {n: load_file(p) for n, p in tasks.items()}

    def rel_error(name: str, sd: dict[str, torch.Tensor]) -> float:
        num = den = 0.0
        for k, v in originals[name].items():
            if k in base and v.is_floating_point():
                num += float((sd[k].double() - v.double()).square().sum())
                den += float((v.double() - base[k].double()).square().sum())
        return math.sqrt(num / den)

    demands = {"t0": 0.0, "t1": 0.1, "t2": 1.0}  # how much each task's score suffers from the error

    def evaluate(name: str, sd: dict[str, torch.Tensor]) -> float:
        return 1.0 - demands[name] * rel_error(name, sd)

    arc = tallstore.pack(tmp_path / "a.tall", base_path, tasks, fidelity="auto", evaluate=evaluate, fidelity_target=0.95)
    got = {t["name"]: t for t in arc.describe()["tasks"]}
    assert got["t0"]["delta_step"] == 6.0 and got["t1"]["delta_step"] == 1.0  # 1 − 0.1·κ/√12 ≥ 0.95 first at κ = 1
    assert got["t2"]["representation"] == "exact"  # no step keeps 95% of it
    assert list(got["t1"]["choice"]["scores"]) == ["6", "3", "1"] and got["t1"]["choice"]["reference"] == 1.0
    assert evaluate("t1", dict(arc["t1"].items())) == got["t1"]["choice"]["scores"]["1"]  # the model it scored
    assert all(torch.equal(v, originals["t2"][k]) for k, v in arc["t2"].items())
    assert arc.verify(deep=True).ok


@pytest.mark.parametrize("evaluate", [None, lambda name, sd: float("nan")])
def test_auto_fidelity_without_a_usable_evaluate_is_refused_and_writes_nothing(
    tmp_path: Path, trio: tuple[Path, dict[str, str], dict[str, torch.Tensor]], evaluate: object,
) -> None:
    base_path, tasks, _ = trio
    with pytest.raises(PlanError, match="evaluate"):
        tallstore.pack(tmp_path / "a.tall", base_path, tasks, fidelity="auto", evaluate=evaluate)
    assert not (tmp_path / "a.tall").exists()


def test_a_delta_stream_spanning_chunks_costs_no_padding_and_any_zarr_reader_reads_its_segments(tmp_path: Path) -> None:
    import zarr

    from tallstore.storage.streams import STREAM_CHUNK_BYTES

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6144, 1024, generator=g)}
    task = {"w": base["w"] + 0.01 * torch.randn(6144, 1024, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(task, tmp_path / "t.safetensors")
    arc = tallstore.pack(tmp_path / "a.tall", tmp_path / "base.safetensors", {"t": tmp_path / "t.safetensors"},
                         fidelity="high")
    segments = arc.describe()["tasks"][0]
    stream = zarr.open_array(str(tmp_path / "a.tall" / "deltas" / "0"), mode="r")
    assert stream.shape[0] > STREAM_CHUNK_BYTES  # more than one chunk
    on_disk = sum(p.stat().st_size for p in (tmp_path / "a.tall" / "deltas" / "0" / "c").iterdir())
    assert on_disk < stream.shape[0] * 1.01  # the last chunk's zero padding is not stored
    data = stream[:]
    record = zarr.open_group(str(tmp_path / "a.tall"), mode="r")["tasks/0"].attrs["tallstore"]
    for offset, length, crc in record["delta"]["segments"]["w"]:
        assert crc32c.crc32c(data[offset : offset + length].tobytes()) == crc
    assert segments["representation"] == "delta" and arc.verify(deep=True).ok
