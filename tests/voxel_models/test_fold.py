"""One fold of a voxel model (`fit_predict_fold`): science checks on fabricated voxels with known signal.

Tolerances use the Hanley–McNeil standard error of an AUC at the test fold's class counts: a gain
"beyond noise" must exceed 3 SE (the SE of a difference of two AUCs on the same test voxels is at most
√2 SE, so 3 SE is more than 2 SE of the difference), and a chance-level AUC must lie within 4 null SDs
of 0.5 (the null SD understates the spread a little, because voxels of one patient are not independent).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ctvlab.config import FEATURES
from ctvlab.data.layout import MRSI_FEATURES
from ctvlab.errors import LeakageError
from ctvlab.voxel_models.cv import _run_fold
from ctvlab.voxel_models.fold import fit_predict_fold, hanley_mcneil_se
from ctvlab.voxel_models.labels import FEATURE_SETS, label_rows
from tests.voxel_models.conftest import tiny_config

ALL = list(FEATURES)
ANAT = list(FEATURE_SETS["anat"])


def _fit(split, features, target="cel", **cfg):
    train, test = split
    return fit_predict_fold(train, test, features, target, tiny_config(**cfg), seed=0)


def _se(result):
    return hanley_mcneil_se(result.auc, result.test_pos, result.test_neg)


@pytest.mark.parametrize(("n_pos", "n_neg"), [(10, 10), (30, 500), (348, 3595)])
def test_hanley_mcneil_at_chance_is_the_mann_whitney_null_sd(n_pos, n_neg):
    expected = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    assert hanley_mcneil_se(0.5, n_pos, n_neg) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("target", ["cel", "nel"])
def test_models_beat_chance_and_need_mrsi_and_diffusion(voxel_split, target):
    full = _fit(voxel_split, ALL, target)
    anat = _fit(voxel_split, ANAT, target)
    assert full.auc > 0.7  # ≥ 7 SE above chance at these class counts
    assert full.auc - anat.auc > 3 * _se(full)
    # the fabricated signal sits in CNI and CCrI: permutation importance must find one of them first
    assert max(full.permutation, key=full.permutation.get) in {"CNI", "CCrI"}
    assert sum(full.impurity.values()) == pytest.approx(1.0)


def test_null_cohort_gains_nothing_from_mrsi_and_diffusion(null_voxel_split):
    full = _fit(null_voxel_split, ALL)
    anat = _fit(null_voxel_split, ANAT)
    assert anat.auc > 0.55  # the anatomical signal is there
    assert full.auc - anat.auc < 3 * _se(anat)


def _shuffle_categories_within_patients(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = df.copy()
    for _, idx in out.groupby("patient_id").indices.items():
        out.loc[out.index[idx], "category"] = out["category"].to_numpy()[rng.permutation(idx)]
    return out


def test_labels_permuted_within_patients_give_chance_auc(voxel_split):
    train, test = (_shuffle_categories_within_patients(df, seed) for seed, df in enumerate(voxel_split))
    result = _fit((train, test), ALL)
    null_sd = hanley_mcneil_se(0.5, result.test_pos, result.test_neg)
    assert abs(result.auc - 0.5) < 4 * null_sd


@pytest.mark.parametrize(
    ("model", "missing"), [("rf", "impute_nav"), ("rf", "covered_only"), ("xgboost", "impute_nav")]
)
def test_missing_value_policies(voxel_split, model, missing):
    train, test = voxel_split
    result = _fit(voxel_split, ALL, model=model, rf_missing=missing)
    assert result.auc > 0.7
    labelled_test, _ = label_rows(test, "cel")
    labelled_train, y_train = label_rows(train, "cel")
    n_missing = int(labelled_test[list(MRSI_FEATURES)].isna().any(axis=1).sum())
    assert n_missing > 0  # the fixture has voxels without MRSI
    if model == "rf" and missing == "covered_only":
        assert (result.n_test_dropped, result.n_test) == (n_missing, len(labelled_test) - n_missing)
        assert result.n_test_patients == 2  # P005 has no MRSI at all
    else:
        assert (result.n_test_dropped, result.n_test) == (0, len(labelled_test))
        assert result.n_test_patients == 3
    if model == "rf" and missing == "impute_nav":
        stable = labelled_train.loc[y_train == 0]
        expected = {f: float(stable[f].median()) for f in ALL}  # pandas skips NaN
        assert result.impute_values == pytest.approx(expected, abs=1e-6)
        assert result.impute_values["CNI"] == pytest.approx(0.0, abs=0.2)
        assert result.impute_values["nCho"] == pytest.approx(1.0, abs=0.05)
    else:
        assert result.impute_values is None  # xgboost sees the NaNs; covered_only never imputes


def test_subsampling_changes_training_rows_only(voxel_split):
    balanced = _fit(voxel_split, ALL, class_balance="balanced")
    sub = _fit(voxel_split, ALL, class_balance="subsample", stable_ratio=2.0)
    assert (sub.n_test, sub.test_pos, sub.test_neg) == (balanced.n_test, balanced.test_pos, balanced.test_neg)
    assert sub.train_pos == balanced.train_pos
    assert sub.train_neg == math.ceil(2.0 * sub.train_pos) < balanced.train_neg
    assert sub.n_train_dropped == balanced.train_neg - sub.train_neg
    assert sub.auc > 0.7


def test_one_class_test_fold_has_nan_auc_with_reason(voxel_split):
    train, test = voxel_split
    stable_only = test.loc[test["category"] == "NAV->NAV"]
    result = fit_predict_fold(train, stable_only, ALL, "cel", tiny_config(), seed=0)
    assert math.isnan(result.auc) and "lacks a class" in result.reason
    assert len(result.scores) == len(stable_only)  # still part of the pooled ROC


def test_same_seed_same_numbers(voxel_split):
    a, b = (_fit(voxel_split, ALL, model="xgboost") for _ in range(2))
    assert a.auc == b.auc
    np.testing.assert_array_equal(a.scores, b.scores)


def test_fold_refuses_a_patient_on_both_sides(voxel_split):
    train, test = voxel_split
    leaked = pd.concat([train, test.loc[test["patient_id"] == "P001"]], ignore_index=True)
    with pytest.raises(LeakageError, match="P001"):
        _run_fold(0, "cel", ALL, tiny_config(), frozenset(train["patient_id"]) | {"P001"}, test, leaked)


def mann_whitney_auc(y: np.ndarray, score: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), over every pair: the AUC by its definition."""
    pos, neg = score[y == 1][:, None], score[y == 0][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


@pytest.mark.parametrize("missing", ["impute_nav", "covered_only"])
def test_distance_baseline_is_scored_on_the_models_own_test_rows(voxel_split, missing):
    """Beside every fold's AUC: the AUC of −distance to the T2L on exactly the rows the model was scored
    on (after the missing-value policy drops rows), by the pairwise definition."""
    _, test = voxel_split
    result = _fit(voxel_split, ALL, model="rf", rf_missing=missing)
    rows, y = label_rows(test, "cel")
    if missing == "covered_only":
        keep = ~rows[list(MRSI_FEATURES)].isna().any(axis=1).to_numpy()
        rows, y = rows.loc[keep], y[keep]
    assert len(y) == result.n_test
    expected = mann_whitney_auc(np.asarray(y), -rows["dist_t2l_mm"].to_numpy())
    assert result.auc_distance == pytest.approx(expected, abs=1e-9)
    assert 0.6 < result.auc_distance < 0.9  # the fabricated distances carry some skill, not all
