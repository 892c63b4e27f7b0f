"""Checkpoint I/O: lazy readers for safetensors files, HF folders and torch ``.bin``, and writers."""

from .reader import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
