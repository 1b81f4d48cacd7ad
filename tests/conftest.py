"""Shared fixtures: phantom cohorts, one local Ray for the whole session, a temporary MLflow store."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tests.phantoms import PhantomSpec, make_phantom_cohort

# Ray Train's controller collects its workers' reports every 2 s, and a worker's next report waits until the
# last one is collected: the tests' epochs take a fraction of a second, so each epoch and each run's end
# waited up to 2 s (a 4-epoch phantom run: 27 s → 21 s at 0.2 s). Set before any Ray starts, so every Ray of
# the session (its workers, the CLI subprocesses that join it, the two-node cluster) inherits it. Studies'
# epochs take seconds to minutes, where the 2 s default costs nothing.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


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
    """One local Ray for the whole test session (starting Ray costs seconds; share it).

    8 logical CPUs whatever the machine, so that the tests' small runs (2-worker training, concurrent
    trials) fit the same way on every machine; a cluster with the machine's own CPUs, as `ray start --head`
    gives, is what tests/test_jobs.py submits the smoke study to."""
    from ctvlab.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=8)
    yield
    shutdown_ray()


def session_ray_address() -> str:
    """The GCS address of the session's running Ray (`ray_local`), for a subprocess to join it."""
    import ray

    return ray.get_runtime_context().gcs_address


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


@contextlib.contextmanager
def start_mlflow_server(
    root: Path, extra_args: list[str] = (), extra_env: dict[str, str] | None = None, port: int | None = None
):
    """Run a real `mlflow server` on 127.0.0.1 (`port`, else a free one) with its stores under `root`;
    yields (its http:// URI, the command line it was started with). Stopped when the block ends."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = port or free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1", *extra_args]  # fmt: skip
    log = open(root / "server.log", "ab")  # noqa: SIM115 (the child process owns it)
    # MLflow 3's server also starts a job runner and its huey consumers (six more Python processes that
    # import MLflow and keep polling) for its GenAI jobs, which ctvlab never submits: off, the server is
    # ready about 2.4 s sooner and leaves the tests' CPUs alone.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
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
        yield uri, cmd
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (a free port) for the session; yields its http:// URI."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as (uri, _):
        yield uri


@pytest.fixture(scope="session")
def prepared_phantom(tmp_path_factory, ray_local) -> Path:
    """A prepared (preprocessed and split) 8-patient phantom dataset, built once; treat it as read-only."""
    from ctvlab.config import PreprocessConfig, SplitConfig
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort
    from ctvlab.splits import write_split

    root = tmp_path_factory.mktemp("prepared_phantom")
    make_phantom_cohort(root / "cohort", n=8, spec=PhantomSpec(noise=0.05))
    report = preprocess_cohort(root / "cohort", root / "prep", PreprocessConfig(), progress=False)
    assert report.ok, report
    write_split(root / "prep", SplitConfig(seed=0))
    return root / "prep"


def tiny_study(workdir: Path, tracking_uri: str, **unet_train) -> StudyConfig:  # noqa: F821
    """Study settings for seconds-long CPU training on the phantom (base 4, no augmentation)."""
    from ctvlab.config import StudyConfig

    cfg = StudyConfig(name="tiny", workdir=workdir)
    cfg.tracking.tracking_uri = tracking_uri
    cfg.unet.model.base_features = 4
    cfg.unet.loss.name = "dice"
    cfg.unet.optim.name = "adam"
    cfg.unet.optim.lr = 3e-3
    for k in ("flip_prob", "rotate_prob", "noise_prob", "channel_shuffle_prob", "channel_drop_prob"):
        setattr(cfg.unet.augment, k, 0.0)
    cfg.unet.train.epochs = 3
    cfg.unet.train.num_workers = 1
    for k, v in unet_train.items():
        setattr(cfg.unet.train, k, v)
    return cfg


@pytest.fixture(scope="session")
def trained_phantom(prepared_phantom, tmp_path_factory, _session_tracking_uri):
    """One small U-Net trained with 2 gloo DDP workers on the phantom (4 epochs), shared by the training
    and evaluation tests: (study config, TrainOutcome). Ray Train's start-up costs tens of seconds."""
    from ctvlab.stages.train import train_unet

    workdir = tmp_path_factory.mktemp("trained_phantom")
    cfg = tiny_study(workdir, _session_tracking_uri, epochs=4, num_workers=2, cpus_per_worker=1)
    return cfg, train_unet(cfg, prepared_phantom)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` cannot be written inside the block: its folders lose their write permission (a normal
    user), or it is bind-mounted read-only onto itself (root, whom permissions do not stop). Skips the test
    where neither can be done."""
    import subprocess

    folder = Path(folder)
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    steps = (["mount", "--bind", str(folder), str(folder)], ["mount", "-o", "remount,ro,bind", str(folder)])
    for i, cmd in enumerate(steps):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            if i:
                subprocess.run(["umount", str(folder)], capture_output=True)
            pytest.skip(f"cannot make {folder} read-only here: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True, check=True)


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    """dicom3tools' DICOM validator; installed with apt (Debian package dicom3tools) when missing."""
    import fcntl
    import shutil
    import subprocess
    import tempfile

    found = shutil.which("dciodvfy")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        with open(Path(tempfile.gettempdir()) / "ctvlab-tests-apt.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one test process installs, another waits for it
            steps = (["apt-get", "install", "-y", "-q", "dicom3tools"], ["apt-get", "update", "-q"],
                     ["apt-get", "install", "-y", "-q", "dicom3tools"])  # fmt: skip
            for cmd in steps:
                if (found := shutil.which("dciodvfy")) is not None:
                    break
                subprocess.run(cmd, capture_output=True, timeout=600)
            found = shutil.which("dciodvfy")
    if found is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is missing and cannot be installed here (needs "
                    "apt-get as root)")  # fmt: skip
    return found


def assert_deliverable(ctv, spacing, min_mm3: float, what: str) -> None:
    """The delivered CTV's shape rules, checked independently of `construct.deliverable`: every
    face-connected piece and every enclosed hole (a background region with no face, edge or corner path
    to the grid's border) holds at least `min_mm3`."""
    import numpy as np
    from scipy import ndimage

    ctv = np.asarray(ctv) > 0
    voxel = float(np.prod(spacing))
    labels, n = ndimage.label(ctv)
    if n:
        smallest_piece = np.bincount(labels.ravel())[1:].min() * voxel
        assert smallest_piece >= min_mm3 - 1e-6, f"{what}: a piece of {smallest_piece:.1f} mm³"
    padded = np.pad(~ctv, 1, constant_values=True)  # the outside is one background region
    background, _ = ndimage.label(padded, structure=np.ones((3, 3, 3)))
    outside = background[0, 0, 0]
    sizes = np.bincount(background.ravel())
    holes = [sizes[i] * voxel for i in range(1, len(sizes)) if i != outside]
    assert not holes or min(holes) >= min_mm3 - 1e-6, f"{what}: a hole of {min(holes):.1f} mm³"
