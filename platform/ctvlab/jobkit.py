"""The common shape of every script under jobs/: parse, load the config, run one function, exit.

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

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo.yaml"


def run_job(main: Callable[[Any, argparse.Namespace], int | None], description: str,
            add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:  # fmt: skip
    """Parse the standard options (and the job's own), load the config, call `main(cfg, args)`, exit.

    A `CtvlabError` prints its message and exits with its code; nothing prints a traceback for a
    problem the user can fix.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="study config (YAML)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU-only settings, a few minutes")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="the study's working directory (default: the config's)"
    )
    if add_args:
        add_args(parser)
    args = parser.parse_args()

    from rich.console import Console

    from ctvlab.config import apply_smoke_test, load_config
    from ctvlab.errors import CtvlabError

    # soft_wrap: a job log is no terminal; a message wrapped at 80 columns would be hard to search
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        cfg = load_config(args.config)
        if args.workdir:
            cfg.workdir = args.workdir
        if args.smoke_test or cfg.smoke_test:
            cfg = apply_smoke_test(cfg)
        if args.tracking_uri:
            cfg.tracking.tracking_uri = args.tracking_uri
        cfg.ray.address = args.address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if in_submitted_job():
            settle_job_paths(cfg, os.environ.get("MLFLOW_TRACKING_URI"))
        where = where_line(cfg)
        console.print(where)
        code = main(cfg, args)
        if in_submitted_job():
            console.print(where)
    except CtvlabError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    sys.exit(code or 0)


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


def where_line(cfg) -> str:
    """Where this job's results and MLflow runs are."""
    from ctvlab.tracking import resolve_tracking_uri

    return (
        f"results: {Path(cfg.workdir).resolve()}  ·  MLflow runs: {resolve_tracking_uri(cfg.tracking.tracking_uri)} "
        f"(experiment {cfg.tracking.experiment or cfg.name})"
    )
