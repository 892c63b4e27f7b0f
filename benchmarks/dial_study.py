"""The fidelity dial study (issue #14, "Beyond the paper"): rate vs accuracy of per-task representations.

Run ``python -m benchmarks.dial_study [--variant full|wide] [--only NAME,...]``; it regenerates
``benchmarks/results/dial.json`` (and ``dial-wide.json``) from cached evaluations under
``benchmarks/.cache/dial/`` (delete that folder to recompute everything).

Every representation is computed from the task vectors τ_t = θ_t − θ₀ of the base's tensors and rebuilt from
what it stores only (plus θ₀). Bytes are those a real encoder produces: code streams through
``tallstore.storage.entropy.encode_symbols`` (static rANS), flag/mask streams through ``encode_bits`` /
``encode_mask``, plus the raw bytes of scales and tables and a stated per-tensor header (``HEADER_BYTES``).

bits/param/task = 8 × (shared bytes ÷ T + the task's own bytes) ÷ P, P = the base's parameter count (all
103 tensors, 22.7M for MiniLM), averaged over tasks; heads (``head.*``) are stored exactly (float32) by
every method alike and reported apart ("with heads" adds them).

Accuracy: each task's encoder with its own head, on the zoo's validation split (for every choice) and test
split (reported only). normalized = acc(rebuilt) / acc(fine-tuned) per task, then the mean over tasks. The
driver also records per example whether the rebuilt model's prediction equals the fine-tuned model's
(``agree``), a much less noisy measure of fidelity than accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from benchmarks import dial_ops as dial
from tallstore.ops.quantize import dequantize_rows, quantize_rows, row_view
from tallstore.storage import entropy

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "dial"
RESULTS = HERE / "results"
SPLITS = ("val", "test")
HEADER_BYTES = 8  # per tensor per stored stream set: stream lengths and kinds (varints), stated overhead

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Loading and evaluation (with a cache of per-example predictions)


class Study:
    """One zoo in memory: base, task vectors, heads, fine-tuned predictions; a cached evaluator."""

    def __init__(self, variant: str = "full") -> None:
        from .zoo import build_zoo

        self.variant = variant
        self.zoo = build_zoo(variant=variant)
        self.tasks = self.zoo.tasks
        self.base = load_file(self.zoo.base_path)
        self.keys = list(self.base)
        self.P = sum(v.numel() for v in self.base.values())
        self.taus: dict[str, StateDict] = {}
        self.heads: dict[str, StateDict] = {}
        for t in self.tasks:
            sd = load_file(self.zoo.task_paths[t])
            self.taus[t] = {k: sd[k].float() - v.float() for k, v in self.base.items()}
            self.heads[t] = {k: v for k, v in sd.items() if k not in self.base}
        self.cache_dir = CACHE / variant
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.eval_path = self.cache_dir / "evals.json"
        self.evals: dict[str, Any] = json.loads(self.eval_path.read_text()) if self.eval_path.is_file() else {}
        self.sizes_path = self.cache_dir / "sizes.json"
        self.sizes: dict[str, Any] = json.loads(self.sizes_path.read_text()) if self.sizes_path.is_file() else {}
        self.n = {t: {s: self.zoo.n_examples(t, s) for s in SPLITS} for t in self.tasks}
        ft_path = self.cache_dir / "finetuned_predictions.pt"
        if ft_path.is_file():
            self.ft_pred = torch.load(ft_path)
        else:
            self.ft_pred = {t: {s: self._predict(t, {**self.finetuned_encoder(t), **self.heads[t]}, s)
                                for s in SPLITS} for t in self.tasks}
            torch.save(self.ft_pred, ft_path)
        self.labels = {t: {s: self.zoo._get_split(t, s)["labels"] for s in SPLITS} for t in self.tasks}
        self.ft_correct = {t: {s: int((self.ft_pred[t][s] == self.labels[t][s]).sum()) for s in SPLITS}
                           for t in self.tasks}

    def finetuned_encoder(self, t: str) -> StateDict:
        return {k: self.base[k] + self.taus[t][k] for k in self.keys}

    @torch.inference_mode()
    def _predict(self, task: str, state_dict: StateDict, split: str) -> torch.Tensor:
        """Predicted labels on ``split``, batched exactly as ``benchmarks.zoo._accuracy`` does."""
        from .zoo import _pool

        encoder = self.zoo._get_encoder()
        encoder.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("head.")}, strict=True)
        data = self.zoo._get_split(task, split)
        lengths = data["attention_mask"].sum(1)
        preds = []
        for start in range(0, len(lengths), 64):
            width = int(lengths[start : start + 64].max())
            ids = data["input_ids"][start : start + 64, :width]
            mask = data["attention_mask"][start : start + 64, :width]
            logits = F.linear(_pool(encoder, ids, mask), state_dict["head.weight"].float(),
                              state_dict["head.bias"].float())
            preds.append(logits.argmax(-1))
        return torch.cat(preds)

    def evaluate(self, config: str, task: str, encoder: StateDict, splits: tuple[str, ...] = SPLITS) -> dict:
        """Per split: correct, agree (same prediction as fine-tuned), n; cached by config name."""
        rec = self.evals.setdefault(config, {}).setdefault(task, {})
        for s in splits:
            if s in rec:
                continue
            pred = self._predict(task, {**encoder, **self.heads[task]}, s)
            rec[s] = {"correct": int((pred == self.labels[task][s]).sum()),
                      "agree": int((pred == self.ft_pred[task][s]).sum()), "n": int(pred.numel())}
        return rec

    def done(self, config: str, task: str, splits: tuple[str, ...] = SPLITS) -> bool:
        return all(s in self.evals.get(config, {}).get(task, {}) for s in splits)

    def save(self) -> None:
        for path, obj in ((self.eval_path, self.evals), (self.sizes_path, self.sizes)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
            tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Byte counting of stored streams


def symbol_bytes(codes: torch.Tensor) -> int:
    """Bytes of one static-rANS symbol stream of int8 codes (``entropy.encode_symbols``)."""
    if codes.numel() == 0:
        return 0
    return len(entropy.encode_symbols(np.ascontiguousarray(codes.reshape(-1).numpy()).view(np.uint8)))


def flag_bytes(flags: torch.Tensor) -> int:
    """Bytes of a bit stream of row flags under one adaptive context (``entropy.encode_bits``)."""
    if flags.numel() <= 1:
        return 1
    bits = np.ascontiguousarray(flags.reshape(-1).numpy().astype(np.bool_))
    return len(entropy.encode_bits(bits, np.ones(bits.size, np.uint8)))


DITHER_CONTEXTS = 8  # dithered codes are coded in this many streams, by ⌊(u + 1/2)·8⌋


def dithered_code_bytes(code: dial.DeltaCode, contexts: int = DITHER_CONTEXTS) -> int:
    """Bytes of dithered codes coded as ``contexts`` symbol streams split by the dither's bin
    (the reader regenerates u, so it knows which stream each position reads), each stream with a
    varint length prefix (counted as 3 bytes)."""
    if contexts <= 1 or code.codes.numel() == 0:
        return symbol_bytes(code.codes)
    rows = code.decay.numel()
    u = dial.dither(code.dither_stream, int(np.prod(code.shape))).reshape(rows, -1)[~code.decay]
    ctx = dial.dither_context(u, contexts).reshape(-1)
    flat = code.codes.reshape(-1)
    return sum(symbol_bytes(flat[ctx == i]) + 3 for i in range(contexts))


def delta_bytes(code: dial.DeltaCode, step_mode: str = "row") -> dict[str, int]:
    """Bytes one tensor's ``DeltaCode`` stores, by part."""
    rows = code.decay.numel()
    levels = int(code.codes.abs().max()) if code.codes.numel() and code.dither_stream is None else 0
    any_decay = bool(code.decay.any())
    return {
        "codes": symbol_bytes(code.codes) if code.dither_stream is None else dithered_code_bytes(code),
        "steps": 2 * int(code.steps.numel()) if step_mode == "row" else 2,  # bfloat16 per coded row / tensor
        "flags": flag_bytes(code.decay) if rows > 1 and any_decay else (1 if rows > 1 else 0),
        "decay_scale": 4 if any_decay else 0,
        "table": 4 * levels,  # v[1..max |c|] float32 (v[0] = 0 implicit)
        "header": HEADER_BYTES,
    }


