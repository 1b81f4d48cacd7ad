"""The clinical draw (no images) against Table 1 of the study."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.config import SynthConfig
from ctvlab.synth.clinical import COHORTS, STUDY, STUDY_RANGES, allocate, draw_cohort, split_normal_ppf
from ctvlab.synth.table1 import compare_to_study, report_from_plans


@pytest.mark.parametrize(
    ("n", "weights", "expected"),
    [
        (101, (44, 27, 30), [44, 27, 30]),
        (10, (44, 27, 30), [4, 3, 3]),
        (3, (44, 27, 30), [1, 1, 1]),
        (5, (1, 1), [3, 2]),  # tie: the first category takes the remainder
        (7, (7, 0, 0), [7, 0, 0]),
    ],
)
def test_allocate_largest_remainder(n, weights, expected):
    assert allocate(n, weights).tolist() == expected


@pytest.mark.parametrize(
    ("median", "low", "high", "log"), [(7.0, 0.8, 25.9, True), (53.0, 25.0, 77.0, False)]
)
def test_split_normal_quantiles(median, low, high, log):
    q = np.array([1e-6, 0.5, 1 - 1e-6])
    assert split_normal_ppf(q, median, low, high, log) == pytest.approx([low, median, high])


def test_draw_of_101_patients_matches_table_1():
    report = report_from_plans(draw_cohort(SynthConfig(n_patients=101, seed=0)))
    assert compare_to_study(report, groups=("all", "SOC", "ATT", "ENZA")) == []
    g = report.groups["all"]
    # categorical fields are allocated exactly at the study's size
    assert [report.groups[c].n for c in COHORTS] == [STUDY[c].n for c in COHORTS]
    assert tuple(g.resection.values()) == STUDY["all"].resection
    assert tuple(g.progression.values()) == STUDY["all"].progression
    assert tuple(g.pattern.values()) == STUDY["all"].pattern
    for c in ("SOC", "ATT", "ENZA"):
        assert tuple(report.groups[c].pattern.values()) == STUDY[c].pattern
    # ranges stay inside the study's
    for field in ("lesion_cm3", "age"):
        low, high = STUDY_RANGES[field]
        assert getattr(g, field).min >= low and getattr(g, field).max <= high


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_draw_is_within_tolerance_for_other_seeds(seed):
    report = report_from_plans(draw_cohort(SynthConfig(n_patients=101, seed=seed)))
    assert compare_to_study(report) == []


def test_clinical_relations():
    plans = draw_cohort(SynthConfig(n_patients=101, seed=0))
    assert all(p.os_months >= p.pfs_months for p in plans)
    # CEL-only progressors are the patients who recur inside the T2L (Results: the same 5/1/1)
    assert all((p.progression_type == "CEL") == (p.pattern == "within T2L") for p in plans)
    beyond = [p.tumour.advance_mm for p in plans if p.pattern == "beyond 2 cm"]
    within = [p.tumour.advance_mm for p in plans if p.pattern == "within 2 cm"]
    assert min(beyond) > 20.0 and max(within) < 20.0 and max(beyond) < 40.0
    # ATT: enhancement needs a higher density at progression (bevacizumab), later progression
    att = [p for p in plans if p.cohort == "ATT"]
    soc = [p for p in plans if p.cohort == "SOC"]
    assert all(p.tumour.cel_density_progression > p.tumour.cel_density for p in att)
    assert np.median([p.pfs_months for p in att]) > np.median([p.pfs_months for p in soc])
    # late progressors recur beyond 2 cm more often than early ones
    late = [p.pattern == "beyond 2 cm" for p in plans if p.pfs_months >= 7 and p.progression_type != "CEL"]
    early = [p.pattern == "beyond 2 cm" for p in plans if p.pfs_months < 7 and p.progression_type != "CEL"]
    assert np.mean(late) > np.mean(early)
    assert sum(not p.has_mrsi for p in plans) == 5  # 5% of 101


def test_draw_is_deterministic():
    a = draw_cohort(SynthConfig(n_patients=30, seed=4))
    b = draw_cohort(SynthConfig(n_patients=30, seed=4))
    c = draw_cohort(SynthConfig(n_patients=30, seed=5))
    assert a == b
    assert [p.clinical() for p in a] != [p.clinical() for p in c]
