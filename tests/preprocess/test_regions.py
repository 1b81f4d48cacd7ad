"""Regions, the ring and voxel categories with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.data.layout import CATEGORIES
from ctvlab.preprocess import regions
from ctvlab.preprocess.grid import reference_grid, resample_mask, voxel_centres


def test_ring_on_anisotropic_grid_is_exactly_the_40mm_ball():
    spacing = (1.0, 1.0, 2.5)
    shape = (101, 101, 41)
    t2l = np.zeros(shape, dtype=bool)
    t2l[50, 50, 20] = True
    ring = regions.ring(np.ones(shape, dtype=bool), t2l, spacing, 40.0)
    ijk = np.indices(shape).astype(float)
    dist = np.sqrt(sum(((ijk[d] - c) * spacing[d]) ** 2 for d, c in enumerate((50, 50, 20))))
    np.testing.assert_array_equal(ring, dist <= 40.0)
    assert ring[50, 50, 4] and not ring[50, 50, 3]  # 16 × 2.5 = 40 mm in z; 17 × 2.5 = 42.5


def test_ring_from_anisotropic_input_reaches_40mm_and_no_further():
    # T2L: a 10 mm ball on a 1×1×2.5 mm grid; the ring is computed on the 3 mm grid.
    src = np.diag([1.0, 1.0, 2.5, 1.0])
    shape = (140, 140, 56)
    src[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.diag(src)[:3]
    centre = np.array([4.0, -3.0, 2.0])
    xyz = voxel_centres(src, shape)
    t2l = ((xyz - centre.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 10.0**2
    brain = np.ones(shape, dtype=bool)
    dst, out_shape = reference_grid(brain, src, 3.0, 0.0)
    brain3 = resample_mask(brain, src, dst, out_shape)
    t2l3 = resample_mask(t2l, src, dst, out_shape)
    ring = regions.ring(brain3, t2l3, (3.0, 3.0, 3.0), 40.0)

    d = np.linalg.norm(voxel_centres(dst, out_shape) - centre.reshape(3, 1, 1, 1), axis=0) - 10.0
    voxel = 3.0
    assert (d[ring] <= 40.0 + voxel).all()  # no further than 40 mm (± one voxel)
    assert ring[brain3 & (d <= 40.0 - voxel)].all()  # everything within 40 mm (± one voxel)
    assert d[ring].max() >= 40.0 - voxel  # it does reach 40 mm
    # Along each axis through the lesion, both ways, the ring ends 39 mm (13 voxels: the last whole
    # voxel within 40 mm) beyond the lesion's last voxel, whatever the input's voxel size on that axis.
    c = tuple(np.rint(np.linalg.solve(dst, [*centre, 1.0])[:3]).astype(int))
    for axis in range(3):
        line = [slice(i, i + 1) for i in c]
        line[axis] = slice(None)
        lesion_idx = np.flatnonzero(t2l3[tuple(line)].ravel())
        ring_idx = np.flatnonzero(ring[tuple(line)].ravel())
        assert (ring_idx.max() - lesion_idx.max()) * voxel == 39.0
        assert (lesion_idx.min() - ring_idx.min()) * voxel == 39.0


def test_empty_t2l_has_no_ring():
    with pytest.raises(ValueError, match="empty"):
        regions.ring(np.ones((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (3.0, 3.0, 3.0), 40.0)


# Each row is one voxel: its pre-RT state, its state at progression, whether it is in the ring, and the
# category the study assigns it.
CASES = [
    ("NAV", "none", True, "NAV->NAV"),
    ("NAV", "NEL", True, "NAV->NEL"),
    ("NAV", "CEL", True, "NAV->CEL"),
    ("NAV", "CEL only", True, "NAV->CEL"),
    ("NEL", "CEL", True, "NEL->CEL"),
    ("NEL", "NEL", True, "other"),
    ("NEL", "none", True, "other"),
    ("CEL", "CEL", True, "other"),
    ("CEL", "none", True, "other"),
    ("cavity", "CEL", True, "other"),
    ("ventricle", "NEL", True, "other"),
    ("NAV", "CEL", False, "outside"),
    ("NEL", "CEL", False, "outside"),
]


def test_categories_on_a_hand_made_two_time_point_case():
    n = len(CASES)
    names = ("t2l", "cel", "cavity", "vent", "t2l_p", "cel_p", "ring")
    m = {k: np.zeros((n, 1, 1), dtype=bool) for k in names}
    for i, (pre, prog, in_ring, _) in enumerate(CASES):
        m["t2l"][i] = pre in ("NEL", "CEL")
        m["cel"][i] = pre == "CEL"
        m["cavity"][i] = pre == "cavity"
        m["vent"][i] = pre == "ventricle"
        m["t2l_p"][i] = prog in ("NEL", "CEL")
        m["cel_p"][i] = prog in ("CEL", "CEL only")
        m["ring"][i] = in_ring
    brain = np.ones((n, 1, 1), dtype=bool)
    nav = regions.nav(brain, m["cavity"], m["vent"], m["t2l"], m["cel"])
    nel = regions.nel(m["t2l"], m["cel"])
    codes = regions.categories(m["ring"], nav, nel, m["t2l_p"], m["cel_p"])
    expected = np.array([CATEGORIES[c[3]] for c in CASES], dtype=np.uint8).reshape(n, 1, 1)
    np.testing.assert_array_equal(codes, expected)


def test_target_is_both_lesions_at_both_time_points_within_the_brain():
    t2l, cel, t2l_p, cel_p, brain = (np.array(v, dtype=bool).reshape(6, 1, 1) for v in (
        [1, 0, 0, 0, 0, 1],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
    ))  # fmt: skip
    got = regions.target(t2l, cel, t2l_p, cel_p, brain).ravel()
    np.testing.assert_array_equal(got, [True, True, True, True, False, False])
