"""Archives written by format v1 stay readable: the fixtures in tests/data/v1 were packed by the
v1 code, with the tensors each task rebuilt to at the time recorded next to them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tallstore

V1 = Path(__file__).parent / "data" / "v1"
ARCHIVES = {"f32-ties-embedded": None, "bf16-ta": V1 / "bf16-base.safetensors"}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_a_v1_archive_rebuilds_every_task_bit_for_bit(name: str) -> None:
    with tallstore.open(V1 / f"{name}.tall", base=ARCHIVES[name]) as arc:
        assert arc.describe(sizes=False)["format_version"] == 1
        for task in arc.tasks:
            want = load_file(V1 / f"{name}.{task}.expected.safetensors")
            got = arc[task].state_dict()
            assert list(got) == list(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
                assert torch.equal(bits(got[k]), bits(want[k])), (task, k)


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_a_v1_archive_verifies_deep_and_merges(name: str) -> None:
    with tallstore.open(V1 / f"{name}.tall", base=ARCHIVES[name]) as arc:
        report = arc.verify(deep=True)
        assert report.ok, report.problems
        assert report.tasks_rebuilt == len(arc.tasks)
        merged = arc.merge("consensus")
        assert set(merged) <= set(arc[arc.tasks[0]])
        assert arc.stats()["masked_params"] > 0
