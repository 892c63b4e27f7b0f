"""Shared by the reliability tests: a tiny collection, full reads, and in-process CLI runs."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import tallstore
from tallstore.cli import main

TINY_BLOCK = 32


def tiny_base(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four tensors of the kinds an archive stores: fp32 and bf16 masked, an int buffer, a scalar."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(16, 8, generator=g),
        "v": torch.randn(24, generator=g).to(torch.bfloat16),
        "ids": torch.arange(6),
        "scale": torch.tensor(0.5),
    }


def tiny_task(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A fine-tune of ``base`` with its own head (stored exactly)."""
    g = torch.Generator().manual_seed(100 + seed)
    sd = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in base.items()}
    sd["head"] = torch.randn(3, 8, generator=g)
    return sd


def tiny_collection(folder: Path, n_tasks: int = 2) -> tuple[Path, dict[str, Path]]:
    """Write a base and ``n_tasks`` fine-tunes as safetensors under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = tiny_base()
    save_file(base, folder / "base.safetensors")
    tasks = {}
    for i in range(n_tasks):
        tasks[f"t{i}"] = folder / f"t{i}.safetensors"
        save_file(tiny_task(base, i), tasks[f"t{i}"])
    return folder / "base.safetensors", tasks


def read_all(location: str | Path, base: str | Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Every task of an archive, fully rebuilt."""
    arc = tallstore.open(location, base=base)
    return {name: arc[name].state_dict() for name in arc}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys in the same order, dtypes, shapes and bytes."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def run_cli(*args: object) -> tuple[int, str, str]:
    """``tallstore ARGS`` through the real entry point, in this process → (exit code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["tallstore", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def one_error_line(result: tuple[int, str, str]) -> str:
    """The single ``error:`` line of a failed CLI run (asserting there is exactly one)."""
    code, _, err = result
    lines = err.splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]
