"""The ceiling of a synthetic cohort (`ctvlab.synth.ceiling`): cases small enough to count by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.synth.ceiling import (
    MarginCoverage,
    densest,
    distance_mm,
    margin_coverages,
    new_progression,
    normal_appearing_ring,
    summarise_ceiling,
)


def line(values) -> np.ndarray:
    """A row of cells along the first axis, shape (n, 1, 1)."""
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


def test_distance_is_in_millimetres_with_the_spacing():
    t2l = line([1, 0, 0, 0]).astype(bool)
    np.testing.assert_allclose(distance_mm(t2l, 2.5).ravel(), [0.0, 2.5, 5.0, 7.5])
    with pytest.raises(ValueError, match="empty"):
        distance_mm(np.zeros((3, 1, 1), dtype=bool), 1.0)


def test_ring_and_new_progression_leave_out_the_lesion_the_cavity_and_the_far_brain():
    # cells:        0  1  2  3  4  5  (spacing 10 mm; T2L at 0, cavity at 1)
    t2l = line([1, 0, 0, 0, 0, 0]).astype(bool)
    cavity = line([0, 1, 0, 0, 0, 0]).astype(bool)
    brain = line([1, 1, 1, 1, 1, 0]).astype(bool)
    dist = distance_mm(t2l, 10.0)
    ring = normal_appearing_ring(brain, t2l, cavity, dist, ring_mm=30.0)
    assert ring.ravel().tolist() == [False, False, True, True, False, False]  # 40 mm: beyond the ring
    u_prog = line([1.0, 0.9, 0.3, 0.1, 0.9, 0.9])
    assert new_progression(u_prog, ring, 0.25).ravel().tolist() == [False, False, True, False, False, False]


# Ten cells 1 mm apart, the T2L at cell 0. New progression at 2, 7 and 8: one cell near the lesion, two
# far out where the pre-RT density is high (an invisible focus).
DENSITY = [1.0, 0.20, 0.10, 0.05, 0.01, 0.0, 0.0, 0.15, 0.12, 0.0]
NEW = [0, 0, 1, 0, 0, 0, 0, 1, 1, 0]


@pytest.mark.parametrize(
    ("margin_mm", "cells", "density", "margin"),
    [
        # 3 mm: the margin is cells 1-3 (covers cell 2: 1/3); the 3 densest are 1, 7, 8 (2/3)
        (3.0, 3, 2 / 3, 1 / 3),
        # 1 mm: the margin is cell 1 (none); the densest is cell 1 too
        (1.0, 1, 0.0, 0.0),
        # 5 mm: cells 1-5 (1/3); the 5 densest are 1, 7, 8, 2, 3 (all three)
        (5.0, 5, 1.0, 1 / 3),
        # 9 mm: every ring cell either way
        (9.0, 9, 1.0, 1.0),
    ],
)
def test_margin_coverages_by_hand(margin_mm, cells, density, margin):
    t2l = line([1] + [0] * 9).astype(bool)
    dist = distance_mm(t2l, 1.0)
    ring = normal_appearing_ring(np.ones_like(t2l), t2l, np.zeros_like(t2l), dist)
    (cov,) = margin_coverages(line(DENSITY), dist, ring, line(NEW).astype(bool), [margin_mm])
    assert cov == MarginCoverage(margin_mm, cells, pytest.approx(density), pytest.approx(margin))
    assert cov.gain == pytest.approx(density - margin)


def test_densest_breaks_ties_by_distance_so_a_flat_map_is_the_margin():
    dist = line([3.0, 1.0, 2.0, 1.0])
    flat = line([0.0, 0.0, 0.0, 0.0])
    everywhere = np.ones(flat.shape, dtype=bool)
    assert densest(flat, dist, everywhere, 2).ravel().tolist() == [False, True, False, True]
    assert densest(line([0.5, 0.0, 0.0, 0.0]), dist, everywhere, 2).ravel().tolist() == [
        True,
        True,
        False,
        False,
    ]
    assert densest(flat, dist, everywhere, 10).sum() == 4  # never more than the candidates
    assert densest(flat, dist, line([1, 0, 0, 0]).astype(bool), 3).ravel().tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_no_new_progression_is_an_error_not_a_zero():
    t2l = line([1, 0, 0]).astype(bool)
    dist = distance_mm(t2l, 1.0)
    ring = ~t2l
    with pytest.raises(ValueError, match="no new progression"):
        margin_coverages(line([1, 0, 0]), dist, ring, np.zeros_like(t2l), [1.0])


def test_summary_mean_interval_and_paired_test():
    patients = [[MarginCoverage(10.0, 5, d, m)] for d, m in [(0.9, 0.5), (0.8, 0.6), (0.7, 0.7), (1.0, 0.4)]]
    (s,) = summarise_ceiling(patients, n_boot=2000, seed=0)
    assert s.patients == 4 and s.margin_mm == 10.0
    assert s.mean_gain == pytest.approx((0.4 + 0.2 + 0.0 + 0.6) / 4)
    assert s.ci_low <= s.mean_gain <= s.ci_high
    assert s.ci_low >= 0.0 and s.ci_high <= 0.6  # a mean of resampled gains stays within their range
    assert 0.0 < s.wilcoxon_p < 1.0
    (tie,) = summarise_ceiling([[MarginCoverage(10.0, 5, 0.5, 0.5)]] * 3)
    assert tie.mean_gain == 0.0 and tie.wilcoxon_p == 1.0
    assert summarise_ceiling([]) == []
