"""Publishing an output on a local filesystem: never half-written, never replacing what is not ours.

- An output is built in a hidden sibling folder ``.NAME.<random><suffix>/``, as its entry ``NAME``;
  the folder holds a lock file whose exclusive ``flock`` its writer keeps while it lives, so the
  next writer to the same destination can remove what dead writers left (:func:`sweep`) and never
  the folder of one still running.
- Publishing fsyncs the output (every file, then every folder, deepest first), renames it to its
  final name with ``renameat2(RENAME_NOREPLACE)``, or a fallback that claims the name first, so a
  file or folder that appeared there meanwhile is never replaced, then fsyncs the parent folder.
- Replacing (``--force``) is decided before any work (:func:`check`): only a tallstore archive, an
  output tallstore wrote (marked with :data:`OUTPUT_KEY`) or an empty folder may be replaced. At
  publish time exactly that file or folder (same inode, still of that kind) is moved aside into a
  hidden ``.NAME.<random>.old/`` and deleted once the new output is durable.

Standard library only: archives (``packing``) and checkpoints (``checkpoint``) publish through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .errors import OutputExistsError, TallstoreError

ARCHIVE_KEY = "tallstore"
"""The root ``zarr.json`` attribute holding an archive's manifest (spec §3)."""
OUTPUT_KEY = "tallstore_output"
MARKER = ".tallstore-output"
COPY_CHUNK = ("meta", "manifest", "c", "0")
"""The safetensors ``__metadata__`` key marking a checkpoint tallstore wrote (value: which command)."""
"""The index of a sharded (Hugging Face style) checkpoint folder."""
LOCK = "tallstore.lock"
"""The lock file inside every hidden folder an output is built in."""
MAX_DOCUMENT = 256 * 1024 * 1024
"""The most bytes read of a ``zarr.json`` or safetensors header to tell what a destination is."""

