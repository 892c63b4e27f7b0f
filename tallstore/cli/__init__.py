"""The ``tallstore`` command line: one module per command, registered on one Typer app.

The entry points (``entry.console`` for the console script, ``main`` in-process) handle signals
first and import the commands, and torch with them, after.
"""

from .entry import main

__all__ = ["main"]
