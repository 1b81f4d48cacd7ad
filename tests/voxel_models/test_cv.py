"""Cross-validation over a prepared voxel table: Ray Data reading, Ray tasks per fold, leakage guards."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ctvlab.data.readers import read_patients
from ctvlab.errors import LeakageError
from ctvlab.voxel_models.cv import run_cv
from ctvlab.voxel_models.folddata import load_fold_data, validate_fold_map
from tests.voxel_models.conftest import tiny_config
from tests.voxel_models.fabricate import patient_ids, round_robin_folds

IDS = patient_ids(14)


@pytest.mark.ray
def test_parallel_and_serial_cv_agree_and_folds_are_patient_disjoint(voxel_prep, ray_local):
    folds = round_robin_folds(IDS, 5)
    # 4 CPUs per fold: two concurrent fold workers; starting five at once took ~20 s on 2 busy cores
    cfg = tiny_config(model="xgboost", cpus_per_fold=4)
    data = load_fold_data(voxel_prep, folds)
    # every patient's voxels sit in exactly its own fold
    owners = {k: set(df["patient_id"].unique().astype(str)) for k, df in data.frames.items()}
    assert owners == {k: {p for p, f in folds.items() if f == k} for k in range(5)}
    # rows come in a fixed order (by patient, then voxel), whatever order Ray Data's blocks finish in
    assert all(df["patient_id"].cat.codes.is_monotonic_increasing for df in data.frames.values())

    reported = {"parallel": [], "serial": []}
    parallel = run_cv(voxel_prep, folds, cfg, "cel", data=data, on_fold=reported["parallel"].append)
    serial = run_cv(
        voxel_prep, folds, cfg, "cel", parallel=False, data=data, on_fold=reported["serial"].append
    )
    # every fold is reported once, as it finishes (in any order when parallel), and the result keeps fold order
    assert sorted(r.fold for r in reported["parallel"]) == [f.fold for f in parallel.folds] == list(range(5))
    assert [r.auc for r in reported["serial"]] == list(serial.aucs)
    np.testing.assert_array_equal(parallel.aucs, serial.aucs)
    assert parallel.pooled_roc()[2] == serial.pooled_roc()[2]
    assert parallel.auc_mean > 0.7 and not math.isnan(parallel.auc_std)
    assert [f.n_test_patients for f in parallel.folds] == [3, 3, 3, 3, 2]
    assert sum(f.n_test for f in parallel.folds) == sum(f.n_train for f in parallel.folds) / 4

    # pooled and per-patient AUC with patient-level bootstrap intervals; ids stay out of every table
    pooled, per_patient = parallel.auc_intervals(300, seed=0)
    assert pooled.estimate == pytest.approx(parallel.pooled_roc()[2], abs=1e-12)
    assert (
        pooled.low <= pooled.estimate <= pooled.high
        and per_patient.low <= per_patient.estimate <= per_patient.high
    )
    summary_ci = parallel.summary()
    assert (summary_ci["auc_pooled_ci_low"], summary_ci["auc_per_patient"]) == (
        pooled.low,
        per_patient.estimate,
    )

    frames = parallel.to_frames()
    assert list(frames["folds"]["auc"]) == list(parallel.aucs)
    assert set(frames["importances"]["feature"]) == set(parallel.features)
    summary = parallel.summary()
    assert summary["auc_fold0"] == parallel.aucs[0] and summary["auc_pooled"] > 0.7
    for frame in frames.values():  # artifacts carry no patient identifiers
        assert "patient_id" not in frame.columns
        assert not frame.astype(str).isin(IDS).any().any()

    # a subgroup keeps its patients' fold assignment; the threshold is the fold map's median PFS
    early = run_cv(voxel_prep, folds, cfg, "cel", subgroup="early", parallel=False, data=data)
    pfs = read_patients(voxel_prep).set_index("patient_id")["pfs_months"]
    assert early.threshold_months == pytest.approx(float(pfs.median()))
    assert early.n_patients == int((pfs < pfs.median()).sum())
    assert sum(f.n_test_patients for f in early.folds) == early.n_patients


def test_fold_map_naming_a_patient_without_data_is_leakage(voxel_prep):
    folds = {**round_robin_folds(IDS, 5), "P999": 0}
    with pytest.raises(LeakageError, match="P999"):
        load_fold_data(voxel_prep, folds)


@pytest.mark.parametrize(
    ("folds", "message"),
    [
        (pd.Series([0, 1, 2], index=["P000", "P001", "P000"]), "more than one fold: P000"),
        ({"P000": 0, "P001": 0}, "at least two folds"),
        ({"P000": 0, "P001": 1.5}, "folds are integers"),
    ],
)
def test_bad_fold_maps_are_leakage(folds, message):
    with pytest.raises(LeakageError, match=message):
        validate_fold_map(folds)


def test_cv_refuses_data_read_for_another_fold_map(voxel_prep):
    from ctvlab.voxel_models.folddata import FoldData

    data = FoldData(frames={}, features=[], folds={"P000": 0, "P001": 1}, read_s=0.0)
    with pytest.raises(LeakageError, match="another fold map"):
        run_cv(voxel_prep, {"P000": 1, "P001": 0}, tiny_config(), "cel", data=data)


@pytest.fixture(scope="module")
def null_voxel_prep(tmp_path_factory):
    from tests.voxel_models.conftest import N_PATIENTS, VOXELS
    from tests.voxel_models.fabricate import FabricSpec, write_prepared

    return write_prepared(
        tmp_path_factory.mktemp("null_voxel_prep"),
        FabricSpec(n_patients=N_PATIENTS, voxels=VOXELS, null=True),
    )


def test_missing_policy_check_finds_the_mrsi_signal_and_none_in_the_null_cohort(voxel_prep, null_voxel_prep):
    from ctvlab.voxel_models.cv import missing_policy_check

    folds = round_robin_folds(IDS, 5)
    cfg = tiny_config(model="rf", rf_missing="impute_nav")
    normal = missing_policy_check(voxel_prep, folds, cfg, ["cel"], parallel=False).set_index("policy")
    null = missing_policy_check(null_voxel_prep, folds, cfg, ["cel"], parallel=False).set_index("policy")
    assert list(normal.index) == ["impute_nav", "covered_only"] and normal["chosen"].tolist() == [True, False]
    # covered_only scores the voxels with MRSI only, its anatomical model on those same voxels
    assert normal.loc["covered_only", "n_voxels_test"] < normal.loc["impute_nav", "n_voxels_test"]
    assert (normal["gain"] > 0.1).all()  # the fabricated signal sits in CNI and CCrI
    assert (null["gain"].abs() < 0.03).all()  # neither policy adds signal where the maps carry none
    np.testing.assert_allclose(normal["gain"], normal["auc_all"] - normal["auc_anat"])

    # a result already computed with the chosen policy is reused, not recomputed
    done = {("cel", "all"): run_cv(voxel_prep, folds, cfg, "cel", parallel=False)}
    again = missing_policy_check(voxel_prep, folds, cfg, ["cel"], done=done, parallel=False)
    assert again.loc[0, "auc_all"] == done[("cel", "all")].auc_mean
