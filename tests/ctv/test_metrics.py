"""CTV metrics on shapes with hand-computed answers, against MONAI and an independent surface distance."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from ctvlab.ctv.metrics import (
    choose_threshold,
    confusion,
    coverage,
    ctv_metrics,
    ctv_wilcoxon,
    dice,
    hd95,
    pcc,
    pcc_weights,
    sensitivity,
    specificity,
    tversky,
)


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def _ball(shape, centre, radius) -> np.ndarray:
    idx = np.indices(shape)
    return sum((idx[i] - centre[i]) ** 2 for i in range(3)) < radius**2


# A 20³ brain; target a 10³ cube; pred a 12×10×10 box overlapping 8×10×10 of it:
# TP = 800, FP = 400, FN = 200, TN = 8000 − 1400 = 6600.
BRAIN = np.ones((20, 20, 20), dtype=bool)
TARGET = _box(BRAIN.shape, (5, 5, 5), (15, 15, 15))
PRED = _box(BRAIN.shape, (7, 5, 5), (19, 15, 15))
# PCC: f = 1000/8000 = 1/8, β = 8/9, α = 1/9 → 800 / (800 + 400/9 + 1600/9) = 7200/9200.
HAND = {
    "sensitivity": 800 / 1000,
    "specificity": 6600 / 7000,
    "ppv": 800 / 1200,
    "dice": 1600 / 2200,
    "tversky": 800 / (800 + 0.02 * 400 + 0.98 * 200),
    "pcc": 7200 / 9200,
    "volume_cm3": 1200 * 27 / 1000,  # at 3 mm voxels
}


def test_confusion_of_the_cube_and_its_shifted_box():
    assert confusion(PRED, TARGET, BRAIN) == (800, 400, 200, 6600)


def test_confusion_counts_only_within_the_brain():
    brain = _box(BRAIN.shape, (0, 0, 0), (20, 20, 10))  # the lower half: z < 10
    # Within it: target 10×10×5 = 500, pred 12×10×5 = 600, overlap 8×10×5 = 400.
    assert confusion(PRED, TARGET, brain) == (400, 200, 100, 4000 - 700)


@pytest.mark.parametrize(
    "name", ["sensitivity", "specificity", "ppv", "dice", "tversky", "pcc", "volume_cm3"]
)
def test_hand_computed_metrics_of_the_shifted_box(name):
    got = ctv_metrics(PRED, TARGET, BRAIN, (3.0, 3.0, 3.0))
    assert got[name] == pytest.approx(HAND[name], rel=1e-12)


def test_single_metric_functions_agree_with_ctv_metrics():
    got = ctv_metrics(PRED, TARGET, BRAIN, (1.0, 1.0, 1.0))
    assert sensitivity(PRED, TARGET, BRAIN) == got["sensitivity"]
    assert specificity(PRED, TARGET, BRAIN) == got["specificity"]
    assert dice(PRED, TARGET, BRAIN) == got["dice"]
    assert tversky(PRED, TARGET, BRAIN) == got["tversky"]
    assert pcc(PRED, TARGET, BRAIN) == got["pcc"]
    assert hd95(PRED, TARGET, (1.0, 1.0, 1.0)) == got["hd95_mm"]


def test_tversky_with_equal_weights_is_dice():
    assert tversky(PRED, TARGET, BRAIN, alpha=0.5, beta=0.5) == pytest.approx(dice(PRED, TARGET, BRAIN))


def test_tversky_matches_monai_tversky_loss():
    from monai.losses import TverskyLoss

    loss = TverskyLoss(alpha=0.02, beta=0.98, smooth_nr=0.0, smooth_dr=0.0, include_background=True)
    p = torch.as_tensor(PRED[None, None], dtype=torch.float32)
    t = torch.as_tensor(TARGET[None, None], dtype=torch.float32)
    assert 1.0 - float(loss(p, t)) == pytest.approx(tversky(PRED, TARGET, BRAIN), abs=1e-6)


@pytest.mark.parametrize(
    ("n_target", "n_brain", "alpha", "beta"),
    [(1000, 8000, 1 / 9, 8 / 9), (0, 500, 0.0, 1.0), (100, 100, 0.5, 0.5), (2, 98, 0.02, 0.98)],
)
def test_pcc_weights_follow_eq_1(n_target, n_brain, alpha, beta):
    a, b = pcc_weights(n_target, n_brain)
    assert (a, b) == (pytest.approx(alpha), pytest.approx(beta))


def test_pcc_on_a_larger_brain_by_hand():
    # The same boxes in a brain twice as large: f = 1/16, β = 16/17, α = 1/17,
    # PCC = 800 / (800 + 400/17 + 200·16/17) = 13600/17200.
    pad = ((0, 20), (0, 0), (0, 0))
    big = np.ones((40, 20, 20), dtype=bool)
    assert pcc(np.pad(PRED, pad), np.pad(TARGET, pad), big) == pytest.approx(13600 / 17200, rel=1e-12)


def test_pcc_penalises_a_missed_voxel_more_than_an_extra_one():
    missed = TARGET.copy()
    missed[5, 5, 5] = False
    extra = TARGET.copy()
    extra[4, 5, 5] = True
    assert pcc(missed, TARGET, BRAIN) < pcc(extra, TARGET, BRAIN) < 1.0


# --- edge cases ----------------------------------------------------------------------------------------

EMPTY = np.zeros_like(BRAIN)


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        # empty prediction: nothing found, nothing wrongly included
        (EMPTY, TARGET, {"sensitivity": 0.0, "specificity": 1.0, "ppv": math.nan, "dice": 0.0, "tversky": 0.0,
                         "pcc": 0.0, "hd95_mm": math.nan, "volume_cm3": 0.0}),
        # empty target: sensitivity undefined, every predicted voxel a false positive
        (PRED, EMPTY, {"sensitivity": math.nan, "specificity": 6800 / 8000, "ppv": 0.0, "dice": 0.0, "tversky": 0.0,
                       "pcc": 0.0, "hd95_mm": math.nan, "volume_cm3": 1.2}),
        # both empty: perfect agreement
        (EMPTY, EMPTY, {"sensitivity": math.nan, "specificity": 1.0, "dice": 1.0, "tversky": 1.0,
                        "pcc": 1.0, "hd95_mm": 0.0, "volume_cm3": 0.0}),
        # everything predicted
        (BRAIN, TARGET, {"sensitivity": 1.0, "specificity": 0.0, "dice": 2000 / 9000,
                         "tversky": 1000 / (1000 + 0.02 * 7000), "pcc": 1000 / (1000 + 7000 / 9),
                         "volume_cm3": 8.0}),
        # the target fills the brain: specificity undefined
        (TARGET, BRAIN, {"sensitivity": 1000 / 8000, "specificity": math.nan, "dice": 2000 / 9000}),
    ],
)  # fmt: skip
def test_edge_cases_have_defined_values(pred, target, expected):
    got = ctv_metrics(pred, target, BRAIN, (1.0, 1.0, 1.0))
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value), name


@pytest.mark.parametrize(
    ("pred", "region", "expected"),
    [(PRED, TARGET, 0.8), (EMPTY, TARGET, 0.0), (PRED, EMPTY, math.nan), (TARGET, TARGET, 1.0)],
)
def test_coverage(pred, region, expected):
    got = coverage(pred, region)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


# --- hd95 ----------------------------------------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside it (or outside the array)."""
    p = np.pad(mask, 1)
    inner = p.copy()
    for axis in range(3):
        for shift in (1, -1):
            inner &= np.roll(p, shift, axis=axis)
    return (p & ~inner)[1:-1, 1:-1, 1:-1]


