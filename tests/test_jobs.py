"""The job scripts: every job takes exactly its `ctvlab` command's options, and the pipeline job runs on a real Ray cluster
submitted through the Job Submission API, as `ray job submit` does."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ctvlab.tracking import Tracker
from tests.conftest import free_port, start_mlflow_server
from tests.mlflow_ui import review_in_browser
from tests.test_stage_table import assert_one_vocabulary

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").glob("*.py"))


def test_every_stage_has_a_job():
    """Each stage with a command has its job, named after it (`ctvlab.stage_table`)."""
    from ctvlab.stage_table import STAGES

    names = {p.stem for p in JOBS}
    assert {s.ident for s in STAGES} <= names
    assert {"run", "predict"} <= names


# Each job script runs one `ctvlab` command (ctvlab.cli.run_job): the one its name says.
COMMAND_OF_JOB = {p.stem: p.stem.replace("_", "-") for p in JOBS}
# What every job needs on a cluster: the study, its overrides, where the results go, a smoke check.
JOB_OPTIONS = {"--config", "--set", "--workdir", "--smoke-test"}
COMPUTE_OPTIONS = JOB_OPTIONS | {"--tracking-uri", "--address"}
REQUIRED_OPTIONS = {"synth": JOB_OPTIONS, "validate": JOB_OPTIONS, "register": JOB_OPTIONS,
                    "predict": {"--config", "--tracking-uri"},
                    "report": JOB_OPTIONS | {"--tracking-uri"}}  # fmt: skip


def command_options(command: str) -> set[str]:
    """Every option name `ctvlab COMMAND` declares (from the command's own definition, not its help text)."""
    import typer

    from ctvlab.cli import app

    click_command = typer.main.get_command(app).commands[command]
    return {name for p in click_command.params for name in p.opts + p.secondary_opts if name.startswith("--")}


def help_options(job: Path) -> set[str]:
    import re

    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    out = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=60,
                         env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.stdout)) - {"--help"}


def test_every_job_runs_the_command_it_is_named_after():
    import re

    import typer

    from ctvlab.cli import app

    commands = set(typer.main.get_command(app).commands)
    for job in JOBS:
        ran = re.findall(r'run_job\("([a-z-]+)"\)', job.read_text())
        assert ran == [COMMAND_OF_JOB[job.stem]], job.name
        assert ran[0] in commands, job.name


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_job_accepts_exactly_its_commands_options(job):
    """A job is its command's twin: the same option names (read from the job's own --help), so a flag
    that works on the command line works in `ray job submit`, and the other way round."""
    command = COMMAND_OF_JOB[job.stem]
    expected = command_options(command) - {"--help"}
    assert help_options(job) == expected
    assert REQUIRED_OPTIONS.get(command, COMPUTE_OPTIONS) <= expected


