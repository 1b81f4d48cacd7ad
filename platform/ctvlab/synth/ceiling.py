"""What a synthetic cohort leaves for imaging to find: the ceiling of any map made from the true density.

Per patient, on the simulation's own growth grid (no images, no noise, no registration error):

- **new progression**: cells whose density at progression is at or above the T2L threshold, outside the
  pre-RT T2L and cavity, inside the brain and within RING_MM of the pre-RT T2L (the study's 4 cm ring);
- **the margin of M mm**: the normal-appearing cells (in the brain, outside the T2L and the cavity) within
  M mm of the T2L and within the ring; its size k is the volume a uniform CTV margin of M mm spends;
- **the densest k**: the k normal-appearing ring cells of highest TRUE pre-RT density (ties, e.g. cells the
  tumour never reached, go to the nearer cell: a density map falls back on the distance, no worse).

The ceiling at M mm is the share of the new progression the densest k cover minus the share the margin
covers, averaged over the patients that have new progression. No map computed from the pre-RT density
(diffusion, MRSI, a network on them) can beat the margin at that volume by more than the density itself,
so a cohort whose ceiling is near 0 has nothing for imaging to find.

Distances are Euclidean, in millimetres with the grid spacing; pass the patient's spacing (template mm
times the brain scale) so that margins are the patient's millimetres, as the recurrence pattern is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

RING_MM = 40.0  # the study's voxel analyses stay within 4 cm of the pre-RT T2L
MARGINS_MM = (5.0, 10.0, 15.0, 20.0)


@dataclass(frozen=True)
class MarginCoverage:
    """One patient at one margin.

    Attributes:
        margin_mm: the uniform margin (mm) whose volume both predictions spend.
        cells: that volume, in cells (k).
        density: share of the new progression covered by the k densest cells.
        margin: share covered by the margin itself (the k nearest cells).
    """

    margin_mm: float
    cells: int
    density: float
    margin: float

    @property
    def gain(self) -> float:
        return self.density - self.margin


def distance_mm(region: np.ndarray, spacing_mm: float | Sequence[float]) -> np.ndarray:
    """Euclidean distance (mm) of every cell centre to the nearest cell of `region` (0 inside it).

    Raises:
        ValueError: `region` is empty (there is nothing to measure from).
    """
    if not region.any():
        raise ValueError("distance_mm: the region is empty; a patient without a pre-RT T2L has no margin")
    return ndi.distance_transform_edt(~region, sampling=spacing_mm)


def normal_appearing_ring(
    brain: np.ndarray, t2l: np.ndarray, cavity: np.ndarray, dist_mm: np.ndarray, ring_mm: float = RING_MM
) -> np.ndarray:
    """Brain cells outside the pre-RT T2L and cavity, within `ring_mm` of the T2L (boolean)."""
    return brain & ~t2l & ~cavity & (dist_mm <= ring_mm)


def new_progression(u_progression: np.ndarray, ring: np.ndarray, t2l_density: float) -> np.ndarray:
    """Ring cells at or above the T2L visibility density at progression (boolean)."""
    return ring & (u_progression >= t2l_density)


def densest(density: np.ndarray, dist_mm: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The `k` candidate cells of highest density; ties go to the nearer cell, then to the lower index.

    Args:
        density: any score per cell (here the true pre-RT density).
        dist_mm: distance to the T2L per cell (the tie-break).
        candidates: boolean, the cells to choose from.
        k: how many to choose (at most the number of candidates).

    Returns:
        boolean array of `density`'s shape with exactly min(k, candidates) cells set.
    """
    idx = np.flatnonzero(candidates)
    k = int(min(max(k, 0), idx.size))
    out = np.zeros(density.shape, dtype=bool)
    if k == 0:
        return out
    d, r = density.ravel()[idx], dist_mm.ravel()[idx]
    order = np.lexsort((idx, r, -d.astype(np.float64)))  # last key first: density down, distance up
    out.ravel()[idx[order[:k]]] = True
    return out


def margin_coverages(
    density: np.ndarray,
    dist_mm: np.ndarray,
    ring: np.ndarray,
    new: np.ndarray,
    margins_mm: Sequence[float] = MARGINS_MM,
) -> list[MarginCoverage]:
    """Coverage of the new progression by the margin and by the densest cells of the same volume.

    Args:
        density: true pre-RT density per cell.
        dist_mm: distance (mm) to the pre-RT T2L per cell.
        ring: the normal-appearing ring cells (`normal_appearing_ring`).
        new: the new progression (`new_progression`); must be non-empty.
        margins_mm: the margins to compare at.

    Raises:
        ValueError: no new progression (the shares are undefined).
    """
    n_new = int(np.count_nonzero(new))
    if n_new == 0:
        raise ValueError("margin_coverages: no new progression; leave such a patient out of the ceiling")
    out = []
    for m in margins_mm:
        margin = ring & (dist_mm <= m)
        k = int(np.count_nonzero(margin))
        top = densest(density, dist_mm, ring, k)
        out.append(
            MarginCoverage(
                margin_mm=float(m),
                cells=k,
                density=np.count_nonzero(top & new) / n_new,
                margin=np.count_nonzero(margin & new) / n_new,
            )
        )
    return out


@dataclass(frozen=True)
class CeilingSummary:
    """The ceiling at one margin over patients: mean gain, bootstrap 95% interval, paired Wilcoxon p."""

    margin_mm: float
    patients: int
    mean_gain: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float
    mean_density: float
    mean_margin: float


