"""The Fisher–Kolmogorov solver against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.synth.growth import FisherKolmogorov, face_diffusivities, front_position, stable_dt


def test_no_growth_conserves_mass_with_heterogeneous_diffusion():
    """ρ = 0: pure diffusion with zero-flux walls (D = 0 outside a blob) keeps the total density."""
    rng = np.random.default_rng(0)
    d = rng.uniform(0.2, 2.0, size=(20, 22, 18))
    d[:3] = 0.0  # a wall: cells the density must never enter
    u = np.zeros_like(d)
    u[8:11, 9:12, 7:10] = 1.0
    solver = FisherKolmogorov(d, 0.0, h=1.0)
    mass = u.sum()
    solver.run(u, t_end=20.0)
    assert u.sum() == pytest.approx(mass, rel=1e-10)
    assert u[:3].max() == 0.0
    assert u.max() < 0.5  # it did spread


@pytest.mark.parametrize(
    ("shape", "d_coef", "rho"),
    [((800, 1, 1), 0.5, 2.0), ((800, 3, 2), 0.5, 2.0), ((800, 1, 1), 0.125, 2.0), ((800, 1, 1), 0.5, 0.5)],
)
def test_travelling_wave_speed_is_two_sqrt_d_rho(shape, d_coef, rho):
    """A front invading u = 0 settles at speed 2√(Dρ) (1-D, and a planar front in a 3-D array)."""
    lam = np.sqrt(d_coef / rho)  # infiltration length: 4 cells of it; times in units of 1/ρ
    h = lam / 4
    d = np.full(shape, d_coef)
    u = np.zeros(shape)
    u[:40] = 1.0
    solver = FisherKolmogorov(d, rho, h)
    solver.run(u, t_end=30.0 / rho)
    x1 = front_position(u[:, 0, 0], 0.5, h)
    solver.run(u, t_end=20.0 / rho)
    x2 = front_position(u[:, 0, 0], 0.5, h)
    # the front approaches 2√(Dρ) from below as 3/(2t)·λ (Bramson): 2% at these times
    assert (x2 - x1) / (20.0 / rho) == pytest.approx(2.0 * np.sqrt(d_coef * rho), rel=0.03)
    assert np.allclose(u, u[:, :1, :1])  # planar: no transverse variation


def test_face_diffusivity_is_harmonic_and_closes_walls():
    d = np.array([[[1.0], [3.0], [0.0]]])  # shape (1, 3, 1)
    faces = face_diffusivities(d)
    assert faces[0].shape == (0, 3, 1)
    assert faces[1][0, :, 0] == pytest.approx([1.5, 0.0])  # 2·1·3/(1+3); any face to D = 0 is closed


def test_stable_dt_limits():
    assert stable_dt(d_max=2.0, rho_max=0.0, h=1.0, safety=1.0) == pytest.approx(1 / 12)
    assert stable_dt(d_max=0.0, rho_max=4.0, h=1.0, safety=1.0) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        stable_dt(0.0, 0.0, 1.0)
