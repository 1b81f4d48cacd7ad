"""CTV construction: millimetre margins, clipping, the EORTC fallback and the model CTV's shape rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctvlab.config import CTVConfig
from ctvlab.ctv.construct import (
    build_ctvs,
    clip_ctv,
    eortc_ctv,
    eortc_gtv,
    expand_mm,
    model_ctv,
    rtog_ctv,
)


def _point(shape, idx) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[idx] = True
    return m


def _brute_force_expand(mask, spacing, margin):
    """Every voxel within `margin` mm of any mask voxel, by comparing all pairs of voxel centres.

    Inclusive up to 1e-6 mm, as documented: 5 × 0.9 mm is 4.500000000000001 in floating point.
    """
    sp = np.asarray(spacing, dtype=float)
    grid = np.indices(mask.shape).reshape(3, -1).T * sp
    seeds = np.argwhere(mask) * sp
    d = np.sqrt(((grid[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)).min(1)
    return (d <= margin + 1e-6).reshape(mask.shape)


def _ball(shape, centre, radius_vox) -> np.ndarray:
    idx = np.indices(shape)
    return sum((idx[i] - centre[i]) ** 2 for i in range(3)) <= radius_vox**2


# --- expand_mm ----------------------------------------------------------------------------------------


def test_single_voxel_by_3mm_is_the_integer_ball():
    # Integer points with i² + j² + k² ≤ 9, counted independently: 123.
    r = np.arange(-3, 4)
    count = sum(1 for i in r for j in r for k in r if i * i + j * j + k * k <= 9)
    assert count == 123
    out = expand_mm(_point((11, 11, 11), (5, 5, 5)), (1.0, 1.0, 1.0), 3.0)
    assert out.sum() == count


@pytest.mark.parametrize(
    ("margin", "reach_x_mm", "reach_z_mm"),
    [
        (20.0, 20.0, 18.0),  # z voxels at 18 and 21 mm: 21 > 20, so 18 is the last one
        (21.0, 21.0, 21.0),  # exactly on the margin: inclusive
        (17.9, 17.0, 15.0),
        (0.0, 0.0, 0.0),  # no margin: the mask itself
    ],
)
def test_anisotropic_margin_reaches_the_same_world_distance_on_every_axis(margin, reach_x_mm, reach_z_mm):
    spacing = (1.0, 1.0, 3.0)
    centre = (30, 30, 10)
    out = expand_mm(_point((61, 61, 21), centre), spacing, margin)
    xs = np.nonzero(out[:, centre[1], centre[2]])[0]
    zs = np.nonzero(out[centre[0], centre[1], :])[0]
    assert (xs.max() - centre[0]) * spacing[0] == reach_x_mm
    assert (centre[0] - xs.min()) * spacing[0] == reach_x_mm
    assert (zs.max() - centre[2]) * spacing[2] == reach_z_mm
    assert (centre[2] - zs.min()) * spacing[2] == reach_z_mm


def test_voxel_count_dilation_would_overshoot_along_the_coarse_axis():
    spacing = (1.0, 1.0, 3.0)
    seed = _point((45, 45, 45), (22, 22, 22))
    by_mm = expand_mm(seed, spacing, 20.0)
    by_voxels = ndimage.binary_dilation(seed, iterations=20)  # 20 voxels = 60 mm along z
    assert np.nonzero(by_mm[22, 22])[0].max() == 22 + 6
    assert np.nonzero(by_voxels[22, 22])[0].max() == 22 + 20
    assert by_voxels.sum() > by_mm.sum()


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.5, 3.0), (3.0, 3.0, 3.0), (0.9, 1.2, 2.5)])
def test_expansion_matches_brute_force_including_masks_at_the_border(spacing):
    rng = np.random.default_rng(1)
    mask = rng.random((14, 13, 9)) > 0.985
    mask[0, 0, 0] = mask[13, 12, 8] = True  # corners: the bounding-box crop must not cut anything
    np.testing.assert_array_equal(expand_mm(mask, spacing, 4.5), _brute_force_expand(mask, spacing, 4.5))


def test_empty_mask_expands_to_nothing():
    assert not expand_mm(np.zeros((5, 5, 5), bool), (3.0, 3.0, 3.0), 20.0).any()


@pytest.mark.parametrize(
    ("spacing", "margin"), [((1.0, 1.0), 3.0), ((1.0, 0.0, 1.0), 3.0), ((1.0, 1.0, 1.0), -1.0)]
)
def test_bad_spacing_or_margin_is_refused(spacing, margin):
    with pytest.raises(ValueError):
        expand_mm(np.ones((3, 3, 3), bool), spacing, margin)


# --- baselines ----------------------------------------------------------------------------------------

SHAPE = (40, 44, 36)
SPACING = (3.0, 3.0, 3.0)


@pytest.fixture
def anatomy():
    """A brain ball, a lesion (T2L around a smaller CEL), a cavity next to it and a critical box."""
    brain = _ball(SHAPE, (20, 22, 18), 17)
    t2l = _ball(SHAPE, (15, 22, 18), 7)
    cel = _ball(SHAPE, (14, 22, 18), 2)
    cavity = _ball(SHAPE, (12, 22, 18), 2) & ~cel
    critical = np.zeros(SHAPE, bool)
    critical[19:24, 18:26, 14:22] = True
    critical[14:16, 22, 18] = True  # even a critical voxel inside the lesion is removed
    return {"brain": brain, "t2l": t2l, "cel": cel, "cavity": cavity, "critical": critical}


def test_rtog_contains_the_lesion_inside_the_brain_outside_critical(anatomy):
    a = anatomy
    ctv = rtog_ctv(a["cel"], a["t2l"], a["brain"], a["critical"], SPACING, 20.0)
    lesion = (a["cel"] | a["t2l"]) & a["brain"] & ~a["critical"]
    assert np.all(ctv[lesion])
    assert not ctv[a["critical"]].any()
    assert not ctv[~a["brain"]].any()
    expected = expand_mm(a["cel"] | a["t2l"], SPACING, 20.0) & a["brain"] & ~a["critical"]
    np.testing.assert_array_equal(ctv, expected)


def test_eortc_is_within_the_expansion_of_cel_and_cavity_and_leaves_oedema_out(anatomy):
    a = anatomy
    ctv = eortc_ctv(a["cel"], a["cavity"], a["brain"], a["critical"], SPACING, 15.0)
    assert not (ctv & ~expand_mm(a["cel"] | a["cavity"], SPACING, 15.0)).any()
    assert np.all(ctv[(a["cel"] | a["cavity"]) & ~a["critical"]])
    assert not ctv[a["critical"]].any()
    # Oedema more than 15 mm from the CEL and cavity is outside the EORTC CTV, inside the RTOG one.
    far_oedema = a["t2l"] & ~expand_mm(a["cel"] | a["cavity"], SPACING, 15.0) & a["brain"] & ~a["critical"]
    assert far_oedema.any()
    assert not ctv[far_oedema].any()
    assert rtog_ctv(a["cel"], a["t2l"], a["brain"], a["critical"], SPACING, 20.0)[far_oedema].all()


def test_eortc_without_cel_or_cavity_falls_back_to_the_t2l(anatomy):
    a = anatomy
    empty = np.zeros(SHAPE, bool)
    gtv, source = eortc_gtv(empty, empty, a["t2l"])
    assert source == "t2l"
    np.testing.assert_array_equal(gtv, a["t2l"])
    with_fallback = eortc_ctv(empty, empty, a["brain"], a["critical"], SPACING, 15.0, t2l=a["t2l"])
    np.testing.assert_array_equal(
        with_fallback, rtog_ctv(empty, a["t2l"], a["brain"], a["critical"], SPACING, 15.0)
    )
    assert not eortc_ctv(empty, empty, a["brain"], a["critical"], SPACING, 15.0).any()
    assert eortc_gtv(empty, empty, None)[1] == "empty"
    assert eortc_gtv(a["cel"], empty, a["t2l"])[1] == "cel+cavity"


def test_clip_ctv_is_ctv_and_brain_and_not_critical():
    ctv, brain, crit = (np.array(v, dtype=bool) for v in ([1, 1, 1, 0], [1, 1, 0, 1], [0, 1, 0, 0]))
    np.testing.assert_array_equal(clip_ctv(ctv, brain, crit), [True, False, False, False])


# --- model CTV ------------------------------------------------------------------------------------------


def test_model_ctv_drops_detached_blobs_fills_holes_and_keeps_the_lesion(anatomy):
    a = anatomy
    lesion = a["cel"] | a["t2l"]
    prob = np.zeros(SHAPE)
    shell = _ball(SHAPE, (24, 22, 18), 6) & ~_ball(
        SHAPE, (24, 22, 18), 3
    )  # a hollow ball touching the lesion
    prob[shell] = 0.9
    blob = _ball(SHAPE, (30, 30, 18), 2)  # far from the lesion and the shell
    prob[blob] = 0.95
    prob[lesion] = 0.1  # the lesion is included whatever the network says
    no_critical = np.zeros(SHAPE, bool)
    ctv = model_ctv(prob, 0.5, lesion, a["brain"], no_critical)
    assert not ctv[blob].any()
    assert np.all(ctv[lesion & a["brain"]])
    assert np.all(ctv[_ball(SHAPE, (24, 22, 18), 3)])  # the hole inside the shell is filled
    expected = ndimage.binary_fill_holes(lesion | shell) & a["brain"]
    np.testing.assert_array_equal(ctv, expected)


def test_model_ctv_pieces_are_face_connected_so_a_corner_neighbour_is_dropped():
    """A voxel touching the shape only at a corner or an edge is its own contour in a planning system."""
    lesion = _point((9, 9, 9), (4, 4, 4))
    prob = np.zeros((9, 9, 9))
    prob[4, 4, 5] = 1.0  # shares a face with the lesion: kept
    prob[5, 5, 3] = 1.0  # touches the lesion only at an edge: dropped
    prob[3, 3, 3] = 1.0  # only at a corner: dropped
    ctv = model_ctv(prob, 0.5, lesion, np.ones((9, 9, 9), bool), np.zeros((9, 9, 9), bool))
    assert ctv[4, 4, 4] and ctv[4, 4, 5] and not ctv[5, 5, 3] and not ctv[3, 3, 3]
    assert ndimage.label(ctv)[1] == 1  # one face-connected piece


def test_deliverable_drops_fragments_and_fills_pinholes_smaller_than_a_made_voxel():
    """On a 1 mm delivery grid of a CTV made at 3 mm (27 mm³): a 2-voxel fragment goes, a 27-voxel second
    piece stays, a 1-voxel enclosed hole is filled unless it is outside the allowed region, a large hole
    stays."""
    from ctvlab.ctv.construct import deliverable

    ctv = np.zeros((30, 30, 30), bool)
    ctv[2:14, 2:14, 2:14] = True
    ctv[7, 7, 7] = False  # a pinhole
    ctv[4:9, 4:9, 10] = False  # a 25-voxel hole, not enclosed? it is: inside the cube
    ctv[20, 20, 20:22] = True  # a 2-voxel fragment (2 mm³)
    ctv[20:23, 24:27, 24:27] = True  # a 27-voxel piece (27 mm³)
    out = deliverable(ctv, (1.0, 1.0, 1.0), 27.0)
    assert out[7, 7, 7] and not out[20, 20, 20:22].any() and out[20:23, 24:27, 24:27].all()
    assert out[4:9, 4:9, 10].all()  # 25 voxels < 27: filled as well
    big = ctv.copy()
    big[4:10, 4:10, 10] = False  # 36 voxels: a real hole, kept
    assert not deliverable(big, (1.0, 1.0, 1.0), 27.0)[4:10, 4:10, 10].any()
    allowed = np.ones_like(ctv)
    allowed[7, 7, 7] = False  # a critical voxel: the carve-out stays
    assert not deliverable(ctv, (1.0, 1.0, 1.0), 27.0, allowed)[7, 7, 7]
    labels, n = ndimage.label(out)
    assert n == 2 and np.bincount(labels.ravel())[1:].min() >= 27
    np.testing.assert_array_equal(deliverable(out, (1.0, 1.0, 1.0), 27.0), out)  # idempotent


def test_model_ctv_threshold_is_inclusive_and_clipping_removes_critical():
    lesion = _point((7, 7, 7), (3, 3, 3))
    prob = np.zeros((7, 7, 7))
    prob[3, 3, 4] = 0.5
    prob[3, 3, 5] = 0.49
    critical = _point((7, 7, 7), (3, 3, 3))
    ctv = model_ctv(prob, 0.5, lesion, np.ones((7, 7, 7), bool), critical)
    assert ctv[3, 3, 4] and not ctv[3, 3, 5] and not ctv[3, 3, 3]


def test_model_ctv_without_a_lesion_keeps_the_largest_component():
    prob = np.zeros((12, 12, 12))
    prob[1:3, 1:3, 1:3] = 0.9  # 8 voxels
    prob[6:10, 6:10, 6:10] = 0.9  # 64 voxels
    ctv = model_ctv(
        prob, 0.5, np.zeros(prob.shape, bool), np.ones(prob.shape, bool), np.zeros(prob.shape, bool)
    )
    assert ctv.sum() == 64 and ctv[7, 7, 7]


def test_build_ctvs_matches_the_single_constructors(anatomy):
    a = anatomy
    cfg = CTVConfig(rtog_margin_mm=12.0, eortc_margin_mm=9.0)
    prob = np.zeros(SHAPE)
    masks = {k: v.astype(np.uint8) for k, v in a.items()}
    ctvs = build_ctvs(prob, 0.5, masks, SPACING, cfg)
    assert set(ctvs) == {"model", "rtog", "eortc"}
    np.testing.assert_array_equal(
        ctvs["rtog"], rtog_ctv(a["cel"], a["t2l"], a["brain"], a["critical"], SPACING, 12.0)
    )
    np.testing.assert_array_equal(
        ctvs["eortc"], eortc_ctv(a["cel"], a["cavity"], a["brain"], a["critical"], SPACING, 9.0)
    )
    np.testing.assert_array_equal(
        ctvs["model"], model_ctv(prob, 0.5, a["cel"] | a["t2l"], a["brain"], a["critical"])
    )
    assert set(build_ctvs(None, 0.5, masks, SPACING, cfg)) == {"rtog", "eortc"}


def test_build_ctvs_names_missing_masks_and_mismatched_grids(anatomy):
    masks = dict(anatomy)
    del masks["cavity"]
    with pytest.raises(ValueError, match="cavity"):
        build_ctvs(None, 0.5, masks, SPACING, CTVConfig())
    with pytest.raises(ValueError, match="one grid"):
        build_ctvs(np.zeros((3, 3, 3)), 0.5, anatomy, SPACING, CTVConfig())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_ctv_matches_a_whole_grid_reference(seed):
    """model_ctv works on the shape's bounding box; the answer must equal the whole-grid computation."""
    rng = np.random.default_rng(seed)
    shape = (24, 20, 18)
    prob = ndimage.gaussian_filter(rng.random(shape), 1.2)
    prob = (prob - prob.min()) / np.ptp(prob)
    prob[_ball(shape, (6, 10, 9), 4.5)] = 1.0  # a hollow ball on the lesion: a hole to fill
    prob[_ball(shape, (6, 10, 9), 2.5)] = 0.0
    lesion = _ball(shape, (2, 10, 9), 2)  # touches the array border
    brain = np.ones(shape, dtype=bool)
    critical = _ball(shape, (12, 10, 9), 2)
    union = (prob >= 0.55) | lesion
    labels, _ = ndimage.label(union)  # face-connected pieces
    reference = np.isin(labels, np.unique(labels[lesion]))
    reference = ndimage.binary_fill_holes(reference) & ~critical
    assert (reference & ~union).any() and (union & ~reference & ~critical).any()  # filled, dropped
    np.testing.assert_array_equal(model_ctv(prob, 0.55, lesion, brain, critical), reference)