def summarise_ceiling(
    per_patient: Sequence[Sequence[MarginCoverage]], n_boot: int = 4000, seed: int = 0
) -> list[CeilingSummary]:
    """The ceiling per margin over patients (each patient a list from `margin_coverages`, same margins).

    The interval resamples patients with replacement (percentile bootstrap); the p-value is the
    two-sided Wilcoxon signed-rank test of the paired coverages (1.0 when every difference is 0).
    """
    from scipy import stats

    if not per_patient:
        return []
    rng = np.random.default_rng(seed)
    n = len(per_patient)
    boot = rng.integers(0, n, size=(n_boot, n))
    out = []
    for j, first in enumerate(per_patient[0]):
        dens = np.array([p[j].density for p in per_patient])
        marg = np.array([p[j].margin for p in per_patient])
        diff = dens - marg
        means = diff[boot].mean(axis=1)
        p = 1.0 if not np.any(diff != 0) else float(stats.wilcoxon(dens, marg).pvalue)
        out.append(
            CeilingSummary(
                margin_mm=first.margin_mm,
                patients=n,
                mean_gain=float(diff.mean()),
                ci_low=float(np.percentile(means, 2.5)),
                ci_high=float(np.percentile(means, 97.5)),
                wilcoxon_p=p,
                mean_density=float(dens.mean()),
                mean_margin=float(marg.mean()),
            )
        )
    return out


# --- one simulated patient -------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientCeiling:
    """What the ceiling benchmark measures on one simulated patient (growth grid, patient mm).

    Attributes:
        coverages: per margin (None when the patient has no new progression).
        new_cells: cells of new progression.
        lesion_cm3: pre-RT T2L ∪ CEL volume, cm³ (Table 1's lesion volume).
        pattern: the recurrence pattern of the progression masks (`ctvlab.synth.table1`).
        far_mm: the farthest new progression voxel from the pre-RT T2L (the masks' definition), mm.
        hidden_max: the highest pre-RT density of the new progression more than HIDDEN_MM beyond the T2L
            and the cavity, what the density knows there and a margin does not (NaN when there is none). Below
            0.8·`t2l_density`, where T1 and FLAIR begin to brighten (`imaging.visibility`), anatomy is
            blind to it but for FLAIR's faint tail.
        flair_tail: median relative FLAIR brightening of that new progression at the pre-RT scan (the faint
            sub-threshold tail of `imaging.flair_image`, in every cohort; NaN when there is none).
    """

    coverages: list[MarginCoverage] | None
    new_cells: int
    lesion_cm3: float
    pattern: str | None
    far_mm: float | None
    hidden_max: float
    flair_tail: float


HIDDEN_MM = 10.0  # beyond this the new progression is what a 10 mm margin misses


def simulate_patient(plan, cfg, grid):
    """The tumour course of `plan` exactly as `generate_patient` simulates it (same spec, same stream).

    Returns:
        (the spec in template units, the `TumourCourse`).
    """
    from ctvlab.synth.patient import patient_streams, template_units
    from ctvlab.synth.tumour import simulate_tumour

    spec = template_units(plan.tumour, plan.brain_scale)
    return spec, simulate_tumour(spec, grid, patient_streams(cfg.seed, plan.index)["tumour"])


def patient_ceiling(plan, cfg, grid, margins_mm: Sequence[float] = MARGINS_MM) -> PatientCeiling:
    """Simulate one patient on the growth grid (no images) and measure its ceiling, lesion and pattern.

    Args:
        plan: a `PatientPlan` from `draw_cohort(cfg)`.
        cfg: the `SynthConfig` the plan was drawn with.
        grid: `growth_grid(cfg.growth_mm)`.
        margins_mm: the margins (patient mm).
    """
    from ctvlab.synth import imaging
    from ctvlab.synth.patient import OEDEMA_KEPT
    from ctvlab.synth.table1 import recurrence_pattern
    from ctvlab.synth.tumour import pre_rt_regions, progression_regions

    spec, course = simulate_patient(plan, cfg, grid)
    pre = pre_rt_regions(course.u_pre, course.depth_mm, spec, course.gtr_density, course.oedema)
    h = grid.spacing * plan.brain_scale  # the patient's millimetres (the head is scaled into the template)
    brain = grid.brain >= 0.5
    t2l, cel = pre["t2l"] & brain, pre["cel"] & brain
    lesion_cm3 = float(np.count_nonzero(t2l | cel) * h**3 / 1000.0)
    if course.oedema is not None:
        pre["oedema_kept"] = course.oedema >= OEDEMA_KEPT
    prog = progression_regions(course.u_prog, pre, spec)
    pattern, far, _ = recurrence_pattern(t2l, cel, prog["t2l"] & brain, prog["cel"] & brain, (h, h, h))
    if not t2l.any():
        return PatientCeiling(None, 0, lesion_cm3, pattern, far, float("nan"), float("nan"))
    dist = distance_mm(t2l, h)
    ring = normal_appearing_ring(brain, t2l, pre["cavity"], dist)
    new = new_progression(course.u_prog, ring, spec.t2l_density)
    # beyond the cavity too: a GTR may resect below the T2L threshold, leaving a sub-threshold wall far from
    # the remaining T2L but right at the visible cavity
    hidden = course.u_pre[new & (distance_mm(t2l | pre["cavity"], h) > HIDDEN_MM)]
    visible_at = imaging.infiltration_response(np.float32(spec.t2l_density))
    tail = imaging.HIDDEN_FLAIR_CELLS * np.clip(imaging.infiltration_response(hidden) / visible_at, 0.0, 1.0)
    nan = float("nan")
    hidden_max, flair_tail = (float(hidden.max()), float(np.median(tail))) if hidden.size else (nan, nan)
    n_new = int(np.count_nonzero(new))
    coverages = margin_coverages(course.u_pre, dist, ring, new, margins_mm) if n_new else None
    return PatientCeiling(coverages, n_new, lesion_cm3, pattern, far, hidden_max, flair_tail)
