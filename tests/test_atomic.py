"""Atomic writes: a process killed mid-write leaves the previous file (or model folder) intact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctvlab.atomic import TMP_PREFIX, atomic_folder, remove_stale_tmp, write_csv_atomic, write_text_atomic

# Writes part of the new content inside the atomic block, then dies by SIGKILL: no cleanup runs.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from ctvlab.atomic import atomic_folder, atomic_path
target = Path(sys.argv[2])
if sys.argv[1] == "file":
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new " * 100_000)
        os.kill(os.getpid(), signal.SIGKILL)
else:
    with atomic_folder(target) as tmp:
        (tmp / "weights.pt").write_bytes(b"new weights")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed(kind: str, target: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, kind, str(target)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr  # it really died inside the block


def test_a_killed_file_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "summary.csv"
    write_text_atomic(target, "old\n")
    _killed("file", target)
    assert target.read_text() == "old\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(leftovers) == 1  # the partial write, under a name every reader skips...
    assert remove_stale_tmp(tmp_path) == 1  # ...which the next run removes
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_a_killed_model_build_leaves_the_previous_model(tmp_path):
    model = tmp_path / "model"
    with atomic_folder(model) as d:
        (d / "weights.pt").write_bytes(b"old weights")
        (d / "model.json").write_text("{}")
    _killed("folder", model)
    assert (model / "weights.pt").read_bytes() == b"old weights" and (model / "model.json").exists()


def test_a_failed_build_keeps_the_old_folder_and_a_good_one_replaces_it(tmp_path):
    model = tmp_path / "model"
    with atomic_folder(model) as d:
        (d / "weights.pt").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_folder(model) as d:
        (d / "weights.pt").write_bytes(b"half")
        raise RuntimeError("training crashed")
    assert (model / "weights.pt").read_bytes() == b"old"
    with atomic_folder(model) as d:
        (d / "weights.pt").write_bytes(b"new")
    assert (model / "weights.pt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing temporary left


def test_csv_goes_through_the_atomic_path(tmp_path):
    import pandas as pd

    write_csv_atomic(tmp_path / "t.csv", pd.DataFrame({"a": [1, 2]}))
    assert (tmp_path / "t.csv").read_text() == "a\n1\n2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]
