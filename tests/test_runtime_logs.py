"""Ray's, MLflow's and Python's warnings go to <workdir>/logs/ctvlab.log; their errors still reach the terminal."""

from __future__ import annotations

import logging
import warnings

import pytest

from ctvlab.runtime import LOG_FILE, route_library_logs


@pytest.fixture
def restore_logging():
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in ("ray", "mlflow", "py.warnings")}  # fmt: skip
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
