"""Conformal risk control for the CTV threshold: hand cases, reachability, and the guarantee by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.ctv.conformal import crc_threshold, min_calibration_patients, miss_fractions, rcps_threshold


def test_hand_case():
    """Four patients, thresholds 0.9 / 0.5 / 0.1; target 50% (α = 0.5). Corrected risk n/(n+1)·R̂ + 1/(n+1):
    at 0.9 R̂ = 0.75 → 0.8; at 0.5 R̂ = 0.25 → 0.4 ≤ 0.5: the largest qualifying threshold is 0.5."""
    losses = np.array([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rule = crc_threshold(losses, [0.9, 0.5, 0.1], target=0.5)
    assert rule.threshold == 0.5 and rule.name == "cov50"
    assert rule.calibration_miss == pytest.approx(0.25) and rule.bound == pytest.approx(0.4)
    # the grid's order does not matter
    assert crc_threshold(losses[:, ::-1], [0.1, 0.5, 0.9], target=0.5).threshold == 0.5


@pytest.mark.parametrize(("target", "n"), [(0.9, 9), (0.95, 19), (0.99, 99)])
def test_a_target_needs_enough_calibration_patients(target, n):
    assert min_calibration_patients(target) == n
    zeros = np.zeros((n - 1, 3))
    rule = crc_threshold(zeros, [0.9, 0.5, 0.1], target)
    assert rule.threshold is None and f"at least {n}" in rule.reason
    assert crc_threshold(np.zeros((n, 3)), [0.9, 0.5, 0.1], target).threshold == 0.9


def test_ctvs_that_are_not_nested_are_refused():
    with pytest.raises(ValueError, match="not nested"):
        crc_threshold(np.array([[0.0, 0.5, 0.0]] * 20), [0.9, 0.5, 0.1], 0.9)


def test_miss_fractions_count_the_new_progression_outside_the_ctv():
    new = np.zeros(10, bool)
    new[[2, 3, 7, 8]] = True
    small, large = np.zeros(10, bool), np.zeros(10, bool)
    small[:4], large[:8] = True, True
    out = miss_fractions([[small, large], [small, large]], [new, np.zeros(10, bool)])
    np.testing.assert_allclose(out, [[0.5, 0.25], [0.0, 0.0]])


def _patients(rng, n, grid):
    """Miss fractions of exchangeable patients: each misses none of its progression below its own threshold
    l_i, a linearly rising share above it, and all of it from l_i + w_i; a fifth have no new progression."""
    low = 0.7 * rng.beta(2, 5, n)[:, None]
    w = rng.uniform(0.02, 0.3, n)[:, None]
    losses = np.clip((grid[None, :] - low) / w, 0.0, 1.0)
    losses[rng.random(n) < 0.2] = 0.0
    return losses


def test_the_guarantee_holds_by_simulation_and_is_not_trivially_conservative():
    """Over 1500 random draws of 30 calibration and 200 test patients, the mean test miss at the chosen
    threshold is at most α (within Monte Carlo error), and close to it rather than far below."""
    rng = np.random.default_rng(0)
    grid = np.linspace(0.0, 1.0, 201)
    for target in (0.9, 0.95):
        alpha = 1 - target
        misses = []
        for _ in range(1500):
            rule = crc_threshold(_patients(rng, 30, grid), grid, target)
            test = _patients(rng, 200, grid)
            misses.append(test[:, int(np.argmin(np.abs(grid - rule.threshold)))].mean())
        mean, se = float(np.mean(misses)), float(np.std(misses) / np.sqrt(len(misses)))
        assert mean <= alpha + 3 * se, (target, mean, se)
        assert mean >= 0.5 * alpha, (target, mean)


def test_rcps_bounds_the_share_of_badly_covered_patients_with_probability_one_minus_delta():
    rng = np.random.default_rng(1)
    grid = np.linspace(0.0, 1.0, 101)
    level, epsilon, delta = 0.9, 0.2, 0.1
    violations, draws = 0, 400
    for _ in range(draws):
        t = rcps_threshold(_patients(rng, 60, grid), grid, level, epsilon, delta)
        assert t is not None
        test = _patients(rng, 2000, grid)
        share = float(np.mean(test[:, int(np.argmin(np.abs(grid - t)))] > 1 - level))
        violations += share > epsilon
    assert violations / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
