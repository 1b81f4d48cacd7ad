"""Voxel statistics: per-patient medians per voxel category and stable-vs-progressed tests (Methods, "Statistics").

For each patient, the median of every feature over the voxels of each category (NAV→NAV and the three
progressed categories) within the 4 cm ring, when the category holds at least `min_voxels` voxels with
a value of that feature. Across patients, each progressed category is compared with stable NAV:
- the Wilcoxon signed-rank test on the patients that have both (the medians are paired by patient);
- the Mann–Whitney U test on all patients with each category (unpaired; the test the paper names).
Both are two-sided and uncorrected for multiple comparisons, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctvlab.config import StatsConfig
from ctvlab.data.layout import PrepPaths
from ctvlab.errors import DataError
from ctvlab.voxel_models.labels import PROGRESSED, STABLE

__all__ = ["CATEGORY_ORDER", "StatsResult", "category_medians", "compare_categories", "voxel_statistics"]

CATEGORY_ORDER: tuple[str, ...] = (STABLE, *PROGRESSED)
MEDIAN_COLUMNS = ["patient_id", "category", "feature", "median", "n_voxels"]
# Per test: n_pairs patients with both categories, of which n_zero had a zero difference (dropped before
# ranking: `ctvlab.statistics.paired_wilcoxon`); Holm-adjusted p-values over the whole table (one family per
# test kind); `significant` judges the primary test's Holm-adjusted p.
TEST_COLUMNS = [
    "feature", "category", "n_pairs", "n_zero", "median_difference", "wilcoxon_p", "wilcoxon_p_holm",
    "n_stable", "n_progressed", "mannwhitney_p", "mannwhitney_p_holm", "significant",
]  # fmt: skip


@dataclass
class StatsResult:
    """`medians`: one row per (patient, category, feature) kept; `tests`: one row per (feature, category).

    `medians` holds patient ids: pseudonymise them before they leave the prepared folder.
    """

    medians: pd.DataFrame
    tests: pd.DataFrame
    primary_test: str
    significance: float

    def median_table(self) -> pd.DataFrame:
        """Feature × category: the median over patients of the per-patient medians."""
        table = self.medians.pivot_table(
            index="feature", columns="category", values="median", aggfunc="median"
        )
        rows = list(dict.fromkeys(self.medians["feature"]))
        cols = [c for c in CATEGORY_ORDER if c in table.columns]
        return table.reindex(index=rows, columns=cols)

    def to_frames(self) -> dict[str, pd.DataFrame]:
        return {"tests": self.tests, "median_table": self.median_table().reset_index()}

    def summary(self) -> dict[str, float]:
        n_patients = self.medians["patient_id"].nunique() if len(self.medians) else 0
        return {
            "n_patients": float(n_patients),
            "n_tests": float(len(self.tests)),
            "n_significant": float(self.tests["significant"].sum()) if len(self.tests) else 0.0,
        }


def category_medians(
    voxels: pd.DataFrame, features: Sequence[str], min_voxels: int, patient_id: str
) -> pd.DataFrame:
    """One patient's medians: a row per (category, feature) with ≥ `min_voxels` non-missing values.

    Args:
        voxels: the patient's voxel rows (`category` and the feature columns; NaN where missing).
        features: the feature columns.
        min_voxels: categories with fewer voxels holding a value of a feature are left out for it.
        patient_id: written into the rows.

    Returns:
        DataFrame with MEDIAN_COLUMNS, categories in CATEGORY_ORDER.
    """
    rows = []
    category = voxels["category"].astype(str).to_numpy()
    for cat in CATEGORY_ORDER:
        in_cat = voxels.loc[category == cat]
        for f in features:
            values = in_cat[f].to_numpy(dtype=float, na_value=np.nan)
            values = values[~np.isnan(values)]
            if values.size >= min_voxels:
                rows.append((patient_id, cat, f, float(np.median(values)), int(values.size)))
    return pd.DataFrame(rows, columns=MEDIAN_COLUMNS)


def compare_categories(medians: pd.DataFrame, cfg: StatsConfig) -> pd.DataFrame:
    """Wilcoxon signed-rank (paired) and Mann–Whitney U tests of each progressed category vs NAV→NAV.

    A p-value is NaN where a test cannot run: no patients, or (Wilcoxon) every paired difference is zero.
    """
    from scipy.stats import mannwhitneyu

    from ctvlab.statistics import holm, paired_wilcoxon

    rows = []
    for f in cfg.features:
        per_feature = medians.loc[medians["feature"] == f]
        wide = per_feature.pivot_table(
            index="patient_id", columns="category", values="median", aggfunc="first"
        )
        if STABLE not in wide.columns:
            continue
        stable_all = wide[STABLE].dropna().to_numpy()
        for cat in PROGRESSED:
            if cat not in wide.columns:
                continue
            pairs = wide[[STABLE, cat]].dropna()
            test = paired_wilcoxon(pairs[cat].to_numpy(), pairs[STABLE].to_numpy())
            progressed_all = wide[cat].dropna().to_numpy()
            mw_p = (
                float(mannwhitneyu(progressed_all, stable_all, alternative="two-sided").pvalue)
                if progressed_all.size and stable_all.size
                else float("nan")
            )
            rows.append({
                "feature": f, "category": cat, "n_pairs": len(pairs), "n_zero": test.n_zero,
                "median_difference": test.median_difference, "wilcoxon_p": test.p,
                "n_stable": int(stable_all.size), "n_progressed": int(progressed_all.size), "mannwhitney_p": mw_p,
            })  # fmt: skip
    tests = pd.DataFrame(
        rows, columns=[c for c in TEST_COLUMNS if not c.endswith("_holm") and c != "significant"]
    )
    tests["wilcoxon_p_holm"] = holm(tests["wilcoxon_p"].to_numpy())
    tests["mannwhitney_p_holm"] = holm(tests["mannwhitney_p"].to_numpy())
    primary = tests["wilcoxon_p_holm" if cfg.primary_test == "wilcoxon" else "mannwhitney_p_holm"]
    tests["significant"] = (primary < cfg.significance).to_numpy(dtype=bool)
    return tests[TEST_COLUMNS]


def voxel_statistics(prep: str | Path, patient_ids: Sequence[str] | None, cfg: StatsConfig) -> StatsResult:
    """Per-patient category medians and stable-vs-progressed tests over a prepared dataset.

    Args:
        prep: prepared dataset folder.
        patient_ids: the patients to include (e.g. one treatment cohort); None: every patient with voxels.
        cfg: minimum voxels, significance level, primary test, features.
    """
    import pyarrow.parquet as pq

    paths = PrepPaths(prep)
    if patient_ids is None:
        patient_ids = sorted(p.name.split("=", 1)[1] for p in paths.voxels.glob("patient_id=*") if p.is_dir())
        if not patient_ids:
            raise DataError(f"{paths.voxels} holds no patient partitions: run `ctvlab preprocess` first")
    frames = []
    for pid in patient_ids:
        folder = paths.voxel_partition(pid)
        if not folder.is_dir():
            raise DataError(f"patient {pid}: no voxel rows at {folder}; run `ctvlab preprocess` again")
        # The statistics are cheap: one patient's partition at a time, read straight with pyarrow.
        voxels = pq.read_table(folder, columns=["category", *cfg.features]).to_pandas()
        frames.append(category_medians(voxels, cfg.features, cfg.min_voxels, pid))
    medians = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=MEDIAN_COLUMNS)
    return StatsResult(
        medians=medians,
        tests=compare_categories(medians, cfg),
        primary_test=cfg.primary_test,
        significance=cfg.significance,
    )


def statistics_by_cohort(
    prep: str | Path, cohorts: Mapping[str, str], cfg: StatsConfig
) -> tuple[dict[str, StatsResult], pd.DataFrame]:
    """The voxel statistics of each treatment cohort apart (Supplementary Fig. 1, "by therapy group").

    Args:
        cohorts: patient id → cohort (SOC, ATT, ENZA).

    Returns:
        (cohort → StatsResult, every cohort's tests in one table with a `cohort` column). Holm's adjustment
        runs within each cohort's family of tests, as each cohort is its own figure.
    """
    groups: dict[str, list[str]] = {}
    for pid, cohort in sorted(cohorts.items()):
        groups.setdefault(str(cohort), []).append(pid)
    results = {c: voxel_statistics(prep, ids, cfg) for c, ids in sorted(groups.items())}
    tables = [r.tests.assign(cohort=c, n_patients=len(groups[c])) for c, r in results.items()]
    return results, (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame())
