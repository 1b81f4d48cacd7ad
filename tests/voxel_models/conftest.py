"""Fabricated voxel tables for the voxel-model tests (see fabricate.py for their known structure)."""

from __future__ import annotations

import pandas as pd
import pytest

from ctvlab.config import VoxelModelConfig
from tests.voxel_models.fabricate import FabricSpec, fabricate_patient, patient_ids, write_prepared

N_PATIENTS = 14
VOXELS = 1200
TEST_PATIENTS = ("P001", "P005", "P009")  # P005 has no MRSI


def tiny_config(**updates) -> VoxelModelConfig:
    """Small forests (20 trees, depth 6) and one permutation repeat: seconds per fold."""
    base = {
        "rf": {"n_estimators": 20, "max_depth": 6, "max_samples": None},
        "xgboost": {"n_estimators": 40, "max_depth": 4},
        "permutation_repeats": 1,
        "max_test_rows_for_permutation": 1000,
    }
    return VoxelModelConfig(**{**base, **updates})


def _frame(spec: FabricSpec) -> pd.DataFrame:
    parts = []
    for i, pid in enumerate(patient_ids(spec.n_patients)):
        frame, _ = fabricate_patient(pid, i, spec)
        frame.insert(0, "patient_id", pid)
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    test = df["patient_id"].isin(TEST_PATIENTS)
    return df.loc[~test].reset_index(drop=True), df.loc[test].reset_index(drop=True)


@pytest.fixture(scope="session")
def voxel_split():
    """(train, test) voxel rows of the normal fabricated cohort; test = three patients."""
    return _split(_frame(FabricSpec(n_patients=N_PATIENTS, voxels=VOXELS)))


@pytest.fixture(scope="session")
def null_voxel_split():
    """(train, test) of the null cohort: progression shows only in nFLAIR and nT1c."""
    return _split(_frame(FabricSpec(n_patients=N_PATIENTS, voxels=VOXELS, null=True)))


@pytest.fixture(scope="session")
def voxel_prep(tmp_path_factory):
    """A prepared folder (patients.parquet and hive-partitioned voxels/) of the normal cohort."""
    return write_prepared(
        tmp_path_factory.mktemp("voxel_prep"), FabricSpec(n_patients=N_PATIENTS, voxels=VOXELS)
    )
