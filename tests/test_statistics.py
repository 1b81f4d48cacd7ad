"""The shared statistics against hand-computed cases and independent implementations: the Wilcoxon test
against an exact enumeration of sign flips, Holm against hand-worked adjustments, the patient bootstrap's
coverage of a known AUC."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import norm

from ctvlab.statistics import (
    FIGURE_STAR_LEVELS,
    VOXEL_STAR_LEVELS,
    auc_with_patient_ci,
    holm,
    paired_wilcoxon,
    patient_bootstrap,
    stars,
)


@pytest.mark.parametrize(
    "p, levels, mark",
    [(0.2, FIGURE_STAR_LEVELS, "ns"), (0.04, FIGURE_STAR_LEVELS, "*"), (0.004, FIGURE_STAR_LEVELS, "**"),
     (0.0004, FIGURE_STAR_LEVELS, "***"), (0.00004, FIGURE_STAR_LEVELS, "***"),
     (0.00004, VOXEL_STAR_LEVELS, "****"), (0.05, FIGURE_STAR_LEVELS, "ns"), (math.nan, FIGURE_STAR_LEVELS, "")],
)  # fmt: skip
def test_stars_follow_the_papers_levels(p, levels, mark):
    assert stars(p, levels) == mark


def exact_signed_rank_p(diff: np.ndarray) -> float:
    """Two-sided exact p of the signed-rank statistic by enumerating every sign assignment (no ties)."""
    d = diff[diff != 0]
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    observed = ranks[d > 0].sum()
    stats = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s)
        for signs in itertools.product([0, 1], repeat=d.size)
    ]
    stats = np.asarray(stats)
    lower, upper = np.mean(stats <= observed), np.mean(stats >= observed)
    return min(1.0, 2 * min(lower, upper))


def test_paired_wilcoxon_drops_zero_differences_and_matches_an_exact_enumeration():
    a = np.array([3.1, 2.0, 5.5, 1.0, 4.0, 7.25, 2.5, np.nan])
    b = np.array([2.0, 2.0, 3.0, 1.7, 1.0, 3.0, 0.75, 1.0])  # one zero difference, one missing pair
    t = paired_wilcoxon(a, b)
    assert (t.n, t.n_zero) == (6, 1)
    diff = (a - b)[:-1]
    assert t.median_difference == pytest.approx(float(np.median(diff)))
    assert t.p == pytest.approx(exact_signed_rank_p(diff), abs=1e-12)


def test_paired_wilcoxon_without_a_non_zero_difference_is_no_test():
    t = paired_wilcoxon([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(t.p) and (t.n, t.n_zero) == (0, 2)


def test_holm_against_hand_worked_adjustments():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # a NaN is no test: it stays NaN and the family has three members
    got = holm([0.01, math.nan, 0.02, 0.5])
    assert math.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2, 3]], [0.03, 0.04, 0.5])
    np.testing.assert_allclose(holm([0.9, 0.8]), [1.0, 1.0])  # 0.8 x 2 = 1.6 is capped at 1; 0.9 follows it


def test_patient_bootstrap_of_a_mean_matches_its_standard_error():
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1.0, 400)
    ci = patient_bootstrap([str(i) for i in range(400)], lambda idx: float(values[idx].mean()), n_boot=2000)
    half = (ci.high - ci.low) / 2
    assert half == pytest.approx(1.96 * values.std(ddof=1) / math.sqrt(400), rel=0.12)
    assert ci.low < ci.estimate < ci.high and ci.n_boot == 2000


def fabricated_cohort(rng, n_patients=30, n_voxels=80):
    """Negatives N(0, 1) in every patient; a patient's positives N(d_i, 1) with d_i ~ N(1, 0.5²): the
    pooled AUC is Φ(1 / √2.25) and the mean per-patient AUC is E[Φ(d_i / √2)]."""
    y, score, patient = [], [], []
    for i in range(n_patients):
        d = rng.normal(1.0, 0.5)
        pos = rng.random(n_voxels) < 0.3
        y.append(pos.astype(int))
        score.append(rng.normal(0.0, 1.0, n_voxels) + d * pos)
        patient.append(np.full(n_voxels, f"p{i:02d}"))
    return np.concatenate(y), np.concatenate(score), np.concatenate(patient)


def test_patient_bootstrap_intervals_cover_the_true_auc():
    true_pooled = norm.cdf(1.0 / math.sqrt(2.25))
    grid = np.linspace(-4, 6, 4001)
    true_per_patient = float(np.trapezoid(norm.cdf(grid / math.sqrt(2)) * norm.pdf(grid, 1.0, 0.5), grid))
    rng = np.random.default_rng(7)
    covered = {"pooled": 0, "per_patient": 0}
    replicates = 30
    for r in range(replicates):
        pooled, per_patient = auc_with_patient_ci(*fabricated_cohort(rng), n_boot=300, seed=r)
        covered["pooled"] += pooled.low <= true_pooled <= pooled.high
        covered["per_patient"] += per_patient.low <= true_per_patient <= per_patient.high
    # nominal 95%: with 30 replicates, fewer than 24 covered would be far outside chance (binomial p < 0.001)
    assert covered["pooled"] >= 24 and covered["per_patient"] >= 24, covered


def test_weighted_auc_with_unit_weights_is_sklearns_auc_and_weights_act_as_repeats():
    from sklearn.metrics import roc_auc_score

    from ctvlab.statistics import weighted_auc_factory

    rng = np.random.default_rng(5)
    y = rng.random(500) < 0.3
    score = np.round(rng.normal(0, 1, 500) + y, 1)  # rounded: many ties
    auc = weighted_auc_factory(y, score)
    assert auc(np.ones(500)) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    w = rng.integers(0, 4, 500)
    repeated = np.repeat(np.arange(500), w)
    assert auc(w) == pytest.approx(roc_auc_score(y[repeated], score[repeated]), abs=1e-12)
