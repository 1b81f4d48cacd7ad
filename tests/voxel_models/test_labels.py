"""Targets, subgroups and feature sets of the voxel models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctvlab.errors import ConfigError, DataError
from ctvlab.voxel_models.labels import FEATURE_SETS, label_rows, resolve_features, subgroup_patients

CATEGORIES = ["NAV->NAV", "NAV->NEL", "NAV->CEL", "NEL->CEL", "other"]
# Expected label per category (None: the row is not in the model). Methods, "Voxel-wise predictions".
LABELS = {
    "nel": [0, 1, None, None, None],
    "cel": [0, None, 1, 1, None],
    "any": [0, 1, 1, 1, None],
}


@pytest.mark.parametrize("target", sorted(LABELS))
def test_label_rows_maps_categories(target):
    df = pd.DataFrame({"category": CATEGORIES * 2, "row": range(10)})
    subset, y = label_rows(df, target)
    expected = [(i, lab) for i, lab in enumerate(LABELS[target] * 2) if lab is not None]
    assert subset["row"].tolist() == [i for i, _ in expected]
    assert y.tolist() == [lab for _, lab in expected]
    assert y.dtype == np.int8


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown voxel-model target 'tumour'"):
        label_rows(pd.DataFrame({"category": CATEGORIES}), "tumour")


def _patients(pfs):
    return pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(len(pfs))], "pfs_months": pfs})


@pytest.mark.parametrize(
    ("pfs", "subgroup", "threshold", "expected", "expected_threshold"),
    [
        # even count: median 7 is the mean of the two middle values; ties at 7 are late
        ([3, 5, 7, 7, 9, 12], "early", None, ["P000", "P001"], 7.0),
        ([3, 5, 7, 7, 9, 12], "late", None, ["P002", "P003", "P004", "P005"], 7.0),
        ([3, 5, 6, 8, 9, 12], "early", None, ["P000", "P001", "P002"], 7.0),
        ([3, 5, 7, 7, 9, 12], "all", None, [f"P{i:03d}" for i in range(6)], 7.0),
        # a fixed threshold (the study's 7 months) overrides the cohort median
        ([3, 5, 7, 7, 9, 12], "early", 8.0, ["P000", "P001", "P002", "P003"], 8.0),
    ],
)
def test_subgroup_split(pfs, subgroup, threshold, expected, expected_threshold):
    ids, used = subgroup_patients(_patients(pfs), subgroup, threshold)
    assert ids == expected
    assert used == expected_threshold


def test_subgroups_of_an_odd_cohort_are_50_and_51_like_the_study():
    patients = _patients(np.arange(1.0, 102.0))
    early, t = subgroup_patients(patients, "early")
    late, _ = subgroup_patients(patients, "late")
    assert (len(early), len(late), t) == (50, 51, 51.0)
    assert not set(early) & set(late)


def test_subgroup_errors():
    with pytest.raises(DataError, match="P001"):
        subgroup_patients(_patients([3.0, np.nan]), "early")
    with pytest.raises(ConfigError, match="unknown subgroup"):
        subgroup_patients(_patients([3.0]), "middle")


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        (None, ["nT1c", "CNI"]),
        ("anat", ["nT1c", "nT1", "nFLAIR"]),
        (["CNI", "nADC"], ["CNI", "nADC"]),
    ],
)
def test_resolve_features(features, expected):
    assert resolve_features(features, ["nT1c", "CNI"]) == expected


@pytest.mark.parametrize("bad", ["everything", ["nT2"], ["CNI", "CNI"], []])
def test_resolve_features_rejects_unknown_names(bad):
    with pytest.raises(ConfigError):
        resolve_features(bad, FEATURE_SETS["all"])