def test_job_with_a_bad_config_fails_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  optim:\n    lrr: 1\n")
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "split.py"), "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "unknown key 'unet.optim.lrr'" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture
def ray_cluster(tmp_path, request):
    """A real single-node Ray cluster (`ray start --head --block`) on 127.0.0.1 with free ports and token
    authentication, as a team cluster should run; stopped by ending its process group, also when the test
    fails (`ray stop` would stop every Ray on the host). Yields a Job Submission client holding the token.

    It has the machine's real CPUs, as plain `ray start --head` gives; a test may ask for fewer with
    `@pytest.mark.parametrize("ray_cluster", [N], indirect=True)`."""
    with start_ray_cluster(tmp_path, getattr(request, "param", None)) as (client, _):
        yield client


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head and a worker node, each its own `ray start` on 127.0.0.1 with its own ports and temporary
    folder, 2 logical CPUs each: the layout of a team's cluster, on one machine. Yields (client, node ids)."""
    with start_ray_cluster(tmp_path, 2, worker_cpus=2) as (client, nodes):
        yield client, nodes


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    ports = {name: free_port() for name in ("agent_http", "agent_grpc", "runtime_env", "metrics",
                                             "node_manager", "object_manager")}  # fmt: skip
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--block", "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={ports['agent_http']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}", f"--metrics-export-port={ports['metrics']}",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        "--disable-usage-stats", *args,
    ]  # fmt: skip
    with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def start_ray_cluster(tmp_path: Path, num_cpus: int | None, worker_cpus: int | None = None):
    """Yields (a Job Submission client, the alive nodes' ids) of a cluster started with `ray start`; with
    `worker_cpus`, a worker node joins the head, each node with its own short temporary folder (Ray's
    socket paths must stay under the Unix limit)."""
    import shutil

    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # fmt: skip
    env.pop(
        "MLFLOW_TRACKING_URI", None
    )  # jobs inherit the cluster's environment: choose their store themselves
    # `ray start` records its address in Ray's temporary folder for later `address="auto"` lookups; killed,
    # it leaves the record behind, and Ray's State API (which Ray Train's placement-group cleaner calls
    # at the end of every training run) then waits on the dead address for its full timeout. Put back
    # what was there before.
    address_file = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    previous = address_file.read_bytes() if address_file.exists() else None
    temps: list[str] = []
    procs: list[subprocess.Popen] = []
    try:
        from ray.job_submission import JobSubmissionClient

        # On a loaded 2-core machine a head can time out registering with its own GCS ("The current node
        # timed out during startup") and exit: such a start is made once more, on fresh ports. A node that
        # is still running but never comes up is not retried.
        for attempt in (1, 2):
            gcs, dashboard = free_port(), free_port()
            head_args = ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={dashboard}", *([f"--num-cpus={num_cpus}"] if num_cpus else [])]  # fmt: skip
            if worker_cpus:
                temps.append(tempfile.mkdtemp(prefix="rh-"))
                head_args.append(f"--temp-dir={temps[-1]}")
            procs.append(_ray_start(head_args, env, tmp_path / "ray_head.log"))
            try:
                client = _wait_for_dashboard(
                    f"http://127.0.0.1:{dashboard}", token, procs[0], tmp_path / "ray_head.log"
                )
                if worker_cpus:
                    temps.append(tempfile.mkdtemp(prefix="rw-"))
                    procs.append(_ray_start([f"--address=127.0.0.1:{gcs}", f"--num-cpus={worker_cpus}",
                                             f"--temp-dir={temps[-1]}"], env, tmp_path / "ray_worker.log"))  # fmt: skip
                nodes = _wait_for_nodes(client, 2 if worker_cpus else 1, procs, tmp_path)
                break
            except RuntimeError:
                if attempt == 2 or all(p.poll() is None for p in procs):
                    raise
                for proc in reversed(procs):
                    _stop(proc)
                procs.clear()
        assert isinstance(client, JobSubmissionClient)
        yield client, nodes
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_bytes(previous)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def _wait_for_dashboard(address: str, token: str, proc: subprocess.Popen, log: Path):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
            client.list_jobs()
            return client
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-3000:]) from None
            time.sleep(1)


def _wait_for_nodes(client, n: int, procs: list[subprocess.Popen], tmp_path: Path) -> list[str]:
    """The ids of the cluster's alive nodes, once there are `n` (the dashboard's node list)."""
    import requests

    deadline = time.monotonic() + 120
    while True:
        try:
            r = requests.get(f"{client._address}/nodes?view=summary", headers=client._headers, timeout=10)
            summary = r.json()["data"]["summary"] if r.ok else []
        except requests.ConnectionError:  # the head went away: said below with its log
            summary = []
        alive = [n_["raylet"]["nodeId"] for n_ in summary if n_["raylet"].get("state") == "ALIVE"]
        if len(alive) >= n:
            return alive
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            logs = "".join(f.read_text()[-2000:] for f in tmp_path.glob("ray_*.log"))
            raise RuntimeError(f"{len(alive)} of {n} Ray nodes came up: {logs}")
        time.sleep(1)


