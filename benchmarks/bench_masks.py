"""Mask and shared-vector coding, side by side: zstd-16, zstd-3 and ``tallstore.storage.entropy``.

``python -m benchmarks.bench_masks [--quick] [--zoo DIR]`` writes ``benchmarks/results/masks.json``:

- ``iid``: i.i.d. Bernoulli(p) masks of 8M bits, one context: bytes vs ``n·H(p̂)`` (p̂ the
  sample's density), zstd of the packed bits, encode/decode MB/s of packed mask bytes per core;
- ``synthetic``: TALL masks (λ = 0.4) of 8 heavy-tailed task vectors with per-row scales and rows
  each task left unchanged, contexts from int4 absmax codes of Σ τ_t;
- ``zoo`` (when ``DIR/manifest.json`` lists ≥ 2 tasks): the real collection: τ_t = task − base
  (float32) per shared tensor, τ_MTL = Σ τ_t, masks for λ ∈ {0.2, 0.4, 0.6}, contexts from the
  k-bit codes of τ_MTL (k = 4, and 3 and 8 at λ = 0.4); per task bits per parameter of our mask
  streams (one per row block of the v1 geometry, 2^22 elements) against zstd-16 / zstd-3 of the
  task's whole packed mask; empirical entropies; speed; and the shared vector ``q`` for
  k = 3, 4, 6, 8 as symbol streams vs zstd.
- ``jit``: numba compile time of the kernels with an empty cache, and import time with a warm one.

Speeds are CPU time of the calling thread (``time.thread_time``: the kernels are single-threaded),
best and median of several runs, so other jobs on the machine inflate them less than wall time
would, and idle library threads that spin (an OpenBLAS or OpenMP pool) are not counted as coding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
from safetensors import safe_open

from tallstore.ops.quantize import dequantize_rows, qmax, quantize_rows, row_view
from tallstore.storage import entropy

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "masks.json"
ZOO = HERE / ".cache" / "zoo"
BLOCK_ELEMS = 1 << 22  # v1 row-block target (spec/FORMAT.md §2)


def _entropy(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0)
    q = np.clip(1.0 - p, 1e-300, 1.0)
    return -(p * np.log2(p) + q * np.log2(q))


def _cond_entropy(bits: np.ndarray, labels: np.ndarray) -> float:
    """Empirical ``H(bit | label)`` in bits, summed over all positions (not averaged)."""
    n = np.bincount(labels)
    ones = np.bincount(labels, weights=bits.astype(np.float64), minlength=n.size)
    used = n > 0
    return float((n[used] * _entropy(ones[used] / n[used])).sum())


def _zstd(data: bytes | np.ndarray, level: int) -> int:
    return len(numcodecs.Zstd(level=level).encode(np.ascontiguousarray(data)))


def _timed(repeats: int, fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """Result, best and median CPU seconds of ``fn(*args)`` over ``repeats`` runs."""
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.thread_time()
        out = fn(*args)
        times.append(time.thread_time() - t0)
    return out, min(times), float(np.median(times))


def _rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else float("inf")


# ---------------------------------------------------------------------------------------------
# i.i.d. masks


def bench_iid(n: int, repeats: int) -> list[dict[str, Any]]:
    """One context, density p: our size vs entropy and zstd, and speed per core."""
    rows = []
    ctx = np.ones(n, np.uint8)
    for p in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
        bits = np.random.default_rng(int(p * 1000)).random(n) < p
        packed = np.packbits(bits, bitorder="little")
        data, enc_best, enc_med = _timed(repeats, entropy.encode_bits, bits, ctx)
        out, dec_best, dec_med = _timed(repeats, entropy.decode_bits, data, ctx)
        assert np.array_equal(out, bits)
        bound = n * float(_entropy(bits.mean())) / 8
        z16_bytes, z16_seconds, _ = _timed(1, _zstd, packed, 16)
        rows.append({
            "p": p, "n_bits": n, "entropy_bytes": round(bound), "ours_bytes": len(data),
            "ours_over_entropy": round(len(data) / bound, 4),
            "zstd16_over_entropy": round(z16_bytes / bound, 4),
            "zstd3_over_entropy": round(_zstd(packed, 3) / bound, 4),
            "encode_MBps": _rate(packed.size, enc_best), "encode_MBps_median": _rate(packed.size, enc_med),
            "decode_MBps": _rate(packed.size, dec_best), "decode_MBps_median": _rate(packed.size, dec_med),
            "zstd16_encode_MBps": _rate(packed.size, z16_seconds),
        })
        print(f"iid p={p}: ours/H {rows[-1]['ours_over_entropy']}, zstd16/H "
              f"{rows[-1]['zstd16_over_entropy']}, enc {rows[-1]['encode_MBps']} MB/s, "
              f"dec {rows[-1]['decode_MBps']} MB/s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Collections (synthetic or the zoo): tensors of T task vectors


def _blocks(rows: int, row: int) -> Iterator[tuple[int, int]]:
    """Row blocks of the v1 geometry (spec/FORMAT.md §2)."""
    per = max(1, BLOCK_ELEMS // row)
    step = 8 // math.gcd(row, 8)
    per = max(1, min(max(step, per - per % step), rows))
    for a in range(0, rows, per):
        yield a, min(a + per, rows)


def _synthetic_tensors(seed: int = 0, tasks: int = 8) -> Iterator[tuple[str, torch.Tensor]]:
    """τ stacks ``(T, rows, cols)``: Student-t(3) noise, log-normal row scales, 20% of rows of
    each task left unchanged (τ = 0), plus a 1-D tensor."""
    rng = np.random.default_rng(seed)
    for name, shape in (("emb", (8192, 384)), ("ffn", (1536, 384)), ("proj", (384, 1536)), ("bias", (384,))):
        rows = shape[0] if len(shape) > 1 else 1
        scale = np.exp(rng.normal(0, 0.5, (tasks, rows, 1)))
        keep = rng.random((tasks, rows, 1)) < 0.8
        tau = rng.standard_t(3, (tasks, rows, int(np.prod(shape)) // rows)) * scale * keep
        yield name, torch.from_numpy((tau * 1e-3).astype(np.float32)).reshape(tasks, *shape)


def _zoo_tensors(zoo: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """τ stacks of the tensors every task shares with the base (same shape, floating)."""
    files = [safe_open(str(zoo / "tasks" / f"{t}.safetensors"), "pt") for t in names]
    keys = [set(f.keys()) for f in files]
    with safe_open(str(zoo / "base.safetensors"), "pt") as base:
        for key in base.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            b = base.get_tensor(key)
            if not b.is_floating_point() or not all(key in k for k in keys):
                continue
            ts = [f.get_tensor(key) for f in files]
            if any(t.shape != b.shape for t in ts):
                continue
            yield key, torch.stack([t.to(torch.float32) - b.to(torch.float32) for t in ts])


def _masks(tau: torch.Tensor, mtl: torch.Tensor, lam: float) -> torch.Tensor:
    return tau.abs() > lam * (mtl[None] - tau).abs()


def _bin16(x: np.ndarray) -> np.ndarray:
    """16 quantile bins of ``|x|`` (the notes' "16-bin class of |τ_MTL|")."""
    a = np.abs(x)
    edges = np.quantile(a, np.linspace(0, 1, 17)[1:-1])
    return np.searchsorted(edges, a, side="right").astype(np.int64)


def bench_collection(
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]],
    lams: tuple[float, ...],
    ks: dict[float, tuple[int, ...]],
    repeats: int,
) -> dict[str, Any]:
    """Mask sizes (per task: ours per block, zstd of the whole packed mask) and entropies."""
    out: dict[str, Any] = {}
    for lam in lams:
        for k in ks[lam]:
            out[f"lam{lam}_k{k}"] = _bench_masks_once(tensors, lam, k, repeats)
            r = out[f"lam{lam}_k{k}"]["total"]
            print(f"  λ={lam} k={k}: ours {r['ours_bits_per_param']:.4f}, zstd16 "
                  f"{r['zstd16_bits_per_param']:.4f} ({r['ours_vs_zstd16']:.3f}), H(bin,prev) "
                  f"{r['H_bin16_prev_bits_per_param']:.4f}, enc {r['encode_MBps']} dec "
                  f"{r['decode_MBps']} MB/s", flush=True)
    return out


