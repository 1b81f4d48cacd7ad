"""The job scripts: every job takes exactly its `ctvlab` command's options, and the pipeline job runs on a real Ray cluster
submitted through the Job Submission API, as `ray job submit` does."""

from __future__ import annotations

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
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").glob("*.py"))


def test_every_stage_has_a_job():
    names = {p.stem for p in JOBS}
    assert {"synthesize", "validate_cohort", "preprocess_cohort", "split_patients", "voxel_cv", "voxel_stats",
            "train_unet", "tune_unet", "evaluate_ctvs", "run_study"} <= names  # fmt: skip
    # A job named after a library it imports would shadow that library on sys.path.
    assert not names & {"ray", "mlflow", "torch", "xgboost", "monai", "sklearn", "platform"}


# Each job script runs one `ctvlab` command (ctvlab.cli.run_job).
COMMAND_OF_JOB = {"synthesize": "synth", "validate_cohort": "validate", "preprocess_cohort": "preprocess",
                  "split_patients": "split", "voxel_cv": "rf-cv", "voxel_stats": "stats", "train_unet": "train",
                  "tune_unet": "tune", "evaluate_ctvs": "evaluate", "predict": "predict", "run_study": "run"}  # fmt: skip
# What every job needs on a cluster: the study, its overrides, where the results go, a smoke check.
JOB_OPTIONS = {"--config", "--set", "--workdir", "--smoke-test"}
COMPUTE_OPTIONS = JOB_OPTIONS | {"--tracking-uri", "--address"}
REQUIRED_OPTIONS = {"synth": JOB_OPTIONS, "validate": JOB_OPTIONS, "predict": {"--config", "--tracking-uri"}}


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


def test_every_job_runs_a_command():
    assert set(COMMAND_OF_JOB) == {p.stem for p in JOBS}


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
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "split_patients.py"), "--config", str(bad)],
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
    num_cpus = getattr(request, "param", None)
    ray_bin = Path(sys.executable).with_name("ray")
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent_http", "agent_grpc", "runtime_env",
                                             "metrics", "node_manager", "object_manager")}  # fmt: skip
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}", f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        "--disable-usage-stats", *([f"--num-cpus={num_cpus}"] if num_cpus else []),
    ]  # fmt: skip
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
    log = open(tmp_path / "ray_start.log", "wb")  # noqa: SIM115 (the child process owns it)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            try:
                client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                client.list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "ray_start.log").read_text()[-3000:]) from None
                time.sleep(1)
        yield client
    finally:
        for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
        log.close()
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_bytes(previous)


EXCLUDES = [".venv", ".git", "runs", "mlflow.db", "mlartifacts", "mlruns", "*.egg-info", "__pycache__",
            ".pytest_cache", ".ruff_cache"]  # fmt: skip


def submit_study(client, workdir: str, *extra: str) -> str:
    """Submit the demo's smoke study as a user would: the checkout as the working directory, results in
    `workdir`."""
    return submit(client, f"jobs/run_study.py --config jobs/configs/demo.yaml --smoke-test --workdir {workdir}",
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
def test_pipeline_job_submitted_to_a_ray_cluster_succeeds(ray_cluster, tmp_path):
    """The smoke study on a cluster with the machine's own CPUs (a 2-core laptop included) finishes, with
    its results and MLflow runs in the absolute workdir it was given, not in Ray's temporary copy."""
    from ray.job_submission import JobStatus

    workdir = tmp_path / "study"
    one_trial = "--set tune.num_samples=1"  # the search's mechanics are tested in tests/unet/test_tune.py
    status, logs = wait_for_job(ray_cluster, submit_study(ray_cluster, str(workdir), one_trial), 900)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "ctvlab run: summary" in logs
    smoke = workdir / "smoke"
    uri = f"sqlite:///{smoke / 'mlflow.db'}"
    assert f"results: {smoke}" in logs and uri in logs  # the job says where everything is

    assert (smoke / "results" / "evaluate" / "summary.csv").is_file()
    runs = Tracker("ctvlab-demo", uri).find_runs()
    stages = {r.data.tags.get("ctvlab.stage") for r in runs}
    assert {"split", "rf-cv", "stats", "tune", "tune-trial", "evaluate"} <= stages
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("ctvlab.stage") != "tune-trial")
    assert all(r.info.artifact_uri.startswith((smoke / "mlruns").as_uri()) for r in runs)
    assert_no_identifying_strings(
        smoke / "mlflow.db", smoke / "mlruns", raw=smoke / "cohort", prep=smoke / "prep"
    )

    # The study's model, through its `champion` alias, applied to two patients as a job: one Ray task each.
    ids = sorted(p.name for p in (smoke / "cohort").iterdir() if p.is_dir())[:2]
    out = tmp_path / "predicted"
    job = submit(ray_cluster, f"jobs/predict.py {smoke / 'cohort'} --out {out} --tracking-uri {uri}",
                 *[f"--patient {i}" for i in ids])  # fmt: skip
    status, logs = wait_for_job(ray_cluster, job, 300)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"predicted 2 patient(s) into {out}" in " ".join(logs.split())
    for pid in ids:
        report = json.loads((out / pid / "report.json").read_text())
        assert report["model_uri"] == "models:/ctvlab-unet@champion" and report["model_version"]


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
    """On a 1-CPU cluster one smoke trial (0.25 + 0.5 CPU held, 0.5 kept for Ray Data) can never run: the
    job fails before its first stage with what it needs and has, instead of waiting forever. A relative
    workdir would write into Ray's temporary copy of the checkout: refused."""
    from ray.job_submission import JobStatus

    job_id = submit_study(ray_cluster, str(tmp_path / "study"))
    t0 = time.monotonic()
    status, logs = wait_for_job(ray_cluster, job_id, 120)
    assert status == JobStatus.FAILED
    assert "one trial can never fit on this cluster: it needs 1.25 CPU" in logs, logs[-3000:]
    assert "the Ray cluster has 1 CPU" in logs and "tune.cpus_per_trial" in logs
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