# --- the iso-volume control --------------------------------------------------------------------------


def test_isovolume_of_one_voxel_and_its_six_neighbours_is_a_1_mm_margin():
    from ctvlab.ctv.construct import isovolume_ctv

    lesion = np.zeros((9, 9, 9), bool)
    lesion[4, 4, 4] = True
    brain, critical = np.ones_like(lesion), np.zeros_like(lesion)
    ctv, margin = isovolume_ctv(lesion, brain, critical, (1.0, 1.0, 1.0), 7)
    assert margin == 1.0 and ctv.sum() == 7  # the voxel and its face neighbours, by hand
    ctv, margin = isovolume_ctv(lesion, brain, critical, (1.0, 1.0, 1.0), 9)  # 7 is nearer than 19 (√2 mm)
    assert margin == 1.0 and ctv.sum() == 7
    ctv, margin = isovolume_ctv(lesion, brain, critical, (1.0, 1.0, 1.0), 14)
    assert margin == pytest.approx(np.sqrt(2)) and ctv.sum() == 19


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (1.0, 1.0, 2.5)])
def test_isovolume_matches_the_target_volume_within_one_voxel_layer(spacing):
    from scipy import ndimage

    from ctvlab.ctv.construct import isovolume_ctv

    rng = np.random.default_rng(3)
    shape = (40, 44, 36)
    lesion = np.zeros(shape, bool)
    lesion[15:22, 18:25, 14:19] = True
    brain = ndimage.binary_erosion(np.ones(shape, bool), iterations=2)
    critical = np.zeros(shape, bool)
    critical[30:34, 10:30, 10:20] = True
    dist = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    allowed = brain & ~critical
    for target in rng.integers(300, 6000, size=5):
        ctv, margin = isovolume_ctv(lesion, brain, critical, spacing, int(target))
        # it is the uniform margin's CTV, clipped like the others
        assert np.array_equal(ctv, allowed & (dist <= margin + 1e-6))
        layer = int((allowed & (dist > margin - max(spacing)) & (dist <= margin + 1e-6)).sum())
        assert abs(int(ctv.sum()) - int(target)) <= layer