def _bench_masks_once(
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]], lam: float, k: int, repeats: int
) -> dict[str, Any]:
    per_task: dict[int, dict[str, float]] = {}
    packed: dict[int, list[np.ndarray]] = {}
    params = 0
    enc_t = dec_t = enc_m = dec_m = 0.0
    mask_bytes = 0
    for _, tau in tensors():
        t_count = tau.shape[0]
        mtl = tau.sum(0)
        masks = _masks(tau, mtl, lam)
        mv = row_view(mtl)
        q, _ = quantize_rows(mv.contiguous(), k)
        qn = q.numpy()
        n = mtl.numel()
        params += n
        bins = _bin16(mtl.numpy().reshape(-1))
        for t in range(t_count):
            m = masks[t].numpy().reshape(-1)
            row = per_task.setdefault(t, dict.fromkeys(
                ("ours", "ours_zeroed", "ones", "h_iid", "h_bin", "h_bin_prev", "h_ctx", "coded"), 0.0))
            packed.setdefault(t, []).append(np.packbits(m, bitorder="little"))
            mz = m.copy()  # the bits the new format stores: 0 where q = 0
            mz[qn.reshape(-1) == 0] = False
            packed.setdefault(-t - 1, []).append(np.packbits(mz, bitorder="little"))
            row["ones"] += float(m.sum())
            row["h_iid"] += float(_entropy(m.mean())) * n
            row["h_bin"] += _cond_entropy(m, bins)
            prev = np.concatenate([[0], m[:-1]]).astype(np.int64)
            prev.reshape(mv.shape)[:, 0] = 0  # previous bit of the same row
            row["h_bin_prev"] += _cond_entropy(m, bins * 2 + prev)
            for a, b in _blocks(mv.shape[0], mv.shape[1]):
                qb = qn[a:b].reshape(-1)
                mb = m.reshape(mv.shape)[a:b].reshape(-1)
                seg = mv.shape[1] if tau.dim() > 2 else qb.size
                data, e_best, e_med = _timed(repeats, entropy.encode_mask, mb, qb, seg)
                dec, d_best, d_med = _timed(repeats, entropy.decode_mask, data, qb)
                assert np.array_equal(dec, mb & (qb != 0))
                enc_t += e_best
                dec_t += d_best
                enc_m += e_med
                dec_m += d_med
                mask_bytes += (qb.size + 7) // 8
                row["ours"] += len(data) * 8
                coded = qb != 0
                row["coded"] += float(coded.sum())
                levels = entropy.mask_contexts(  # level of |q| (one class), 0 where q = 0
                    qb, seg, np.zeros(-(-qb.size // seg), np.uint8),
                    entropy.default_thresholds(int(np.abs(qb.astype(np.int16)).max())))
                row["h_ctx"] += _cond_entropy(mb[coded], levels[coded])
    total_ours = sum(r["ours"] for r in per_task.values())
    tasks = len(per_task)
    z16 = [_zstd(np.concatenate(packed[t]), 16) * 8 for t in range(tasks)]
    z3 = [_zstd(np.concatenate(packed[t]), 3) * 8 for t in range(tasks)]
    z16_zeroed = [_zstd(np.concatenate(packed[-t - 1]), 16) * 8 for t in range(tasks)]
    denom = params * tasks
    total = {
        "params": params, "tasks": tasks,
        "density": round(sum(r["ones"] for r in per_task.values()) / denom, 4),
        "coded_fraction": round(per_task[0]["coded"] / params, 4),
        "ours_bits_per_param": total_ours / denom,
        "zstd16_bits_per_param": sum(z16) / denom,
        "zstd3_bits_per_param": sum(z3) / denom,
        "zstd16_of_zeroed_bits_per_param": sum(z16_zeroed) / denom,
        "H_iid_per_tensor_bits_per_param": sum(r["h_iid"] for r in per_task.values()) / denom,
        "H_bin16_bits_per_param": sum(r["h_bin"] for r in per_task.values()) / denom,
        "H_bin16_prev_bits_per_param": sum(r["h_bin_prev"] for r in per_task.values()) / denom,
        "H_qlevel_coded_only_bits_per_param": sum(r["h_ctx"] for r in per_task.values()) / denom,
        "encode_MBps": _rate(mask_bytes, enc_t), "decode_MBps": _rate(mask_bytes, dec_t),
        "encode_MBps_median": _rate(mask_bytes, enc_m), "decode_MBps_median": _rate(mask_bytes, dec_m),
    }
    total["ours_vs_zstd16"] = total["ours_bits_per_param"] / total["zstd16_bits_per_param"]
    for key, value in list(total.items()):
        if isinstance(value, float):
            total[key] = round(value, 4)
    tasks_rows = [
        {"task": t, "ours_bits_per_param": round(per_task[t]["ours"] / params, 4),
         "zstd16_bits_per_param": round(z16[t] / params, 4),
         "zstd3_bits_per_param": round(z3[t] / params, 4),
         "density": round(per_task[t]["ones"] / params, 4)}
        for t in range(tasks)
    ]
    return {"total": total, "per_task": tasks_rows}


def _requantized_error(v: torch.Tensor, scales: torch.Tensor, k: int) -> float:
    """Squared error of codes recomputed against ``scales`` (e.g. scales rounded to 16 bits)."""
    top = qmax(k)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(v / safe[:, None]).clamp(-top, top)
    return float(((v - scales[:, None] * codes).double() ** 2).sum())


def bench_shared_vector(
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]], ks: tuple[int, ...], mse: bool
) -> dict[str, Any]:
    """The codes q of τ_MTL per k: our symbol stream per block vs zstd of the int8 codes and the
    order-0 entropy, the float32 scales (32 bits per row) apart; relative L2 error of absmax and
    (if ``mse``) clipped scales; and what 16-bit scales would do (codes recomputed with them)."""
    keys = ("ours", "z16", "z3", "h0", "scales", "params", "rows", "norm2", "err_absmax",
            "err_mse", "err_f16", "err_bf16", "below_f16_normal", "enc_s", "dec_s")
    stats = {k: dict.fromkeys(keys, 0.0) for k in ks}
    for _, tau in tensors():
        mv = row_view(tau.sum(0)).contiguous()
        norm2 = float((mv.double() ** 2).sum())
        for k in ks:
            q, s = quantize_rows(mv, k)
            qn = q.numpy()
            st = stats[k]
            st["params"] += qn.size
            st["rows"] += qn.shape[0]
            st["scales"] += 32 * qn.shape[0]
            st["norm2"] += norm2
            st["err_absmax"] += float(((mv - dequantize_rows(q, s)).double() ** 2).sum())
            if mse:
                qm, sm = quantize_rows(mv, k, "mse")
                st["err_mse"] += float(((mv - dequantize_rows(qm, sm)).double() ** 2).sum())
            st["err_f16"] += _requantized_error(mv, s.half().float(), k)
            st["err_bf16"] += _requantized_error(mv, s.bfloat16().float(), k)
            st["below_f16_normal"] += float(((s > 0) & (s < 2.0**-14)).sum())
            for a, b in _blocks(mv.shape[0], mv.shape[1]):
                codes = qn[a:b].reshape(-1)
                data, enc_s, _ = _timed(1, entropy.encode_symbols, codes)
                out, dec_s, _ = _timed(1, entropy.decode_symbols, data, codes.size)
                assert np.array_equal(out.view(np.int8), codes)
                st["enc_s"] += enc_s
                st["dec_s"] += dec_s
                st["ours"] += 8 * len(data)
                st["z16"] += 8 * _zstd(codes, 16)
                st["z3"] += 8 * _zstd(codes, 3)
                counts = np.bincount(codes.view(np.uint8), minlength=256)
                p = counts[counts > 0] / codes.size
                st["h0"] += float(-(p * np.log2(p)).sum()) * codes.size
    res: dict[str, Any] = {}
    for k, st in stats.items():
        n = st["params"]
        row = res[f"k{k}"] = {
            "ours_bits_per_param": round(st["ours"] / n, 4),
            "zstd16_bits_per_param": round(st["z16"] / n, 4),
            "zstd3_bits_per_param": round(st["z3"] / n, 4),
            "entropy_order0_bits_per_param": round(st["h0"] / n, 4),
            "scales_bits_per_param": round(st["scales"] / n, 4),
            "relative_l2_error_absmax": round(math.sqrt(st["err_absmax"] / st["norm2"]), 4),
            "relative_l2_error_f16_scales": round(math.sqrt(st["err_f16"] / st["norm2"]), 4),
            "relative_l2_error_bf16_scales": round(math.sqrt(st["err_bf16"] / st["norm2"]), 4),
            "rows_with_scale_below_f16_normal": round(st["below_f16_normal"] / st["rows"], 4),
            "encode_Msymbols_per_s": _rate(int(n), st["enc_s"]),
            "decode_Msymbols_per_s": _rate(int(n), st["dec_s"]),
        }
        if mse:
            row["relative_l2_error_mse"] = round(math.sqrt(st["err_mse"] / st["norm2"]), 4)
        print(f"  q k={k}: " + ", ".join(f"{a} {b}" for a, b in row.items()), flush=True)
    return res


