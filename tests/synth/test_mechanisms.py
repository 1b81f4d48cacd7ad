"""The physics of each mechanism of the synthetic cohort, on small hand-made grids with known answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.stats import spearmanr

from ctvlab.config import SynthConfig
from ctvlab.synth import imaging
from ctvlab.synth.anatomy import growth_grid, tract_orientation
from ctvlab.synth.clinical import draw_cohort, template_brain_litres
from ctvlab.synth.growth import FisherKolmogorov
from ctvlab.synth.patient import template_units
from ctvlab.synth.tumour import (
    axis_diffusivities,
    gaussian_field,
    grow_oedema,
    pre_rt_regions,
    redrawn_field,
    route_factor,
    route_field,
    simulate_tumour,
)


def tube_along_x(shape=(24, 24, 24), radius=3.0) -> np.ndarray:
    """White-matter probability of a tube along the first axis."""
    _, y, z = np.indices(shape, dtype=np.float64)
    c = (shape[1] - 1) / 2
    return np.exp(-((y - c) ** 2 + (z - c) ** 2) / (2 * radius**2))


def test_tract_orientation_follows_a_white_matter_tube():
    wm = tube_along_x()
    axes, coherence = tract_orientation(wm, spacing_mm=2.0)
    # off the axis, where the map has a gradient to read, the tract runs along x
    probe = (12, 14, 12)
    assert axes[0][probe] > 0.95
    assert axes[1][probe] + axes[2][probe] < 0.05
    assert coherence[probe] > 0.5
    np.testing.assert_allclose(axes.sum(axis=0), 1.0, atol=1e-5)  # squares of a unit vector


def test_infiltration_reaches_further_along_the_tract_than_across():
    shape, h = (41, 41, 9), 1.0
    along_x = np.zeros((3, *shape), dtype=np.float32)
    along_x[0] = 1.0
    grid = SimpleNamespace(tract_axes=along_x, tract_coherence=np.ones(shape, dtype=np.float32))
    d = np.ones(shape, dtype=np.float32)
    axes = axis_diffusivities(d, grid, strength=0.8)
    np.testing.assert_allclose(axes.mean(axis=0), d, rtol=1e-6)  # the mean diffusivity is kept
    u = np.zeros(shape, dtype=np.float32)
    u[18:23, 18:23, :] = 1.0
    FisherKolmogorov(axes, 1.0, h, per_axis=True).run(u, t_end=4.0)
    reach = u[:, :, 4] >= 0.05
    along = np.ptp(np.flatnonzero(reach[:, 20]))
    across = np.ptp(np.flatnonzero(reach[20, :]))
    assert along >= 1.5 * across
    assert axis_diffusivities(d, grid, strength=0.0) is None


def test_a_route_is_a_half_line_from_the_seed():
    seed = np.array([10, 10, 10])
    f = route_field((21, 21, 21), seed, np.array([[1.0, 0.0, 0.0]]), width_mm=2.0, spacing_mm=1.0)
    assert f[20, 10, 10] == pytest.approx(1.0)  # on the route, far from the seed
    assert f[20, 12, 10] == pytest.approx(np.exp(-0.5 * 4 / 4), rel=1e-5)  # 2 mm off it: one SD
    assert f[0, 10, 10] < 1e-5  # behind the seed
    assert f[10, 20, 10] < 1e-5  # across


def test_the_tumour_infiltrates_and_advances_further_along_its_routes():
    """Off the routes D is `off_route_invasion` times lower: both the invisible tail and the front's
    advance reach about √(1/0.1) ≈ 3 times further along a route than across it."""
    shape, h = (61, 61, 5), 1.0
    spec = SimpleNamespace(routes=1, off_route_invasion=0.1, route_width_mm=3.0)
    seed = np.array([30, 30, 2])
    rng = np.random.default_rng(3)
    factor = route_factor(spec, shape, seed, h, rng)
    direction = np.random.default_rng(3).normal(size=(1, 3))
    direction /= np.linalg.norm(direction)
    np.testing.assert_allclose(factor, 0.1 + 0.9 * route_field(shape, seed, direction, 3.0, h), rtol=1e-6)
    # a route in the slab's plane, along +x
    d = (0.1 + 0.9 * route_field(shape, seed, np.array([[1.0, 0, 0]]), 1.5, h)).astype(np.float32)
    u = np.zeros(shape, dtype=np.float32)
    u[28:33, 28:33, :] = 1.0
    FisherKolmogorov(d, 1.0, h).run(u, t_end=5.0)
    row, col = u[:, 30, 2], u[30, :, 2]
    edge = 2  # the seed block's last cell, from its centre
    along = np.flatnonzero(row[30:] >= 0.01).max() - edge
    across = np.flatnonzero(col[30:] >= 0.01).max() - edge
    assert along >= 2 * across
    visible_along = np.flatnonzero(row[30:] >= 0.25).max()
    visible_across = np.flatnonzero(col[30:] >= 0.25).max()
    assert visible_along > visible_across
    assert route_factor(SimpleNamespace(routes=0, off_route_invasion=0.1, route_width_mm=3.0), shape, seed,
                        h, rng) == 1.0  # fmt: skip


def test_oedema_spreads_further_in_white_than_in_grey_matter():
    shape = (61, 3, 3)
    wm = np.zeros(shape, dtype=np.float32)
    wm[31:] = 1.0  # white matter on the right, grey on the left
    grid = SimpleNamespace(gm=1.0 - wm, wm=wm, spacing=1.0)
    source = np.zeros(shape, dtype=bool)
    source[29:32] = True
    steps = iter(range(10**6))
    level = grow_oedema(source, grid, np.ones(shape, dtype=bool), 20.0, lambda _e: next(steps) >= 400)
    right, left = level[31 + 10, 1, 1], level[29 - 10, 1, 1]
    assert right > 0.2
    assert right > 5 * left


def test_oedema_raises_flair_and_adc_but_not_the_choline_naa_ratio():
    wm, gm, csf, zero = (np.array([v], dtype=np.float32) for v in (1.0, 0.0, 0.0, 0.0))
    theta, faint = 0.25, np.array([0.2], dtype=np.float32)  # below OEDEMA_VISIBLE: not in the T2L
    flair = [imaging.flair_image(gm, wm, csf, zero, zero, zero, theta, e)[0] for e in (zero, faint)]
    adc = [imaging.diffusion_maps(gm, wm, csf, zero, zero, zero, zero, zero, e)[0][0] for e in (zero, faint)]
    spectra = [imaging.metabolite_maps(gm, wm, csf, zero, zero, zero, e) for e in (zero, faint)]
    assert flair[1] > 1.05 * flair[0]
    assert adc[1] > 1.05 * adc[0]
    ratio = [m["cho"][0] / m["naa"][0] for m in spectra]
    assert ratio[1] == pytest.approx(ratio[0], rel=1e-6)
    assert spectra[1]["cho"][0] < spectra[0]["cho"][0]  # diluted, never raised


def test_infiltrating_cells_raise_choline_over_naa_where_oedema_does_not():
    wm, gm, csf, zero = (np.array([v], dtype=np.float32) for v in (1.0, 0.0, 0.0, 0.0))
    cells = np.array([0.05], dtype=np.float32)  # a fifth of the T2L threshold: invisible on FLAIR
    m0, m1 = (imaging.metabolite_maps(gm, wm, csf, u, zero, zero) for u in (zero, cells))
    assert (m1["cho"][0] / m1["naa"][0]) > 1.5 * (m0["cho"][0] / m0["naa"][0])
    flair0, flair1 = (imaging.flair_image(gm, wm, csf, u, zero, zero, 0.25)[0] for u in (zero, cells))
    assert flair1 / flair0 - 1 <= imaging.HIDDEN_FLAIR_CELLS + 1e-6


def test_scalp_lipid_contaminates_the_outer_voxels_only():
    one, zero = np.ones(2, dtype=np.float32), np.zeros(2, dtype=np.float32)
    depth = np.array([0.0, 30.0], dtype=np.float32)
    lip = imaging.metabolite_maps(zero, one, zero, zero, zero, zero, None, depth)["lip"]
    assert lip[0] > 10 * lip[1]
    assert lip[1] == pytest.approx(imaging.NAV["lip"]["wm"], rel=0.02)


@pytest.mark.parametrize("r", [0.9, 0.5, 0.2])
def test_the_post_rt_field_keeps_the_drawn_correlation_with_the_pre_rt_one(r):
    rng = np.random.default_rng(0)
    g = gaussian_field((64, 64, 64), 10.0, rng)  # correlation length: 3 cells, many independent ones
    post = redrawn_field(g, r, 10.0, rng)
    assert np.corrcoef(g.ravel(), post.ravel())[0, 1] == pytest.approx(r, abs=0.08)
    assert post.std() == pytest.approx(1.0, abs=0.1)


def test_later_progression_keeps_less_of_the_pre_rt_field_and_meets_more_rt_kill():
    plans = draw_cohort(SynthConfig(n_patients=101, seed=0))
    pfs = [p.pfs_months for p in plans]
    corr = [p.tumour.post_rt_correlation for p in plans]
    kill = [p.tumour.rt_kill for p in plans]
    assert spearmanr(pfs, corr).statistic == pytest.approx(-1.0)
    assert spearmanr(pfs, kill).statistic == pytest.approx(1.0)
    assert all(0 < c <= 1 for c in corr)
    # bevacizumab selects an invasive phenotype
    assert {p.tumour.post_rt_invasion for p in plans if p.cohort == "ATT"} == {1.5}
    assert {p.tumour.post_rt_invasion for p in plans if p.cohort != "ATT"} == {1.0}


def test_brains_have_adult_volumes_scaled_by_sex():
    plans = draw_cohort(SynthConfig(n_patients=101, seed=0))
    litres = np.array([p.brain_scale**3 * template_brain_litres() for p in plans])
    assert template_brain_litres() > 1.6  # the template is larger than an adult's brain ...
    assert litres.min() > 0.8 and litres.max() < 1.7  # ... the patients' are adults'
    assert 1.15 < np.median(litres) < 1.35
    men = np.mean([v for v, p in zip(litres, plans, strict=True) if p.sex == "M"])
    women = np.mean([v for v, p in zip(litres, plans, strict=True) if p.sex == "F"])
    assert men > women + 0.05


def test_infiltration_length_follows_how_far_the_tumour_recurs():
    plans = [p for p in draw_cohort(SynthConfig(n_patients=101, seed=0)) if p.tumour.advance_mm > 0]
    rho = spearmanr([p.tumour.advance_mm for p in plans], [p.tumour.lambda_wm_mm for p in plans]).statistic
    assert rho > 0.8


def test_the_pre_rt_tumour_has_an_invisible_tail_beyond_its_t2l():
    """Cells beyond the visible edge, falling off outwards: what diffusion and MRSI can see and FLAIR
    hardly does. A seed as large as the lesion with a hard edge would have none."""
    plans = draw_cohort(SynthConfig(n_patients=101, seed=0))
    plan = min(plans, key=lambda p: p.tumour.lesion_cm3 * (1 - p.tumour.oedema_fraction))  # the hardest case
    spec = template_units(plan.tumour, plan.brain_scale)
    grid = growth_grid(3.0)
    course = simulate_tumour(spec, grid, np.random.default_rng(0))
    pre = pre_rt_regions(course.u_pre, course.depth_mm, spec, course.gtr_density, course.oedema)
    tumour_edge = course.u_pre >= spec.t2l_density
    dist = ndi.distance_transform_edt(~tumour_edge, sampling=grid.spacing)
    shell = [np.median(course.u_pre[(dist > a) & (dist <= a + 3) & ~pre["cavity"]]) for a in (0, 3, 6)]
    assert spec.t2l_density > shell[0] > shell[1] > shell[2] > 1e-3


def test_null_maps_are_a_function_of_the_visible_lesion_only():
    """Two tumours with the same T2L but different invisible tails: the null cohort's MRSI is identical
    for both (so it cannot know where the tumour will grow), the normal cohort's is not."""
    from dataclasses import replace

    from ctvlab.synth.anatomy import apply_affine, grid_affine, load_template
    from ctvlab.synth.patient import mrsi_maps, sensed
    from ctvlab.synth.tumour import TumourCourse, signed_depth

    grid = growth_grid(3.0)
    spec = replace(draw_cohort(SynthConfig(n_patients=101, seed=0))[0].tumour, resection="biopsy")
    centre = np.argwhere(grid.wm >= 0.9).mean(0).round().astype(int)
    r = np.sqrt((((np.indices(grid.wm.shape) - centre.reshape(3, 1, 1, 1)) * grid.spacing) ** 2).sum(0))
    u = (1.0 / (1.0 + np.exp((r - 15.0) / 4.0))).astype(np.float32)
    # the tail changed two cells or more away from any visible cell, so that no interpolated point on the
    # T2L's edge sees the change
    near = ndi.binary_dilation(u >= spec.t2l_density, iterations=2)
    faint_tail = np.where(near, u, 0.3 * u).astype(np.float32)
    shape = (8, 8, 4)
    box = grid_affine(apply_affine(grid.affine, centre), np.eye(3), (10.0, 10.0, 10.0), shape)

    def maps(density: np.ndarray, strength: float) -> dict[str, np.ndarray]:
        depth = signed_depth(density >= spec.cel_density, grid.spacing)
        course = TumourCourse(density, depth, density, centre, 0.0, 0.0, 0.0, 1.0, np.zeros_like(density))
        return mrsi_maps(load_template(), course, grid.affine, spec, box, shape, np.eye(4), strength, 0.0,
                         np.random.default_rng(0))  # fmt: skip

    null_a, null_b = maps(u, 0.0), maps(faint_tail, 0.0)
    normal_a, normal_b = maps(u, 1.0), maps(faint_tail, 1.0)
    for name in ("cho", "naa", "cni", "ccri"):
        np.testing.assert_array_equal(null_a[name], null_b[name])
    assert np.nanmax(np.abs(normal_a["cni"] - normal_b["cni"])) > 0.5
    t2l = u >= spec.t2l_density
    seen, oedema = sensed(u, np.ones_like(u), t2l, strength=0.0)
    assert oedema is None and set(np.unique(seen)) == {0.0, np.float32(0.3)}
