"""Geometry of the patient grids and the intensity models, with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.synth import imaging
from ctvlab.synth.anatomy import (
    apply_affine,
    covering_shape,
    critical_mask,
    grid_affine,
    load_template,
    rigid,
    rotation_matrix,
    sample,
    voxel_world,
)


def test_sampling_through_pose_and_oblique_grid_is_exact_for_a_linear_field():
    """A field equal to its MNI x coordinate, sampled on an oblique grid of a rotated, shifted head,
    must read back the MNI x of every voxel centre (trilinear interpolation is exact on linear fields)."""
    field_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    field_aff[:3, 3] = [-40.0, -40.0, -40.0]
    field = voxel_world(field_aff, (41, 41, 41))[0].astype(np.float32)
    pose = rigid(rotation_matrix(np.array([1.0, 2.0, 3.0]), np.deg2rad(10)), np.array([3.0, -2.0, 5.0]))
    grid = grid_affine(np.array([0.0, 1.0, -2.0]), rotation_matrix(np.array([0.0, 1.0, 1.0]), 0.2),
                       (3.0, 2.5, 4.0), (12, 14, 10))  # fmt: skip
    got = sample(field, field_aff, grid, (12, 14, 10), pose)
    mni = apply_affine(np.linalg.inv(pose), voxel_world(grid, (12, 14, 10)).reshape(3, -1).T)
    assert got.ravel() == pytest.approx(mni[:, 0], abs=1e-3)


@pytest.mark.parametrize("angle_deg", [0.0, 7.0, 20.0])
def test_covering_shape_contains_the_rotated_box(angle_deg):
    rot = rotation_matrix(np.array([0.3, -1.0, 0.5]), np.deg2rad(angle_deg))
    extent = np.array([140.0, 180.0, 150.0])
    spacing = (2.0, 2.0, 3.0)
    shape = covering_shape(extent, rot, spacing)
    aff = grid_affine(np.zeros(3), rot, spacing, shape)
    corners = np.array(np.meshgrid(*[[-e / 2, e / 2] for e in extent], indexing="ij")).reshape(3, -1).T
    ijk = apply_affine(np.linalg.inv(aff), corners)
    assert (ijk >= -0.5).all() and (ijk <= np.asarray(shape) - 0.5).all()


def test_critical_structures_at_their_mni_coordinates():
    pts = np.array([[12.0, -18.0, 7.0], [-12.0, -18.0, 7.0], [0.0, -28.0, -30.0], [40.0, 20.0, 30.0]]).T
    assert critical_mask(pts).tolist() == [True, True, True, False]


def test_template_anatomy_is_plausible():
    tpl = load_template()
    cm3 = abs(np.linalg.det(tpl.affine[:3, :3])) / 1000.0
    assert 1400 < tpl.brain.sum() * cm3 < 2000  # brain incl. cerebellum and CSF
    assert 15 < tpl.ventricles.sum() * cm3 < 60  # lateral + third ventricles
    assert 20 < tpl.critical.sum() * cm3 < 60  # brainstem + thalami
    assert np.allclose(tpl.gm + tpl.wm + tpl.csf, tpl.brain, atol=1e-5)


def test_infiltration_response_is_concave_and_sensitive_below_visibility():
    u = np.array([0.0, 0.01, 0.05, 0.25, 1.0])
    r = imaging.infiltration_response(u)
    assert r[0] == 0.0 and r[-1] == pytest.approx(1.0)
    assert np.all(np.diff(r) > 0)
    assert r[2] > 0.25  # a density five times below the T2L threshold already moves the maps


def test_metabolite_index_scores_deviation_from_the_normal_ratio():
    rng = np.random.default_rng(0)
    naa = rng.uniform(1.5, 2.5, 300)
    cho = 0.5 * naa + rng.normal(0.0, 0.05, 300)
    cho[:20] += 1.0  # tumour voxels: choline up
    z = imaging.metabolite_index(cho, naa)
    assert abs(np.median(z[20:])) < 0.2 and 0.8 < np.std(z[20:]) < 1.2
    assert z[:20].min() > 10.0
    nan_in = cho.copy()
    nan_in[5] = np.nan
    assert np.isnan(imaging.metabolite_index(nan_in, naa)[5])


def test_hidden_infiltration_moves_diffusion_and_metabolism_more_than_flair():
    """Relative change at a density half the T2L threshold: ADC, Cho/NAA clearly; FLAIR subtly."""
    wm, gm, csf, zero = (np.array([v]) for v in (1.0, 0.0, 0.0, 0.0))
    theta = 0.25
    flair0, flair1 = (
        imaging.flair_image(gm, wm, csf, np.array([u]), zero, zero, theta)[0] for u in (0.0, theta / 2)
    )
    adc0, adc1 = (imaging.diffusion_maps(gm, wm, csf, np.array([u]), zero, zero, zero, zero)[0][0]
                  for u in (0.0, theta / 2))  # fmt: skip
    m0, m1 = (imaging.metabolite_maps(gm, wm, csf, np.array([u]), zero, zero) for u in (0.0, theta / 2))
    flair_change = flair1 / flair0 - 1
    assert 0 < flair_change < imaging.HIDDEN_FLAIR_GAIN
    assert adc1 / adc0 - 1 > 2 * flair_change
    ratio = (m1["cho"] / m1["naa"]) / (m0["cho"] / m0["naa"])
    assert ratio[0] > 1.5
