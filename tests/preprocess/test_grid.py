"""Reference grid and resampling: volumes, world positions and coverage with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ctvlab.preprocess.grid import (
    brain_bbox_world,
    reference_grid,
    resample,
    resample_mask,
    resample_with_coverage,
    voxel_centres,
)


def centred_affine(spacing, shape, rotation=None):
    """Affine of a grid centred on the world origin, optionally rotated (oblique)."""
    rot = np.diag(spacing) if rotation is None else rotation @ np.diag(spacing)
    aff = np.eye(4)
    aff[:3, :3] = rot
    aff[:3, 3] = -rot @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def ball(affine, shape, centre, radius):
    xyz = voxel_centres(affine, shape)
    return ((xyz - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) <= radius**2


OBLIQUE = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix()


@pytest.mark.parametrize("centre", [(0.0, 0.0, 0.0), (0.3, -0.7, 1.1), (1.5, 1.5, 1.5), (-4.2, 2.6, -3.9)])
def test_sphere_on_1x1x2_keeps_its_volume_at_3mm(centre):
    src = centred_affine((1.0, 1.0, 2.0), (64, 64, 32))
    mask = ball(src, (64, 64, 32), centre, 15.0)
    dst, shape = reference_grid(mask, src, voxel_mm=3.0, margin_mm=6.0)
    out = resample_mask(mask, src, dst, shape, threshold=0.5)
    exact = 4.0 / 3.0 * np.pi * 15.0**3
    assert out.sum() * 27.0 == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("rotation", [None, OBLIQUE], ids=["axis-aligned", "oblique"])
def test_point_lands_in_the_voxel_that_contains_it(rotation):
    # A 4 mm ball at a known world point, on a 1.2 mm source grid that may be oblique.
    src = centred_affine((1.2, 1.2, 1.2), (80, 80, 80), rotation)
    point = np.array([13.7, -21.4, 8.9])
    mask = ball(src, (80, 80, 80), point, 4.0)
    brain = ball(src, (80, 80, 80), (0, 0, 0), 40.0)
    dst, shape = reference_grid(brain, src, 3.0, 6.0)
    out = resample_mask(mask, src, dst, shape)
    ijk = np.rint(np.linalg.solve(dst, [*point, 1.0])[:3]).astype(int)
    assert out[tuple(ijk)]
    centroid = dst[:3, :3] @ np.argwhere(out).mean(0) + dst[:3, 3]
    assert np.linalg.norm(centroid - point) < 1.0


@pytest.mark.parametrize("rotation", [None, OBLIQUE], ids=["axis-aligned", "oblique"])
def test_linear_field_is_reproduced_through_the_affines(rotation):
    # Trilinear interpolation reproduces a linear function of world position exactly, so every
    # output voxel must hold the field's value at its own world centre.
    shape = (50, 50, 40)
    src = centred_affine((2.0, 1.5, 2.5), shape, rotation)
    a, b = np.array([0.3, -0.2, 0.5]), 7.0
    field = np.tensordot(a, voxel_centres(src, shape), axes=1) + b
    dst = np.diag([3.0, 3.0, 3.0, 1.0])
    dst[:3, 3] = [-15.0, -12.0, -9.0]
    out = resample(field, src, dst, (10, 8, 6))
    expected = np.tensordot(a, voxel_centres(dst, (10, 8, 6)), axes=1) + b
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-3)


def test_reference_grid_is_ras_isotropic_multiple_of_8_and_covers_the_oblique_brain():
    shape = (60, 70, 50)
    src = centred_affine((1.0, 1.0, 1.0), shape, OBLIQUE)
    brain = ball(src, shape, (2.0, -3.0, 1.0), 22.0)
    dst, out_shape = reference_grid(brain, src, voxel_mm=3.0, margin_mm=6.0)
    assert np.array_equal(dst[:3, :3], np.diag([3.0, 3.0, 3.0]))
    assert all(n % 8 == 0 for n in out_shape)
    lo, hi = brain_bbox_world(brain, src)
    # every corner of every brain voxel, computed directly
    ijk = np.argwhere(brain)
    corners = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)])
    pts = (ijk[:, None, :] + corners[None]).reshape(-1, 3) @ src[:3, :3].T + src[:3, 3]
    np.testing.assert_allclose(lo, pts.min(0), atol=1e-9)
    np.testing.assert_allclose(hi, pts.max(0), atol=1e-9)
    grid_lo = dst[:3, 3] - 1.5
    grid_hi = dst[:3, 3] + (np.asarray(out_shape) - 1) * 3.0 + 1.5
    assert (grid_lo <= lo - 6.0 + 1e-9).all() and (grid_hi >= hi + 6.0 - 1e-9).all()
    np.testing.assert_allclose((grid_lo + grid_hi) / 2, (lo + hi) / 2, atol=1e-9)  # centred on the box


def test_mrsi_coverage_keeps_missing_missing_and_edges_unbiased():
    # An 8×8×4 grid of 10 mm voxels holding a constant 2.0: a PRESS box of 80×80×40 mm.
    box = np.diag([10.0, 10.0, 10.0, 1.0])
    box[:3, 3] = [-35.0, -35.0, -15.0]  # box spans [-40, 40] × [-40, 40] × [-20, 20] mm
    data = np.full((8, 8, 4), 2.0, dtype=np.float32)
    data[0, 0, 0] = np.nan  # a voxel without a usable spectrum
    dst = np.diag([3.0, 3.0, 3.0, 1.0])
    dst[:3, 3] = [-58.5, -58.5, -34.5]
    shape = (40, 40, 24)
    values, valid = resample_with_coverage(data, box, dst, shape, threshold=0.5)
    xyz = voxel_centres(dst, shape)
    half = np.array([40.0, 40.0, 20.0]).reshape(3, 1, 1, 1)
    inside = (np.abs(xyz) <= half - 3.0).all(0)
    outside = (np.abs(xyz) >= half + 3.0).any(0)
    near_nan_voxel = (np.abs(xyz - np.reshape([-35.0, -35.0, -15.0], (3, 1, 1, 1))) <= 10.0).all(0)
    assert valid[inside & ~near_nan_voxel].all()
    np.testing.assert_allclose(values[inside & ~near_nan_voxel], 2.0, rtol=1e-6)
    # valid edge voxels are not pulled toward 0 by the missing outside
    np.testing.assert_allclose(values[valid & ~near_nan_voxel], 2.0, rtol=1e-6)
    assert not valid[outside].any() and np.isnan(values[outside]).all()
    assert np.isnan(values[~valid]).all()
