"""One writer at a time: a second `ctvlab run` on a working directory is refused, naming the holder; a
lock left by a killed process on this host is taken over; one held from another host never is."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from ctvlab.lock import LOCK_NAME, LockedError, exclusive


def _ctvlab(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ctvlab.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        **kw,
    )


def test_a_second_ctvlab_run_on_the_same_workdir_is_refused(tmp_path):
    workdir = tmp_path / "work"
    config = tmp_path / "study.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "lock-test",
                "workdir": str(workdir),
                "synth": {"n_patients": 2},  # generating the cohort holds the lock for a while
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            }
        )
    )
    # Its own session, so that the test can end it with everything it started.
    first = _ctvlab("run", "--config", str(config), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / LOCK_NAME).exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        second = _ctvlab("run", "--config", str(config))
        _, err = second.communicate(timeout=120)
        assert first.poll() is None, (
            "the first run ended before the second was refused; the test proves nothing"
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert second.returncode == LockedError.exit_code, err
    assert f"pid {first.pid}" in err and socket.gethostname() in err and "ctvlab run" in err
    assert "Traceback" not in err

    # The killed run's lock is stale (a dead pid on this host): the next writer takes it over.
    assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == first.pid
    with exclusive(workdir, "test") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (workdir / LOCK_NAME).exists()


def test_a_live_holder_and_a_holder_on_another_host_are_never_overridden(tmp_path):
    with (
        exclusive(tmp_path, "first"),
        pytest.raises(LockedError, match=f"pid {os.getpid()}"),
        exclusive(tmp_path, "second"),
    ):
        pass
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"what": "ctvlab run", "host": "other-node", "pid": 1, "since": "2026-01-01T00:00:00"})
    )
    # Its pid cannot be checked from here, so it is never taken as stale.
    with pytest.raises(LockedError, match="other-node"), exclusive(tmp_path, "second"):
        pass
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "other-node"


def test_single_stage_commands_take_the_working_directory_lock(tmp_path):
    """A stage run on its own writes the same results and pointer files as `ctvlab run`: while another
    process holds the working directory, each is refused before it touches anything."""
    workdir = tmp_path / "work"
    commands = [["split"], ["voxel-models"], ["stats"], ["train"], ["tune"], ["ablation"], ["evaluate"]]
    with exclusive(workdir, "ctvlab run"):
        procs = [(c, _ctvlab(*c, "--workdir", str(workdir))) for c in commands]
        errors = [(c, p.communicate(timeout=120)[1]) for c, p in procs]
        results = [(c, p.returncode, err) for (c, p), (_, err) in zip(procs, errors, strict=True)]
    for command, _, err in results:
        assert f"pid {os.getpid()}" in err and "ctvlab run" in err, (command, err[-1500:])
        assert "Traceback" not in err, (command, err[-1500:])
    assert [code for _, code, _ in results] == [LockedError.exit_code] * len(commands)
    assert sorted(p.name for p in workdir.iterdir()) == []  # the lock went with its holder; nothing written
