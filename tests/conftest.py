"""Shared fixtures: small checkpoint collections written to a temporary folder."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from s3server import S3Server


def make_base(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model-like state dict: matrices, vectors, a bf16-able embedding and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g).to(dtype),
        "layer.0.attn.weight": torch.randn(16, 16, generator=g).to(dtype),
        "layer.0.attn.bias": torch.randn(16, generator=g).to(dtype),
        "layer.0.mlp.weight": torch.randn(32, 16, generator=g).to(dtype),
        "norm.weight": torch.ones(16, dtype=dtype),
        "position_ids": torch.arange(12),
    }


def make_task(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01, head: bool = True) -> dict[str, torch.Tensor]:
    """A fine-tune of ``base``: small perturbations of float tensors plus its own head."""
    g = torch.Generator().manual_seed(1000 + seed)
    sd = {}
    for k, v in base.items():
        if v.is_floating_point():
            sd[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            sd[k] = v.clone()
    if head:
        sd["head.weight"] = torch.randn(3, 16, generator=g).to(next(iter(base.values())).dtype)
    return sd


Collection = tuple[Path, dict[str, Path]]


@pytest.fixture
def collection(tmp_path: Path) -> Callable[..., Collection]:
    """Factory: ``collection(n_tasks=3, dtype=torch.float32)`` → (base path, {name: path})."""

    def make(n_tasks: int = 3, dtype: torch.dtype = torch.float32, scale: float = 0.01) -> Collection:
        base = make_base(dtype)
        base_path = tmp_path / "base.safetensors"
        save_file(base, base_path)
        tasks = {}
        for i in range(n_tasks):
            p = tmp_path / f"task{i}.safetensors"
            save_file(make_task(base, i, scale), p)
            tasks[f"task{i}"] = p
        return base_path, tasks

    return make


# --- S3: a real S3-compatible endpoint (moto's server) for remote-archive tests ---


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server (``moto[server]``, in the test extra) in its own process on 127.0.0.1."""
    from s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new empty bucket on the session's S3 server, as an ``s3://`` URL; counts reset."""
    import uuid

    url = s3_server.make_bucket(f"t-{uuid.uuid4().hex[:12]}")
    s3_server.set_latency(0)
    s3_server.reset()
    return url


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``cli("pack", ...)`` → (exit code, stdout, stderr) of ``tallstore pack ...``, in-process."""
    from tallstore.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["tallstore", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
