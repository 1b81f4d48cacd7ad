"""The statistics every table and figure shares: the paired Wilcoxon test, Holm's adjustment, significance
marks and patient-level bootstrap intervals, each defined once.

- **Paired Wilcoxon signed-rank test** (scipy's, two-sided). Zero differences are dropped before ranking
  (Wilcoxon's original rule, scipy's `zero_method="wilcox"`), and the result says how many pairs were
  tested (`n`) and how many zero differences were dropped (`n_zero`). With no non-zero difference no test
  is possible and p is NaN.
- **Holm's step-down adjustment** (statsmodels' `multipletests(method="holm")`) over the p-values of one
  table (a family of tests); NaN p-values are left out of the family and stay NaN.
- **Significance marks:** the study marks its figures * p < 0.05, ** p < 0.01, *** p < 0.001 (Figs. 2
  and 3) and reports its voxel statistics down to p < 0.0001 (Methods, Statistical analysis): one function,
  two documented level sets.
- **Patient-level bootstrap:** patients are resampled with replacement (their voxels travel with them), so
  an interval reflects the variation between patients, not the far larger and correlated voxel count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

FIGURE_STAR_LEVELS = (0.05, 0.01, 0.001)  # Figs. 2 and 3: *, **, ***
VOXEL_STAR_LEVELS = (0.05, 0.01, 0.001, 0.0001)  # voxel statistics (Methods): down to ****


def stars(p: float | None, levels: Sequence[float] = FIGURE_STAR_LEVELS, ns: str = "ns") -> str:
    """One '*' per level that p falls below; `ns` when p is at or above the first; '' for a missing p."""
    if p is None or math.isnan(p):
        return ""
    n = sum(p < level for level in levels)
    return "*" * n if n else ns


@dataclass(frozen=True)
class PairedTest:
    """A paired Wilcoxon signed-rank test: its p-value, the pairs ranked and the zero differences dropped."""

    p: float
    n: int  # pairs with a non-zero difference: the ones ranked
    n_zero: int  # pairs with a zero difference, dropped before ranking
    median_difference: float  # median of a − b over every pair (zeros included)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of a − b; pairs with a missing value on either side are left out."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    diff = x[keep] - y[keep]
    n_zero = int(np.count_nonzero(diff == 0))
    n = int(diff.size - n_zero)
    median = float(np.median(diff)) if diff.size else math.nan
    if n == 0:
        return PairedTest(math.nan, 0, n_zero, median)
    p = float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedTest(p, n, n_zero, median)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values of one family of tests, in the input's order (NaN stays NaN, outside the
    family)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


@dataclass(frozen=True)
class Interval:
    """A statistic and its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    n_boot: int  # resamples in which the statistic was defined

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def patient_bootstrap(
    patients: Sequence[str],
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of `statistic(chosen)` over resamples of the patients with replacement.

    Args:
        patients: one entry per patient (its id).
        statistic: called with an index array into `patients` (a resample, repeats allowed); returns the
            statistic, or NaN where it is undefined (e.g. a resample without a positive voxel).
        n_boot: resamples.
        level: coverage of the interval.
        seed: the resampling seed (intervals are reproducible).
    """
    n = len(patients)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    estimate = float(statistic(np.arange(n)))
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(estimate, math.nan, math.nan, 0)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), int(values.size))


def per_patient_auc(y: np.ndarray, score: np.ndarray, patient: np.ndarray) -> dict[str, float]:
    """ROC AUC within each patient (NaN for a patient whose voxels are all one class)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for pid in np.unique(patient):
        m = patient == pid
        yy = y[m]
        out[str(pid)] = float(roc_auc_score(yy, score[m])) if 0 < yy.sum() < yy.size else math.nan
    return out


def weighted_auc_factory(y: np.ndarray, score: np.ndarray) -> Callable[[np.ndarray], float]:
    """A fast ROC AUC of (y, score) under per-row weights: `auc(weights)`, ties counted half.

    Scores are sorted once; each call is O(rows) (two weighted bincounts over the tie groups), so a
    bootstrap that reweights rows by how often their patient was drawn costs no sort per resample.
    """
    y = np.asarray(y).astype(bool)
    _, group = np.unique(np.asarray(score, dtype=float), return_inverse=True)
    n_groups = int(group.max()) + 1 if group.size else 0

    def auc(weights: np.ndarray) -> float:
        w = np.asarray(weights, dtype=float)
        pos = np.bincount(group, weights=w * y, minlength=n_groups)
        neg = np.bincount(group, weights=w * ~y, minlength=n_groups)
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos <= 0 or total_neg <= 0:
            return math.nan
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        return float((pos * (below + 0.5 * neg)).sum() / (total_pos * total_neg))

    return auc


def auc_with_patient_ci(
    y: np.ndarray, score: np.ndarray, patient: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[Interval, Interval]:
    """The pooled voxel AUC and the mean per-patient AUC, each with a patient-level bootstrap 95% interval.

    Returns:
        (pooled, per_patient_mean). The pooled AUC ranks every voxel of every patient together; the
        per-patient mean averages the AUCs of patients that have both classes.
    """
    y, score, patient = np.asarray(y).astype(int), np.asarray(score, dtype=float), np.asarray(patient)
    ids, code = np.unique(patient, return_inverse=True)
    weighted_auc = weighted_auc_factory(y, score)
    per = per_patient_auc(y, score, patient)
    per_values = np.array([per[str(pid)] for pid in ids])

    def pooled(chosen: np.ndarray) -> float:
        times_drawn = np.bincount(chosen, minlength=len(ids))
        return weighted_auc(times_drawn[code])

    def mean_per_patient(chosen: np.ndarray) -> float:
        v = per_values[chosen]
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else math.nan

    return (
        patient_bootstrap(list(ids), pooled, n_boot=n_boot, seed=seed),
        patient_bootstrap(list(ids), mean_per_patient, n_boot=n_boot, seed=seed),
    )
