"""Coverage rules on prepared patients with fabricated probability maps where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.ctv.conformal import crc_threshold, miss_fractions
from ctvlab.ctv.construct import model_ctv
from ctvlab.ctv.coverage import new_progression
from ctvlab.ctv.scoring import patient_masks
from ctvlab.data.readers import load_patient
from ctvlab.stages.calibrate import COVERAGE_GRID, coverage_rules

pytestmark = pytest.mark.ray  # the prepared phantom is made with Ray Data


def _calibration_maps(prep, n_copies: int = 3, seed: int = 0):
    """Each phantom patient several times, with a map that is high on its new progression, lower around
    the lesion and noisy elsewhere: exchangeable calibration patients."""
    rng = np.random.default_rng(seed)
    ids = sorted(p.name.split(".")[0] for p in (prep / "volumes").glob("*.json"))
    maps = []
    for pid in ids:
        p = load_patient(prep, pid)
        m = {**patient_masks(p), "ventricles": p.mask("ventricles") > 0}
        new = new_progression(m)
        for _ in range(n_copies):
            prob = 0.3 * rng.random(new.shape) + 0.6 * new * rng.uniform(0.5, 1.0)
            maps.append((p, prob.astype(np.float32)))
    return maps


def test_coverage_rules_take_the_largest_threshold_that_keeps_the_corrected_miss_within_the_target(
    prepared_phantom,
):
    maps = _calibration_maps(prepared_phantom)
    assert len(maps) >= 19  # enough calibration "patients" for 95%
    rules = {r["name"]: r for r in coverage_rules(maps, [0.9, 0.95, 0.99])}
    assert rules["cov99"]["threshold"] is None and "at least 99" in rules["cov99"]["reason"]
    # the same answer as conformal risk control on the miss fractions computed here, independently
    ctvs, news = [], []
    for p, prob in maps:
        m = {**patient_masks(p), "ventricles": p.mask("ventricles") > 0}
        ctvs.append(
            [model_ctv(prob, t, m["cel"] | m["t2l"], m["brain"], m["critical"]) for t in COVERAGE_GRID]
        )
        news.append(new_progression(m))
    losses = miss_fractions(ctvs, news)
    n = len(maps)
    for name, target in (("cov90", 0.9), ("cov95", 0.95)):
        t = rules[name]["threshold"]
        assert t is not None and t == crc_threshold(losses, COVERAGE_GRID, target).threshold
        j = COVERAGE_GRID.index(t)
        assert n / (n + 1) * losses[:, j].mean() + 1 / (n + 1) <= 1 - target + 1e-12
        if j + 1 < len(COVERAGE_GRID):  # the next threshold up breaks the bound: t is the largest
            assert n / (n + 1) * losses[:, j + 1].mean() + 1 / (n + 1) > 1 - target
    assert rules["cov95"]["threshold"] <= rules["cov90"]["threshold"]  # more coverage, lower threshold
    assert 0 < rules["cov95"]["threshold"] < 1 and rules["cov95"]["calibration_miss"] > 0  # not trivial