# ----------------------------------------------------------------------------------------------
# Representations: each returns per-task own bytes, shared bytes, and the rebuilt encoder per task


@dataclass
class Rep:
    name: str
    shared: int
    own: dict[str, int]
    parts: dict[str, dict[str, int]]
    rebuild: Callable[[str], StateDict]
    info: dict[str, Any] = field(default_factory=dict)


GROUPS: dict[str, Callable[[str], bool]] = {
    "word": lambda k: "word_embeddings" in k,
    "postype": lambda k: "position_embeddings" in k or "token_type" in k,
    "qk": lambda k: k.endswith(("query.weight", "key.weight")),
    "v": lambda k: k.endswith("value.weight"),
    "attnout": lambda k: k.endswith("attention.output.dense.weight"),
    "ffnin": lambda k: k.endswith("intermediate.dense.weight"),
    "ffnout": lambda k: k.endswith("output.dense.weight") and "attention" not in k,
    "L01": lambda k: ".layer.0." in k or ".layer.1." in k,
    "L23": lambda k: ".layer.2." in k or ".layer.3." in k,
    "L45": lambda k: ".layer.4." in k or ".layer.5." in k,
}


def input_powers(st: Study, task: str, source: str = "synthetic", n_seq: int = 64, length: int = 48,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """E[x_j²] of the input of every linear layer of the task's fine-tuned encoder (key of its weight).

    ``synthetic``: ``n_seq`` sequences of ``length`` tokens drawn uniformly (seeded) from the rows of
    the word embedding that the task moved (its non-decay rows: the vocabulary its training saw),
    between [CLS] and [SEP]; no data set is read. ``val``: the task's validation inputs (an oracle
    for how much a calibration could give; a packer only has ``evaluate``). Cached on disk.
    """
    path = st.cache_dir / f"powers-{source}-{task}.pt"
    if path.is_file():
        return torch.load(path)
    enc = st.zoo._get_encoder()
    with torch.inference_mode():
        enc.load_state_dict(st.finetuned_encoder(task), strict=True)
    if source == "synthetic":
        k = "embeddings.word_embeddings.weight"
        decay, _ = dial.decay_rows(st.taus[task][k], st.base[k])
        seen = torch.nonzero(~decay).flatten()
        g = torch.Generator().manual_seed(seed)
        ids = seen[torch.randint(len(seen), (n_seq, length), generator=g)]
        ids[:, 0], ids[:, -1] = 101, 102
        mask = torch.ones_like(ids)
    else:
        data = st.zoo._get_split(task, "val")
        ids, mask = data["input_ids"], data["attention_mask"]
    sums: dict[str, torch.Tensor] = {}
    count = [0.0]
    hooks = []
    cur = {}
    for name, mod in enc.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.startswith("pooler"):
            def hook(m: torch.nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                x = inp[0].double()
                mm = cur["mask"].unsqueeze(-1).double()
                sums[name] = sums.get(name, 0) + (x * x * mm).sum((0, 1))
            hooks.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        for start in range(0, len(ids), 32):
            m = mask[start : start + 32]
            width = int(m.sum(1).max())
            cur["mask"] = m[:, :width]
            enc(input_ids=ids[start : start + 32, :width], attention_mask=m[:, :width])
            count[0] += float(m.sum())
    for h in hooks:
        h.remove()
    out = {f"{n}.weight": (v / count[0]).float() for n, v in sums.items()}
    torch.save(out, path)
    return out


# Step multipliers per tensor group, from the κ = 2 validation ablation (flips per group ∝ live
# parameters at the optimum: κ_g ∝ sqrt(n_g / flips_g)); see DIAL_NOTES.md.
GROUP_MULT = {"word": 2.0, "postype": 0.25, "qk": 1.5, "v": 1.25, "attnout": 1.0, "ffnin": 1.25, "ffnout": 1.0}


def group_of(key: str) -> str | None:
    for g in ("word", "postype", "qk", "v", "attnout", "ffnin", "ffnout"):
        if GROUPS[g](key):
            return g
    return None


def delta_rep(st: Study, kappa: float | Callable[[str], float | None], rounding: float = 0.5, qmax: int = 127,
              exact_1d: bool = True, skip_decay: bool = True, tag: str = "", groups: bool = False,
              calib: str | None = None, clip: float = 8.0, dither: bool = False,
              kappa_1d: float | None = None, step_mode: str = "row") -> Rep:
    """(c) per-task uniform delta code, step κ·rms(row), centroid reconstruction; 1-D tensors exact.

    ``kappa`` may be a function of the tensor name (None: that tensor exact, for ablations)."""
    if not callable(kappa) and not tag:
        tag = f"delta-k{kappa:g}"
    kfun0 = kappa if callable(kappa) else (lambda k, _v=kappa: _v)
    if groups:
        def kfun(k: str) -> float | None:
            v = kfun0(k)
            g = group_of(k)
            return None if v is None else v * (GROUP_MULT[g] if g else 1.0)
    else:
        kfun = kfun0
    if kappa_1d is not None:
        exact_1d = False
    name = tag + ("-dith" if dither else "") + ("-grp" if groups else "") + ("" if calib is None else f"-aw{calib}") + \
        ("" if kappa_1d is None else f"-1d{kappa_1d:g}") + ("" if step_mode == "row" else f"-{step_mode}step") + \
        ("" if clip == 8.0 else f"c{clip:g}") + ("" if rounding == 0.5 else f"-r{rounding:g}") + \
        ("" if exact_1d or kappa_1d is not None else "-q1d") + ("" if skip_decay else "-nodecay") + \
        ("" if qmax == 127 else f"-q{qmax}")
    sizes = st.sizes.get(name)
    counting = sizes is None
    recon: dict[str, StateDict] = {}
    powers: dict[str, dict[str, torch.Tensor]] = {}

    def code_task(t: str) -> tuple[StateDict, dict[str, int]]:
        out, parts = {}, {"codes": 0, "steps": 0, "flags": 0, "decay_scale": 0, "table": 0, "header": 0, "exact": 0}
        for k in st.keys:
            tau, b = st.taus[t][k], st.base[k]
            kap = kfun(k)
            if kappa_1d is not None and tau.dim() == 1:
                kap = kappa_1d
            if (exact_1d and tau.dim() == 1) or kap is None:
                out[k] = b + tau
                parts["exact"] += 4 * tau.numel() + HEADER_BYTES
                continue
            gain = None
            if calib is not None and t not in powers:
                powers[t] = input_powers(st, t, calib)
            if calib is not None and k in powers[t]:
                gain = dial.column_gains(powers[t][k], clip)
            stream = dial.tensor_seed(st.tasks.index(t), k) if dither else None
            code = dial.quantize_delta(tau, b, kap, rounding, qmax, skip_decay, col_gain=gain,
                                       dither_stream=stream, step_mode=step_mode)
            out[k] = b + dial.dequantize_delta(code, b)
            if counting:
                for p, v in delta_bytes(code, step_mode).items():
                    parts[p] += v
                if gain is not None:
                    parts["gains"] = parts.get("gains", 0) + 2 * gain.numel()
        return out, parts

    if sizes is None:
        sizes = {}
        for t in st.tasks:
            recon[t], sizes[t] = code_task(t)
        st.sizes[name] = sizes
        st.save()

    def rebuild(t: str) -> StateDict:
        if t in recon:
            return recon.pop(t)
        return code_task(t)[0]

    return Rep(name, 0, {t: sum(sizes[t].values()) for t in st.tasks}, sizes, rebuild)


def mask_bytes(mask: torch.Tensor, q: torch.Tensor, row_len: int) -> int:
    """Bytes of one TALL mask stream coded against the shared codes (``entropy.encode_mask``)."""
    m = np.ascontiguousarray(mask.reshape(-1).numpy().astype(np.bool_))
    qq = np.ascontiguousarray(q.reshape(-1).numpy())
    if not qq.any():
        return 1
    return len(entropy.encode_mask(m, qq, max(1, row_len)))


@dataclass
class Shared:
    """The shared vector τ̂_MTL as a reader holds it (dequantized), its codes and its stored bytes."""

    deq: StateDict
    q: dict[str, torch.Tensor]  # int8 codes, row view (0 on shared decay rows)
    nbytes: int
    parts: dict[str, int]


def shared_vector(st: Study, bits: int | None, method: str = "absmax") -> Shared:
    """τ_MTL = Σ_t τ_t (task order), int-``bits`` per row (absmax or mse scale) or float32 (``None``).

    Rows where every task is a pure decay row (``dial.decay_rows`` of τ_MTL itself) are flagged and
    rebuilt as 0 (the mask is not coded there). Cached on the study.
    """
    key = f"shared-{bits}-{method}"
    cache = st.__dict__.setdefault("_shared", {})
    if key in cache:
        return cache[key]
    deq, qs, parts = {}, {}, {"codes": 0, "scales": 0, "flags": 0, "header": 0}
    for k in st.keys:
        total = st.taus[st.tasks[0]][k].clone()
        for t in st.tasks[1:]:
            total += st.taus[t][k]
        r = row_view(total)
        decay, _ = dial.decay_rows(r, row_view(st.base[k].float()))
        live = r[~decay]
        if bits is None:
            dq = torch.zeros_like(r)
            dq[~decay] = live
            q = torch.where(decay[:, None], 0, 1).to(torch.int8).expand_as(r).contiguous()
            parts["codes"] += 4 * live.numel()  # float32, stored as is (an upper bound of lossless)
        else:
            codes, scales = quantize_rows(live.contiguous(), bits, method)
            dq = torch.zeros_like(r)
            dq[~decay] = dequantize_rows(codes, scales)
            q = torch.zeros(r.shape, dtype=torch.int8)
            q[~decay] = codes
            parts["codes"] += symbol_bytes(codes)
            parts["scales"] += 4 * scales.numel()
        parts["flags"] += flag_bytes(decay) if bool(decay.any()) and r.shape[0] > 1 else 1
        parts["header"] += HEADER_BYTES
        deq[k] = dq.reshape(total.shape)
        qs[k] = q
    cache[key] = Shared(deq, qs, sum(parts.values()), parts)
    return cache[key]


def tall_rep(st: Study, lam: float, bits: int | None = 4, exact_1d: bool = False, residual: float | None = None,
             corrections: float | None = None, corr_kappa: float = 0.25) -> Rep:
    """(a) TALL mask against the k-bit shared vector; optionally (e) 1-D tensors exact,
    (d) a residual delta code of τ_t − m⊙τ̂_MTL with step factor ``residual``, or
    (b) the ``corrections`` fraction of largest residual entries per tensor (bitmap + uniform codes)."""
    sh = shared_vector(st, bits)
    name = f"tall-{'f32' if bits is None else f'i{bits}'}-l{lam:g}" + ("-x1d" if exact_1d else "") + \
        ("" if residual is None else f"-res{residual:g}") + \
        ("" if corrections is None else f"-corr{corrections:g}" + ("" if corr_kappa == 0.25 else f"k{corr_kappa:g}"))
    sizes = st.sizes.get(name)
    counting = sizes is None
    recon: dict[str, StateDict] = {}

    def code_task(t: str) -> tuple[StateDict, dict[str, int]]:
        out: StateDict = {}
        parts = {"mask": 0, "exact": 0, "residual": 0, "corr_pos": 0, "corr_val": 0, "header": 0}
        for k in st.keys:
            tau, b = st.taus[t][k], st.base[k]
            if exact_1d and tau.dim() == 1:
                out[k] = b + tau
                parts["exact"] += 4 * tau.numel() + HEADER_BYTES
                continue
            shd = sh.deq[k]
            m = dial.tall_mask(tau, shd, lam)
            q = sh.q[k].reshape(tau.shape)
            m = m & (q != 0)
            rec = dial.tall_rebuild(m, shd)
            if counting:
                parts["mask"] += mask_bytes(m, q, row_view(tau).shape[1])
                parts["header"] += HEADER_BYTES
            if residual is not None:
                code = dial.quantize_delta(tau - rec, b, residual)
                rec = rec + dial.dequantize_delta(code, b)
                if counting:
                    parts["residual"] += sum(delta_bytes(code).values())
            if corrections is not None:
                err = tau - rec
                pos = dial.top_error_positions(err, corrections)
                if pos.numel():
                    vals = err.reshape(-1)[pos].reshape(1, -1)
                    step = dial.bf16_round(dial.row_rms(vals) * corr_kappa)
                    codes = dial.uniform_codes(vals, step)
                    table = dial.level_table(vals, codes, step, 127)
                    fix = table[codes.abs().long()] * torch.sign(codes.float()) * step[:, None]
                    rec = rec.reshape(-1).clone()
                    rec[pos] += fix.reshape(-1)
                    rec = rec.reshape(tau.shape)
                    if counting:
                        bitmap = torch.zeros(tau.numel(), dtype=torch.bool)
                        bitmap[pos] = True
                        parts["corr_pos"] += flag_bytes(bitmap)
                        parts["corr_val"] += symbol_bytes(codes) + 2 + 4 * int(codes.abs().max()) + HEADER_BYTES
            out[k] = b + rec
        return out, parts

    if sizes is None:
        sizes = {}
        for t in st.tasks:
            recon[t], sizes[t] = code_task(t)
        st.sizes[name] = sizes
        st.save()

    def rebuild(t: str) -> StateDict:
        if t in recon:
            return recon.pop(t)
        return code_task(t)[0]

    return Rep(name, sh.nbytes, {t: sum(sizes[t].values()) for t in st.tasks}, sizes, rebuild,
               {"shared_parts": sh.parts})


def probe_rep(st: Study, name: str, fn: Callable[[str, str, torch.Tensor], torch.Tensor]) -> Rep:
    """An error-type probe (not a storable representation): τ̂ = fn(task, key, τ) on 2-D tensors."""
    def rebuild(t: str) -> StateDict:
        return {k: st.base[k] + (fn(t, k, v) if v.dim() == 2 else v) for k, v in st.taus[t].items()}
    return Rep(name, 0, dict.fromkeys(st.tasks, 0), {}, rebuild)


def _gauss_like(v: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v.shape, generator=g, dtype=torch.float32)


def error_probes(st: Study, rel: float = 0.4) -> list[Rep]:
    """Four error types of one relative L2 size ``rel`` (per row, decay rows untouched)."""
    def live(k: str, t: str, v: torch.Tensor) -> torch.Tensor:
        return ~dial.decay_rows(row_view(v), row_view(st.base[k]))[0]

    def shrink(t: str, k: str, v: torch.Tensor) -> torch.Tensor:
        return v * (1 - rel)

    def noise(t: str, k: str, v: torch.Tensor) -> torch.Tensor:
        r = row_view(v)
        n = _gauss_like(r, 1 + st.keys.index(k))
        n = n * (dial.row_rms(r) * rel)[:, None]
        n[~live(k, t, v)] = 0
        return (r + n).reshape(v.shape)

    def other(t: str, k: str, v: torch.Tensor) -> torch.Tensor:  # another task's vector, row-scaled
        o = row_view(st.taus[st.tasks[(st.tasks.index(t) + 1) % len(st.tasks)]][k])
        r = row_view(v)
        scale = dial.row_rms(r) * rel / dial.row_rms(o).clamp_min(1e-30)
        add = o * scale[:, None]
        add[~live(k, t, v)] = 0
        return (r + add).reshape(v.shape)

    def prune(t: str, k: str, v: torch.Tensor) -> torch.Tensor:  # zero the smallest entries per row
        r = row_view(v)
        srt = r.abs().sort(dim=1).values
        cum = (srt.double() ** 2).cumsum(1) / (srt.double() ** 2).sum(1, keepdim=True).clamp_min(1e-300)
        cut = (cum <= rel * rel).sum(1)  # entries below this rank are zeroed
        thr = srt.gather(1, (cut - 1).clamp_min(0)[:, None])
        thr[cut == 0] = -1.0
        return torch.where(r.abs() > thr, r, 0.0).reshape(v.shape)

    return [probe_rep(st, f"probe-{n}-{rel:g}", f) for n, f in
            (("shrink", shrink), ("noise", noise), ("other", other), ("prune", prune))]


# ----------------------------------------------------------------------------------------------
# Reporting


def summarize(st: Study, rep: Rep, assignment: dict[str, str] | None = None) -> dict[str, Any]:
    """Bits and accuracies of a representation (or of a per-task assignment of configs)."""
    per = {}
    for t in st.tasks:
        cfg = assignment[t] if assignment else rep.name
        rec = st.evals[cfg][t]
        per[t] = {"config": cfg,
                  **{f"acc_{s}": rec[s]["correct"] / rec[s]["n"] for s in SPLITS},
                  **{f"normalized_{s}": rec[s]["correct"] / st.ft_correct[t][s] for s in SPLITS},
                  **{f"agree_{s}": rec[s]["agree"] / rec[s]["n"] for s in SPLITS},
                  **{f"delta_examples_{s}": rec[s]["correct"] - st.ft_correct[t][s] for s in SPLITS},
                  "own_bytes": rep.own[t]}
    T = len(st.tasks)
    head_bytes = {t: sum(4 * v.numel() for v in st.heads[t].values()) for t in st.tasks}
    bits = 8 * (rep.shared / T + statistics.mean(rep.own.values())) / st.P
    bits_heads = 8 * (rep.shared / T + statistics.mean(rep.own[t] + head_bytes[t] for t in st.tasks)) / st.P
    worst = min(st.tasks, key=lambda t: per[t]["normalized_test"])
    return {
        "name": rep.name, "bits_per_param_task": bits, "bits_with_heads": bits_heads,
        "shared_bytes": rep.shared,
        **{f"mean_normalized_{s}": statistics.mean(per[t][f"normalized_{s}"] for t in st.tasks) for s in SPLITS},
        **{f"mean_agree_{s}": statistics.mean(per[t][f"agree_{s}"] for t in st.tasks) for s in SPLITS},
        **{f"net_examples_{s}": sum(per[t][f"delta_examples_{s}"] for t in st.tasks) for s in SPLITS},
        "worst_task": worst, "worst_normalized_test": per[worst]["normalized_test"],
        "per_task": per, "info": rep.info,
    }


def run_rep(st: Study, rep: Rep, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    t0 = time.perf_counter()
    for t in st.tasks:
        if not st.done(rep.name, t, splits):
            st.evaluate(rep.name, t, rep.rebuild(t), splits)
            st.save()
    if splits != SPLITS:
        agree = sum(st.evals[rep.name][t]["val"]["n"] - st.evals[rep.name][t]["val"]["agree"] for t in st.tasks)
        net = sum(st.evals[rep.name][t]["val"]["correct"] - st.ft_correct[t]["val"] for t in st.tasks)
        bits = 8 * statistics.mean(rep.own.values()) / st.P
        print(f"{rep.name:28s} {bits:.3f} b/p/t  val flips {agree}  net val examples {net:+d}", flush=True)
        return {}
    s = summarize(st, rep)
    print(f"{rep.name:28s} {s['bits_per_param_task']:.3f} b/p/t  val {100 * s['mean_normalized_val']:.2f}  "
          f"test {100 * s['mean_normalized_test']:.2f} (worst {s['worst_task']} "
          f"{100 * s['worst_normalized_test']:.2f})  agree val {100 * s['mean_agree_val']:.2f} "
          f"test {100 * s['mean_agree_test']:.2f}  net ex val {s['net_examples_val']:+d} test "
          f"{s['net_examples_test']:+d}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="full")
    parser.add_argument("--only", default="delta")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    st = Study(args.variant)
    out = {}
    only = args.only.split(",")
    if "delta" in only:
        for kappa in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
            out[f"delta-k{kappa:g}"] = run_rep(st, delta_rep(st, kappa))
    if "tall" in only:
        for lam in (0.2, 0.3, 0.4, 0.5, 0.6):
            out[f"tall-i4-l{lam:g}"] = run_rep(st, tall_rep(st, lam, 4))
    if "alloc" in only:  # design evidence: validation only
        for kappa in (1.5, 2.0):
            run_rep(st, delta_rep(st, kappa, groups=True), ("val",))
            run_rep(st, delta_rep(st, kappa, calib="synthetic"), ("val",))
            run_rep(st, delta_rep(st, kappa, groups=True, calib="synthetic"), ("val",))
            run_rep(st, delta_rep(st, kappa, calib="val"), ("val",))
    if "grp" in only:
        for kappa in (1.0, 1.25, 1.5, 2.0, 2.5):
            out[f"delta-k{kappa:g}-grp"] = run_rep(st, delta_rep(st, kappa, groups=True))
    if "probe" in only:
        for rep in error_probes(st, 0.4):
            run_rep(st, rep, ("val",))
    if "noise" in only:
        for rel in (0.8, 1.2, 2.0):
            run_rep(st, error_probes(st, rel)[1], ("val",))
    if "dith" in only:
        for kappa in (1.5, 2.0, 3.0, 4.0, 5.0, 1.0, 6.0, 8.0, 11.0, 16.0):
            out[f"delta-k{kappa:g}-dith"] = run_rep(st, delta_rep(st, kappa, dither=True))
    if "ablate" in only:  # design evidence: validation only
        for g, sel in GROUPS.items():
            run_rep(st, delta_rep(st, lambda k, _s=sel: 2.0 if _s(k) else None, tag=f"abl-k2-{g}"), ("val",))


if __name__ == "__main__":
    main()