EXCLUDES = [".venv", ".git", "runs", "mlflow.db", "mlartifacts", "mlruns", "*.egg-info", "__pycache__",
            ".pytest_cache", ".ruff_cache"]  # fmt: skip


def submit_study(client, workdir: str, *extra: str) -> str:
    """Submit the demo's smoke study as a user would: the checkout as the working directory, results in
    `workdir`."""
    return submit(client, f"jobs/run.py --config jobs/configs/demo.yaml --smoke-test --workdir {workdir}",
                  *extra)  # fmt: skip


def submit(client, script_and_args: str, *extra: str) -> str:
    """Submit `python <script_and_args>` with the checkout as the job's working directory."""
    import requests

    job_id = f"ctvlab-test-{secrets.token_hex(6)}"  # a fixed id makes a retried submission safe
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(
                entrypoint=f"{sys.executable} {script_and_args} {' '.join(extra)}",
                runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES},
                submission_id=job_id,
            )
        except (RuntimeError, requests.ConnectionError) as e:
            # The job agent registers a few seconds after the dashboard answers, and a loaded dashboard may
            # drop the request; a submission that got through the first time is not made twice.
            if "already exists" in str(e):
                return job_id
            if not isinstance(e, requests.ConnectionError) and "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait_for_job(client, job_id: str, limit_s: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + limit_s
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"the job did not finish within {limit_s:.0f} s"
        time.sleep(2)
        status = client.get_job_status(job_id)
    return status, client.get_job_logs(job_id)


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_job_on_a_two_node_cluster_tracks_through_a_server(two_node_cluster, tmp_path):
    """The smoke study as a team runs it: submitted to a head and a worker node, tracked through a real
    `mlflow server`. Preprocessing tasks and search trials run on both nodes; results land in the absolute
    workdir it was given, not in Ray's temporary copy; a reviewer finds the runs, the CTV metrics, the
    figures, the report and the champion's evaluation in the MLflow UI (headless Chromium); the tracking
    store holds no patient id or path."""
    from ray.job_submission import JobStatus

    client, nodes = two_node_cluster
    workdir = tmp_path / "study"
    server = tmp_path / "server"
    server.mkdir()
    with start_mlflow_server(server) as (uri, _):
        status, logs = wait_for_job(client, submit_study(client, str(workdir), f"--tracking-uri {uri}"), 900)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "ctvlab run: summary" in logs
        smoke = workdir / "smoke"
        assert f"results: {smoke}" in logs and uri in logs  # the job says where everything is
        assert (smoke / "results" / "evaluate" / "summary.csv").is_file()

        runs = Tracker("ctvlab-demo", uri).find_runs()
        stages = {r.data.tags.get("ctvlab.stage") for r in runs}
        assert {"split", "voxel-models", "stats", "tune", "tune-trial", "evaluate"} <= stages
        assert_one_vocabulary(smoke, runs)  # stamps, folders and tags under the stage table's names
        assert all(
            r.info.status == "FINISHED" for r in runs if r.data.tags.get("ctvlab.stage") != "tune-trial"
        )
        trial_nodes = {
            r.data.tags["ctvlab.ray_node"] for r in runs if r.data.tags.get("ctvlab.stage") == "tune-trial"
        }
        report = json.loads((smoke / "prep" / "preprocess_report.json").read_text())
        assert set(report["nodes"].values()) == set(nodes), report["nodes"]  # patients on both nodes
        assert trial_nodes == set(nodes), trial_nodes  # trials on both nodes

        # The study as a reviewer meets it in the MLflow UI, in a real browser (tests/mlflow_ui.py).
        review_in_browser(Tracker("ctvlab-demo", uri), "ctvlab-unet", smoke / "results" / "evaluate" / "summary.csv",
                          tmp_path / "screenshots")  # fmt: skip

        # The study's model, through its `champion` alias, applied to two patients as a job: a Ray task each.
        ids = sorted(p.name for p in (smoke / "cohort").iterdir() if p.is_dir())[:2]
        out = tmp_path / "predicted"
        job = submit(client, f"jobs/predict.py {smoke / 'cohort'} --out {out} --tracking-uri {uri}",
                     *[f"--patient {i}" for i in ids])  # fmt: skip
        status, logs = wait_for_job(client, job, 300)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert f"predicted 2 patient(s) into {out}" in " ".join(logs.split())
        for pid in ids:
            report = json.loads((out / pid / "report.json").read_text())
            assert report["model_uri"] == "models:/ctvlab-unet@champion" and report["model_version"]
    assert_no_identifying_strings(
        server / "backend.db", server / "artifacts", raw=smoke / "cohort", prep=smoke / "prep"
    )


