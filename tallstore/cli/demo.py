"""``tallstore demo``: the whole job end to end on a small real collection built on the fly.

Data: the handwritten-digits set that ships inside scikit-learn (1,797 real 8×8 scans). A
base MLP is pre-trained on 10-way digit recognition; each task fine-tunes all of it (plus a
new head) for a different question about the digits, as the paper fine-tunes one backbone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TallstoreError
from ..packing import driver
from ..packing.options import PackOptions
from ..reading.archive import open as open_archive
from .app import app
from .info import render

TASKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "parity": lambda y: y % 2,
    "five_or_more": lambda y: (y >= 5).astype(np.int64),
    "has_loop": lambda y: np.isin(y, [0, 6, 8, 9]).astype(np.int64),
    "prime": lambda y: np.isin(y, [2, 3, 5, 7]).astype(np.int64),
    "mod3": lambda y: y % 3,
    "round_shape": lambda y: np.isin(y, [0, 2, 3, 5, 6, 8, 9]).astype(np.int64),
}
WIDTH = 512


def _model(n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(),
        nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, n_out),
    )


def _head_key() -> str:
    return "6"


@dataclass
class Data:
    """Digits split into pre-training, fine-tuning and validation parts."""

    x_pre: torch.Tensor
    y_pre: torch.Tensor
    x_ft: torch.Tensor
    y_ft: np.ndarray
    x_val: torch.Tensor
    y_val: np.ndarray


def load_data(seed: int = 0) -> Data:
    """The scikit-learn digits, scaled to [0, 1] and split 40/40/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TallstoreError("the demo needs scikit-learn: pip install 'tallstore[demo]'") from None
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = y[order].astype(np.int64)
    a, b = int(0.4 * len(y)), int(0.8 * len(y))
    return Data(x[:a], torch.tensor(y[:a]), x[a:b], y[a:b], x[b:], y[b:])


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()


def accuracy(state: dict[str, torch.Tensor], x: torch.Tensor, y: np.ndarray) -> float:
    """Accuracy of the MLP with these weights (head included) on ``x``."""
    n_out = state[f"{_head_key()}.weight"].shape[0]
    model = _model(n_out)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        pred = model(x).argmax(dim=1).numpy()
    return float((pred == y).mean())


def build(folder: Path, seed: int = 0) -> tuple[Path, dict[str, Path], Data]:
    """Pre-train the base and fine-tune one model per task; save all as safetensors."""
    torch.manual_seed(seed)
    data = load_data(seed)
    base = _model(10)
    _train(base, data.x_pre, data.y_pre, steps=600, lr=1e-3, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    base_path = folder / "base.safetensors"
    save_file(base_sd, base_path)
    tasks = {}
    for i, (name, label) in enumerate(TASKS.items()):
        labels = label(data.y_ft)
        model = _model(int(labels.max()) + 1)
        own = model.state_dict()
        model.load_state_dict({k: (own[k] if k.startswith(_head_key() + ".") else v) for k, v in base_sd.items()})
        _train(model, data.x_ft, torch.tensor(labels), steps=300, lr=2e-4, seed=seed + 1 + i)
        path = folder / f"{name}.safetensors"
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
        tasks[name] = path
    return base_path, tasks, data


def run(out: Path, lam: float = 0.4) -> dict[str, object]:
    """Build the collection, pack it, report size and fidelity, extract one task."""
    t0 = time.perf_counter()
    base_path, tasks, data = build(out / "checkpoints")
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    options = PackOptions(lam=lam, overwrite=True)
    arc = open_archive(driver.pack(out / "zoo.tall", base_path, tasks, options))
    packed = time.perf_counter() - t0
    delta = open_archive(driver.pack(out / "zoo-balanced.tall", base_path, tasks,
                                     PackOptions(fidelity="balanced", overwrite=True)))
    rows = []
    for name in arc.tasks:
        labels = TASKS[name](data.y_val)
        ft = accuracy(load_file(tasks[name]), data.x_val, labels)
        rebuilt = accuracy(arc[name].state_dict(), data.x_val, labels)
        coded = accuracy(delta[name].state_dict(), data.x_val, labels)
        rows.append({"task": name, "finetuned": ft, "rebuilt": rebuilt, "normalized": rebuilt / ft,
                     "balanced": coded / ft})
    first = arc.tasks[0]
    extracted = arc.extract(first, out / f"{first}.rebuilt.safetensors", overwrite=True)
    same = all(torch.equal(v, arc[first][k]) for k, v in load_file(extracted).items())
    d = arc.describe()
    return {"summary": d, "tasks": rows, "extracted": str(extracted), "extracted_matches": same,
            "build_seconds": built, "pack_seconds": packed, "balanced_ratio": delta.describe()["ratio"]}


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints, archive and extract.")] = Path("demo-output"),
    lam: Annotated[float, typer.Option("--lam", help="λ for every task.")] = 0.4,
) -> None:
    """Fine-tune 6 small models on real digit scans, pack them (TALL, and --fidelity balanced), print ratio and fidelity, extract one."""
    c = Console()
    c.print("building a real collection: a digits MLP pre-trained, then fine-tuned on 6 tasks…")
    r = run(out, lam)
    render(r["summary"])
    t = Table("task", "fine-tuned acc", "TALL rebuilt acc", "normalized", "--fidelity balanced normalized")
    for row in r["tasks"]:
        t.add_row(row["task"], f"{row['finetuned']:.3f}", f"{row['rebuilt']:.3f}", f"{row['normalized']:.1%}",
                  f"{row['balanced']:.1%}")
    c.print(t)
    mean = sum(row["normalized"] for row in r["tasks"]) / len(r["tasks"])
    coded = sum(row["balanced"] for row in r["tasks"]) / len(r["tasks"])
    c.print(f"mean normalized accuracy {mean:.1%} (TALL, {r['summary']['ratio']:.2f}x smaller than the tasks) and "
            f"{coded:.1%} (--fidelity balanced, {r['balanced_ratio']:.2f}x); built in {r['build_seconds']:.0f}s, "
            f"packed in {r['pack_seconds']:.1f}s")
    c.print(f"extracted {r['extracted']} (identical to the lazy view: {r['extracted_matches']})")
