"""The Typer application and the error boundary: user mistakes end in one line, exit 2."""

from __future__ import annotations

import inspect
import logging
import sys
import warnings

import typer
from rich.text import Text

from ..errors import PackWarning, TallstoreError
from ..storage.chunks import out_of_memory
from ..text import printable

app = typer.Typer(
    name="tallstore",
    help="Store many fine-tunes of one base model as one merged vector plus per-task TALL masks, "
    "and rebuild any single task lazily.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def error_line(message: object) -> str:
    """``error: message`` on one line, with whatever in it a terminal would act on escaped (archive
    names and bytes reach error messages)."""
    return f"error: {printable(' '.join(str(message).split()))}"


def plain(value: object) -> Text:
    """Archive-provided text for Rich output: escaped as in :func:`error_line`, never read as
    markup (``[link=…]``) or emoji codes."""
    return Text(printable(value))


def fail(message: str) -> "typer.Exit":
    """Print ``error: message`` on one line to stderr and return the exit to raise."""
    print(error_line(message), file=sys.stderr)
    return typer.Exit(2)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: object) -> None:
    """tallstore's own warnings as one ``warning: …`` line (escaped like errors); others as Python prints them."""
    if issubclass(category, PackWarning):
        print(f"warning: {printable(' '.join(str(message).split()))}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, *_)  # type: ignore[arg-type]


_default_showwarning = warnings.showwarning


def run() -> None:
    """Run the command ``sys.argv`` names, ending with its exit status (``entry.main`` calls it)."""
    warnings.showwarning = _show_warning
    _register_commands()
    # zarr abandons its other chunk reads when one fails; asyncio's complaints about them are noise
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        # outside standalone mode, typer returns the status of a typer.Exit instead of raising it
        code = app(standalone_mode=False)
    except TallstoreError as e:
        raise SystemExit(_one_line(e)) from None
    except OSError as e:
        raise SystemExit(_one_line(e)) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except Exception as e:  # not enough memory, a click usage error (its own formatting), or a defect
        if out_of_memory(e):  # an archive's sizes (within its limits) larger than this machine's memory
            raise SystemExit(_one_line(f"not enough memory ({type(e).__name__}: {e})")) from None
        # matched by name: newer typers raise those of their own vendored copy of click
        if any(c.__name__ == "ClickException" for c in type(e).__mro__):
            e.show()  # type: ignore[attr-defined]
            raise SystemExit(e.exit_code) from None  # type: ignore[attr-defined]
        print(error_line(f"internal error, please report it: {type(e).__name__}: {e}"), file=sys.stderr)
        raise SystemExit(1) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _register_commands() -> None:
    """Import every command module of this package; each registers itself on ``app``."""
    import importlib
    import pkgutil

    package = importlib.import_module(__package__ or "tallstore.cli")
    for m in pkgutil.iter_modules(package.__path__):
        if m.name not in ("app", "entry", "options", "progress"):
            importlib.import_module(f"{package.__name__}.{m.name}")
    for info in app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = reflow(info.callback.__doc__)


def reflow(doc: str) -> str:
    """A docstring as ``--help`` shows it: paragraphs kept, the line breaks inside each joined, so
    the terminal wraps the text to its width (typer keeps every source line break)."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


def _one_line(e: BaseException) -> int:
    print(error_line(e), file=sys.stderr)
    return 2