def _brute_force_hd(a, b, spacing, q=95.0) -> float:
    sa = np.argwhere(_surface(a)) * np.asarray(spacing)
    sb = np.argwhere(_surface(b)) * np.asarray(spacing)
    d_ab = cKDTree(sb).query(sa)[0]
    d_ba = cKDTree(sa).query(sb)[0]
    return max(np.percentile(d_ab, q), np.percentile(d_ba, q))


@pytest.mark.parametrize(
    ("spacing", "shift_axis", "shift", "expected_mm"),
    [
        # The shifted face of one cube lies exactly `shift` voxels from the other's surface, and that face
        # alone is 100 of the 488 surface voxels of a 10-cube (> 5%), so HD95 = shift × voxel size.
        ((1.0, 1.0, 1.0), 0, 2, 2.0),
        ((3.0, 3.0, 3.0), 0, 2, 6.0),
        ((1.0, 1.0, 3.0), 2, 2, 6.0),  # shifted along the 3 mm axis
        ((1.0, 1.0, 3.0), 0, 2, 2.0),  # the same shift along a 1 mm axis
        ((2.0, 1.0, 1.0), 0, 3, 6.0),
    ],
)
def test_hd95_of_a_cube_and_its_shifted_copy(spacing, shift_axis, shift, expected_mm):
    lo = np.array([3, 3, 3])
    hi = lo + 10
    offset = np.eye(3, dtype=int)[shift_axis] * shift
    a = _box((20, 20, 20), lo, hi)
    b = _box((20, 20, 20), lo + offset, hi + offset)
    assert hd95(a, b, spacing) == pytest.approx(expected_mm)
    assert hd95(a, b, spacing, percentile=100) == pytest.approx(expected_mm)


