"""Ray's, MLflow's and Python's warnings go to <workdir>/logs/ctvlab.log; their errors still reach the terminal."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from ctvlab.runtime import LOG_FILE, route_library_logs


@pytest.fixture
def restore_logging(monkeypatch):
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    logging.captureWarnings(False)  # an earlier in-process command may have left it on
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in ("ray", "ray.data", "mlflow", "py.warnings")}  # fmt: skip
    yield
    for n, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(n)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in handlers:
            logger.addHandler(h)
        logger.propagate, logger.level = propagate, level
    logging.captureWarnings(False)


def test_library_messages_go_to_the_log_file_and_errors_to_the_terminal_too(
    tmp_path, capsys, restore_logging
):
    # as Ray Data leaves its logger once imported: its own console handler, no propagation
    ray_data = logging.getLogger("ray.data")
    ray_data.addHandler(logging.StreamHandler())
    ray_data.propagate = False
    path = route_library_logs(tmp_path / "logs")
    assert path == tmp_path / "logs" / LOG_FILE
    assert route_library_logs(tmp_path / "logs") == path  # idempotent: one handler each
    assert len(logging.getLogger("ray").handlers) == 2
    logging.getLogger("ray.data").warning("Progress bars disabled.")
    logging.getLogger("mlflow.pyfunc").info("Passing a Python object as python_model")
    warnings.warn("a deprecation banner", DeprecationWarning, stacklevel=1)
    logging.getLogger("ray.tune").error("a trial failed")
    out = capsys.readouterr()
    assert "Progress bars" not in out.err + out.out and "python_model" not in out.err + out.out
    assert "a trial failed" in out.err  # errors stay visible
    text = path.read_text()
    assert "Progress bars disabled." in text and "python_model" in text and "a trial failed" in text
    assert "a deprecation banner" in text


def test_a_later_ray_data_import_is_pointed_at_a_logging_config_that_propagates(
    tmp_path, restore_logging, monkeypatch
):
    import os

    import yaml

    monkeypatch.chdir(tmp_path)
    route_library_logs("logs")  # relative, as a config's workdir often is
    assert Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).is_absolute()  # Ray's workers run elsewhere
    config = yaml.safe_load(Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).read_text())
    assert config["loggers"]["ray.data"] == {"level": "INFO", "handlers": [], "propagate": True}
    from ray.data._internal.logging import configure_logging

    configure_logging()  # what `import ray.data` runs
    assert logging.getLogger("ray.data").propagate and not logging.getLogger("ray.data").handlers


def test_a_users_own_ray_data_logging_config_is_kept(tmp_path, monkeypatch, restore_logging):
    import os

    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", "/their/config.yaml")
    route_library_logs(tmp_path / "logs")
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == "/their/config.yaml"
