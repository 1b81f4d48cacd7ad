"""One patient's tumour: seeded in white matter, grown to its pre-RT size, resected, grown on to progression.

The simulation runs in template space on the coarse growth grid, in reference units: ρ = 1 per unit time
and D = λ² with λ the patient's infiltration length (mm) in white matter (λ/√ratio in grey matter). Only
the shape of the density profile depends on λ; the patient's real rates follow from the time at which
progression is reached (`t_progression`) and the drawn PFS: ρ = t_progression / PFS, D = λ²ρ. So "the
same model run on for the patient's PFS" and the drawn recurrence pattern hold together by construction.

Invasion is not the same in every direction. Glioma cells migrate along white-matter bundles far faster
than through the rest of the parenchyma, so each infiltrating tumour gets one to three invasion routes
(`route_field`: half-lines from the seed, Gaussian across) on which D has its full value and off which it
is `off_route_invasion` (0.1–0.3) times lower; a smooth random field (correlation length
HETEROGENEITY_MM) and the local tract direction (`axis_diffusivities`) vary it further. The invisible
tail reaches furthest along the routes, and so does the recurrence: how far and where a tumour recurs is
written in its sub-visible density, which diffusion and MRSI see, and not in the distance to its visible
edge. The seed starts as the travelling wave's profile (a logistic of width λ), so even a tumour stopped
at once by a small drawn volume has its invisible tail.

Density levels (fractions of the carrying capacity), as in Swanson's model of what MRI sees:
`t2l_density` is the T2/FLAIR visibility threshold (below it: invisible infiltration), `cel_density`
the level at which the blood-brain barrier breaks down (enhancement). The enhancing zone deeper than
`rim_mm` is the necrotic core (ring enhancement). Resection: a GTR removes the densest tissue, at least
all of the enhancing zone and a planned cavity volume; an STR leaves an enhancing rim of
`str_residual_mm`; a biopsy removes nothing. The pre-RT lesion volume (T2L ∪ CEL, cavity excluded) is
the drawn one: growth stops when it is reached.

Vasogenic oedema: fluid leaking from the enhancing tumour's broken blood-brain barrier spreads through the
extracellular space, far more easily along white matter than through grey matter. It is simulated as
diffusion from the enhancing zone (held at 1) with `oedema_wm_ratio` times faster spread in white matter,
until the T2L (visible tumour ∪ visible oedema, the cavity excluded) reaches the drawn lesion volume; the
tumour is grown first to `1 − oedema_fraction` of it. Oedema is bright on FLAIR like tumour, raises ADC,
and carries no tumour cells: it does not progress, and a margin drawn from its edge is a margin around
nothing. So the distance to the T2L is a blurred guide to where the cells are; diffusion and metabolism,
which see the cells, are a sharper one.

After RT the cavity holds no cells and no flux; optionally an invisible satellite focus is added in white
matter; the tumour's invasiveness changes (the random field of D is redrawn with correlation
`post_rt_correlation` to the pre-RT one, lower for later progression: what the pre-RT scan shows of the
tumour's behaviour says less the longer it takes to recur; times `post_rt_invasion`, above 1 under
anti-angiogenic therapy, which selects an invasive phenotype). Growth goes on until the drawn recurrence is
reached: the farthest newly visible cell lies `advance_mm` beyond the pre-RT T2L (T2L or both
progression), or `new_cel_cm3` of new enhancement has appeared inside it (CEL progression).

The cohort's signal settings (`SynthConfig.channelling`, `seeding`, `determinism`; all 0 by default, when
none of this runs) move the course away from near-isotropic recurrence, as
`ctvlab.synth.signal_settings.with_signal` sets them per patient: a *channelled* tumour invades along
routes that follow the white matter (`ctvlab.synth.routes`), off which D falls towards 1% of its value,
and its invisible tail (below the T2L threshold) reaches far along those routes only; its seed is the
lesion itself (`smallest_core`), so that growth off the routes does not round the tail off again. *Seeded*
foci (`foci_mm`) sit on the routes at the drawn recurrence distance, invisible, and grow into the
recurrence. A *deterministic* course keeps the pre-RT invasiveness after RT, meets no unimaged
radio-resistance and barely migrates (`post_rt_migration`): the recurrence regrows where the pre-RT cells
are. docs/synthetic-cohort-ceiling.md measures what each does.

About 600 lines in one module: one patient's course, whose phases (growth, resection, oedema, RT, regrowth)
share the same fields and thresholds; split up, they would pass a dozen arrays between modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ctvlab.synth.anatomy import GrowthGrid, apply_affine
from ctvlab.synth.growth import FisherKolmogorov, stable_dt
from ctvlab.synth.routes import geodesic_mm, path_tubes, route_foci, straight_paths, white_matter_paths

# Cells whose tissue fraction (grey + white matter) is below this are outside the simulation domain:
# tumour cells neither enter CSF nor ventricles (zero-flux boundary).
MIN_TISSUE = 0.5
# Seeds: white matter of the cerebrum, away from the brain's surface and from the critical structures.
SEED_MIN_WM = 0.7
SEED_MIN_DEPTH_MM = 15.0
SEED_MIN_Z_MM = -5.0
ACTIVE_THRESHOLD = 1e-8
SEED_RADIUS_LAMBDA = 2.0
HETEROGENEITY_MM = 30.0  # correlation length of the random invasiveness field
OEDEMA_VISIBLE = 0.3  # oedema level (fraction of its source's) visible as T2/FLAIR hyperintensity
# Longest simulated phase (reference time, ρ = 1): a front crosses a brain (~150 mm) at 2λ ≥ 5 mm per
# unit well within it. A target the anatomy cannot hold (a lesion larger than its lobe allows, an
# advance blocked by the brain's surface) ends here instead of running forever.
MAX_TIME = 40.0
CORE_SEARCH_MM = 100.0  # a channelled seed's core is sought up to this radius (a brain's is about 70)
ROUTE_SPARE_MM = 15.0  # a white-matter route aims this far past the lesion and the drawn recurrence


@dataclass(frozen=True)
class TumourSpec:
    """What the clinical draw decided about a patient's tumour (see `ctvlab.synth.clinical`).

    Attributes:
        lambda_wm_mm: infiltration length √(D/ρ) in white matter, mm.
        diffusion_ratio: D in white matter / D in grey matter.
        lesion_cm3: pre-RT lesion volume (T2L ∪ CEL, the cavity excluded) to grow to.
        resection: "GTR", "STR" or "biopsy".
        progression_type: "CEL", "T2L" or "both".
        advance_mm: for T2L/both progression, how far (mm) beyond the pre-RT T2L the farthest newly
            visible voxel lies at progression.
        new_cel_cm3: for CEL progression, the volume of new enhancement inside the pre-RT T2L.
        heterogeneity: SD of the log of a smooth random factor on D (patient-specific, spatially varying
            invasiveness: some directions infiltrate further than tissue type alone explains).
        satellite_mm: distance beyond the pre-RT T2L of an invisible satellite focus in white matter
            (0: none). Real recurrences are not only a front moving outwards: distant foci of
            infiltration, invisible on anatomical MRI, grow into new lesions.
        satellite_density: peak density of that focus (below the T2L threshold).
        rim_mm: thickness of the enhancing rim around a necrotic core.
        gtr_cavity_cm3: GTR removes at least this volume of the densest tissue, and always all enhancing
            tissue.
        str_residual_mm: STR leaves an enhancing rim this thick around the cavity.
        t2l_density, cel_density: visibility thresholds (see module docstring).
        cel_density_progression: enhancement threshold at progression (higher under bevacizumab, which
            suppresses enhancement).
        oedema_fraction: share of the pre-RT lesion volume that is oedema without visible tumour.
        oedema_wm_ratio: how much faster oedema spreads in white than in grey matter.
        post_rt_correlation: correlation of the invasiveness field after RT with the one before.
        post_rt_invasion: factor on D after RT (anti-angiogenic therapy: more invasive).
        rt_kill: log cell kill of RT in the least radio-resistant tissue; a smooth random resistance field
            (never imaged) decides where cells survive to seed the recurrence.
        tract_anisotropy: 0..1, how much faster cells migrate along white-matter tracts than across them
            (times the tracts' coherence; see `axis_diffusivities`).
        routes: number of invasion routes: bundles of white matter leaving the tumour, along which its
            cells migrate at the full D (see `route_field`); 0: none, D is the same in every direction.
        route_width_mm: the routes' Gaussian half-width (SD), mm.
        off_route_invasion: factor on D away from the routes (≤ 1).
        channelling: 0..1, how strictly invasion keeps to the routes (0: the default straight routes).
            Above 0 the routes follow the white matter (`ctvlab.synth.routes.white_matter_paths`), the
            seed's neighbourhood is on them only by 1 − channelling, and the invisible tail the tumour
            starts with decays over λ·f^(channelling/2), f the factor on D: the travelling wave's decay
            length √(D/ρ) where the tumour invaded along the routes; its saturated core is sized (by the
            same fraction) so that the lesion is reached from the start, instead of growing into it.
        foci_mm: one distance beyond the pre-RT T2L per route (0: none) at which an invisible focus sits
            on that route (`ctvlab.synth.routes.route_foci`): cells that migrated ahead of the bulk.
        foci_density: the foci's density (below `t2l_density`).
        foci_radius_mm: the foci's radius, mm.
        post_rt_migration: factor on D after RT (1: invasion goes on as before; small: the recurrence
            regrows where the surviving cells are, so it is written in the pre-RT density).
    """

    lambda_wm_mm: float
    diffusion_ratio: float
    lesion_cm3: float
    resection: str
    progression_type: str
    advance_mm: float
    new_cel_cm3: float
    heterogeneity: float
    satellite_mm: float
    satellite_density: float
    rim_mm: float
    gtr_cavity_cm3: float
    str_residual_mm: float
    t2l_density: float
    cel_density: float
    cel_density_progression: float
    oedema_fraction: float = 0.0
    oedema_wm_ratio: float = 20.0
    post_rt_correlation: float = 1.0
    post_rt_invasion: float = 1.0
    rt_kill: float = 0.0
    tract_anisotropy: float = 0.0
    routes: int = 0
    route_width_mm: float = 6.0
    off_route_invasion: float = 1.0
    channelling: float = 0.0
    foci_mm: tuple[float, ...] = ()
    foci_density: float = 0.0
    foci_radius_mm: float = 0.0
    post_rt_migration: float = 1.0


@dataclass
class TumourCourse:
    """The simulated fields on the growth grid (template space), to be interpolated onto image grids.

    Attributes:
        u_pre: density at the pre-RT scan, before resection (float32).
        depth_mm: signed distance to the boundary of the enhancing zone {u_pre ≥ cel_density}, mm,
            positive inside (float32): decides the necrotic core and the STR cavity.
        u_prog: density at progression; cavity cells filled from their neighbours for interpolation.
        seed_mni: seed position (MNI mm).
        t_pre, t_progression: simulated times (reference units) from seed to the pre-RT scan and from
            the pre-RT scan to progression.
        advance_mm: achieved distance of the farthest new T2L cell beyond the pre-RT T2L (growth grid).
        gtr_density: GTR only: cells above this density were resected (at most `cel_density`).
        oedema: vasogenic oedema at the pre-RT scan, 0..1 (visible at OEDEMA_VISIBLE); no tumour cells.
    """

    u_pre: np.ndarray
    depth_mm: np.ndarray
    u_prog: np.ndarray
    seed_mni: np.ndarray
    t_pre: float
    t_progression: float
    advance_mm: float
    gtr_density: float
    oedema: np.ndarray | None = None


def pre_rt_regions(
    u: np.ndarray,
    depth_mm: np.ndarray,
    spec: TumourSpec,
    gtr_density: float,
    oedema: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The pre-RT regions from density and depth, on any grid (growth grid or an image grid).

    A GTR removes every cell above `gtr_density` (≤ `cel_density`: all enhancement); an STR removes the
    enhancing zone but a rim of `str_residual_mm`; a biopsy removes nothing.

    Returns:
        boolean arrays "cavity", "necrosis", "cel", "t2l": T2L ⊇ CEL ∪ necrosis, all disjoint from the
        cavity; CEL = the enhancing zone minus the necrotic core (deeper than `rim_mm`) and the cavity;
        the T2L holds visible tumour and visible oedema.
    """
    enhancing = u >= spec.cel_density
    if spec.resection == "GTR":
        cavity = u >= min(gtr_density, spec.cel_density)
    elif spec.resection == "STR":
        cavity = enhancing & (depth_mm > spec.str_residual_mm)
    else:
        cavity = np.zeros(u.shape, dtype=bool)
    necrosis = enhancing & (depth_mm > spec.rim_mm) & ~cavity
    return {
        "cavity": cavity,
        "necrosis": necrosis,
        "cel": enhancing & ~necrosis & ~cavity,
        "t2l": ((u >= spec.t2l_density) | _visible_oedema(oedema, u.shape)) & ~cavity,
    }


def _visible_oedema(oedema: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, dtype=bool) if oedema is None else oedema >= OEDEMA_VISIBLE


def progression_regions(
    u_prog: np.ndarray, pre: dict[str, np.ndarray], spec: TumourSpec
) -> dict[str, np.ndarray]:
    """CEL and T2L at progression (what is visible then), given the pre-RT regions on the same grid.

    CEL progression: new enhancement inside the pre-RT T2L, no new non-enhancing lesion. T2L
    progression: the T2L grows, enhancement stays as it was. Both: both grow. Pre-RT oedema has
    resolved by then except where it was densest (`pre["oedema_kept"]`, when given).
    """
    keep = ~pre["cavity"] & ~pre["necrosis"]
    new_cel = (u_prog >= spec.cel_density_progression) & keep
    if spec.progression_type == "CEL":
        cel = pre["cel"] | (new_cel & pre["t2l"])
        t2l = pre["t2l"] | cel
    elif spec.progression_type == "T2L":
        cel = pre["cel"].copy()
        t2l = ((u_prog >= spec.t2l_density) & ~pre["cavity"]) | cel
    else:
        cel = pre["cel"] | new_cel
        t2l = ((u_prog >= spec.t2l_density) & ~pre["cavity"]) | cel
    if spec.progression_type != "CEL" and "oedema_kept" in pre:
        t2l = t2l | (pre["oedema_kept"] & pre["t2l"])
    return {"cel": cel, "t2l": t2l}


def signed_depth(region: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Signed distance (mm) to a region's boundary: positive inside, negative outside (float32)."""
    if not region.any():
        return np.full(region.shape, -1e3, dtype=np.float32)
    inside = ndi.distance_transform_edt(region, sampling=spacing_mm)
    outside = ndi.distance_transform_edt(~region, sampling=spacing_mm)
    # boundaries lie half a cell from the centres on either side
    return np.where(region, inside - 0.5 * spacing_mm, -(outside - 0.5 * spacing_mm)).astype(np.float32)


def tissue_domain(grid: GrowthGrid) -> np.ndarray:
    """Cells the tumour may occupy: brain tissue (grey + white matter), not CSF."""
    return (grid.brain >= 0.5) & ((grid.gm + grid.wm) >= MIN_TISSUE)


def diffusivity(grid: GrowthGrid, lambda_wm_mm: float, ratio: float, domain: np.ndarray) -> np.ndarray:
    """D per cell in reference units (ρ = 1): λ² in white matter, λ²/ratio in grey, 0 outside the domain."""
    d_wm = lambda_wm_mm**2
    tissue = np.maximum(grid.gm + grid.wm, 1e-6)
    d = d_wm * (grid.wm + grid.gm / ratio) / tissue
    return np.where(domain, d, 0.0).astype(np.float32)


def gaussian_field(shape: tuple[int, ...], spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian random field of unit SD and correlation length HETEROGENEITY_MM."""
    g = ndi.gaussian_filter(rng.standard_normal(shape), HETEROGENEITY_MM / spacing_mm, mode="wrap")
    return (g / max(float(g.std()), 1e-12)).astype(np.float32)


def axis_diffusivities(d: np.ndarray, grid: GrowthGrid, strength: float) -> np.ndarray | None:
    """(3, ...) diffusivities per grid axis that favour the white-matter tract direction: D·(1 − w + 3w·vₐ²)
    with v the tract's unit direction and w = strength × coherence. The mean over the axes is D (the
    diagonal of a tensor of trace 3D; the off-diagonal terms are left out, so a tract oblique to the axes
    favours the axes it runs along). None when there is nothing to favour."""
    if strength <= 0 or grid.tract_axes is None or grid.tract_coherence is None:
        return None
    w = np.float32(strength) * grid.tract_coherence
    return (d[None] * ((1.0 - w)[None] + 3.0 * w[None] * grid.tract_axes)).astype(np.float32)


def _solver(d: np.ndarray, rho: np.ndarray, grid: GrowthGrid, spec: TumourSpec, dt: float | None = None):
    axes = axis_diffusivities(d, grid, spec.tract_anisotropy)
    if axes is None:
        return FisherKolmogorov(d, rho, grid.spacing, dt=dt)
    if dt is not None:
        dt = min(dt, stable_dt(float(axes.max()), 1.0, grid.spacing))
    return FisherKolmogorov(axes, rho, grid.spacing, dt=dt, per_axis=True)


def redrawn_field(
    g: np.ndarray, correlation: float, spacing_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """A `gaussian_field` whose correlation with `g` (another one) is `correlation`: r·g + √(1 − r²)·G."""
    r = float(np.clip(correlation, -1.0, 1.0))
    return (r * g + np.sqrt(1.0 - r * r) * gaussian_field(g.shape, spacing_mm, rng)).astype(np.float32)


def route_field(
    shape: tuple[int, ...], seed: np.ndarray, directions: np.ndarray, width_mm: float, spacing_mm: float
) -> np.ndarray:
    """1 on the invasion routes, falling to 0 away from them: for each unit direction, a half-line from
    the seed cell, Gaussian across (SD `width_mm`); the maximum over the routes. The seed's own
    neighbourhood (within `width_mm`) is on every route."""
    idx = (np.indices(shape, dtype=np.float32) - seed.reshape(-1, *([1] * len(shape)))) * spacing_mm
    r2 = (idx**2).sum(0)
    out = np.exp(-0.5 * r2 / width_mm**2)
    for v in np.atleast_2d(directions):
        along = np.tensordot(v.astype(np.float32), idx, axes=1)
        across2 = np.maximum(r2 - along**2, 0.0)
        out = np.maximum(out, np.where(along > 0, np.exp(-0.5 * across2 / width_mm**2), 0.0))
    return out.astype(np.float32)


def route_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) unit vectors uniform on the sphere."""
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def route_factor(
    spec: TumourSpec, shape, seed: np.ndarray, spacing_mm: float, rng, directions: np.ndarray | None = None
) -> np.ndarray | float:
    """The factor on D of `spec`'s invasion routes (1 without routes): `directions`, or `spec.routes`
    directions uniform on the sphere."""
    if spec.routes <= 0 or spec.off_route_invasion >= 1.0:
        return 1.0
    v = route_directions(spec.routes, rng) if directions is None else directions
    f = route_field(shape, seed, v, spec.route_width_mm, spacing_mm)
    return (spec.off_route_invasion + (1.0 - spec.off_route_invasion) * f).astype(np.float32)


def smooth_log_field(
    shape: tuple[int, ...], spacing_mm: float, sd: float, rng: np.random.Generator
) -> np.ndarray:
    """exp(sd·G), G a `gaussian_field`, clipped to ±2 SD (the largest D sets the explicit time step)."""
    return log_factor(gaussian_field(shape, spacing_mm, rng), sd)


def log_factor(g: np.ndarray, sd: float) -> np.ndarray:
    return np.exp(sd * np.clip(g, -2.0, 2.0)).astype(np.float32)


def grow_oedema(
    source: np.ndarray, grid: GrowthGrid, domain: np.ndarray, ratio: float, stop, max_steps: int = 4000
) -> np.ndarray:
    """Oedema level in [0, 1]: diffusion from `source` (held at 1), `ratio` times faster in white than in
    grey matter, none outside `domain`, until `stop(level)` is true."""
    tissue = np.maximum(grid.gm + grid.wm, 1e-6)
    d = np.where(domain, (grid.wm + grid.gm / ratio) / tissue, 0.0).astype(np.float32)
    e = np.where(source, 1.0, 0.0).astype(np.float32)
    if not source.any():
        return e
    solver = FisherKolmogorov(d, 0.0, grid.spacing)

    def held(v: np.ndarray, _t: float) -> bool:
        v[source] = 1.0
        return stop(v)

    solver.run(e, stop=held, max_steps=max_steps, active_threshold=1e-4)
    return e


def choose_seed(grid: GrowthGrid, domain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random white-matter cell of the cerebrum at least SEED_MIN_DEPTH_MM inside the brain."""
    depth, far_critical = grid.depth_mm, grid.critical_mm > 15.0
    idx = np.indices(grid.brain.shape).reshape(3, -1).T
    z = apply_affine(grid.affine, idx)[:, 2].reshape(grid.brain.shape)
    cand = (
        domain & (grid.wm >= SEED_MIN_WM) & (depth >= SEED_MIN_DEPTH_MM) & far_critical & (z > SEED_MIN_Z_MM)
    )
    if not cand.any():  # very coarse test grids: relax to any white matter
        cand = domain & (grid.wm >= 0.5)
    cells = np.argwhere(cand)
    return cells[rng.integers(len(cells))]


def satellite(
    allowed: np.ndarray, dist_pre: np.ndarray, spec: TumourSpec, h: float, rng: np.random.Generator
) -> np.ndarray:
    """An invisible focus: a Gaussian of peak `satellite_density` and σ = λ, centred on a random allowed
    cell about `satellite_mm` beyond the pre-RT T2L (zeros if no cell lies at that distance)."""
    cells = np.argwhere(allowed & (np.abs(dist_pre - spec.satellite_mm) <= h))
    if len(cells) == 0:
        return np.zeros(dist_pre.shape, dtype=np.float32)
    centre = cells[rng.integers(len(cells))]
    r2 = (((np.indices(dist_pre.shape) - centre.reshape(3, 1, 1, 1)) * h) ** 2).sum(0)
    sigma = max(spec.lambda_wm_mm, h)
    return (spec.satellite_density * np.exp(-0.5 * r2 / sigma**2) * allowed).astype(np.float32)


def route_reach_mm(spec: TumourSpec) -> tuple[float, float]:
    """How far from the seed a white-matter route ends (mm): past the lesion's radius and the drawn
    recurrence distance, within ROUTE_SPARE_MM more."""
    near = (3.0 * spec.lesion_cm3 * 1000.0 / (4.0 * np.pi)) ** (1 / 3) + spec.advance_mm
    return near, near + ROUTE_SPARE_MM


def channelled_factor(tubes: np.ndarray, r_mm: np.ndarray, spec: TumourSpec) -> np.ndarray:
    """The factor on D of a channelled tumour: 1 on its routes (`tubes`: 1 on them, Gaussian across),
    `off_route_invasion` away from them; the seed's neighbourhood (Gaussian of SD the route width in the
    distance `r_mm` from the seed) is on them by 1 − channelling."""
    blob = (1.0 - spec.channelling) * np.exp(-0.5 * (r_mm / spec.route_width_mm) ** 2)
    off = spec.off_route_invasion
    return (off + (1.0 - off) * np.maximum(tubes, blob)).astype(np.float32)


def channelled_tail(lam: float, tubes: np.ndarray, spec: TumourSpec) -> np.ndarray:
    """Decay length (mm) of the seed's invisible tail per cell: λ on the routes, λ·√off away from them at
    full channelling (the travelling wave's √(D/ρ)), λ·f^(channelling/2) in between."""
    off = spec.off_route_invasion
    return (lam * (off + (1.0 - off) * tubes) ** (0.5 * spec.channelling)).astype(np.float32)


def smallest_core(
    profile: Callable[[float], np.ndarray],
    grown: Callable[[np.ndarray, float], bool],
    hi_mm: float = 100.0,
) -> float:
    """The smallest core radius (mm, to within hi_mm / 2^20) whose seed `profile(radius)` is already
    `grown`: bisection, `grown` being monotone in the radius; `hi_mm` when none is."""
    if not grown(profile(hi_mm), 0.0):
        return hi_mm
    lo, hi = 0.0, hi_mm
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if grown(profile(mid), 0.0) else (mid, hi)
    return hi


def simulate_tumour(spec: TumourSpec, grid: GrowthGrid, rng: np.random.Generator) -> TumourCourse:
    """Grow, resect and regrow one tumour (see the module docstring)."""
    h = grid.spacing
    cell_cm3 = h**3 / 1000.0
    domain = tissue_domain(grid)
    seed = choose_seed(grid, domain, rng)
    d_base = diffusivity(grid, spec.lambda_wm_mm, spec.diffusion_ratio, domain)
    routes = route_directions(max(spec.routes, 0), rng)
    r = np.sqrt(((np.indices(grid.brain.shape) - seed.reshape(3, 1, 1, 1)) ** 2).sum(0)) * h
    channelled = spec.channelling > 0 and len(routes) > 0
    paths = tubes = None
    if channelled:
        paths = white_matter_paths(grid.wm, domain, seed, routes, route_reach_mm(spec), h)
        tubes = path_tubes(d_base.shape, paths, spec.route_width_mm, h)
        d_tissue = (d_base * channelled_factor(tubes, r, spec)).astype(np.float32)
    else:
        d_tissue = (d_base * route_factor(spec, d_base.shape, seed, h, rng, routes)).astype(np.float32)
    g_pre = gaussian_field(d_tissue.shape, h, rng)
    d = d_tissue * log_factor(g_pre, spec.heterogeneity)
    rho = domain.astype(np.float32)

    lesion_cells = spec.lesion_cm3 / cell_cm3
    target_cells = lesion_cells * (1.0 - spec.oedema_fraction)  # the rest of the lesion is oedema
    gtr_cells = spec.gtr_cavity_cm3 / cell_cm3

    def resected_cells(v: np.ndarray) -> float:
        """Cells a GTR removes: the planned cavity, or every enhancing cell if there are more."""
        return max(gtr_cells, float(np.count_nonzero(v >= spec.cel_density)))

    def grown(v: np.ndarray, _t: float) -> bool:
        visible = np.count_nonzero(v >= spec.t2l_density)
        if visible < target_cells:
            return False
        if spec.resection == "GTR":
            return visible - resected_cells(v) >= target_cells
        if spec.resection == "biopsy":
            return True
        # STR: the cavity lies inside the enhancing zone, so subtracting that zone bounds the lesion
        if visible - np.count_nonzero(v >= spec.cel_density) >= target_cells:
            return True
        depth = signed_depth(v >= spec.cel_density, h)
        return np.count_nonzero(pre_rt_regions(v, depth, spec, 1.0)["t2l"]) >= target_cells

    # a saturated core of radius SEED_RADIUS_LAMBDA·λ: a smaller seed loses cells to diffusion faster
    # than it grows (below about πλ) and would spend the whole course in a diffuse, unsaturated
    # transient that real tumours left long before their first scan
    r0 = max(SEED_RADIUS_LAMBDA * spec.lambda_wm_mm, 1.5 * h)
    # never larger than half the tumour to grow, and with the travelling wave's tail (decay length λ)
    # from the start: a step-edged seed that is already the lesion's size would show no infiltration
    target_radius = (3.0 * spec.lesion_cm3 * (1.0 - spec.oedema_fraction) * 1000.0 / (8.0 * np.pi)) ** (1 / 3)
    r0 = min(r0, max(target_radius, 1.5 * h))
    lam = max(spec.lambda_wm_mm, 0.5 * h)

    def seed_profile(radius: float, decay: float | np.ndarray) -> np.ndarray:
        """A saturated core of `radius` mm with the travelling wave's logistic tail of length `decay`."""
        z = np.clip((r - radius) / decay, -50.0, 50.0)
        return np.where(domain, 1.0 / (1.0 + np.exp(z)), 0.0).astype(np.float32)

    if channelled:
        # the visible tumour is today's seed (a saturated core and the travelling wave's logistic edge),
        # and below the T2L threshold the invisible tail falls off over the channelled length: far along
        # the routes, hardly at all off them. Grown off the routes, where D is far lower, that tail would
        # relax back to round, so the seed is (by `channelling`) already the lesion's size
        tail = channelled_tail(lam, tubes, spec)
        theta = spec.t2l_density
        # distances through the tissue, so that the tail does not leap across CSF or a ventricle
        r_tissue = np.minimum(geodesic_mm(domain, seed, h), 1e4)

        def channelled_profile(radius: float) -> np.ndarray:
            inner = min(lam, max(radius / SEED_RADIUS_LAMBDA, 0.5 * h))  # a small core stays saturated
            edge = radius + inner * np.log((1.0 - theta) / theta)  # where the logistic crosses theta
            z = np.clip((r_tissue - radius) / inner, -50.0, 50.0)
            beyond = np.maximum(r_tissue - edge, 0.0)
            u0 = np.where(r_tissue <= edge, 1.0 / (1.0 + np.exp(z)), theta * np.exp(-beyond / tail))
            return np.where(domain, u0, 0.0).astype(np.float32)

        fitted = smallest_core(channelled_profile, grown, CORE_SEARCH_MM)
        if fitted < CORE_SEARCH_MM:  # else no core holds the lesion: grow a seed into it
            u = channelled_profile((1.0 - spec.channelling) * r0 + spec.channelling * fitted)
        else:
            u = channelled_profile(r0)
    else:
        u = seed_profile(r0, lam)
    solver = _solver(d, rho, grid, spec)
    max_steps = int(MAX_TIME / solver.dt) + 1
    t_pre = solver.run(u, stop=grown, max_steps=max_steps, active_threshold=ACTIVE_THRESHOLD)
    u_pre = u.copy()
    depth = signed_depth(u_pre >= spec.cel_density, h)
    gtr_level = 1.0
    if spec.resection == "GTR":
        k = int(min(resected_cells(u_pre), u_pre.size))
        top = np.partition(u_pre.ravel(), u_pre.size - k)[u_pre.size - k] if k > 0 else 1.0
        gtr_level = float(min(top, spec.cel_density))
    pre = pre_rt_regions(u_pre, depth, spec, gtr_level)
    oedema = np.zeros(u_pre.shape, dtype=np.float32)
    if spec.oedema_fraction > 0:
        source = u_pre >= spec.cel_density
        if not source.any():
            source = u_pre >= spec.t2l_density
        tumour_lesion = pre["t2l"] | pre["cel"]
        free = domain & ~pre["cavity"]

        def lesion_reached(e: np.ndarray) -> bool:
            return np.count_nonzero(tumour_lesion | ((e >= OEDEMA_VISIBLE) & free)) >= lesion_cells

        oedema = grow_oedema(source, grid, domain, spec.oedema_wm_ratio, lesion_reached)
        oedema = np.where(pre["cavity"], 0.0, oedema).astype(np.float32)
        pre = pre_rt_regions(u_pre, depth, spec, gtr_level, oedema)
    dist_pre = ndi.distance_transform_edt(~pre["t2l"], sampling=h)
    if spec.satellite_mm > 0:
        focus = satellite(domain & (grid.wm >= 0.5), dist_pre, spec, h, rng)
        np.maximum(u_pre, focus, out=u_pre)
        np.maximum(u, focus, out=u)
    if any(f > 0 for f in spec.foci_mm) and len(routes) > 0:
        if paths is None:
            paths = straight_paths(domain, seed, routes)
        radius = max(spec.foci_radius_mm, h)
        foci = route_foci(domain, dist_pre, paths, spec.foci_mm, spec.foci_density, radius, h)
        np.maximum(u_pre, foci, out=u_pre)
        np.maximum(u, foci, out=u)

    # after RT: cells die except where a smooth, never-imaged radio-resistance field protects them, and
    # the cavity holds no cells and no tissue to invade (zero flux through its wall)
    cavity = pre["cavity"]
    if spec.rt_kill > 0:
        resistance = 0.5 * (1.0 + np.clip(gaussian_field(u.shape, h, rng), -2.0, 2.0) / 2.0)  # 0..1
        u *= np.exp(-spec.rt_kill * (1.0 - resistance)).astype(np.float32)
    u[cavity] = 0.0
    g_post = redrawn_field(g_pre, spec.post_rt_correlation, h, rng)
    if spec.routes > 0 and rng.uniform() > spec.post_rt_correlation:
        # the recurrence escapes along a route the pre-RT tumour did not use (RT's high dose covered the
        # old ones): the later the recurrence, the likelier, and no pre-RT scan shows that route
        routes = route_directions(1, rng)
        if channelled:
            escape = white_matter_paths(grid.wm, domain, seed, routes, route_reach_mm(spec), h)
            factor = channelled_factor(path_tubes(d_base.shape, escape, spec.route_width_mm, h), r, spec)
        else:
            factor = route_factor(spec, d_base.shape, seed, h, rng, routes)
        d_tissue = (d_base * factor).astype(np.float32)
    d_post = d_tissue * log_factor(g_post, spec.heterogeneity) * np.float32(spec.post_rt_invasion)
    if spec.post_rt_migration != 1.0:
        d_post = d_post * np.float32(spec.post_rt_migration)
    d_post = np.where(cavity, 0.0, d_post).astype(np.float32)
    rho_post = np.where(cavity, 0.0, rho).astype(np.float32)
    post = _solver(d_post, rho_post, grid, spec, dt=min(solver.dt, stable_dt(float(d_post.max()), 1.0, h)))

    if spec.progression_type == "CEL":
        inside = pre["t2l"] & ~pre["cel"] & ~pre["necrosis"]
        target_new = max(min(spec.new_cel_cm3 / cell_cm3, 0.5 * np.count_nonzero(inside)), 1.0)

        def progressed(v: np.ndarray, _t: float) -> bool:
            return np.count_nonzero((v >= spec.cel_density_progression) & inside) >= target_new

    else:

        def progressed(v: np.ndarray, _t: float) -> bool:
            new = v >= spec.t2l_density
            return bool(new.any()) and float(dist_pre[new].max()) >= spec.advance_mm

    t_prog = post.run(u, stop=progressed, max_steps=max_steps, active_threshold=ACTIVE_THRESHOLD)
    visible = u >= spec.t2l_density
    advance = float(dist_pre[visible].max()) if visible.any() else 0.0

    # fill the cavity from its wall so that trilinear interpolation does not pull the wall's density down
    u_prog = np.where(cavity, ndi.grey_dilation(u, size=3), u).astype(np.float32)
    return TumourCourse(
        u_pre=u_pre,
        depth_mm=depth,
        u_prog=u_prog,
        seed_mni=apply_affine(grid.affine, seed),
        t_pre=t_pre,
        t_progression=t_prog,
        advance_mm=advance,
        gtr_density=gtr_level,
        oedema=oedema,
    )
