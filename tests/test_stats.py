"""Mask statistics: selection histogram, catastrophic/selfish weights, per layer, Jaccard, plot.

The hand archive's masks are known by construction; random archives are checked against the
stored mask bits decoded here with numpy, including windows and pieces that cut tensors apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import make_base, make_task
from tall_reference import HAND_COUNT, HAND_MASKS, hand_collection, save_collection
from typer.testing import CliRunner

import tallstore
import tallstore.reading.stats as stats_mod
from tallstore import TallstoreError
from tallstore.cli.app import _register_commands, app
from tallstore.reading.stats import layer_of, natural_key, plot

runner = CliRunner()
_register_commands()


def hand_archive(tmp_path: Path) -> tallstore.Archive:
    base, tasks = hand_collection()
    b, paths = save_collection(tmp_path / "in", base, tasks)
    return tallstore.pack(tmp_path / "hand.tall", b, paths, lam=0.5)


def random_archive(tmp_path: Path, n_tasks: int = 4) -> tallstore.Archive:
    base = make_base(torch.bfloat16, seed=2)
    base["blocks.7.odd"] = torch.randn(5, 3).to(torch.bfloat16)  # 15 bits: a padded mask byte
    tasks = [make_task(base, 20 + i, scale=0.05) for i in range(n_tasks)]
    b, paths = save_collection(tmp_path / "in", base, {f"t{i}": sd for i, sd in enumerate(tasks)})
    return tallstore.pack(tmp_path / "zoo.tall", b, paths, lam=dict(zip(paths, [0.2, 0.4, 0.6, 1.0])), block_elems=40)


def stored_masks(arc: tallstore.Archive) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """``(T, n)`` mask bits of every maskable tensor in mask order, decoded from the arrays."""
    entries = sorted((e for e in arc.describe(sizes=False)["tensors"] if e["kind"] != "separate"), key=lambda e: e["mask_offset"])
    rows = []
    for t in range(len(arc)):
        raw = zarr.open_array(f"{arc.location}/masks/{t}", mode="r")[:]
        parts = []
        for e in entries:
            n = int(np.prod(e["shape"]))
            parts.append(np.unpackbits(raw[e["mask_offset"] : e["mask_offset"] + (n + 7) // 8], count=n, bitorder="little"))
        rows.append(np.concatenate(parts))
    return np.stack(rows), [(e["key"], int(np.prod(e["shape"]))) for e in entries]


def test_hand_archive_statistics_are_the_hand_counts(tmp_path: Path) -> None:
    s = hand_archive(tmp_path).stats()
    assert s["masked_params"] == 8
    assert s["histogram"] == [2, 3, 2, 1] == np.bincount(HAND_COUNT, minlength=4).tolist()
    assert s["catastrophic"] == 2 / 8 and s["selfish"] == 3 / 8
    assert s["density"] == {"t0": 5 / 8, "t1": 3 / 8, "t2": 2 / 8}
    assert [sum(m) for m in HAND_MASKS] == [5, 3, 2]
    assert s["selfish_by_task"] == {"t0": 2 / 8, "t1": 0.0, "t2": 1 / 8}
    np.testing.assert_allclose(s["jaccard"], [[1, 3 / 5, 1 / 6], [3 / 5, 1, 1 / 4], [1 / 6, 1 / 4, 1]])
    assert s["layers"] == [{"layer": "w", "params": 8, "histogram": [2, 3, 2, 1], "catastrophic": 0.25, "selfish": 0.375}]


@pytest.mark.parametrize("window, piece", [(4 << 20, 1 << 20), (5, 16)])
def test_statistics_match_the_stored_mask_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int, piece: int) -> None:
    monkeypatch.setattr(stats_mod, "WINDOW", window)
    monkeypatch.setattr(stats_mod, "PIECE", piece)
    arc = random_archive(tmp_path)
    s = arc.stats()
    masks, keys = stored_masks(arc)
    count = masks.sum(axis=0)
    T, n = masks.shape
    assert s["masked_params"] == n
    assert s["histogram"] == np.bincount(count, minlength=T + 1).tolist()
    assert s["catastrophic"] == pytest.approx((count == 0).mean()) and s["selfish"] == pytest.approx((count == 1).mean())
    assert list(s["density"].values()) == pytest.approx(masks.mean(axis=1).tolist())
    for t in range(T):
        assert arc.describe(sizes=False)["tasks"][t]["mask_density"] == pytest.approx(s["density"][f"t{t}"])
        assert s["selfish_by_task"][f"t{t}"] == pytest.approx((masks[t] & (count == 1)).sum() / n)
        for u in range(T):
            inter, union = (masks[t] & masks[u]).sum(), (masks[t] | masks[u]).sum()
            assert s["jaccard"][t][u] == pytest.approx(inter / union)
    start = 0
    by_layer: dict[str, np.ndarray] = {}
    for key, size in keys:
        h = np.bincount(count[start : start + size], minlength=T + 1)
        by_layer[layer_of(key)] = by_layer.get(layer_of(key), 0) + h
        start += size
    assert {row["layer"]: row["histogram"] for row in s["layers"]} == {k: v.tolist() for k, v in by_layer.items()}


def test_a_single_task_archive_has_a_two_bin_histogram(tmp_path: Path) -> None:
    arc = random_archive(tmp_path, 1)
    s = arc.stats()
    assert len(s["histogram"]) == 2 and s["jaccard"] == [[1.0]]
    assert s["selfish"] == s["density"]["t0"]


@pytest.mark.parametrize(
    "key, layer",
    [
        ("model.layers.3.mlp.up_proj.weight", "model.layers.3"),
        ("encoder.layer.11.attention.self.query.bias", "encoder.layer.11"),
        ("embed.weight", "embed"),
        ("lm_head.weight", "lm_head"),
        ("scale", "scale"),
    ],
)
def test_layer_is_the_name_up_to_its_first_index_else_its_module(key: str, layer: str) -> None:
    assert layer_of(key) == layer


def test_layers_are_listed_in_natural_order() -> None:
    names = ["layer.10", "embed", "layer.2", "layer.1"]
    assert sorted(names, key=natural_key) == ["embed", "layer.1", "layer.2", "layer.10"]


def test_cli_stats_json_and_a_png_plot(tmp_path: Path) -> None:
    hand_archive(tmp_path)
    png = tmp_path / "plots" / "masks.png"
    r = runner.invoke(app, ["stats", str(tmp_path / "hand.tall"), "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["histogram"] == [2, 3, 2, 1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = runner.invoke(app, ["stats", str(tmp_path / "hand.tall")])
    assert r.exit_code == 0 and "catastrophic (0 tasks) 25.00%" in " ".join(r.output.split())


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = hand_archive(tmp_path).stats()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TallstoreError, match="needs matplotlib"):
        plot(s, tmp_path / "x.png")
