"""Coverage at a fixed volume: a map against the uniform margin of the same volume, on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.ctv.coverage import (
    candidates,
    coverage_at,
    ctv_volume,
    lesion_distance,
    margin_volume,
    new_progression,
    top_k,
)


def _row_patient(recur_at: tuple[int, ...], length: int = 12):
    """A 1-voxel-thick row of the brain (x = 0..length-1, 1 mm voxels): the lesion is voxel 0; the
    progression is lesion at progression at `recur_at`."""
    shape = (length, 1, 1)
    masks = {k: np.zeros(shape, bool) for k in ("cavity", "ventricles", "cel", "cel_prog", "t2l_prog")}
    masks["brain"] = np.ones(shape, bool)
    masks["ring"] = np.ones(shape, bool)
    masks["t2l"] = np.zeros(shape, bool)
    masks["t2l"][0] = True
    masks["t2l_prog"][0] = True
    for x in recur_at:
        masks["t2l_prog"][x] = True
    return masks


def test_hand_counted_row():
    """Lesion at 0, recurrence at 2 and 9. At k = 3 the margin takes 1, 2, 3 (covers 1 of 2 = 0.5); a map that
    peaks at 9 and 2 takes 9, 2 and then the nearest of equal score: covers both (1.0). Gain +0.5."""
    masks = _row_patient((2, 9))
    cand, new = candidates(masks), new_progression(masks)
    assert cand.sum() == 11 and list(np.flatnonzero(new)) == [2, 9]
    dist = lesion_distance(masks, (1.0, 1.0, 1.0))
    assert margin_volume(dist, cand, 3.0) == 3
    score = np.zeros(masks["brain"].shape)
    score[9], score[2] = 0.9, 0.8
    chosen = top_k(score, cand, 3, dist)
    assert list(np.flatnonzero(chosen)) == [1, 2, 9]  # ties at 0 → the nearest (voxel 1)
    rows = coverage_at({"map": score}, cand, new, dist, {"margin 3 mm": 3})
    assert rows == [{"volume": "margin 3 mm", "k": 3, "n_new": 2, "margin": 0.5, "map": 1.0}]


def test_the_margin_itself_is_the_nearest_candidates_and_a_ctv_counts_only_candidates():
    masks = _row_patient((5,))
    masks["cavity"][1] = True  # not a candidate: the margin skips it
    cand, dist = candidates(masks), lesion_distance(masks, (2.0, 1.0, 1.0))  # 2 mm voxels along x
    assert margin_volume(dist, cand, 6.0) == 2  # voxels 2 and 3 (4 and 6 mm); voxel 1 is cavity
    ctv = np.zeros_like(cand)
    ctv[:4] = True
    assert ctv_volume(ctv, cand) == 2
    rows = coverage_at({}, cand, new_progression(masks), dist, {"k2": 2, "k4": 4})
    assert [r["margin"] for r in rows] == [0.0, 1.0]


def test_no_new_progression_gives_nan_and_k_is_clipped():
    masks = _row_patient(())
    cand, dist = candidates(masks), lesion_distance(masks, (1.0, 1.0, 1.0))
    rows = coverage_at({"map": np.ones(cand.shape)}, cand, new_progression(masks), dist, {"all": 100})
    assert rows[0]["n_new"] == 0 and np.isnan(rows[0]["margin"]) and np.isnan(rows[0]["map"])
    assert top_k(np.ones(cand.shape), cand, 100, dist).sum() == cand.sum()


def test_a_map_that_follows_the_hidden_progression_beats_the_margin_and_a_random_one_does_not():
    """3-D: the recurrence is a lopsided lobe 8–14 mm out on one side. A map that is high where it is (plus
    noise) covers more than the same-volume margin; a random map covers less."""
    rng = np.random.default_rng(0)
    shape = (31, 31, 31)
    grid = np.indices(shape).transpose(1, 2, 3, 0) - 15
    r = np.linalg.norm(grid, axis=-1)
    masks = {k: np.zeros(shape, bool) for k in ("cavity", "ventricles", "cel", "cel_prog")}
    masks["brain"] = r <= 15
    masks["ring"] = masks["brain"]
    masks["t2l"] = r <= 4
    lobe = (r > 4) & (r <= 14) & (grid[..., 0] >= 8)
    masks["t2l_prog"] = masks["t2l"] | (r <= 6) | lobe
    cand, new = candidates(masks), new_progression(masks)
    dist = lesion_distance(masks, (1.0, 1.0, 1.0))
    k = margin_volume(dist, cand, 4.0)
    follows = new + 0.3 * rng.random(shape)
    random = rng.random(shape)
    row = coverage_at({"follows": follows, "random": random}, cand, new, dist, {"4 mm": k})[0]
    assert row["follows"] > row["margin"] + 0.2
    assert row["random"] < row["margin"]


@pytest.mark.parametrize("k", [0, 1, 5])
def test_top_k_picks_exactly_k(k):
    masks = _row_patient((3,))
    cand, dist = candidates(masks), lesion_distance(masks, (1.0, 1.0, 1.0))
    assert top_k(np.arange(12.0)[:, None, None], cand, k, dist).sum() == k


def test_curve_at_reads_the_best_coverage_within_each_volume():
    from ctvlab.ctv.coverage import curve_at

    volumes, coverages = np.array([10.0, 30.0, 20.0]), np.array([0.2, 0.9, 0.5])
    np.testing.assert_allclose(
        curve_at(volumes, coverages, np.array([5.0, 10.0, 25.0, 40.0])), [np.nan, 0.2, 0.5, 0.9]
    )


def test_volume_curves_of_a_map_that_follows_the_progression_lie_above_the_margin():
    """The lobe case: the model's CTV covers the whole new progression below 3.3 cm³ (the lobe joins the lesion
    once the threshold falls below 0.4), the margin only at 8.6 cm³; the gain averaged over the volumes both
    curves reach (the area between them per unit volume) is large; a patient without new progression has no
    curve."""
    import pandas as pd

    from ctvlab.ctv.coverage import volume_curves, volume_gain

    shape = (31, 31, 31)
    grid3 = np.indices(shape).transpose(1, 2, 3, 0) - 15
    r = np.linalg.norm(grid3, axis=-1)
    masks = {k: np.zeros(shape, bool) for k in ("cavity", "ventricles", "cel", "cel_prog", "critical")}
    masks["brain"] = r <= 15
    masks["ring"] = masks["brain"]
    masks["t2l"] = r <= 4
    masks["t2l_prog"] = masks["t2l"] | ((r > 4) & (r <= 12) & (grid3[..., 0] >= 6))
    prob = np.clip(1.0 - r / 20.0, 0, 1) * 0.5 + 0.5 * (grid3[..., 0] >= 6) * (r <= 12)
    rows = volume_curves(prob, masks, (1.0, 1.0, 1.0), np.linspace(0, 1, 51), range(0, 16))
    curves = pd.DataFrame([{"patient_id": "P1", **row} for row in rows])
    grid = np.linspace(0.0, 10.0, 21)  # cm³ (1 mm voxels: 1000 voxels a cm³)
    _, _, diff = volume_gain(curves, grid)
    model_full = curves[(curves.curve == "model") & (curves.coverage == 1.0)]["volume_cm3"].min()
    margin_full = curves[(curves.curve == "margin") & (curves.coverage == 1.0)]["volume_cm3"].min()
    assert model_full < 3.3 and margin_full == pytest.approx(8.607) and model_full < margin_full / 2
    assert np.isfinite(diff[0]).sum() == 20 and np.nanmean(diff[0]) > 0.3
    assert np.nanmin(diff[0]) > -0.1  # where the margin leads (small volumes), by little
    masks["t2l_prog"] = masks["t2l"]
    assert volume_curves(prob, masks, (1.0, 1.0, 1.0), [0.5], [0]) is None


def test_reliability_counts_and_ece_on_hand_cases():
    from ctvlab.ctv.calibration import ReliabilityCounts

    counts = ReliabilityCounts(bins=2)
    region = np.ones(4, bool)
    # bin [0, 0.5): predictions 0.2, 0.2, outcome 0, 1 → frequency 0.5, confidence 0.2
    # bin [0.5, 1]: predictions 0.8, 1.0, outcomes 1, 1 → frequency 1.0, confidence 0.9
    counts.add(np.array([0.2, 0.2, 0.8, 1.0]), np.array([0, 1, 1, 1], bool), region)
    table = counts.table()
    assert list(table["n"]) == [2, 2]
    np.testing.assert_allclose(table["confidence"], [0.2, 0.9])
    np.testing.assert_allclose(table["frequency"], [0.5, 1.0])
    assert counts.ece() == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)
    # a calibrated predictor: outcomes drawn with the predicted probability → ECE near 0
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    calibrated = ReliabilityCounts()
    calibrated.add(p, rng.random(p.size) < p, np.ones(p.size, bool))
    assert calibrated.ece() < 0.01
