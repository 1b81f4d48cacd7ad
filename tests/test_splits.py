"""The U-Net split's role counts: the study's exact 67/16/18 at 101 patients, stratified by cohort;
fractions at any other size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctvlab.config import SplitConfig
from ctvlab.splits import draw_dl_roles, stratified_counts


def cohort_table(sizes: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{c}{i:03d}", c) for c, n in sizes.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["patient_id", "cohort"])


STUDY_SIZES = {"SOC": 44, "ATT": 27, "ENZA": 30}  # Table 1


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_study_cohort_gets_the_papers_exact_counts_stratified(seed):
    patients = cohort_table(STUDY_SIZES)
    cfg = SplitConfig(seed=seed)
    roles = draw_dl_roles(patients, cfg.dl_fractions, seed, cfg.dl_counts)
    assert roles.value_counts().to_dict() == {"train": 67, "val": 16, "test": 18}
    # each cohort's share of a role is its proportional share, rounded (never off by a whole patient)
    for cohort, n in STUDY_SIZES.items():
        got = roles[patients["cohort"] == cohort].value_counts()
        for role, total in zip(("train", "val", "test"), (67, 16, 18), strict=True):
            assert abs(got.get(role, 0) - n * total / 101) < 1, (cohort, role)
    # the paper's 72% and 94% of test patients are whole patients of 18
    assert round(0.72 * 18) == 13 and round(0.94 * 18) == 17


def test_other_sizes_use_the_fractions():
    patients = cohort_table({"SOC": 20, "ATT": 15, "ENZA": 15})
    cfg = SplitConfig()
    roles = draw_dl_roles(patients, cfg.dl_fractions, 0, cfg.dl_counts)
    # per cohort, largest remainder of 0.67/0.16/0.17 (by hand): SOC 13.4/3.2/3.4 -> 14/3/3,
    # ATT and ENZA 10.05/2.4/2.55 -> 10/2/3
    assert roles.value_counts().to_dict() == {"train": 34, "val": 7, "test": 9}
    # without counts the study's cohort gets the fractions' 68/16/17, not the paper's 67/16/18
    no_counts = draw_dl_roles(cohort_table(STUDY_SIZES), cfg.dl_fractions, 0, None)
    assert no_counts.value_counts().to_dict() == {"train": 68, "val": 16, "test": 17}


def test_stratified_counts_add_up_both_ways():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(1, 40, size=rng.integers(1, 5)).tolist()
        n = sum(sizes)
        cuts = np.sort(rng.integers(0, n + 1, size=2))
        totals = (int(cuts[0]), int(cuts[1] - cuts[0]), int(n - cuts[1]))
        table = stratified_counts(sizes, totals)
        assert table.sum(axis=1).tolist() == sizes and tuple(table.sum(axis=0)) == totals
        assert (table >= 0).all()
        share = np.asarray(sizes)[:, None] * np.asarray(totals)[None, :] / n
        assert np.abs(table - share).max() < 2  # within one patient of the share, at worst two


def test_stratified_counts_refuse_totals_of_another_cohort():
    with pytest.raises(ValueError, match="sum to 10"):
        stratified_counts([4, 6], (5, 5, 5))
