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


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh local SQLite MLflow store; MLFLOW_TRACKING_URI points at it for the test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
