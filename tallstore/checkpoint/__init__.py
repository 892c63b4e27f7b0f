"""Checkpoint I/O: one lazy safetensors reader over byte-range sources, folders, ``.bin``, writers."""

from .interface import Checkpoint
from .opening import open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
