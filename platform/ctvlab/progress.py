"""Progress of long work, one step at a time: a live bar on a terminal, one line per step in a log (a Ray
job's driver log, a redirected run), so a user always sees how far a fold, epoch or trial loop has come."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class StepProgress:
    """`with StepProgress("rf CV", 30) as p: ... p.step("nel/all fold 2: AUC 0.81")`."""

    def __init__(self, what: str, total: int, stream: TextIO | None = None):
        self.what = what
        self.total = total
        self.stream = stream or sys.stderr
        self.done = 0
        self._t0 = time.monotonic()
        self._bar = None
        self._task = None

    def __enter__(self) -> StepProgress:
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(file=self.stream), transient=True)  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def step(self, line: str) -> None:
        """One step done; `line` says what it gave."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"{self.what}: {line}")
            self._bar.console.print(f"{self.what} [{self.done}/{self.total}] {line}", highlight=False)
        else:
            elapsed = time.monotonic() - self._t0
            print(
                f"{self.what} [{self.done}/{self.total}, {elapsed:.0f} s] {line}",
                file=self.stream,
                flush=True,
            )

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
