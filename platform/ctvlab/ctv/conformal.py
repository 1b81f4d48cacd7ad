"""Coverage with a guarantee: the model CTV's threshold chosen by conformal risk control.

A CTV rule with a coverage target (say 95%) picks the probability threshold on calibration patients (held
out from training) so that, for a NEW patient exchangeable with them, the expected fraction of the new
progression that the CTV misses is at most 1 − target (Angelopoulos, Bates, Fisch, Lei, Schuster,
"Conformal Risk Control", ICLR 2024, Theorem 1). The loss of patient i at threshold t is

    L_i(t) = |new progression of i outside CTV_i(t)| / |new progression of i|   (0 without any),

bounded by B = 1 and non-increasing as t falls (a lower threshold gives a CTV that contains the higher one's:
`ctvlab.ctv.construct.model_ctv` only adds voxels as t falls). With n calibration patients and R̂(t) the mean
loss, the rule takes the LARGEST threshold t on the grid with

    n/(n + 1) · R̂(t) + B/(n + 1) ≤ α,   α = 1 − target.

What is guaranteed: the mean miss fraction over new patients drawn like the calibration patients, on
average over the draw of the calibration set. What is not: the miss of any one patient (per-patient
coverage is very skewed: most are covered fully, a few badly), and patients from another population
(another site, scanner or protocol) without recalibration. The term B/(n + 1) also means a target is
reachable only with enough calibration patients: n ≥ 1/α − 1 (19 for 95%, 99 for 99%).

Beside the mean, `rcps_threshold` bounds the share of patients covered below a level c (risk-controlling
prediction sets, Bates et al. 2021): with probability 1 − δ over the calibration draw, P(coverage < c) ≤ ε,
from a Clopper–Pearson upper bound on that share at each threshold, tested in a fixed sequence from the
lowest threshold up (Learn-then-Test, Angelopoulos et al. 2021).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CoverageRule", "crc_threshold", "min_calibration_patients", "miss_fractions", "rcps_threshold"]


@dataclass(frozen=True)
class CoverageRule:
    """A threshold chosen for a coverage target, or None where the target is out of reach."""

    target: float  # the coverage asked for (mean over patients): 1 − α
    threshold: float | None
    n_calibration: int
    calibration_miss: float  # R̂ at the chosen threshold (NaN when none)
    bound: float  # n/(n + 1) · R̂ + B/(n + 1) at the chosen threshold (NaN when none)
    reason: str = ""  # why no threshold was chosen

    @property
    def name(self) -> str:
        """The CTV's name: `cov95` for a 95% target."""
        return f"cov{round(self.target * 100):d}"


def min_calibration_patients(target: float, bound: float = 1.0) -> int:
    """The fewest calibration patients with which a mean-coverage `target` can be guaranteed at all."""
    alpha = 1.0 - target
    return int(np.ceil(bound / alpha - 1.0 - 1e-9))


def miss_fractions(
    ctv_masks_by_threshold: Sequence[Sequence[np.ndarray]], new: Sequence[np.ndarray]
) -> np.ndarray:
    """L_i(t): the share of patient i's new progression outside its CTV at each threshold.

    Args:
        ctv_masks_by_threshold: per patient, one CTV mask per threshold of the grid.
        new: per patient, the new-progression mask (`ctvlab.ctv.coverage.new_progression`).

    Returns:
        (patients, thresholds) float array in [0, 1]; 0 for a patient without new progression.
    """
    out = np.zeros((len(new), len(ctv_masks_by_threshold[0]) if len(new) else 0))
    for i, (masks, prog) in enumerate(zip(ctv_masks_by_threshold, new, strict=True)):
        prog = np.asarray(prog, dtype=bool)
        n = int(prog.sum())
        if n == 0:
            continue
        for j, ctv in enumerate(masks):
            out[i, j] = float((prog & ~np.asarray(ctv, dtype=bool)).sum()) / n
    return out


def crc_threshold(
    losses: np.ndarray, thresholds: Sequence[float], target: float, bound: float = 1.0
) -> CoverageRule:
    """Conformal risk control: the largest threshold whose corrected calibration risk is at most 1 − target.

    Args:
        losses: (n calibration patients, thresholds) miss fractions (`miss_fractions`), non-increasing as
            the threshold falls.
        thresholds: the grid, any order.
        target: the mean coverage to guarantee, in (0, 1).
        bound: B, the loss's upper bound (1 for a fraction).

    Raises:
        ValueError: a malformed table, or losses that rise as the threshold falls.
    """
    losses = np.asarray(losses, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    if not 0 < target < 1:
        raise ValueError(f"a coverage target is a fraction in (0, 1), got {target}")
    if losses.ndim != 2 or losses.shape[1] != t.size:
        raise ValueError(f"losses must be (patients, {t.size} thresholds), got {losses.shape}")
    order = np.argsort(-t)  # largest threshold first: the smallest CTV
    t, losses = t[order], losses[:, order]
    if np.any(np.diff(losses, axis=1) > 1e-12):
        raise ValueError("a patient's miss fraction rises as the threshold falls: the CTVs are not nested")
    n, alpha = losses.shape[0], 1.0 - target
    if n < min_calibration_patients(target, bound):
        return CoverageRule(target, None, n, float("nan"), float("nan"),
                            f"{n} calibration patients cannot guarantee {target:.0%}: it needs at least "
                            f"{min_calibration_patients(target, bound)}")  # fmt: skip
    risk = losses.mean(axis=0)
    corrected = n / (n + 1) * risk + bound / (n + 1)
    ok = np.flatnonzero(corrected <= alpha + 1e-12)
    if ok.size == 0:
        return CoverageRule(target, None, n, float("nan"), float("nan"),
                            f"even the lowest threshold ({t[-1]:g}) misses {risk[-1]:.1%} of the calibration "
                            f"patients' new progression on average")  # fmt: skip
    j = int(ok[0])
    return CoverageRule(target, float(t[j]), n, float(risk[j]), float(corrected[j]))


def rcps_threshold(
    losses: np.ndarray, thresholds: Sequence[float], level: float, epsilon: float, delta: float = 0.1
) -> float | None:
    """The largest threshold at which, with probability 1 − δ, at most a share ε of new patients are covered
    below `level` (a patient's coverage is 1 − its miss fraction); None where no threshold qualifies.

    Learn-then-Test's fixed-sequence procedure: from the lowest threshold (the largest CTV) upwards, reject
    "share > ε" while the Clopper–Pearson upper bound of the calibration share is at most ε, and stop at
    the first threshold where it is not; the answer is the last one rejected.
    """
    from scipy.stats import beta as beta_dist

    losses = np.asarray(losses, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    order = np.argsort(t)  # lowest threshold first: the largest CTV, the safest
    t, losses = t[order], losses[:, order]
    n = losses.shape[0]
    chosen = None
    for j in range(t.size):
        k = int(np.sum(losses[:, j] > 1.0 - level + 1e-12))
        upper = 1.0 if k >= n else float(beta_dist.ppf(1.0 - delta, k + 1, n - k))  # Clopper–Pearson
        if upper > epsilon:
            break
        chosen = float(t[j])
    return chosen
