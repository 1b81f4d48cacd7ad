"""The NAV mode: known modes of known distributions, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.preprocess.normalize import NAVModeError, nav_mode, normalise_to_nav

RNG = np.random.default_rng(7)


def _mixture(mode, sd, contamination, n=40_000):
    """Normal(mode, sd) plus a uniform tail of partial-volume values: its mode is `mode`."""
    core = RNG.normal(mode, sd, int(n * (1 - contamination)))
    tail = RNG.uniform(0.2 * mode, 2.5 * mode, int(n * contamination))
    return np.concatenate([core, tail])


@pytest.mark.parametrize(
    ("values", "expected", "rel"),
    [
        (_mixture(400.0, 20.0, 0.3), 400.0, 0.01),
        (_mixture(0.8e-3, 0.05e-3, 0.2), 0.8e-3, 0.01),
        # skewed: gamma(k=9, θ=1) has mode (k − 1)θ = 8, mean 9, median ≈ 8.67
        (RNG.gamma(9.0, 1.0, 200_000), 8.0, 0.03),
        # one exact tissue value among partial-volume mixtures: exact answer
        (np.concatenate([np.full(5000, 300.0), RNG.uniform(300.0, 540.0, 2000)]), 300.0, 1e-9),
        (np.full(500, 6.0), 6.0, 1e-12),
    ],
    ids=["normal+tail", "adc-units", "gamma", "spike", "constant"],
)
def test_nav_mode_finds_the_known_mode(values, expected, rel):
    assert nav_mode(values, bins=256, smoothing=2.0) == pytest.approx(expected, rel=rel)


def test_nav_mode_ignores_nan():
    values = np.concatenate([np.full(1000, 2.0), np.full(5000, np.nan)])
    assert nav_mode(values) == 2.0


def test_too_few_voxels_is_refused():
    with pytest.raises(NAVModeError, match="only 10 normal-appearing voxels"):
        nav_mode(np.ones(10), min_voxels=100)


def test_non_positive_mode_is_refused():
    image = np.full((10, 10, 10), -1.0, dtype=np.float32)
    with pytest.raises(NAVModeError, match="not positive"):
        normalise_to_nav(image, np.ones_like(image, dtype=bool))


def test_normalised_nav_mode_is_one():
    image = RNG.normal(250.0, 10.0, (30, 30, 30)).astype(np.float32)
    nav = np.zeros(image.shape, dtype=bool)
    nav[5:25, 5:25, 5:25] = True
    out, mode = normalise_to_nav(image, nav)
    assert mode == pytest.approx(250.0, rel=0.01)
    assert nav_mode(out[nav]) == pytest.approx(1.0, abs=1e-3)