def test_hd95_of_two_spheres_is_within_one_voxel_of_the_analytic_value():
    r, d = 10.0, 4.0  # radius and centre offset, in 1 mm voxels
    a = _ball((40, 40, 40), (18, 20, 20), r)
    b = _ball((40, 40, 40), (18 + d, 20, 20), r)
    # A point of sphere A at polar angle θ from the offset lies |sqrt(r² + d² − 2rd·cosθ) − r| from
    # sphere B; cosθ is uniform on [−1, 1] over the sphere's surface (Archimedes). Both directions agree.
    t = np.linspace(-1.0, 1.0, 200_001)
    analytic = np.percentile(np.abs(np.sqrt(r * r + d * d - 2 * r * d * t) - r), 95)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(analytic, abs=1.0)
    assert hd95(a, b, (1.0, 1.0, 1.0), percentile=100) == pytest.approx(d, abs=1.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.5, 3.0), (3.0, 3.0, 3.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_an_independent_implementation(spacing, seed):
    rng = np.random.default_rng(seed)
    a = ndimage.binary_dilation(rng.random((18, 20, 16)) > 0.97, iterations=2)
    b = ndimage.binary_dilation(rng.random((18, 20, 16)) > 0.97, iterations=2)
    assert hd95(a, b, spacing) == pytest.approx(_brute_force_hd(a, b, spacing), abs=1e-4)


def test_anisotropic_spacing_scales_hd95_along_its_axis():
    a = _ball((30, 30, 30), (14, 14, 12), 6)
    b = _ball((30, 30, 30), (14, 14, 15), 6)  # 3 voxels apart along z only
    iso = hd95(a, b, (1.0, 1.0, 1.0))
    assert hd95(a, b, (1.0, 1.0, 2.0)) > iso
    assert hd95(a, b, (2.0, 2.0, 2.0)) == pytest.approx(2 * iso)


@pytest.mark.parametrize(
    ("a", "b", "expected"), [(EMPTY, EMPTY, 0.0), (EMPTY, TARGET, math.nan), (TARGET, EMPTY, math.nan)]
)
def test_hd95_empty_mask_convention(a, b, expected):
    got = hd95(a, b, (3.0, 3.0, 3.0))
    assert math.isnan(got) if math.isnan(expected) else got == expected


def test_identical_masks_have_zero_hd95():
    assert hd95(TARGET, TARGET, (3.0, 3.0, 3.0)) == 0.0


# --- threshold choice ------------------------------------------------------------------------------------


def test_choose_threshold_on_an_obvious_case():
    # Target voxels have probability 0.7, a ring of 0.4 surrounds them, everything else 0.1. Any
    # threshold in (0.4, 0.7] reproduces the target exactly (Tversky 1); the smaller one wins the tie.
    shape = (16, 16, 16)
    target = _box(shape, (5, 5, 5), (10, 10, 10))  # 125 voxels
    ring = _box(shape, (4, 4, 4), (11, 11, 11)) & ~target  # 343 − 125 = 218 voxels
    prob = np.full(shape, 0.1)
    prob[ring] = 0.4
    prob[target] = 0.7
    brain = np.ones(shape, dtype=bool)
    grid = [0.05, 0.3, 0.5, 0.6, 0.8]
    best, table = choose_threshold([prob, prob], [target, target], [brain, brain], grid)
    assert best == 0.5
    assert table == pytest.approx(
        {
            0.05: 125 / (125 + 0.02 * (4096 - 125)),
            0.3: 125 / (125 + 0.02 * 218),
            0.5: 1.0,
            0.6: 1.0,
            0.8: 0.0,
        }
    )
    assert list(table) == grid


def test_choose_threshold_scores_the_model_ctv_when_lesions_are_given():
    # A detached false-positive blob at 0.9 spoils every raw threshold below 0.95, but the model CTV
    # drops it (it does not touch the lesion), so 0.5 reproduces the target.
    shape = (16, 16, 16)
    target = _box(shape, (2, 2, 2), (7, 7, 7))
    lesion = _box(shape, (3, 3, 3), (5, 5, 5))
    prob = np.zeros(shape)
    prob[target] = 0.6
    prob[_box(shape, (11, 11, 11), (14, 14, 14))] = 0.9
    brain = np.ones(shape, dtype=bool)
    _, raw = choose_threshold([prob], [target], [brain], [0.5, 0.7])
    ctv_best, ctv = choose_threshold([prob], [target], [brain], [0.5, 0.7], lesions=[lesion])
    assert raw[0.5] < 1.0 and ctv[0.5] == 1.0
    assert ctv_best == 0.5
    assert ctv[0.7] == pytest.approx(8 / (8 + 0.98 * 117))


def test_choose_threshold_refuses_mismatched_inputs():
    with pytest.raises(ValueError):
        choose_threshold([np.zeros((2, 2, 2))], [], [], [0.5])


# --- paired tests ----------------------------------------------------------------------------------------


def test_ctv_wilcoxon_pairs_by_patient_skips_missing_values_and_adjusts_by_holm():
    from scipy.stats import wilcoxon

    model = np.array([0.90, 0.85, 0.80, 0.95, 0.70, 0.88, 0.91])
    rtog = np.array([0.80, 0.83, 0.60, 0.90, 0.72, 0.70, 0.65])
    rows = [
        {"patient": f"p{i}", "ctv": ctv, "dice": v, "hd95_mm": (math.nan if i == 0 and ctv == "rtog" else v)}
        for ctv, values in (("model", model), ("rtog", rtog))
        for i, v in enumerate(values)
    ]
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter
    got = ctv_wilcoxon(table, reference="model", metrics=["dice", "hd95_mm", "pcc"]).set_index(
        ["metric", "other"]
    )
    p_dice, p_hd = wilcoxon(model, rtog).pvalue, wilcoxon(model[1:], rtog[1:]).pvalue
    assert got.loc[("dice", "rtog"), "p_value"] == pytest.approx(p_dice)
    assert got.loc[("hd95_mm", "rtog"), "p_value"] == pytest.approx(p_hd)
    assert (got.loc[("dice", "rtog"), "n"], got.loc[("hd95_mm", "rtog"), "n"]) == (7, 6)
    assert ("pcc", "rtog") not in got.index
    # Holm over the two tests, by hand: the smaller p doubled, the larger at least that
    lo, hi = sorted([p_dice, p_hd])
    hand = {lo: min(1.0, 2 * lo), hi: max(min(1.0, 2 * lo), hi)}
    assert got.loc[("dice", "rtog"), "p_holm"] == pytest.approx(hand[p_dice])
    assert got.loc[("hd95_mm", "rtog"), "p_holm"] == pytest.approx(hand[p_hd])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_metrics_match_scikit_learn_on_random_masks(seed):
    """Sensitivity is recall, PPV precision, specificity the recall of the negative class, all within
    the brain: scikit-learn's implementations on the brain voxels agree."""
    from sklearn.metrics import precision_score, recall_score

    rng = np.random.default_rng(seed)
    brain = _ball((16, 16, 16), (8, 8, 8), 7)
    target = rng.random(brain.shape) < 0.2
    pred = rng.random(brain.shape) < 0.3
    got = ctv_metrics(pred, target, brain, (2.0, 2.0, 2.0))
    y, p = target[brain], pred[brain]
    assert got["sensitivity"] == pytest.approx(recall_score(y, p))
    assert got["ppv"] == pytest.approx(precision_score(y, p))
    assert got["specificity"] == pytest.approx(recall_score(~y, ~p))
