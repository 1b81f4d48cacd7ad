"""User-facing errors, and the one place where a folder that cannot be written becomes one.

A `CtvlabError` is a problem with the user's data, configuration or environment. The command line
prints its message (never a traceback) and exits with `exit_code`. Anything else is a bug in ctvlab
and keeps its traceback.

An OSError of the classes that mean "this folder cannot be written" (a full disk, a used-up quota, no
permission, a read-only mount) becomes a `StorageError` here (`storage_error`, `writing`): one line naming
the folder as the user gave it and the cause, exit 4. Every writer goes through it (the atomic writers,
the preprocessing tasks, the search's trials, and `ctvlab`'s entry point for anything else); no stage
catches these errors on its own.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class CtvlabError(Exception):
    """An error the user can fix; the message says what was wrong and how to fix it."""

    exit_code = 2


class ConfigError(CtvlabError):
    """A configuration file or option is invalid."""


class DataError(CtvlabError):
    """Input data (a cohort, a prepared dataset, a patient's file) is missing or invalid."""


class LeakageError(CtvlabError):
    """A patient would appear on both sides of a split, or a split does not match its data."""

    exit_code = 3


class InfrastructureError(CtvlabError):
    """The machine failed, not the data: a dead worker, out of memory, a full disk, an I/O error.

    The stage fails and keeps every output it had; running it again once the cause is fixed resumes.
    """

    exit_code = 4


# --- folders that cannot be written ------------------------------------------------------------------

FULL = (_errno.ENOSPC, _errno.EDQUOT)
REFUSED = (_errno.EACCES, _errno.EPERM, _errno.EROFS)
CAUSES = {
    _errno.ENOSPC: "the disk is full",
    _errno.EDQUOT: "the disk quota is used up",
    _errno.EACCES: "permission denied",
    _errno.EPERM: "permission denied",
    _errno.EROFS: "it is on a read-only file system",
}
# numpy reports a short write without an errno ("2408448 requested and 1830784 written"): on a local disk
# that is a full disk (or a used-up quota), so it is named as one.
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


class StorageError(InfrastructureError):
    """A folder cannot be written: the disk is full, the quota used up, no permission, a read-only mount.

    Attributes:
        folder: the folder, as the user gave it where ctvlab knows how (`shown`).
        errno: the OSError's errno (ENOSPC for numpy's short writes).
        needs: what the stage still needs there ("about 48 MB more ..."), when it can tell.
    """

    def __init__(self, message: str, folder: str | None = None, errno: int | None = None,
                 needs: str | None = None):  # fmt: skip
        super().__init__(message)
        self.folder, self.errno, self.needs = folder, errno, needs

    def __reduce__(self):  # raised in Ray tasks and worker processes: must pickle with its fields
        return (type(self), (self.args[0], self.folder, self.errno, self.needs))

    @property
    def full(self) -> bool:
        return self.errno in FULL

    @property
    def cause(self) -> str:
        """'the disk is full', 'permission denied', ..."""
        return CAUSES.get(self.errno, "an I/O error")

    def with_needs(self, needs: str | None) -> StorageError:
        """The same error, saying what the stage still needs (only a full disk needs space)."""
        if not needs or not self.full or self.needs:
            return self
        return StorageError(_message(self.folder, self.errno, needs), self.folder, self.errno, needs)


def storage_error(
    error: BaseException, folder: str | os.PathLike[str] | None = None, needs: str | None = None
) -> StorageError | None:
    """The `StorageError` for an OSError that means a folder cannot be written; None for any other error.

    Args:
        error: the error raised by a write (an OSError, or a `StorageError` already).
        folder: the folder being written; default: the folder of the file the OSError names (a temporary
            ".tmp-" name is the folder it was being built in).
        needs: what the stage still needs there, for a full disk.
    """
    if isinstance(error, StorageError):
        return error.with_needs(needs)
    if not isinstance(error, OSError):
        return None
    code = error.errno
    if code is None and _SHORT_WRITE.search(str(error)):
        code = _errno.ENOSPC
    if code not in CAUSES:
        return None
    where = folder if folder is not None else _folder_of(error)
    shown_folder = shown(where) if where is not None else None
    return StorageError(_message(shown_folder, code, needs if code in FULL else None), shown_folder, code,
                        needs if code in FULL else None)  # fmt: skip


def _folder_of(error: OSError) -> Path | None:
    name = error.filename or error.filename2
    if not name:
        return None
    path = Path(os.fsdecode(name))
    # The file being written, or a temporary folder being built: the user's folder is the nearest one
    # above it that is not a temporary.
    path = path.parent
    while path.name.startswith(".tmp-") and path.parent != path:
        path = path.parent
    return path


def _message(folder: str | None, code: int | None, needs: str | None) -> str:
    where = f"cannot write to {folder}" if folder else "cannot write ctvlab's output"
    cause = CAUSES.get(code, "an I/O error")
    if code in FULL:
        todo = (
            f"; {needs}" if needs else ""
        ) + ". Free space there (or choose another folder) and run again: "
        return f"{where}: {cause}{todo}what was finished is kept and the stage goes on from there."
    return (f"{where}: {cause}. Nothing was changed there; make it writable (or choose another folder) and "
            "run again.")  # fmt: skip


@contextlib.contextmanager
def writing(
    folder: str | os.PathLike[str] | None, needs: Callable[[], str | None] | None = None
) -> Iterator[None]:
    """Writes into `folder`: an OSError that means it cannot be written leaves the block as a `StorageError`
    naming it (and, for a full disk, what `needs()` says the stage still needs). Other errors pass, and so
    does an OSError about a file elsewhere (an input that cannot be read is not this folder's problem)."""
    try:
        yield
    except (StorageError, OSError) as e:
        if not isinstance(e, StorageError) and not _about(e, folder):
            raise
        err = storage_error(e, None if isinstance(e, StorageError) else folder)
        if err is None:
            raise
        if needs is not None and err.full and not err.needs:
            with contextlib.suppress(Exception):  # an estimate must never hide the error itself
                err = err.with_needs(needs())
        if err is e:
            raise
        raise err from e


def _about(error: OSError, folder: str | os.PathLike[str] | None) -> bool:
    """True when `error` names no file, or a file in `folder` (or below it)."""
    name = error.filename or error.filename2
    if not name or folder is None:
        return True
    try:
        path, root = Path(os.fsdecode(name)).resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):
        return True
    return path == root or root in path.parents