def bench_jit() -> dict[str, float]:
    """Seconds to import and run one tiny round trip with an empty and with a warm numba cache."""
    code = (
        "import time, numpy as np; t = time.perf_counter();"
        "from tallstore.storage import entropy as e;"
        "q = np.array([1, 0, -2, 3] * 64, np.int8); m = np.arange(256) % 3 == 0;"
        "assert (e.decode_mask(e.encode_mask(m, q, 64), q) == (m & (q != 0))).all();"
        "s = np.arange(256, dtype=np.uint8) % 5;"
        "assert (e.decode_symbols(e.encode_symbols(s), 256) == s).all();"
        "print(time.perf_counter() - t)"
    )
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold_cache_s", "warm_cache_s"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True, check=True, cwd=HERE.parent)
            out[label] = round(float(r.stdout.strip().splitlines()[-1]), 2)
    print(f"jit: {out}", flush=True)
    return out


def _zoo_tasks(zoo: Path) -> list[str]:
    manifest = zoo / "manifest.json"
    if not manifest.exists():
        return []
    names = list(json.loads(manifest.read_text()).get("tasks", {}))
    return [t for t in names if (zoo / "tasks" / f"{t}.safetensors").exists()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    ap.add_argument("--zoo", type=Path, default=ZOO, help="real collection (manifest.json, tasks/)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = 2 if args.quick else 5
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "timing": "CPU seconds of the calling thread (single-threaded kernels): MB/s per core of "
                  "packed mask bytes (n/8), best of runs; *_median the median",
    }
    results["jit"] = bench_jit()
    results["iid"] = bench_iid(1 << (20 if args.quick else 23), repeats)
    print("synthetic TALL masks", flush=True)
    results["synthetic"] = bench_collection(_synthetic_tensors, (0.4,), {0.4: (4,)}, repeats)
    results["synthetic_shared_vector"] = bench_shared_vector(_synthetic_tensors, (2, 3, 4, 8), True)
    names = _zoo_tasks(args.zoo)
    if len(names) >= 2:
        print(f"zoo: {len(names)} tasks", flush=True)
        def zoo() -> Iterator[tuple[str, torch.Tensor]]:
            return _zoo_tensors(args.zoo, names)
        lams = (0.4,) if args.quick else (0.2, 0.4, 0.6)
        ks = {0.2: (4,), 0.4: (4,) if args.quick else (3, 4, 8), 0.6: (4,)}
        masks = bench_collection(zoo, lams, ks, 1 if args.quick else 3)
        results["zoo"] = {"tasks": names, "masks": masks}
        results["zoo"]["shared_vector"] = bench_shared_vector(zoo, (3, 4, 6, 8), not args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
