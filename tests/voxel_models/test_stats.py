"""Voxel statistics on a hand-made voxel table whose medians and p-values are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import mannwhitneyu, wilcoxon

from ctvlab.config import FEATURES, StatsConfig
from ctvlab.data.layout import PrepPaths, voxel_table_schema
from ctvlab.voxel_models.plots import plot_category_boxes, plot_importances
from ctvlab.voxel_models.stats import compare_categories, voxel_statistics

# Patient i: 7 stable voxels with CNI 0..6 + 0.1 i (median 3 + 0.1 i); 5 NAV→CEL voxels with CNI
# 5..9 + D[i] (median 7 + D[i]); 4 NAV→NEL voxels (too few: left out); 6 NEL→CEL voxels of which only
# 3 have CNI (left out for CNI, kept for nFLAIR).
D = [0.5, -5.2, 1.3, -3.75, 2.1, 0.7]
STABLE_CNI = [3.0, 3.1, 3.2, 3.3, 3.4, 3.5]
CEL_CNI = [7.5, 1.8, 8.3, 3.25, 9.1, 7.7]
CFG = StatsConfig(features=["CNI", "nFLAIR"])


def _patient_rows(i: int) -> pd.DataFrame:
    cats = ["NAV->NAV"] * 7 + ["NAV->CEL"] * 5 + ["NAV->NEL"] * 4 + ["NEL->CEL"] * 6 + ["other"] * 3
    cni = (
        list(np.arange(7) + 0.1 * i)
        + list(np.arange(5, 10) + D[i])
        + [9.0] * 4
        + [4.0, 4.0, 4.0, np.nan, np.nan, np.nan]
        + [0.0] * 3
    )
    flair = [1.0] * 7 + [1.2 + 0.01 * i] * 5 + [1.5] * 4 + [1.8] * 6 + [2.0] * 3
    data = {f: [None] * len(cats) for f in FEATURES}
    data.update(
        voxel_index=list(range(len(cats))),
        CNI=cni,
        nFLAIR=flair,
        category=cats,
        cohort="SOC",
        pfs_months=5.0,
        dist_t2l_mm=1.0,
    )
    return pd.DataFrame(data)


@pytest.fixture(scope="module")
def stats_prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_prep")
    paths = PrepPaths(root)
    for i in range(6):
        folder = paths.voxel_partition(f"P{i:03d}")
        folder.mkdir(parents=True)
        table = pa.Table.from_pandas(_patient_rows(i), schema=voxel_table_schema(), preserve_index=False)
        pq.write_table(table, folder / "part-0.parquet")
    return root


def test_per_patient_medians_and_minimum_voxels(stats_prep):
    result = voxel_statistics(stats_prep, None, CFG)
    m = result.medians.set_index(["patient_id", "category", "feature"])
    for i in range(6):
        pid = f"P{i:03d}"
        assert m.loc[(pid, "NAV->NAV", "CNI"), "median"] == pytest.approx(STABLE_CNI[i], abs=1e-5)
        assert m.loc[(pid, "NAV->NAV", "CNI"), "n_voxels"] == 7
        assert m.loc[(pid, "NAV->CEL", "CNI"), "median"] == pytest.approx(CEL_CNI[i], abs=1e-5)
        assert m.loc[(pid, "NEL->CEL", "nFLAIR"), "n_voxels"] == 6
    kept = set(zip(result.medians["category"], result.medians["feature"], strict=True))
    assert ("NAV->NEL", "CNI") not in kept and ("NAV->NEL", "nFLAIR") not in kept  # 4 voxels < 5
    assert ("NEL->CEL", "CNI") not in kept  # 3 voxels with a value < 5
    assert "other" not in set(result.medians["category"])


def test_p_values_equal_scipy_on_the_hand_made_medians(stats_prep):
    tests = voxel_statistics(stats_prep, None, CFG).tests.set_index(["feature", "category"])
    row = tests.loc[("CNI", "NAV->CEL")]
    diffs = np.subtract(CEL_CNI, STABLE_CNI)
    assert row["n_pairs"] == 6
    assert row["median_difference"] == pytest.approx(float(np.median(diffs)), abs=1e-5)
    assert row["wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue, rel=1e-12)
    expected_mw = mannwhitneyu(CEL_CNI, STABLE_CNI, alternative="two-sided").pvalue
    assert row["mannwhitney_p"] == pytest.approx(expected_mw, rel=1e-12)
    # Holm over the table's Wilcoxon tests, computed by hand; significance is judged on the adjusted p
    raw = tests["wilcoxon_p"].dropna().sort_values()
    m = len(raw)
    adjusted = np.maximum.accumulate([min(1.0, (m - k) * p) for k, p in enumerate(raw)])
    hand = dict(zip(raw.index, adjusted, strict=True))
    assert row["wilcoxon_p_holm"] == pytest.approx(hand[("CNI", "NAV->CEL")], rel=1e-12)
    assert bool(row["significant"]) == (row["wilcoxon_p_holm"] < 0.05)
    assert row["n_zero"] == 0
    assert ("CNI", "NAV->NEL") not in tests.index


def test_subset_of_patients_and_identical_medians_give_nan_wilcoxon(stats_prep):
    result = voxel_statistics(stats_prep, ["P000", "P001", "P002"], CFG)
    assert set(result.medians["patient_id"]) == {"P000", "P001", "P002"}
    same = result.medians.loc[result.medians["category"] == "NAV->NAV"].copy()
    same["category"] = "NAV->CEL"
    tests = compare_categories(pd.concat([result.medians.loc[lambda d: d.category == "NAV->NAV"], same]), CFG)
    assert math.isnan(tests.loc[tests["feature"] == "CNI", "wilcoxon_p"].iloc[0])  # every difference is 0


def test_figures_are_written_as_png(stats_prep, tmp_path):
    result = voxel_statistics(stats_prep, None, CFG)
    box = plot_category_boxes(result.medians, tmp_path / "boxes.png", result.tests)
    table = pd.DataFrame(
        {"impurity": [0.6, 0.4], "permutation": [0.1, 0.02], "permutation_sd": [0.01, 0.01]},
        index=pd.Index(["CNI", "nFLAIR"], name="feature"),
    )
    bars = plot_importances(table, tmp_path / "importances.png")
    for path in (box, bars):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp-*"))


def test_statistics_by_cohort_equal_each_cohorts_own_statistics(stats_prep):
    from ctvlab.voxel_models.stats import statistics_by_cohort

    cohorts = {f"P{i:03d}": ("SOC" if i < 3 else "ATT") for i in range(6)}
    results, table = statistics_by_cohort(stats_prep, cohorts, CFG)
    assert sorted(results) == ["ATT", "SOC"]
    for cohort, ids in (("SOC", ["P000", "P001", "P002"]), ("ATT", ["P003", "P004", "P005"])):
        alone = voxel_statistics(stats_prep, ids, CFG).tests
        mine = (
            table.loc[table["cohort"] == cohort].drop(columns=["cohort", "n_patients"]).reset_index(drop=True)
        )
        pd.testing.assert_frame_equal(mine, alone.reset_index(drop=True))  # Holm within the cohort
        assert (table.loc[table["cohort"] == cohort, "n_patients"] == 3).all()
