"""The ``tallstore`` command line: one module per command, registered on one Typer app."""

from .app import app, main

__all__ = ["app", "main"]
