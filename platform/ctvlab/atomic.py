"""Atomic file writes and content digests.

Every output of ctvlab is written under a temporary name in the destination folder, fsynced, renamed into
place, and the folder fsynced, so that a killed run (or a machine that loses power) leaves the complete
new file or the complete old one. A rename alone is not enough: without the fsyncs a crash can leave the
new name pointing at an empty or partial file. Folder outputs (a model, an evaluation) are built beside
the old folder and swapped in (`atomic_folder`). Temporary names start with ".tmp-", which pyarrow,
Ray Data and ctvlab's readers all skip.

A destination that cannot be written (a full disk, no permission, a read-only mount) leaves either writer
as one `ctvlab.errors.StorageError` naming its folder; the cleanup after it never raises a second error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.errors import writing

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` when the block succeeds.

    The temporary name keeps the final name as its suffix (".tmp-<token>-name.nii.gz") so that
    libraries choosing a format by extension (nibabel, numpy) still do the right thing. On error the
    temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}-{path.name}")
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            fsync_file(tmp)  # the data is on disk before the name points at it
            os.replace(tmp, path)
            fsync_dir(path.parent)  # and the rename itself survives a crash
        finally:
            _discard(tmp)


def _discard(tmp: Path) -> None:
    """Remove a temporary file or folder if it is there. Never raises: it runs while an error (often this
    folder's own: a read-only mount refuses even the removal of a missing name) is on its way out."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        with contextlib.suppress(OSError):
            tmp.unlink()


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries (a rename, a new file) durable. Some filesystems refuse to fsync a
    directory (EINVAL, EBADF); the rename is then as durable as that filesystem makes it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds, swap it in for `path`.

    The old folder stays complete until the new one exists: it is renamed aside (a ".tmp-" name readers
    skip), the new one renamed into place, then the old one deleted. A kill between the two renames
    leaves the old folder under its ".tmp-…-old-" name and no `path`; never a half-built `path`. On error
    the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    token = secrets.token_hex(4)
    tmp = path.with_name(f"{TMP_PREFIX}{token}-{path.name}")
    old = path.with_name(f"{TMP_PREFIX}{token}-old-{path.name}")
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    fsync_file(f)
            fsync_dir(tmp)
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, old)
            os.rename(tmp, path)
            fsync_dir(path.parent)
        finally:
            _discard(tmp)
            _discard(old)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Fail now, before any work, when `folder` (created if missing) cannot be written: a `StorageError`
    naming it. A stage whose results would be refused at the end checks first and changes nothing."""
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_csv_atomic(path: str | os.PathLike[str], df: Any, **kwargs: Any) -> None:
    """`df.to_csv(path, index=False, **kwargs)`, atomically (a pandas DataFrame)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def remove_stale_tmp(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files that a killed run left in `folder` (recursively); return how many."""
    n = 0
    for p in Path(folder).rglob(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of `obj` (sorted keys): stable across runs and machines."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")
