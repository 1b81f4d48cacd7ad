"""What a job script under jobs/ needs beyond its command (`ctvlab.cli.run_job`): inside `ray job submit`,
results must go to absolute paths.

Each job works the same locally (`python jobs/<name>.py --config ...`) and on a cluster
(`ray job submit --address ... --working-dir . -- python jobs/<name>.py --config ...`; inside a submitted
job RAY_ADDRESS is set, and `ctvlab.runtime.init_ray` joins that cluster and ships the package to its
workers). `--smoke-test` swaps in tiny CPU-only settings (`ctvlab.config.apply_smoke_test`).

A submitted job runs in Ray's temporary copy of the working directory, which Ray deletes: a relative
`workdir` or SQLite store would put the results there, out of the user's sight. So inside a submitted job
both must be absolute (`--workdir /abs/path`, `--tracking-uri sqlite:////abs/path/mlflow.db`); with no
tracking URI at all the store is `<workdir>/mlflow.db`. The job says where both are when it starts and
when it ends.
"""

from __future__ import annotations

import os
from pathlib import Path


def in_submitted_job() -> bool:
    """True inside the entrypoint of `ray job submit` (Ray's job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def job_path_problems(workdir: Path, tracking_uri: str | None) -> list[str]:
    """What would make a submitted job write into Ray's temporary copy of its working directory."""
    problems = []
    if not Path(workdir).is_absolute():
        problems.append(
            f"the study's workdir '{workdir}' is relative: pass --workdir with an absolute path (e.g. "
            "--workdir $PWD/runs/demo) or set an absolute workdir in the config"
        )
    if tracking_uri and tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        problems.append(
            f"the MLflow store '{tracking_uri}' is a relative SQLite path: use sqlite:////absolute/path/mlflow.db "
            "(four slashes), or leave it unset to use <workdir>/mlflow.db"
        )
    return problems


def settle_job_paths(cfg, env_tracking_uri: str | None) -> None:
    """Inside a submitted job: refuse relative result paths; default the MLflow store to the workdir.

    Raises:
        ConfigError: the workdir or the SQLite store is relative, with how to fix each.
    """
    from ctvlab.errors import ConfigError

    uri = cfg.tracking.tracking_uri or env_tracking_uri
    problems = job_path_problems(Path(cfg.workdir), uri)
    if problems:
        raise ConfigError(
            "a submitted job runs in a temporary copy of its working directory that Ray deletes when the job "
            "ends, so its results must go to absolute paths: " + "; ".join(problems) + "."
        )
    if uri is None:
        cfg.tracking.tracking_uri = f"sqlite:///{Path(cfg.workdir) / 'mlflow.db'}"


def check_job_output(out: Path, tracking_uri: str | None) -> None:
    """Inside a submitted job, for a command that writes to `--out` (`ctvlab predict`): refuse an output
    folder inside the job's temporary working directory (a relative `--out` resolves there) and a relative
    SQLite store.

    Raises:
        ConfigError: with how to fix each problem.
    """
    from ctvlab.errors import ConfigError

    problems = job_path_problems(Path("/"), tracking_uri)
    if Path(out).resolve().is_relative_to(Path.cwd().resolve()):
        problems.insert(0, f"--out {out} lies in the job's temporary copy of its working directory: give an "
                           "absolute path on storage that outlives the job")  # fmt: skip
    if problems:
        raise ConfigError("a submitted job runs in a temporary copy of its working directory that Ray deletes "
                          "when the job ends, so its results must go to absolute paths: " + "; ".join(problems) + ".")  # fmt: skip


def where_line(cfg) -> str:
    """Where this job's results and MLflow runs are."""
    from ctvlab.tracking import resolve_tracking_uri

    return (
        f"results: {Path(cfg.workdir).resolve()}  ·  MLflow runs: {resolve_tracking_uri(cfg.tracking.tracking_uri)} "
        f"(experiment {cfg.tracking.experiment or cfg.name})"
    )
