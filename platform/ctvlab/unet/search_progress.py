"""What a running search says: a line per finished trial with its best validation score and, every few
seconds, what each unfinished trial is doing or waiting for (a Tune callback that also feeds the stall
watch)."""

from __future__ import annotations

import time

from ctvlab.study import BEST_SELECTION_METRIC


def say(line: str) -> None:
    """A progress line on stderr (a submitted job's log shows it)."""
    import sys

    print(line, file=sys.stderr, flush=True)


def trial_state_line(trial_id: str, status: str, epoch: int | None, epochs: int) -> str:
    """What one trial is doing or waiting for, in a few words."""
    if status == "PENDING":
        return f"{trial_id} waiting for a trial slot"
    if status == "RUNNING" and epoch is None:
        return f"{trial_id} starting: reading its data (a Ray Train trial also waits for its workers)"
    if status == "RUNNING":
        return f"{trial_id} epoch {epoch + 1}/{epochs}"
    return f"{trial_id} {status.lower()}"


def trial_done_line(name: str, trial_id: str, result: dict, done: int, total: int) -> str:
    """A finished trial and its best validation Tversky (the selection metric)."""
    best = result.get(BEST_SELECTION_METRIC)
    score = f"best val Tversky {best:.4f}" if isinstance(best, (int, float)) else "no validation score"
    epochs = (
        f" after {int(result['epoch']) + 1} epochs" if isinstance(result.get("epoch"), (int, float)) else ""
    )
    return f"search {name}: trial {trial_id} finished ({done} of {total} so far){epochs}: {score}"


def progress_line(name: str, states: list[str], pending: list[str]) -> str:
    """One line per progress report: every unfinished trial, and what the cluster cannot schedule."""
    line = f"search {name}: " + (" · ".join(states) or "no trial running")
    if pending:
        line += f" · pending on the cluster: {'; '.join(pending)}"
    return line


def progress_callback(name: str, epochs: int, watch, every_s: float):
    """A Tune callback: each result counts as progress for the stall watch; every `every_s` seconds a
    line says what each unfinished trial is doing or waiting for."""
    from ray.tune import Callback

    class SearchProgress(Callback):
        def __init__(self):
            self.last = time.monotonic()
            self.finished = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            watch.progress()

        def on_trial_complete(self, iteration, trials, trial, **info):
            watch.progress()
            self.finished += 1
            say(trial_done_line(name, trial.trial_id, trial.last_result or {}, self.finished, len(trials)))

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last < every_s:
                return
            self.last = time.monotonic()
            states = [
                trial_state_line(t.trial_id, t.status, (t.last_result or {}).get("epoch"), epochs)
                for t in trials
                if t.status in ("PENDING", "RUNNING", "PAUSED")
            ]
            say(progress_line(name, states, watch.last_pending))

    return SearchProgress()