ARCHIVE, OUTPUT, EMPTY = "tallstore archive", "tallstore output", "empty folder"
"""The kinds of things ``--force`` may replace."""

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_OUTPUT_SIDE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _load_renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` (2.28+), or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_published: list[str] = []


class WriteError(TallstoreError):
    """An output could not be written (full disk, read-only filesystem, no permission…)."""


@dataclass(frozen=True)
class Existing:
    """What was at a destination when it was checked, which ``--force`` may therefore replace."""

    kind: str
    dev: int
    ino: int

    def same(self, path: Path) -> bool:
        """``path`` is still this very file or folder (same inode), and still of its kind."""
        st = _lstat(path)
        return st is not None and (st.st_dev, st.st_ino) == (self.dev, self.ino) and kind_of(path) == self.kind


def published() -> tuple[str, ...]:
    """Every destination this process has published so far, oldest first (an interrupted command
    reports them)."""
    return tuple(_published)


def check(final: Path, overwrite: bool) -> Existing | None:
    """What is at ``final`` and may be replaced (None: nothing); raises if it may not be.

    Called before any work, so a refusal costs nothing; :meth:`Staging.publish` later replaces
    only what this returned.
    """
    st = _lstat(final)
    if st is None:
        return None
    kind = kind_of(final)
    if kind is None:
        raise OutputExistsError(
            f"{final} exists and is {describe(final)}; tallstore replaces only its own archives and outputs, "
            "even with --force / overwrite=True, so it was left alone"
        )
    if not overwrite:
        raise OutputExistsError(f"{final} exists (use --force / overwrite=True to replace it)")
    return Existing(kind, st.st_dev, st.st_ino)


def kind_of(path: Path) -> str | None:
    """:data:`ARCHIVE`, :data:`OUTPUT` or :data:`EMPTY` when tallstore may replace ``path``, else None."""
    try:
        if path.is_symlink():
            return None
        if path.is_dir():
            if next(path.iterdir(), None) is None:
                return EMPTY
            if is_archive_document(_read(path / "zarr.json", MAX_DOCUMENT)) or _is_archive_copy(path):
                return ARCHIVE
            return OUTPUT if _is_output_folder(path) else None
        return OUTPUT if path.is_file() and _is_marked(path) else None
    except OSError:
        return None


def describe(path: Path) -> str:
    """What is at ``path``, for a message: a link, a file, or a folder and a few of its entries."""
    if path.is_symlink():
        return "a symbolic link"
    if not path.is_dir():
        return "a file tallstore did not write"
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return "an unreadable folder"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"a folder that is not a tallstore archive or output (holding {shown})"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _read(path: Path, limit: int) -> bytes | None:
    """``path``'s bytes if it is a file of at most ``limit`` bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError:
        return None
    return raw if len(raw) <= limit else None


def _json(raw: bytes | None) -> object:
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


def is_archive_document(raw: bytes | None) -> bool:
    """``raw`` is a root ``zarr.json`` whose attributes carry a tallstore manifest (complete or not)."""
    doc = _json(raw)
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return isinstance(attrs, dict) and isinstance(attrs.get(ARCHIVE_KEY), dict)


def _is_marked(path: Path) -> bool:
    """``path`` is a safetensors file whose ``__metadata__`` carries :data:`OUTPUT_KEY`."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            head = f.read(size) if 0 < size <= MAX_DOCUMENT else b""
    except OSError:
        return False
    header = _json(head)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and OUTPUT_KEY in meta


def output_listing(folder: Path) -> dict[str, int] | None:
    """Every file below ``folder`` but the marker, by relative POSIX path, with its size; None if
    the folder holds anything but plain files and folders (a link, a FIFO…)."""
    out: dict[str, int] = {}
    for root, dirs, names in os.walk(folder, followlinks=False):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                return None
        for name in names:
            full = os.path.join(root, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                return None
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel != MARKER:
                out[rel] = st.st_size
    return out


def marker_document(folder: Path, command: str) -> str:
    """The :data:`MARKER` of an output folder as written: who wrote it and every file it holds,
    so that a later ``--force`` replaces it only while it holds exactly those files."""
    return json.dumps({"written_by": "tallstore", "command": command, "files": output_listing(folder)}) + "\n"


def _is_output_folder(path: Path) -> bool:
    """``path`` is a folder tallstore wrote and nothing was added to, removed from or resized in
    since: its :data:`MARKER` lists exactly the files it holds."""
    doc = _json(_read(path / MARKER, MAX_DOCUMENT))
    if not (isinstance(doc, dict) and doc.get("written_by") == "tallstore" and isinstance(doc.get("files"), dict)):
        return False
    return output_listing(path) == doc["files"]


def _is_archive_copy(path: Path) -> bool:
    """``path`` holds an archive's manifest copy (its root ``zarr.json`` may be torn or lost)."""
    raw = _read(path.joinpath(*COPY_CHUNK), MAX_DOCUMENT)
    doc = _json(raw[:-4] if raw is not None and len(raw) > 4 else None)
    manifest = doc.get("manifest") if isinstance(doc, dict) else None
    return isinstance(manifest, dict) and manifest.get("format") == ARCHIVE_KEY


@contextlib.contextmanager
def staged(final: Path, suffix: str, existing: Existing | None) -> Iterator[Path]:
    """The path to build the output at; published at ``final`` if the block completes.

    ``existing`` is what :func:`check` allowed to be replaced. The hidden folder is removed in
    every case; an ``OSError`` about the output becomes a :class:`WriteError` naming ``final``.
    """
    with Staging(final, suffix) as staging:
        yield staging.path
        staging.publish(existing)


class Staging:
    """The hidden, locked sibling ``.NAME.<random><suffix>/`` an output is built in, as entry ``NAME``."""

    def __init__(self, final: Path, suffix: str) -> None:
        self.final = Path(final).absolute()
        self.suffix = suffix
        self.folder: Path | None = None
        self._lock = -1

    @property
    def path(self) -> Path:
        """Where the output is built."""
        assert self.folder is not None, "the staging folder is made on entering"
        return self.folder / self.final.name

    def __enter__(self) -> Staging:
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            sweep(self.final, self.suffix)
            while self.folder is None:
                folder = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=self.suffix, dir=self.final.parent))
                fd = _own_lock(folder / LOCK)
                if fd is not None:  # else a concurrent sweep took this folder first: it removes it
                    self.folder, self._lock = folder, fd
        except OSError as e:
            raise self._write_error(e) from e
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Remove the hidden folder (with the output, if unpublished), then release its lock."""
        try:
            if self.folder is not None:
                _remove_staging(self.folder)
        finally:
            if self._lock >= 0:
                os.close(self._lock)
        if isinstance(exc, OSError) and self._about_output(exc):
            raise self._write_error(exc) from exc

    def publish(self, existing: Existing | None) -> None:
        """Make the output durable, then rename it to its final name, replacing only ``existing``."""
        sync_tree(self.path)
        old = _move_aside(self.final, existing) if existing is not None else None
        try:
            rename_noreplace(self.path, self.final)
        except FileExistsError:
            kept = f"; what it replaced is kept in {old}" if old is not None else ""
            raise OutputExistsError(
                f"{self.final} appeared while tallstore was writing it and was left alone; nothing was published{kept}"
            ) from None
        except BaseException:  # an interrupt, a failed rename: what was moved aside goes back
            if old is not None:
                _put_back(old, self.final)
            raise
        _published.append(str(self.final))
        _sync_dir(self.final.parent)
        if old is not None and existing is not None:
            _discard(old, existing.kind)

    def _about_output(self, e: OSError) -> bool:
        """``e`` is about writing the output (a full disk, say), not about reading an input."""
        if e.errno in _OUTPUT_SIDE:
            return True
        names = [Path(os.fsdecode(f)).absolute() for f in (e.filename, e.filename2) if isinstance(f, (str, bytes))]
        return any(n == self.final or (self.folder is not None and n.is_relative_to(self.folder)) for n in names)

    def _write_error(self, e: OSError) -> WriteError:
        reason = os.strerror(e.errno).lower() if e.errno else str(e)
        return WriteError(f"cannot write {self.final}: {reason}; nothing was published")


def _own_lock(path: Path) -> int | None:
    """A descriptor holding ``path``'s lock for a new staging folder; None if a sweep got there first."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:  # the folder was swept before the lock file was made
        return None
    if _flock(fd) is False or not _still_at(path, fd):
        os.close(fd)
        return None
    return fd


def _flock(fd: int) -> bool | None:
    """Take ``fd``'s exclusive lock without waiting: True, False (another process holds it), None (unsupported)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, *_UNSUPPORTED):
            return None
        raise
    return True


def _still_at(path: Path, fd: int) -> bool:
    """``path`` still names the file open as ``fd`` (it was not removed or replaced meanwhile)."""
    st, own = _lstat(path), os.fstat(fd)
    return st is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def sweep(final: Path, suffix: str) -> None:
    """Remove the hidden ``.NAME.*<suffix>`` folders of ``final`` left by writers that died.

    Only folders holding a lock file that this process can lock: a live writer holds its lock,
    and a folder without one is not (or not yet) a writer's.
    """
    for folder in final.parent.glob(f".{glob.escape(final.name)}.*{glob.escape(suffix)}"):
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if _flock(fd) is True and _still_at(folder / LOCK, fd):
                _remove_staging(folder)
        finally:
            os.close(fd)


def _remove_staging(folder: Path) -> None:
    """Remove a staging folder, its lock file last, once nothing else is left in it: a folder
    that could not be emptied (a write still landing in it, say) stays sweepable."""
    for _ in range(3):
        try:
            rest = [entry for entry in folder.iterdir() if entry.name != LOCK]
        except FileNotFoundError:
            return
        if not rest:
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
                folder.rmdir()
            return
        for entry in rest:
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _move_aside(final: Path, existing: Existing) -> Path | None:
    """Move ``existing`` from ``final`` into a new hidden ``.NAME.<random>.old/``; None if it is gone.

    Refuses (and puts back) anything else found there: only what :func:`check` saw is replaced.
    """
    if _lstat(final) is None:
        return None
    if not existing.same(final):
        raise OutputExistsError(f"{final} changed while tallstore was writing it and was left alone; nothing was published")
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    moved = trash / final.name
    try:
        rename_noreplace(final, moved)
    except FileNotFoundError:
        trash.rmdir()
        return None
    try:
        same = existing.same(moved)
    except BaseException:
        _put_back(moved, final)
        raise
    if same:
        return moved
    _put_back(moved, final)  # swapped between the check and the rename
    raise OutputExistsError(f"{final} changed while tallstore was writing it and was left alone; nothing was published")


def _put_back(moved: Path, final: Path) -> None:
    """Return what :func:`_move_aside` moved to ``moved`` to ``final``, unless something took its place."""
    try:
        rename_noreplace(moved, final)
    except OSError:
        raise OutputExistsError(
            f"{final} was taken while tallstore was replacing it; what was there before is kept in {moved}; "
            "nothing was published"
        ) from None
    moved.parent.rmdir()


def _discard(old: Path, kind: str) -> None:
    """Delete what was replaced (an empty folder only with ``rmdir``: if it filled up, it is kept)."""
    if kind == EMPTY:
        with contextlib.suppress(OSError):
            old.rmdir()
            old.parent.rmdir()
    else:
        shutil.rmtree(old.parent, ignore_errors=True)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if anything is at ``dst``, never replacing it."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:  # else: this filesystem does not take the flag
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    _rename_claiming(src, dst)


def _rename_claiming(src: Path, dst: Path) -> None:
    """Without ``RENAME_NOREPLACE``: claim ``dst`` first, so the rename can only replace the claim.

    A folder is renamed onto an empty folder made for it (a rename fails if anything was put in
    it); a file is hard-linked to ``dst`` (which fails if ``dst`` exists), then unlinked.
    """
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)
        try:
            os.rename(src, dst)
        except OSError as e:
            with contextlib.suppress(OSError):  # our claim, unless someone filled it
                os.rmdir(dst)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, f"{dst} was taken while being claimed", str(dst)) from None
            raise
    else:
        os.link(src, dst)
        os.unlink(src)


def sync_tree(path: Path) -> None:
    """fsync ``path``: a file, or every file of a folder then every folder, deepest first."""
    if not path.is_dir() or path.is_symlink():
        _fsync(path, os.O_RDONLY)
        return
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(folder, name), os.O_RDONLY)
        _sync_dir(Path(folder))


def _sync_dir(path: Path) -> None:
    """fsync a folder's entries (some filesystems cannot: EINVAL, and then there is nothing to do)."""
    try:
        _fsync(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
