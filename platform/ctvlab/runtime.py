"""Starting or joining Ray, in one place.

A local Ray gets as many logical CPUs as the machine has cores, like a cluster started with
`ray start --head`. Training and searches plan their resources from what the cluster has
(`ctvlab.resources`), keeping a CPU budget free for Ray Data, so they never need more logical CPUs than
cores to make progress.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


def local_num_cpus(requested: int | None = None) -> int:
    return requested or os.cpu_count() or 1


def package_runtime_env() -> dict[str, Any]:
    """A runtime environment that ships the ctvlab package to the workers of an existing cluster.

    On a cluster whose nodes did not install this checkout (a remote `ray.init(address=...)`, or a job
    whose working directory is the repository, where the package lives under platform/), `py_modules`
    uploads the package once and puts it on every worker's path. A local Ray shares this interpreter and
    needs nothing.
    """
    import ctvlab

    return {"py_modules": [str(Path(ctvlab.__file__).resolve().parent)]}


LOG_FILE = "ctvlab.log"  # in <workdir>/logs: what Ray, MLflow and Python's warnings say, off the terminal
_LIBRARIES = ("ray", "mlflow", "py.warnings")


class _ErrorsToStderr(logging.StreamHandler):
    """Errors to whatever sys.stderr is when they happen (not the stream of the moment it was made)."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.ERROR)

    @property
    def stream(self):  # type: ignore[override]
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
loggers:
  ray.data:
    level: INFO
    handlers: []
    propagate: true
"""


def _quiet_library_children(path: Path) -> None:
    """Loggers below the libraries' that print on their own (Ray Data configures `ray.data` with a console
    handler and no propagation when it is imported) send their messages up to the routed logger instead.

    For an import still to come, RAY_DATA_LOGGING_CONFIG points Ray Data at a configuration that does the
    same (its documented way to replace its logging set-up); an explicit user setting is kept.
    """
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or not any(name.startswith(p + ".") for p in _LIBRARIES):
            continue
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.propagate = True
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        config = (path.parent / "ray-data-logging.yaml").resolve()  # Ray's workers run in other folders
        config.write_text(_RAY_DATA_LOGGING)
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(config)


def route_library_logs(log_dir: Path | str) -> Path:
    """Send Ray's, MLflow's and Python's warning messages to `<log_dir>/ctvlab.log` instead of the terminal,
    where they buried the stage lines; their errors still reach the terminal too. Idempotent.

    Returns:
        the log file.
    """
    import warnings

    path = Path(log_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each distinct warning once, into the log
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _LIBRARIES:
        logger = logging.getLogger(name)
        if any(getattr(h, "_ctvlab", None) == str(path) for h in logger.handlers):
            continue
        for h in list(logger.handlers):
            logger.removeHandler(h)
            if getattr(h, "_ctvlab", None):  # ours, from an earlier folder
                h.close()
        to_file = logging.FileHandler(path, encoding="utf-8")
        to_file.setFormatter(formatter)
        to_file._ctvlab = str(path)  # type: ignore[attr-defined]
        errors = _ErrorsToStderr()
        errors._ctvlab = str(path)  # type: ignore[attr-defined]
        logger.addHandler(to_file)
        logger.addHandler(errors)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    _quiet_library_children(path)
    # Tune's console tables ("Configuration for experiment", "View detailed results here") are its new
    # output engine's; the search reports its own progress lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return path


def init_ray(
    address: str | None = None, num_cpus: int | None = None, quiet: bool = True, log_dir: Path | None = None
) -> None:
    """Connect to the Ray cluster at `address`, or start a local one; no-op when Ray is running.

    Args:
        address: "auto", "ray://host:10001" or "host:6379"; None starts a local Ray (inside a job
            submitted with `ray job submit`, RAY_ADDRESS is set and the job's cluster is joined).
        num_cpus: logical CPUs of a local Ray (default: the machine's cores).
        log_dir: where Ray's and MLflow's own messages go (`route_library_logs`); None leaves them.
    """
    if log_dir is not None:
        route_library_logs(log_dir)
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, runtime_env=package_runtime_env(), **kwargs)
    else:
        # address="local": always a fresh local Ray, never a cluster that `ray start` left on this host.
        ray.init(address="local", num_cpus=local_num_cpus(num_cpus), include_dashboard=False, **kwargs)
    from ray.data import DataContext

    if quiet:  # Ray Data's per-dataset INFO lines (read estimates, "execution finished") are noise to users
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = False


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def is_local_store(tracking_uri: str) -> bool:
    """A store that lives in one machine's files (SQLite, a file store or a bare path), not a server."""
    scheme = tracking_uri.split(":", 1)[0].lower() if "://" in tracking_uri else ""
    return scheme in ("", "sqlite", "file")


def refuse_local_store_on_cluster(tracking_uri: str, alive_nodes: int | None = None) -> None:
    """Trials and training workers log to MLflow from whichever node they run on: on a cluster of several
    nodes a store in one machine's files is either missing there or shared over a network file system, which
    SQLite does not survive. `alive_nodes` defaults to the running Ray cluster's.

    Raises:
        ConfigError: several nodes and a local store, with what to use instead.
    """
    from ctvlab.errors import ConfigError

    if alive_nodes is None:
        import ray

        alive_nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if alive_nodes > 1 and is_local_store(tracking_uri):
        raise ConfigError(
            f"the MLflow store {tracking_uri} is a local file, but the Ray cluster has {alive_nodes} nodes whose "
            "trials and training workers all log to it: run an MLflow tracking server (docs/guides/mlflow.md, 'MLflow for "
            "teams') and pass --tracking-uri http://HOST:PORT or set MLFLOW_TRACKING_URI"
        )


def start_unet_stage(cfg, *, search: bool) -> None:
    """What every U-Net stage (training, search, ablation) does before it starts: join or start Ray, refuse
    a local MLflow store on a cluster of several nodes, and check that one trial (`search`) or one training
    run fits on the cluster.

    Raises:
        ConfigError: a local store on several nodes. ResourceError: the run can never fit.
    """
    from ctvlab.resources import check_study_fits
    from ctvlab.tracking import resolve_tracking_uri

    init_ray(cfg.ray.address, cfg.ray.num_cpus, log_dir=Path(cfg.workdir) / "logs")
    refuse_local_store_on_cluster(resolve_tracking_uri(cfg.tracking.tracking_uri))
    check_study_fits(cfg, search=search)