def assert_no_identifying_strings(db: Path, artifacts: Path, raw: Path, prep: Path) -> None:
    """Every byte of the tracking store (database and artifacts, compressed files opened) is free of every raw
    patient id and of the raw and prepared folders' absolute paths."""
    import csv
    import gzip

    with open(raw / "manifest.csv", newline="") as fh:
        ids = [r["patient_id"] for r in csv.DictReader(fh)]
    assert ids
    needles = [i.encode() for i in ids] + [str(raw).encode(), str(prep).encode()]
    blobs = {str(db): db.read_bytes()}
    for f in artifacts.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            blobs[str(f)] = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    leaks = [(name, n.decode()) for name, blob in blobs.items() for n in needles if n in blob]
    assert not leaks, leaks[:10]


@pytest.mark.ray
@pytest.mark.parametrize("ray_cluster", [1], indirect=True)
def test_a_job_that_cannot_fit_or_would_lose_its_results_fails_at_once(ray_cluster, tmp_path):
    """On a 1-CPU cluster the demo's final model (1.5 CPU held by its worker, 0.5 kept for Ray Data) can
    never run: the job fails before its first stage with what it needs and has, instead of waiting forever
    (or after the search). A relative workdir would write into Ray's temporary copy of the checkout:
    refused."""
    from ray.job_submission import JobStatus

    job_id = submit_study(ray_cluster, str(tmp_path / "study"))
    t0 = time.monotonic()
    status, logs = wait_for_job(ray_cluster, job_id, 120)
    assert status == JobStatus.FAILED
    assert "the training run can never fit on this cluster: it needs 2 CPU" in logs, logs[-3000:]
    assert "the Ray cluster has 1 CPU" in logs and "unet.train.cpus_per_worker" in logs
    assert "Traceback" not in logs
    assert not (tmp_path / "study" / "smoke" / "cohort").exists()  # no stage ran
    print(f"undersized cluster: failed {time.monotonic() - t0:.1f} s after submission")

    status, logs = wait_for_job(ray_cluster, submit_study(ray_cluster, "runs/demo"), 120)
    assert status == JobStatus.FAILED
    assert "workdir 'runs/demo/smoke' is relative" in logs, logs[-3000:]


def test_a_prediction_job_refuses_an_output_in_its_temporary_working_directory(tmp_path, monkeypatch):
    """Inside a job, `--out results` resolves into the copy of the checkout that Ray deletes afterwards."""
    from ctvlab.errors import ConfigError
    from ctvlab.jobkit import check_job_output

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"--out .* temporary copy"):
        check_job_output(tmp_path / "results", "sqlite:////abs/mlflow.db")
    with pytest.raises(ConfigError, match="relative SQLite path"):
        check_job_output(tmp_path.parent / "elsewhere", "sqlite:///mlflow.db")
    check_job_output(tmp_path.parent / "elsewhere", "sqlite:////abs/mlflow.db")  # absolute both: accepted
