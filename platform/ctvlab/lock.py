"""One writer at a time: an exclusive lock file per working directory and per prepared folder.

The lock is a file created with `O_CREAT | O_EXCL`, which is atomic on local filesystems and on NFSv3+
and EFS (unlike `flock`, which NFS may not honour across clients). It holds the holder's host, pid and
start time, so that a refusal can name the holder. A lock whose holder is a dead process on this host is
stale (a killed run) and is taken over; a lock held from another host is never broken automatically,
because its process cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctvlab.errors import CtvlabError

LOCK_NAME = ".ctvlab.lock"

__all__ = ["LOCK_NAME", "LockedError", "exclusive"]


class LockedError(CtvlabError):
    """Another ctvlab process is writing the same folder."""

    exit_code = 5


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None  # gone, or still being written by its creator: treated as held


def _dead_here(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def _take_over(lock: Path, holder: dict[str, Any]) -> None:
    """Move a stale lock aside; if another process replaced it meanwhile, put that one back."""
    aside = lock.with_name(f"{LOCK_NAME}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read(aside) != holder:  # a live lock taken between our read and the rename: restore it
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold `folder`'s lock for the block.

    Args:
        folder: the working directory or prepared folder (created when missing).
        what: what holds it, for the message another process gets ("ctvlab run", "ctvlab preprocess").

    Raises:
        LockedError: another live process holds it; the message names it (host, pid, since).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": secrets.token_hex(8),
    }
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder is not None and _dead_here(holder):
                _take_over(lock, holder)
                continue
            h = holder or {}
            raise LockedError(
                f"{folder} is in use by {h.get('what', 'another ctvlab process')} on host "
                f"{h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('since', '?')}; wait for it to "
                f"finish (if that process is gone, delete {lock})"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
        break
    else:
        raise LockedError(f"{folder}: could not take the lock {lock} (it keeps changing hands)")
    try:
        yield lock
    finally:
        if _read(lock) == me:
            lock.unlink(missing_ok=True)
