"""Core figures: archive size ÷ raw size and one-task load time ÷ safetensors load time.

A generated collection (T=8, ~25M-parameter BERT-like model) in bf16 and fp32, measured with
``bench_size.measure`` and ``bench_load.measure`` (definitions there) with the default codecs.
``load_ratio``: ``arc[task].load_into(params)`` with the archive already open, ÷ ``load_file``
plus ``copy_``, warm; ``load_ratio_with_open`` includes ``tallstore.open``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import bench_load, bench_size
from .common import Config, codec_profiles, synthetic

NAME = "core"


def run(cfg: Config) -> dict[str, Any]:
    """Sizes and load times of the bf16 and fp32 collections; JSON-ready results."""
    params_m, n_tasks, repeats = (5, 4, 3) if cfg.quick else (25, 8, 7)
    default = codec_profiles()[:1]
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        coll = synthetic(cfg.work, params_m, n_tasks, dtype)
        size = bench_size.measure(cfg.work, coll, default)
        load = bench_load.measure(cfg.work, coll, default, repeats, 0)
        f = size["fraction_of_raw"]
        rows.append({
            "dtype": coll.dtype, "params": coll.params, "tasks": n_tasks, "raw_bytes": size["sizes"]["raw"],
            "size_ratio_external": f["tallstore_external"],
            "size_ratio_external_plus_base": f["tallstore_external_plus_base"],
            "size_ratio_embedded": f["tallstore_embedded"],
            "load_seconds_safetensors": load["warm"]["safetensors"],
            "load_seconds_safetensors_lazy": load["warm"]["safetensors_lazy"],
            "load_seconds_tallstore": load["warm"]["tallstore_opened"],
            "load_seconds_tallstore_with_open": load["warm"]["tallstore"],
            "load_ratio": load["ratio_warm_opened"],
            "load_ratio_with_open": load["ratio_warm"],
        })
        r = rows[-1]
        print(f"  {r['dtype']}: archive/raw {r['size_ratio_external']:.3f} (external), {r['size_ratio_embedded']:.3f} "
              f"(embedded); load ×{r['load_ratio']:.2f} (×{r['load_ratio_with_open']:.2f} with open)", flush=True)
    return {"repeats": repeats, "rows": rows}
