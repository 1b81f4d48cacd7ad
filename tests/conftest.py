"""Shared fixtures: phantom cohorts, one local Ray for the whole session, a temporary MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.phantoms import PhantomSpec, make_phantom_cohort


@pytest.fixture(scope="session")
def _phantom_cohort_master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom_master")
    make_phantom_cohort(root, n=4, spec=PhantomSpec())
    return root


@pytest.fixture
def phantom_cohort(_phantom_cohort_master, tmp_path) -> Path:
    """A private copy of a valid 4-patient phantom cohort; tests may damage it freely."""
    dst = tmp_path / "cohort"
    shutil.copytree(_phantom_cohort_master, dst)
    return dst


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (starting Ray costs seconds; share it)."""
    from ctvlab.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=8)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def _session_tracking_uri(tmp_path_factory) -> str:
    # Creating an MLflow SQLite store runs its migrations (seconds): one store for the session, and
    # tests keep apart by experiment name (see `experiment`).
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(_session_tracking_uri, monkeypatch) -> str:
    """The session's local SQLite MLflow store; MLFLOW_TRACKING_URI points at it for the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _session_tracking_uri)
    return _session_tracking_uri


@pytest.fixture
def experiment(request) -> str:
    """An MLflow experiment name of this test's own."""
    import uuid

    return f"test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (a free port) for the session; yields its http:// URI."""
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
