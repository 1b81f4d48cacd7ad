"""The cohort's signal settings: imaging strength, channelling, seeding, determinism and their presets."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import get_args

import numpy as np
import pytest
from pydantic import ValidationError

from ctvlab.config import SynthConfig
from ctvlab.synth import imaging
from ctvlab.synth.clinical import draw_cohort
from ctvlab.synth.cohort import recorded_config
from ctvlab.synth.patient import sensed
from ctvlab.synth.routes import focus_centre, route_foci, white_matter_paths
from ctvlab.synth.signal_settings import (
    CHANNELLED_OFF_ROUTE,
    POST_RT_MIGRATION_MIN,
    signal_params,
    with_signal,
)

SIGNAL = ("imaging_strength", "channelling", "seeding", "determinism")


# --- settings and presets --------------------------------------------------------------------------


def test_every_preset_name_has_values_and_the_defaults_are_today():
    literal, _none = get_args(SynthConfig.model_fields["preset"].annotation)  # Literal[...] | None
    assert set(get_args(literal)) == set(SynthConfig.presets())
    default = SynthConfig()
    assert SynthConfig.presets()["today"] == {k: getattr(default, k) for k in SIGNAL}
    assert SynthConfig(preset="today").model_dump(exclude={"preset"}) == default.model_dump(
        exclude={"preset"}
    )


def test_a_preset_fills_the_settings_and_explicit_values_win():
    strong = SynthConfig(preset="strong")
    assert {k: getattr(strong, k) for k in SIGNAL} == SynthConfig.presets()["strong"]
    assert SynthConfig(preset="strong", determinism=0.25).determinism == 0.25
    with pytest.raises(ValidationError, match="preset"):
        SynthConfig(preset="stronger")
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        SynthConfig(channelling=1.5)


@pytest.mark.parametrize(
    ("kw", "strength"),
    [({}, 1.0), ({"null": True}, 0.0), ({"imaging_strength": 0.0}, 0.0), ({"imaging_strength": 0.4}, 0.4),
     ({"preset": "strong", "null": True}, 0.0)],
)  # fmt: skip
def test_null_is_imaging_strength_zero(kw, strength):
    assert SynthConfig(**kw).sensing_strength == strength


def test_null_and_a_partial_imaging_strength_contradict_each_other():
    with pytest.raises(ValidationError, match="contradicts"):
        SynthConfig(null=True, imaging_strength=0.5)


def test_a_default_cohort_records_no_new_setting():
    assert not set(SIGNAL) & set(recorded_config(SynthConfig()))
    assert "preset" not in recorded_config(SynthConfig())
    strong = recorded_config(SynthConfig(preset="strong"))
    assert strong["preset"] == "strong" and strong["channelling"] == 1.0


# --- what each setting does to the drawn tumours ---------------------------------------------------


@pytest.fixture(scope="module")
def cohorts() -> dict[str, list]:
    return {
        name: draw_cohort(SynthConfig(n_patients=101, seed=0, **kw))
        for name, kw in {"today": {}, "strong": {"preset": "strong"}, "half": {"seeding": 0.5},
                         "imaging": {"imaging_strength": 0.3}}.items()
    }  # fmt: skip


def test_the_defaults_leave_every_tumour_as_it_was(cohorts):
    spec = cohorts["today"][0].tumour
    assert with_signal(spec, SynthConfig(), np.zeros(3), 0.0, 0.0) is spec
    assert signal_params(spec) == {}  # nothing new in a default cohort's synth_params.json
    assert signal_params(cohorts["strong"][0].tumour)["channelling"] == 1.0
    # imaging strength changes no tumour and no clinical row
    assert [p.tumour for p in cohorts["imaging"]] == [p.tumour for p in cohorts["today"]]


def test_signal_settings_leave_the_clinical_table_alone(cohorts):
    for a, b in zip(cohorts["today"], cohorts["strong"], strict=True):
        assert a.clinical() == b.clinical() and a.pattern == b.pattern and a.brain_scale == b.brain_scale
        changed = {f.name for f in fields(a.tumour) if getattr(a.tumour, f.name) != getattr(b.tumour, f.name)}
        assert changed <= {
            "channelling", "off_route_invasion", "foci_mm", "foci_density", "foci_radius_mm", "satellite_mm",
            "post_rt_correlation", "rt_kill", "post_rt_migration",
        }  # fmt: skip


def test_the_strong_preset_does_what_its_settings_say(cohorts):
    for plan in cohorts["strong"]:
        t = plan.tumour
        assert t.channelling == 1.0 and t.off_route_invasion == pytest.approx(CHANNELLED_OFF_ROUTE)
        assert t.post_rt_correlation == 1.0 and t.rt_kill == 0.0  # no post-RT chance
        assert t.post_rt_migration == pytest.approx(POST_RT_MIGRATION_MIN)
        assert t.satellite_mm == 0.0  # the foci on the routes take the off-route satellite's place
        if plan.progression_type == "CEL":
            assert t.foci_mm == ()  # a compact tumour recurring inside its T2L seeds nothing
            continue
        assert len(t.foci_mm) == t.routes and all(f > 0 for f in t.foci_mm)  # one focus on every route
        # the focus's far edge is the drawn recurrence distance, so the recurrence pattern holds
        assert t.foci_mm[0] + t.foci_radius_mm == pytest.approx(t.advance_mm + 1.5)
        assert 0 < t.foci_density <= 0.5 * t.t2l_density  # invisible on T1 and FLAIR


def test_seeding_is_the_share_of_routes_with_a_focus(cohorts):
    routes = sum(p.tumour.routes for p in cohorts["half"] if p.progression_type != "CEL")
    foci = sum(sum(f > 0 for f in p.tumour.foci_mm) for p in cohorts["half"])
    assert foci / routes == pytest.approx(0.5, abs=0.1)
    kept = sum(p.tumour.satellite_mm > 0 for p in cohorts["half"])
    had = sum(p.tumour.satellite_mm > 0 for p in cohorts["today"])
    assert kept / had == pytest.approx(0.5, abs=0.15)


@pytest.mark.parametrize("d", [0.0, 0.5, 1.0])
def test_determinism_removes_post_rt_chance_in_proportion(cohorts, d):
    spec = replace(cohorts["today"][3].tumour, post_rt_correlation=0.4, rt_kill=2.0)
    out = with_signal(spec, SynthConfig(determinism=d), np.zeros(3), 0.0, 1.0)
    assert out.post_rt_correlation == pytest.approx(0.4 + d * 0.6)
    assert out.rt_kill == pytest.approx(2.0 * (1 - d))
    assert out.post_rt_migration == pytest.approx(1 - d * (1 - POST_RT_MIGRATION_MIN))


# --- routes and foci ------------------------------------------------------------------------------


def test_a_white_matter_route_keeps_to_the_white_matter():
    """An L-shaped bundle in grey matter: the route from its corner towards +y follows the bundle round
    instead of cutting across the grey matter."""
    wm = np.zeros((30, 30, 3), dtype=np.float32)
    wm[2:28, 2:5, :] = 1.0  # along x
    wm[25:28, 2:28, :] = 1.0  # then along y
    domain = np.ones(wm.shape, dtype=bool)
    (path,) = white_matter_paths(
        wm, domain, np.array([3, 3, 1]), np.array([[0.0, 1.0, 0.0]]), (60.0, 80.0), 2.0
    )
    assert tuple(path[0]) == (3, 3, 1)
    assert wm[tuple(path.T)].mean() > 0.9  # through the bundle, not across the grey matter
    assert path[-1][1] >= 20  # and it gets far along +y


def test_a_focus_is_a_uniform_ball_on_its_route_at_the_distance_asked():
    shape, h = (40, 9, 9), 1.0
    path = np.stack([np.arange(40), np.full(40, 4), np.full(40, 4)], axis=1)  # along x through the middle
    dist = np.broadcast_to(np.arange(40, dtype=float).reshape(-1, 1, 1), shape)  # the lesion at x = 0
    assert tuple(focus_centre(path, dist, 20.0)) == (20, 4, 4)
    assert tuple(focus_centre(path, dist, 99.0)) == (39, 4, 4)  # never that far: the route's end
    allowed = np.ones(shape, dtype=bool)
    allowed[:, 0, :] = False
    foci = route_foci(allowed, dist, [path], (20.0,), 0.1, 3.0, h)
    assert foci[20, 4, 4] == pytest.approx(0.1) and foci[23, 4, 4] == pytest.approx(0.1)
    assert foci[24, 4, 4] == 0.0 and foci[17, 4, 4] == pytest.approx(0.1)
    ball = ((np.indices(shape) - np.array([20, 4, 4]).reshape(3, 1, 1, 1)) ** 2).sum(0) <= 9
    assert np.count_nonzero(foci) == np.count_nonzero(ball & allowed)
    assert not foci[:, 0, :].any()  # nothing outside the tissue
    assert not route_foci(allowed, dist, [path], (0.0,), 0.1, 3.0, h).any()  # 0: no focus on that route


# --- imaging strength ------------------------------------------------------------------------------


def test_imaging_strength_scales_what_diffusion_sees_of_the_invisible_tail():
    """Two tumours with the same T2L and different invisible tails: at strength 0 diffusion cannot tell
    them apart, and the more it sees the more the maps differ."""
    x = np.linspace(0.0, 40.0, 81, dtype=np.float32)
    u_a = (1.0 / (1.0 + np.exp((x - 10.0) / 4.0))).astype(np.float32)
    t2l = u_a >= 0.25
    u_b = np.where(t2l, u_a, 0.3 * u_a).astype(np.float32)  # a fainter tail beyond the same edge
    one, zero = np.ones_like(x), np.zeros_like(x)

    def adc(u: np.ndarray, strength: float) -> np.ndarray:
        seen, oedema = sensed(u, zero, t2l, strength)
        return imaging.diffusion_maps(zero, one, zero, seen, zero, zero, zero, zero, oedema)[0]

    gaps = [float(np.abs(adc(u_a, s) - adc(u_b, s)).max()) for s in (0.0, 0.3, 0.7, 1.0)]
    assert gaps[0] == 0.0
    assert 0 < gaps[1] < gaps[2] < gaps[3]
    np.testing.assert_array_equal(sensed(u_a, one, t2l, 1.0)[0], u_a)  # full strength: the truth itself
    with pytest.raises(TypeError, match="float"):
        sensed(u_a, one, t2l, True)


# --- one simulated patient -------------------------------------------------------------------------


def test_the_strong_cohort_recurs_beyond_the_margin_where_the_density_says():
    """One patient drawn to recur beyond 2 cm, simulated as today and with the strong preset: the same
    lesion and recurrence pattern, but the strong course puts more of its new progression beyond 20 mm,
    in cells the true pre-RT density ranks first and a 20 mm margin of the same volume leaves out."""
    from ctvlab.synth.anatomy import growth_grid
    from ctvlab.synth.ceiling import patient_ceiling

    grid = growth_grid(3.0)
    out = {}
    for name, kw in {"today": {}, "strong": {"preset": "strong"}}.items():
        cfg = SynthConfig(n_patients=12, seed=3, **kw)
        plan = draw_cohort(cfg)[4]
        assert plan.pattern == "beyond 2 cm"
        out[name] = patient_ceiling(plan, cfg, grid)
    today, strong = out["today"], out["strong"]
    assert today.pattern == strong.pattern == "beyond 2 cm"
    assert strong.lesion_cm3 == pytest.approx(plan.tumour.lesion_cm3, rel=0.1)
    at_20 = {name: r.coverages[-1] for name, r in out.items()}
    assert at_20["today"].margin_mm == 20.0
    assert 1.0 - at_20["strong"].margin > 1.0 - at_20["today"].margin + 0.05  # more of it beyond 20 mm
    assert at_20["strong"].density == 1.0  # all of it among the densest cells
    assert at_20["today"].gain < 0.05
    assert at_20["strong"].gain > 0.2
    assert strong.hidden_max < 0.8 * plan.tumour.t2l_density  # and none of that showed on T1 or FLAIR
