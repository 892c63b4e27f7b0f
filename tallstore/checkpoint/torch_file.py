"""PyTorch ``.bin``/``.pt`` state dicts, loaded only with ``weights_only=True`` (no pickled code)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .. import dtypes
from ..dtypes import TensorInfo
from ..errors import CheckpointError
from .interface import Checkpoint, WeightLayout
from .sources import ByteSource, LocalFile


class TorchCheckpoint(Checkpoint):
    """A torch state dict file, memory-mapped where its format allows."""

    def __init__(self, path: Path, folder: bool = False) -> None:
        self.path = str(path)
        self._path = path
        self._folder = folder
        self._file: LocalFile | None = None
        sd = self._load(path)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
        ):
            raise CheckpointError(f"{path}: not a state dict of named tensors")
        odd = next((k for k, v in sd.items() if v.layout != torch.strided or v.device.type != "cpu"), None)
        if odd is not None:
            raise CheckpointError(f"{path}: tensor {odd!r} is not a dense tensor ({sd[odd].layout}, {sd[odd].device})")
        self._sd: dict[str, torch.Tensor] = sd
        self.keys = list(sd)
        self._infos = {k: TensorInfo(dtypes.of_tensor(v), tuple(v.shape)) for k, v in sd.items()}

    @staticmethod
    def _load(path: Path) -> object:
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
            raise CheckpointError(
                f"{path}: refused: the pickle holds more than tensors ({first})"
            ) from None
        except Exception as e:  # garbage makes torch's unpickler raise IndexError, KeyError, …
            raise CheckpointError(f"{path}: cannot load torch state dict ({e})") from None

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self._sd[key]
        return t if t.dim() == 0 else t[start:stop]

    @property
    def files(self) -> list[ByteSource]:
        if self._file is None:
            self._file = LocalFile(self._path)
        return [self._file]

    @property
    def layout(self) -> WeightLayout:
        return WeightLayout("torch", ((self._path.name, len(self.keys), None),), folder=self._folder)

    def close(self) -> None:
        self._sd = {}
        if self._file is not None:
            self._file.close()
