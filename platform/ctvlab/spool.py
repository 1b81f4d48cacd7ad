"""What the tracking store could not take, kept on disk until it can (`ctvlab.tracking.sync_spool`).

While the tracking server is unreachable, each MLflow write of ctvlab (a run created or ended, params,
metrics, tags, an artifact, a dataset, a model registration) is appended to a journal in the working
directory's `tracking-spool/`: one JSON line per write, one journal per process (the driver, each search
trial, a training worker), beside a copy of each artifact. A run or an experiment created during the
outage gets a placeholder id (`pending-<hex>`) that later writes, in any process, refer to; replaying
creates it, records the real id beside the journals (`ids/`, kept for good), and maps every later
reference.

Replaying is safe to repeat: each journal's progress is recorded after every write sent (`<journal>.sent`),
metric points carry the time they were measured (MLflow stores a point once), a curve is completed against
what the store already holds, and a journal that is fully sent is removed once its writer has ended.

No mlflow here: `ctvlab.tracking` decides when to write here and sends what is here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctvlab.atomic import write_text_atomic

SPOOL_DIR = "tracking-spool"
PLACEHOLDER = re.compile(r"pending-[0-9a-f]{24}")
_HOST = socket.gethostname()
# Appending and removing a fully sent journal exclude each other within a process (the driver writes from
# its main thread while its watch thread sends); other processes' journals are only removed once they end.
_JOURNALS = threading.Lock()


def placeholder() -> str:
    """A new placeholder id: what a run created during an outage is called until it is sent."""
    return f"pending-{secrets.token_hex(12)}"


class Spool:
    """The spool folder of one working directory (shared by the processes of a study)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._journal: Path | None = None

    # --- writing ----------------------------------------------------------------------------------

    def append(self, op: str, uri: str, fields: dict[str, Any], local: Path | None = None) -> None:
        """Keep one write for later. `local`: a file or folder the write sends (an artifact), copied now:
        the original may be a temporary that is gone by the time the store answers."""
        with _JOURNALS:
            self.root.mkdir(parents=True, exist_ok=True)
            if self._journal is None or not self._journal.exists():
                self._journal = self.root / f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            record = {"op": op, "uri": uri, "t": time.time(), **fields}
            if local is not None:
                copy = self.root / "files" / secrets.token_hex(8) / Path(local).name
                copy.parent.mkdir(parents=True)
                if Path(local).is_dir():
                    shutil.copytree(local, copy)
                else:
                    shutil.copy2(local, copy)
                record["local"] = str(copy.relative_to(self.root))
            line = json.dumps(record, sort_keys=True, default=str)
            # One write per line, appended: a journal is never rewritten, so a reader sees whole lines.
            with open(self._journal, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    # --- ids ----------------------------------------------------------------------------------------

    def real_id(self, pending: str) -> str | None:
        """The id the store gave to a placeholder, once it was sent."""
        try:
            return (self.root / "ids" / pending).read_text().strip() or None
        except OSError:
            return None

    def record_id(self, pending: str, real: str) -> None:
        write_text_atomic(self.root / "ids" / pending, real)

    def resolve(self, value: Any) -> Any:
        """`value` with every placeholder that has a real id replaced by it (in strings, lists, dicts)."""
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda m: self.real_id(m.group(0)) or m.group(0), value)
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        return value

    @staticmethod
    def unresolved(value: Any) -> bool:
        """True when `value` still refers to a placeholder (the write must wait for its run)."""
        return bool(PLACEHOLDER.search(json.dumps(value, default=str)))

    # --- reading and replaying ---------------------------------------------------------------------

    def journals(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl")) if self.root.is_dir() else []

    def pending(self) -> list[tuple[Path, int, dict[str, Any]]]:
        """Every write not sent yet, oldest first across journals: (journal, line number, record). Within a
        journal the order is kept; across journals, by the time each write was made (a run is created
        before anything refers to it)."""
        out = []
        for journal in self.journals():
            sent = self._sent(journal)
            with open(journal, encoding="utf-8") as fh:
                for n, line in enumerate(fh):
                    if n < sent or not line.endswith("\n"):  # a line still being written waits
                        continue
                    out.append((journal, n, json.loads(line)))
        # Stable: equal times keep each journal's own order.
        return sorted(out, key=lambda x: (x[2]["t"], str(x[0]), x[1]))

    def has_pending(self, uri: str | None = None) -> bool:
        """True when a write waits here (for the store at `uri`, when given)."""
        if uri is None:
            return any(self._sent(j) < _lines(j) for j in self.journals())
        return any(r["uri"] == uri for _, _, r in self.pending())

    def mark_sent(self, journal: Path, line: int) -> None:
        write_text_atomic(journal.with_suffix(".sent"), str(line + 1))

    def _sent(self, journal: Path) -> int:
        try:
            return int(journal.with_suffix(".sent").read_text())
        except (OSError, ValueError):
            return 0

    def local(self, record: dict[str, Any]) -> Path:
        return self.root / record["local"]

    def tidy(self) -> None:
        """Remove the journals that are fully sent and whose writer has ended, with their artifact copies."""
        with _JOURNALS:
            for journal in self.journals():
                if self._sent(journal) < _lines(journal) or _writer_alive(journal):
                    continue
                with open(journal, encoding="utf-8") as fh:
                    copies = [json.loads(line).get("local") for line in fh if line.strip()]
                for rel in filter(None, copies):
                    shutil.rmtree(self.root / Path(rel).parent, ignore_errors=True)
                journal.unlink(missing_ok=True)
                journal.with_suffix(".sent").unlink(missing_ok=True)
                if journal == self._journal:
                    self._journal = None
            # `ids/` stays: a placeholder written into a pointer file or still held by a process resolves
            # through it later (a few bytes per run created during an outage).
            if (self.root / "files").is_dir() and not any((self.root / "files").iterdir()):
                (self.root / "files").rmdir()

    @contextlib.contextmanager
    def replaying(self, wait: bool = True) -> Iterator[bool]:
        """One replay at a time, across the processes and threads of a study: yields False when another
        holds it and `wait` is off."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".replay.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def summary(self) -> str:
        """What is waiting, for a reader: '2 runs (tune, trial-1) with 5 metric values, 2 params, ...'."""
        names: dict[str, str] = {}  # run id -> its name, in the order the runs were first written
        counts: dict[str, int] = {}

        def add(what: str, n: int = 1) -> None:
            counts[what] = counts.get(what, 0) + n

        for _, _, r in self.pending():
            op = r["op"]
            run = r.get("pending") if op == "create_run" else r.get("run_id")
            if run and (op == "create_run" or run not in names):
                names[run] = r.get("run_name") or r.get("label") or names.get(run) or run[:12]
            if op == "log_batch":
                add("metric value", len(r.get("metrics", [])))
                add("param", len(r.get("params", [])))
            elif op == "complete_curve":
                add("metric value", sum(1 for row in r["history"] for k in row if k not in r.get("skip", [])))
            elif op == "log_artifacts":
                add("artifact")
            elif op == "log_inputs":
                add("dataset")
            elif op == "set_terminated":
                add("run end")
            elif op in ("register", "set_alias", "tag_version"):
                add("model registry update")
        parts = [f"{n} {what}{'s' if n != 1 else ''}" for what, n in counts.items() if n]
        head = (
            f"{len(names)} run{'s' if len(names) != 1 else ''} ({', '.join(names.values())})"
            if names
            else "no run"
        )
        return head + (" with " + ", ".join(parts) if parts else "")


def _lines(journal: Path) -> int:
    try:
        with open(journal, "rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n"))
    except OSError:
        return 0


def _writer_alive(journal: Path) -> bool:
    """True when the process that writes `journal` may still add to it: on this host and running (another
    host's writer cannot be checked, so its journal is kept)."""
    host, pid, _ = journal.stem.rsplit("-", 2)
    if host != _HOST:
        return True
    if int(pid) == os.getpid():
        return False  # this process: its own journal is closed between writes
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def answers(uri: str, timeout_s: float = 3.0) -> bool:
    """True when the store at `uri` answers: a tracking server's /health gives any HTTP answer but a 5xx
    (a server behind a proxy that hides /health still answers); any other store is local."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


class OutageNotice:
    """Says once per outage that the tracking server stopped answering (which server, since when, where
    the writes wait) and once that it answers again: in the one process that speaks for a study (its
    driver, inside `outage_notice`). Training workers and search trials stay silent."""

    def __init__(self) -> None:
        self.voice = None
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def away(self, uri: str) -> bool:
        return uri in self._since

    def down(
        self, uri: str, root: Path | None, error: BaseException | None = None, since: float | None = None
    ) -> None:
        with self._lock:
            if uri in self._since:
                return
            self._since[uri] = since or time.time()
        if self.voice is not None:
            from ctvlab.errors import shown

            kept = f" is kept in {shown(root)}" if root is not None else " is kept"
            why = f" ({type(error).__name__})" if error is not None else ""
            self.voice(f"tracking server {uri} unreachable since {time.strftime('%H:%M:%S', time.localtime(self._since[uri]))}"
                       f"{why}: the study goes on; what MLflow cannot take now{kept} and sent when it answers")  # fmt: skip

    def up(self, uri: str, sent: int) -> None:
        with self._lock:
            since = self._since.pop(uri, None)
        if since is not None and self.voice is not None:
            what = f"sent the {sent} write(s) kept meanwhile" if sent else "what it missed is sent"
            self.voice(f"tracking server {uri} answers again (away {time.time() - since:.0f} s); {what}")


NOTICE = OutageNotice()


@contextlib.contextmanager
def outage_notice(say) -> Iterator[None]:
    """This process speaks for the study about tracking outages, through `say`, inside the block."""
    before = NOTICE.voice
    NOTICE.voice = say
    try:
        yield
    finally:
        NOTICE.voice = before
