"""Archive-provided text made safe for a terminal.

Task and tensor names, paths and codec settings come from an archive, which is untrusted input:
printed as they are, an escape sequence in a name would clear the screen, recolour the terminal
or plant a hyperlink (OSC 8). :func:`printable` writes every character that a terminal acts on
rather than shows as a visible escape instead: control characters (C0, DEL, C1), format
characters (bidirectional overrides, zero-width marks), line and paragraph separators, and lone
surrogates (which no terminal encoding can carry).
"""

from __future__ import annotations

import unicodedata

_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def printable(text: object) -> str:
    """``str(text)`` with every character a terminal would act on written as ``\\xNN`` or ``\\uNNNN``."""
    s = str(text)
    if s.isprintable():  # the common case: isprintable() is False for every character replaced below
        return s
    return "".join(_escape(ch) if unicodedata.category(ch) in _HIDDEN else ch for ch in s)