def space_needed(what: str, written_bytes: float, n_written: int, n_left: int, unit: str = "patient") -> str:
    """'the prepared dataset still needs about 48 MB more (12 MB per patient from the 4 written, 4 left)':
    the space a stage still needs, estimated from what it wrote so far."""
    if n_written <= 0 or n_left <= 0:
        return f"{what} still needs space for {n_left} more {unit}(s)" if n_left > 0 else ""
    per = written_bytes / n_written
    return (f"{what} still needs about {_size(per * n_left)} more ({_size(per)} per {unit} from the {n_written} "
            f"written, {n_left} left)")  # fmt: skip


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n: float) -> str:
    unit = "bytes"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    if unit == "bytes":
        return f"{n:.0f} bytes"
    return f"{n:.1f} {unit}" if n < 10 else f"{n:.0f} {unit}"


# --- folders as the user gave them ---------------------------------------------------------------------

_GIVEN: dict[Path, str] = {}


def remember_given(path: str | os.PathLike[str]) -> None:
    """Record a folder as the user gave it (`--workdir runs/demo`), so that messages name the folders below
    it the same way, not by the absolute path ctvlab resolved it to."""
    with contextlib.suppress(OSError, RuntimeError):
        _GIVEN[Path(path).resolve()] = os.fspath(path)


def shown(path: str | os.PathLike[str]) -> str:
    """`path` as the user would recognise it: under a folder they gave, spelled from that folder."""
    p = Path(path)
    try:
        resolved = p.resolve()
    except (OSError, RuntimeError):
        return os.fspath(path)
    for root, given in sorted(_GIVEN.items(), key=lambda kv: -len(kv[0].parts)):
        if resolved == root or root in resolved.parents:
            rest = resolved.relative_to(root)
            return os.fspath(Path(given) / rest) if rest.parts else given
    return os.fspath(path)
