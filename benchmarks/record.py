"""A benchmark's printed output, recorded as it ran into `docs/results/<name>.md`, which the manual includes.

    with recorded("train_throughput", enabled=args.record):
        ...  # everything printed here also lands in docs/results/train_throughput.md

The file holds the exact command, the date, the machine (CPU count, load average at the start and the end)
and the output verbatim, so a figure in the docs is always one a run printed, never one typed by hand. It is
written only when the run completes (a failed run leaves the previous record in place).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import platform
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
WHAT = {
    "train_throughput": "training step and loop, before and now, beside the machine's practical limit; where a step's time goes",
    "tune_overhead": "a search's wall time against its trials' own training time; what ASHA saves",
    "tune_overhead_study": "the same on a study-sized split (67 training and 16 validation patients)",
    "tune_overhead_30": "the same for a search of the study's size: 30 trials of 4 epochs",
    "positive_control": "the model CTV against the same-volume margin on the strong cohort, its null twin and today's cohort, beside the ceiling",
    "coverage_check": "the coverage guarantee over random calibration/test splits of a model's held-out patients",
    "reproduce": "the whole study on 101 synthetic patients, every row beside the study's",
    "faults": "tracking-server outages, a full disk, a read-only results folder, a killed worker: exit codes, messages, MLflow record, files",
    "fault_searches": "consecutive smoke searches: how every trial's MLflow run ends",
    "positive_control_power": "the power curve: the model's gain and the ceiling against the cohort's signal setting",
    "positive_control_power_101": "the power curve at the study's size (101 patients per cohort), with each model's gain on 101 patients it never saw",
}
# Pages written by a benchmark under another name than its script's (a mode of it).
SCRIPT = {
    "fault_searches": "faults.py --searches",
    "tune_overhead_study": "tune_overhead.py --record-as tune_overhead_study",
    "tune_overhead_30": "tune_overhead.py --trials 30 --record-as tune_overhead_30",
    "positive_control_power": "positive_control.py --power",
    "positive_control_power_101": "positive_control.py --power --record-as positive_control_power_101",
}
INDEX_HEAD = """# Recorded benchmark runs

Each page here is the verbatim output of one benchmark run, written by the benchmark itself with `--record`
(`benchmarks/record.py`): the exact command, the date, the machine's CPU count and load, and what it printed.
A figure quoted elsewhere in this manual comes from one of these pages; a page is replaced only when a run
of its benchmark completes. This index is rewritten with every record.

| page | benchmark | what it measures |
|---|---|---|
"""


def write_index() -> None:
    """docs/results/index.md: one row per recorded page present."""
    rows = []
    for page in sorted(RESULTS.glob("*.md")):
        if page.name == "index.md":
            continue
        base = page.stem.split("-")[0]
        script = SCRIPT.get(base, f"{base}.py")
        rows.append(f"| [{page.stem}]({page.name}) | `benchmarks/{script}` | {WHAT.get(base, '')} |\n")
    (RESULTS / "index.md").write_text(INDEX_HEAD + "".join(rows))


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(name: str, enabled: bool = True, note: str = "") -> Iterator[None]:
    """Tee stdout into `docs/results/<name>.md` (when `enabled`), written once the block completes."""
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    load0 = os.getloadavg()[0]
    started = dt.datetime.now(dt.UTC)
    before = sys.stdout
    sys.stdout = _Tee(before, buffer)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = before
    minutes = (dt.datetime.now(dt.UTC) - started).total_seconds() / 60
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    header = (
        f"<!-- written by benchmarks/{Path(sys.argv[0]).name}: do not edit by hand -->\n"
        f"`{command}`, {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average {load0:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end.{(' ' + note) if note else ''}\n\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".{name}.md.tmp"
    tmp.write_text(header + "```text\n" + buffer.getvalue().rstrip() + "\n```\n")
    tmp.replace(RESULTS / f"{name}.md")
    write_index()
