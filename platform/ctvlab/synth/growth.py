"""Fisher–Kolmogorov reaction–diffusion of tumour-cell density.

    ∂u/∂t = ∇·(D(x) ∇u) + ρ(x) u (1 − u)

`u` is the tumour-cell density as a fraction of the carrying capacity, `D` the diffusivity (mm² per
unit time) and `ρ` the proliferation rate (per unit time); this is the glioma model of Swanson et al.,
with faster diffusion in white than in grey matter. A front travels at 2√(Dρ) and the density ahead of
it decays over the infiltration length √(D/ρ): the part of the tumour that no image shows.

Finite volumes on a regular grid of spacing `h` mm, explicit Euler in time. The diffusivity of a face is
the harmonic mean of its two cells, so a face to a cell with D = 0 (outside the brain, CSF, a resection
cavity) carries no flux: zero-flux boundaries without special cases. Works on arrays of any dimension
(a 1-D front is an array of shape (N,) or (N, 1, 1)).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def face_diffusivities(d: np.ndarray) -> list[np.ndarray]:
    """Harmonic-mean diffusivity of the faces between neighbours along each axis.

    Args:
        d: cell diffusivity (any shape), ≥ 0.

    Returns:
        one array per axis, of the shape of `d` with that axis one shorter.
    """
    out = []
    for axis in range(d.ndim):
        a = np.take(d, np.arange(d.shape[axis] - 1), axis=axis)
        b = np.take(d, np.arange(1, d.shape[axis]), axis=axis)
        s = a + b
        out.append(np.where(s > 0, 2.0 * a * b / np.where(s > 0, s, 1.0), 0.0).astype(d.dtype))
    return out


def stable_dt(d_max: float, rho_max: float, h: float, ndim: int = 3, safety: float = 0.9) -> float:
    """Largest explicit time step that keeps the scheme monotone (and u within [0, 1]).

    Diffusion needs dt ≤ h² / (2·ndim·D); the logistic term dt·ρ ≤ 0.5 keeps its error small.
    """
    limits = [0.5 / rho_max] if rho_max > 0 else []
    if d_max > 0:
        limits.append(h * h / (2 * ndim * d_max))
    if not limits:
        raise ValueError("stable_dt: D and ρ are both zero; nothing evolves")
    return safety * min(limits)


class FisherKolmogorov:
    """Explicit solver for one tumour: fixed D(x), ρ(x) and grid spacing.

    Args:
        d: diffusivity per cell (mm²/time), 0 where cells cannot go; with `per_axis`, (ndim, *shape): one
            diffusivity per grid axis (a diagonal tensor: faster spread along the axes a tract runs along).
        rho: proliferation rate per cell (1/time), scalar or array of `d`'s shape.
        h: grid spacing (mm).
        dt: time step; default: `stable_dt`.
    """

    def __init__(
        self,
        d: np.ndarray,
        rho: float | np.ndarray,
        h: float,
        dt: float | None = None,
        per_axis: bool = False,
    ):
        if per_axis:
            self.faces = [face_diffusivities(d[axis])[axis] for axis in range(d.shape[0])]
            d = d.max(axis=0)
        else:
            self.faces = face_diffusivities(d)
        self.rho = rho if np.isscalar(rho) else np.asarray(rho, dtype=d.dtype)
        self.h = float(h)
        rho_max = float(np.max(rho))
        self.dt = float(dt) if dt is not None else stable_dt(float(d.max()), rho_max, h, ndim=d.ndim)
        self._lap = np.zeros_like(d)
        self._slices = []
        for axis in range(d.ndim):
            lo = [slice(None)] * d.ndim
            hi = [slice(None)] * d.ndim
            lo[axis] = slice(None, -1)
            hi[axis] = slice(1, None)
            self._slices.append((tuple(lo), tuple(hi)))

    def step(self, u: np.ndarray, box: tuple[slice, ...] | None = None) -> None:
        """Advance `u` by one time step, in place; only the cells in `box` when given.

        Cells outside `box` keep their values and exchange no flux with it, so a box must enclose every
        cell whose density matters (see `active_box`).
        """
        if box is None:
            box = tuple(slice(0, n) for n in u.shape)
        ub = u[box]
        lap = self._lap[box]
        lap.fill(0.0)
        for axis, (f, (lo, hi)) in enumerate(zip(self.faces, self._slices, strict=True)):
            if ub.shape[axis] < 2:
                continue
            fbox = list(box)
            fbox[axis] = slice(box[axis].start, box[axis].stop - 1)
            flux = f[tuple(fbox)] * (ub[hi] - ub[lo])
            lap[lo] += flux
            lap[hi] -= flux
        rho = self.rho if np.isscalar(self.rho) else self.rho[box]
        lap *= 1.0 / (self.h * self.h)
        lap += rho * ub * (1.0 - ub)
        ub += self.dt * lap
        np.clip(ub, 0.0, 1.0, out=ub)

    def run(
        self,
        u: np.ndarray,
        t_end: float | None = None,
        stop: Callable[[np.ndarray, float], bool] | None = None,
        max_steps: int = 100_000,
        active_threshold: float | None = None,
    ) -> float:
        """Step `u` in place until `t_end`, until `stop(u, t)` is true, or for `max_steps` steps.

        Args:
            active_threshold: when set, step only the bounding box of cells with u above it (plus a
                margin), recomputed every few steps. The density left outside is below the threshold;
                cutting a pulled front's tail at ε slows it by about π²/(2 ln² ε) (Brunet–Derrida):
                1.5% at 1e-8. None steps the whole grid (exact).

        Returns:
            the time reached.
        """
        t = 0.0
        box = None
        for n in range(max_steps):
            if stop is not None and stop(u, t):
                break
            if t_end is not None and t >= t_end - 1e-12:
                break
            if active_threshold is not None and n % 4 == 0:
                box = active_box(u, active_threshold, margin=6)
            dt = self.dt if t_end is None else min(self.dt, t_end - t)
            saved, self.dt = self.dt, dt
            self.step(u, box)
            self.dt = saved
            t += dt
        return t


def active_box(u: np.ndarray, threshold: float, margin: int) -> tuple[slice, ...]:
    """Bounding box of the cells above `threshold`, grown by `margin` cells (the whole grid if none)."""
    above = u > threshold
    box = []
    for axis in range(u.ndim):
        hit = np.flatnonzero(above.any(axis=tuple(a for a in range(u.ndim) if a != axis)))
        if hit.size == 0:
            return tuple(slice(0, n) for n in u.shape)
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + margin + 1, u.shape[axis])))
    return tuple(box)


def front_position(u: np.ndarray, level: float, h: float) -> float:
    """Distance (mm, from the first cell centre) at which a 1-D profile decreasing in x crosses `level`.

    Linear interpolation between the two cells that bracket the level; used to measure wave speed.
    """
    u = np.asarray(u, dtype=np.float64).ravel()
    above = np.flatnonzero(u >= level)
    if above.size == 0:
        return 0.0
    i = int(above.max())
    if i + 1 >= u.size:
        return i * h
    frac = (u[i] - level) / (u[i] - u[i + 1])
    return (i + frac) * h
