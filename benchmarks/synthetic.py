"""Generated collections of realistic shape: a BERT-like base and correlated fine-tunes.

Task vectors mimic fine-tuning: a component shared by all tasks plus a task-specific one,
each Gaussian with a per-tensor scale proportional to the tensor's own spread (``fine_tune``), or
(``sparse_fine_tune``) small dense changes with about 8% of each task vector's entries large, at
their own random positions: the shape of the issue #14 pack benchmark (``write_sparse_collection``
of ``bert_shaped`` models of a given hidden size, depth and vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def bert_like(params_m: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A BERT-shaped float32 state dict with about ``params_m`` million parameters.

    Hidden size 384 (1024 from 100M), vocabulary 30522 (8192 below 20M, so that small smoke-test
    models are not mostly embeddings).
    """
    hidden = 384 if params_m < 100 else 1024
    vocab = 30522 if params_m >= 20 else 8192
    layer = 4 * hidden * hidden + 2 * hidden * 4 * hidden + 9 * hidden + 4 * hidden
    n_layers = max(1, round((params_m * 1e6 - vocab * hidden) / layer))
    return bert_shaped(hidden, n_layers, vocab, seed)


def bert_shaped(hidden: int, n_layers: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A BERT-shaped float32 state dict: ``vocab`` × ``hidden`` embeddings, ``n_layers`` encoder layers
    (4·hidden intermediate). Hidden 1024, 4 layers, vocabulary 8192: 59M parameters."""
    g = torch.Generator().manual_seed(seed)
    sd = {"embeddings.word_embeddings.weight": torch.randn(vocab, hidden, generator=g) * 0.05,
          "embeddings.position_embeddings.weight": torch.randn(512, hidden, generator=g) * 0.02,
          "embeddings.LayerNorm.weight": 1 + 0.05 * torch.randn(hidden, generator=g),
          "embeddings.LayerNorm.bias": 0.02 * torch.randn(hidden, generator=g)}
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + name + ".weight"] = torch.randn(hidden, hidden, generator=g) * 0.04
            sd[p + name + ".bias"] = torch.randn(hidden, generator=g) * 0.02
        sd[p + "intermediate.dense.weight"] = torch.randn(4 * hidden, hidden, generator=g) * 0.04
        sd[p + "intermediate.dense.bias"] = torch.randn(4 * hidden, generator=g) * 0.02
        sd[p + "output.dense.weight"] = torch.randn(hidden, 4 * hidden, generator=g) * 0.04
        sd[p + "output.dense.bias"] = torch.randn(hidden, generator=g) * 0.02
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + ln + ".weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
            sd[p + ln + ".bias"] = 0.02 * torch.randn(hidden, generator=g)
    return sd


def fine_tune(base: dict[str, torch.Tensor], seed: int, shared_seed: int = 7, rel: float = 0.02) -> dict[str, torch.Tensor]:
    """A fine-tune: θ₀ + shared + own perturbation (relative size ``rel``) plus a new head."""
    g_own = torch.Generator().manual_seed(1000 + seed)
    g_shared = torch.Generator().manual_seed(shared_seed)
    out = {}
    for k, v in base.items():
        s = rel * float(v.float().std())
        delta = 0.5 * s * torch.randn(v.shape, generator=g_shared) + s * torch.randn(v.shape, generator=g_own)
        out[k] = v + delta
    hidden = base["embeddings.LayerNorm.weight"].shape[0]
    out["classifier.weight"] = torch.randn(4, hidden, generator=g_own) * 0.02
    out["classifier.bias"] = torch.zeros(4)
    return out


def sparse_fine_tune(base: dict[str, torch.Tensor], seed: int, large: float = 0.08, rel: float = 0.02,
                     small: float = 0.1, shared_seed: int = 7) -> dict[str, torch.Tensor]:
    """A fine-tune whose task vector is small almost everywhere and large on a fraction ``large`` of
    the entries of every tensor (its own random positions): with ``s = rel · std(θ₀)`` per tensor,
    τ = small·s·(0.5·shared + own) everywhere plus s·N(0, 1) on the large entries; a new head."""
    g_own = torch.Generator().manual_seed(2000 + seed)
    g_shared = torch.Generator().manual_seed(shared_seed)
    out = {}
    for k, v in base.items():
        s = rel * float(v.float().std())
        delta = small * s * (0.5 * torch.randn(v.shape, generator=g_shared) + torch.randn(v.shape, generator=g_own))
        big = torch.rand(v.shape, generator=g_own) < large
        delta += big * (s * torch.randn(v.shape, generator=g_own))
        out[k] = v + delta
    hidden = base["embeddings.LayerNorm.weight"].shape[0]
    out["classifier.weight"] = torch.randn(4, hidden, generator=g_own) * 0.02
    out["classifier.bias"] = torch.zeros(4)
    return out


def write_sparse_collection(folder: Path, hidden: int, n_layers: int, vocab: int, n_tasks: int, dtype: torch.dtype,
                            large: float = 0.08) -> tuple[Path, dict[str, Path]]:
    """Write a ``bert_shaped`` base and ``n_tasks`` ``sparse_fine_tune`` fine-tunes (cached if present)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"h{hidden}-l{n_layers}-v{vocab}-sparse{large:g}-{str(dtype).split('.')[-1]}"
    base_path = folder / f"base-{tag}.safetensors"
    tasks = {f"task{i:02d}": folder / f"task{i:02d}-{tag}.safetensors" for i in range(n_tasks)}
    if base_path.exists() and all(p.exists() for p in tasks.values()):
        return base_path, tasks
    base = bert_shaped(hidden, n_layers, vocab)
    if not base_path.exists():
        save_file({k: v.to(dtype) for k, v in base.items()}, base_path)
    for i, path in enumerate(tasks.values()):
        if not path.exists():
            save_file({k: v.to(dtype) for k, v in sparse_fine_tune(base, i, large).items()}, path)
    return base_path, tasks


def write_collection(folder: Path, params_m: float, n_tasks: int, dtype: torch.dtype) -> tuple[Path, dict[str, Path]]:
    """Write base and ``n_tasks`` fine-tunes as safetensors (cached if already present)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{params_m:g}M-{str(dtype).split('.')[-1]}"
    base_path = folder / f"base-{tag}.safetensors"
    tasks = {f"task{i:02d}": folder / f"task{i:02d}-{tag}.safetensors" for i in range(n_tasks)}
    if base_path.exists() and all(p.exists() for p in tasks.values()):
        return base_path, tasks
    base = bert_like(params_m)
    save_file({k: v.to(dtype) for k, v in base.items()}, base_path)
    for i, path in enumerate(tasks.values()):
        if not path.exists():
            save_file({k: v.to(dtype) for k, v in fine_tune(base, i).items()}, path)
    return base_path, tasks
