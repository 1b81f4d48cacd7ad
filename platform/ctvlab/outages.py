"""A stage's MLflow record through outages of its tracking server.

While a command runs, `recording` (or `ctvlab run`, stage by stage) watches the tracking server from the
driver: it says once when the server stops answering (which server, since when, where the writes wait), the
study goes on and every process keeps what the server cannot take in the working directory's spool
(`ctvlab.spool`), and as soon as the server answers again the spool is sent (`ctvlab.tracking.sync_spool`).
At the end of a stage, `settle` waits up to `tracking.outage_wait_s` for it; if it still does not answer, the
stage fails (exit 4) with what is unrecorded and the command that sends it later (`ctvlab sync`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from ctvlab.spool import NOTICE, Spool, answers, outage_notice
from ctvlab.tracking import (
    RETRY_EVERY_S,
    TrackingError,
    TrackingUnreachable,
    resolve_tracking_uri,
    spool_dir,
    sync_spool,
)


def unrecorded_message(root: str | Path, uri: str | None = None) -> str:
    """One line: what the spool still holds, since when, where, and the command that sends it."""
    from ctvlab.errors import shown

    spool = Spool(root)
    pending = spool.pending()
    uri = uri or (pending[0][2]["uri"] if pending else "the tracking server")
    since = time.strftime("%H:%M:%S", time.localtime(pending[0][2]["t"])) if pending else "?"
    where = shown(root)
    return (f"the tracking server {uri} has not answered since {since}: {spool.summary()} are not recorded "
            f"there. They are kept in {where}; once it answers, send them with `ctvlab sync {where}` "
            "(`ctvlab run` sends them too before its first stage). The outputs on disk are complete.")  # fmt: skip


def settle(root: str | Path, wait_s: float, say=print) -> int:
    """The end of a stage: send what the spool holds, waiting up to `wait_s` for the store to answer.

    Returns:
        The number of writes sent (0 when nothing was kept).

    Raises:
        TrackingError: the store did not answer in time; the message says what is unrecorded and how to
            send it later (exit 4).
    """
    if not Spool(root).has_pending():
        return 0
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        uri = Spool(root).pending()[0][2]["uri"] if Spool(root).has_pending() else None
        try:
            sent = sync_spool(root)
        except TrackingUnreachable:
            if time.monotonic() >= deadline:
                raise TrackingError(unrecorded_message(root, uri)) from None
            if not told:
                say(f"waiting up to {wait_s:.0f} s for the tracking server {uri} to answer before going on "
                    "(tracking.outage_wait_s)")  # fmt: skip
                told = True
            time.sleep(min(RETRY_EVERY_S, max(0.0, deadline - time.monotonic())))
            continue
        if uri is not None:
            NOTICE.up(uri, sent)
        if not Spool(root).has_pending():
            return sent


class OutageWatch:
    """While a stage runs (in the driver): watch the tracking server; say once when it stops answering,
    and as soon as it answers again send what the stage's processes kept meanwhile."""

    def __init__(self, root: str | Path, uri: str, poll_s: float = RETRY_EVERY_S):
        import threading

        self.root, self.uri, self.poll_s = Path(root), resolve_tracking_uri(uri), poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ctvlab-tracking-watch", daemon=True)

    def __enter__(self) -> OutageWatch:
        if self.uri.startswith(("http://", "https://")):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if not answers(self.uri):
                NOTICE.down(self.uri, self.root)
                continue
            spool = Spool(self.root)
            if spool.has_pending() or NOTICE.away(self.uri):
                if not NOTICE.away(self.uri):  # kept in a blink between two looks: say it all the same
                    NOTICE.down(self.uri, self.root, since=spool.pending()[0][2]["t"])
                try:
                    sent = sync_spool(self.root, wait=False)
                except Exception:  # away again, or a replay for the end of the stage to finish
                    continue
                if not spool.has_pending():
                    NOTICE.up(self.uri, sent)


@contextlib.contextmanager
def recording(cfg, say=print) -> Iterator[None]:
    """A command's MLflow record through outages of its tracking server: say once when it stops answering
    (which server, since when), keep what it cannot take in the study's spool, send it as soon as it
    answers again, and at the end wait up to `tracking.outage_wait_s` for it.

    Raises:
        TrackingError: at the end, when the server still does not answer: what is unrecorded and the
            command that sends it (the command's own outputs are complete).
    """
    root, uri = spool_dir(cfg), resolve_tracking_uri(cfg.tracking.tracking_uri)
    with outage_notice(say), OutageWatch(root, uri):
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # what can be sent at once is; the error goes on
                sync_spool(root, wait=False)
            raise
        settle(root, cfg.tracking.outage_wait_s, say)
