"""The clinical table of a synthetic cohort, drawn to match Table 1 of the study (no images).

Categorical fields (cohort, sex, resection, progression type, recurrence pattern) are allocated in the
study's proportions by largest remainder, then shuffled, so a 101-patient cohort reproduces the study's
counts exactly and smaller cohorts come as close as whole patients allow. Continuous fields (age, PFS,
OS, lesion volume) are drawn per treatment cohort from split-normal distributions (log scale for the
skewed ones) whose median is the cohort's median in Table 1 and whose tails reach the study's range at
the expected extremes of 101 draws, truncated to that range. Draws are stratified (one per quantile
slice), so medians hold closely; PFS and OS are rank-correlated (Iman–Conover), OS ≥ PFS.

Recurrence pattern (Results): within the T2L 7% (5 SOC, 1 ATT, 1 ENZA: exactly the patients with CEL-only
progression, so those are the ones recurring inside the T2L), between the T2L and its 2 cm expansion 65%
(26/19/20), beyond 29% (13/7/9). Among T2L/both progressors, "beyond 2 cm" goes preferentially to late
progressors (more time to grow), which is also why late progression is harder to predict.

Everything here is a pure function of the config's seed and size: `draw_cohort` is cheap (no images)
and decides every patient's clinical row and tumour parameters before any image is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from ctvlab.config import SynthConfig
from ctvlab.synth.signal_settings import with_signal
from ctvlab.synth.tumour import TumourSpec

COHORTS = ("SOC", "ATT", "ENZA")
RESECTIONS = ("GTR", "STR", "biopsy")
PROGRESSION_TYPES = ("CEL", "T2L", "both")
PATTERNS = ("within T2L", "within 2 cm", "beyond 2 cm")


@dataclass(frozen=True)
class StudyGroup:
    """One column of Table 1 (counts, medians) plus the recurrence pattern counts from the Results."""

    n: int
    male: int
    lesion_cm3: float
    resection: tuple[int, int, int]  # GTR, STR, biopsy
    progression: tuple[int, int, int]  # CEL, T2L, both
    age: float
    pfs_months: float
    os_months: float
    pattern: tuple[int, int, int]  # within T2L, within 2 cm, beyond 2 cm

    @property
    def male_pct(self) -> float:
        return 100.0 * self.male / self.n


# Table 1 of Tran et al. 2025 (male counts from the percentages: 59% of 44, 67% of 27, 77% of 30).
STUDY: dict[str, StudyGroup] = {
    "all": StudyGroup(101, 67, 26.4, (35, 56, 10), (7, 50, 44), 53.0, 7.0, 17.6, (7, 65, 29)),
    "SOC": StudyGroup(44, 26, 26.6, (20, 22, 2), (5, 14, 25), 53.0, 4.7, 14.6, (5, 26, 13)),
    "ATT": StudyGroup(27, 18, 21.0, (6, 17, 4), (1, 18, 8), 54.0, 12.0, 20.3, (1, 19, 7)),
    "ENZA": StudyGroup(30, 23, 27.4, (9, 17, 4), (1, 18, 11), 57.0, 7.1, 17.9, (1, 20, 9)),
}
# The whole cohort's ranges (Table 1 gives them for "all" only).
STUDY_RANGES: dict[str, tuple[float, float]] = {
    "lesion_cm3": (1.2, 153.6),
    "age": (25.0, 77.0),
    "pfs_months": (0.8, 25.9),
    "os_months": (5.8, 139.7),
}
# Expected z of the extremes of 101 standard-normal draws: sets each tail's spread from the range.
_Z_EXTREME = 2.46
_LOG_SCALE = {"lesion_cm3": True, "age": False, "pfs_months": True, "os_months": True}
PFS_OS_RANK_CORRELATION = 0.6
# Residual lesions are larger after subtotal resection or biopsy than after gross total resection.
LESION_RESECTION_CORRELATION = 0.6
LATE_BEYOND_CORRELATION = 0.5  # how strongly late progression favours recurrence beyond 2 cm

# Ranges of the latent tumour parameters (see ctvlab.synth.tumour).
LAMBDA_WM_MM = (2.5, 5.0)  # the draw that earlier cohorts used (kept so the clinical stream stays)
# Infiltration length √(D/ρ) in white matter on the invasion routes: how far the tumour will recur beyond
# the T2L over ADVANCE_PER_LAMBDA, with a log-normal scatter, within INFILTRATION_MM. A diffusely
# infiltrating tumour (long invisible tail, which diffusion and metabolism see) recurs far from its
# visible edge, a compact one close to it (Swanson's D/ρ).
INFILTRATION_MM = (1.5, 15.0)
ADVANCE_PER_LAMBDA = 2.5  # a recurrence reaches about this many infiltration lengths beyond the T2L
INFILTRATION_SCATTER = 0.2  # SD of log λ around that
# A tumour that recurs only as new enhancement inside its T2L (CEL progression) is a compact one: short
# infiltration length, little invisible tail (Swanson's nodular, low D/ρ tumours).
COMPACT_MM = (1.5, 3.0)
# Invasion routes: glioma cells migrate along white-matter bundles far faster than through the rest of
# the parenchyma, so a tumour infiltrates (and recurs) along one to three routes. Off them D is this
# fraction of its value on them.
ROUTES = (1, 3)
OFF_ROUTE_INVASION = (0.1, 0.3)
ROUTE_WIDTH_MM = (4.0, 8.0)
DIFFUSION_RATIO = (5.0, 10.0)  # D white / D grey (Swanson: about 5; wider here for heterogeneity)
ADVANCE_WITHIN_MM = (4.0, 17.0)  # farthest new voxel beyond the T2L, "within 2 cm" (margin to 20 mm)
ADVANCE_BEYOND_MM = (23.0, 36.0)  # "beyond 2 cm", inside the 4 cm ring (no progression beyond it)
NEW_CEL_CM3 = (0.5, 3.0)
HETEROGENEITY = (0.5, 1.0)  # SD of log D across the brain, per patient
# Invisible satellite foci: how often (beyond 2 cm / within 2 cm), how far short of the farthest new
# voxel, and how dense (always below the T2L threshold).
SATELLITE_PROBABILITY = {"beyond 2 cm": 0.9, "within 2 cm": 0.6, "within T2L": 0.0}
SATELLITE_SHORT_MM = (0.0, 5.0)
SATELLITE_MIN_MM = 6.0
SATELLITE_DENSITY = (0.04, 0.12)
REGISTRATION_MM = (0.5, 2.5)  # residual pre-RT/progression misalignment (smooth displacement, RMS)
RIM_MM = (3.0, 7.0)
GTR_CAVITY_RADIUS_MM = (10.0, 25.0)  # planned resection cavity, 4–65 cm³
STR_RESIDUAL_MM = (2.0, 5.0)
ATT_CEL_SUPPRESSION = 0.15  # bevacizumab raises the density needed to enhance at progression
# Vasogenic oedema: its share of the pre-RT lesion volume, and how much faster it spreads in white matter.
OEDEMA_FRACTION = (0.3, 0.7)
OEDEMA_WM_RATIO = (10.0, 30.0)
# After RT the tumour's invasiveness field is partly redrawn: correlation r = exp(−PFS / this) with the
# one the pre-RT scan reflects, and with probability 1 − r the recurrence escapes along an invasion route
# the pre-RT tumour did not use instead of its own: later progression is less predictable from the pre-RT
# scan.
POST_RT_MEMORY_MONTHS = 12.0
ATT_POST_RT_INVASION = 1.5  # anti-angiogenic therapy selects a more invasive phenotype
# RT's log cell kill where tissue is least radio-resistant: stronger for later progression (a tumour that
# took long to recur was controlled for long; it regrows from resistant clones that no scan showed).
RT_KILL = 3.0
TRACT_ANISOTROPY = (0.5, 0.9)  # how much faster cells migrate along white-matter tracts than across
# Skull-stripped adult brain volumes (litres; parenchyma with ventricles): mean and SD by sex at 40, and
# the yearly loss after 40. The template's brain is larger; each patient's head is scaled to one draw.
BRAIN_LITRES = {"M": (1.35, 0.10), "F": (1.21, 0.09)}
BRAIN_LOSS_PER_YEAR = 0.003


@dataclass(frozen=True)
class PatientPlan:
    """Everything decided about one patient before any image: the clinical row and the tumour."""

    index: int
    patient_id: str
    cohort: str
    sex: str
    age: float
    resection: str
    progression_type: str
    pfs_months: float
    os_months: float
    pattern: str
    has_mrsi: bool
    registration_mm: float
    tumour: TumourSpec
    brain_scale: float = 1.0  # linear factor from the template's brain to the patient's

    def clinical(self) -> dict[str, object]:
        return {
            "patient_id": self.patient_id, "cohort": self.cohort, "sex": self.sex, "age": self.age,
            "resection": self.resection, "progression_type": self.progression_type,
            "pfs_months": self.pfs_months, "os_months": self.os_months,
        }  # fmt: skip


def patient_id(index: int, n: int) -> str:
    """The letters SYN and the patient's 1-based number in three digits (more for cohorts of 1000 or more)."""
    return f"SYN{index + 1:0{max(3, len(str(n)))}d}"


def allocate(n: int, weights: tuple[float, ...] | tuple[int, ...]) -> np.ndarray:
    """Counts per category summing to `n`, proportional to `weights` (largest remainder, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def shuffled_labels(rng: np.random.Generator, labels: tuple[str, ...], counts: np.ndarray) -> list[str]:
    out = [lab for lab, c in zip(labels, counts, strict=True) for _ in range(int(c))]
    return [out[i] for i in rng.permutation(len(out))]


def split_normal_ppf(q: np.ndarray, median: float, low: float, high: float, log: bool) -> np.ndarray:
    """Quantile function of a split normal with median `median`, whose tails reach `low` and `high` at
    z = ±2.46 (the expected extremes of 101 draws); on a log scale when `log`, truncated to [low, high]."""
    z = stats.norm.ppf(np.clip(q, 1e-9, 1 - 1e-9))
    if log:
        m, lo, hi = np.log(median), np.log(low), np.log(high)
    else:
        m, lo, hi = median, low, high
    s_lo, s_hi = (m - lo) / _Z_EXTREME, (hi - m) / _Z_EXTREME
    x = m + np.where(z < 0, s_lo, s_hi) * z
    x = np.exp(x) if log else x
    return np.clip(x, low, high)


def stratified_uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniforms, one in each slice [k/n, (k+1)/n), in random order."""
    return (rng.permutation(n) + rng.uniform(size=n)) / n


def rank_correlate(
    rng: np.random.Generator, a: np.ndarray, b: np.ndarray, rho: float
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder `a` and `b` (keeping their values) so that their ranks follow a normal copula of `rho`."""
    n = len(a)
    z1 = rng.normal(size=n)
    z2 = rho * z1 + np.sqrt(1 - rho**2) * rng.normal(size=n)
    out_a = np.empty_like(a)
    out_b = np.empty_like(b)
    out_a[np.argsort(z1)] = np.sort(a)
    out_b[np.argsort(z2)] = np.sort(b)
    return out_a, out_b


def rank_to(rng: np.random.Generator, values: np.ndarray, key: np.ndarray, rho: float) -> np.ndarray:
    """Reorder `values` so that their ranks follow `key` (standardised) with correlation about `rho`."""
    sd = key.std()
    z = rho * ((key - key.mean()) / sd if sd > 0 else 0.0) + np.sqrt(1 - rho**2) * rng.normal(size=len(key))
    out = np.empty_like(values)
    out[np.argsort(z, kind="stable")] = np.sort(values)
    return out


def draw_cohort(cfg: SynthConfig) -> list[PatientPlan]:
    """Draw the clinical table and every tumour's parameters for `cfg.n_patients` patients.

    Deterministic in `cfg.seed` and `cfg.n_patients`; cheap (no images). Patient i's images later use
    their own random stream, so nothing here depends on how patients are scheduled.
    """
    n = cfg.n_patients
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(2)[0])
    cohort_of = shuffled_labels(rng, COHORTS, allocate(n, tuple(STUDY[c].n for c in COHORTS)))
    fields: dict[str, list] = {k: [None] * n for k in (
        "sex", "age", "resection", "progression_type", "pfs_months", "os_months", "lesion_cm3", "pattern",
        "advance_mm",
    )}  # fmt: skip
    for cohort in COHORTS:
        members = [i for i in range(n) if cohort_of[i] == cohort]
        m = len(members)
        if m == 0:
            continue
        g = STUDY[cohort]
        sex = shuffled_labels(rng, ("M", "F"), allocate(m, (g.male, g.n - g.male)))
        resection = shuffled_labels(rng, RESECTIONS, allocate(m, g.resection))
        progression = shuffled_labels(rng, PROGRESSION_TYPES, allocate(m, g.progression))
        draws = {}
        for key, median in (("age", g.age), ("lesion_cm3", g.lesion_cm3)):
            lo, hi = STUDY_RANGES[key]
            draws[key] = split_normal_ppf(stratified_uniform(rng, m), median, lo, hi, _LOG_SCALE[key])
        extent = np.array([RESECTIONS.index(r) for r in resection], dtype=np.float64)
        draws["lesion_cm3"] = rank_to(rng, draws["lesion_cm3"], extent, LESION_RESECTION_CORRELATION)
        pfs = split_normal_ppf(
            stratified_uniform(rng, m), g.pfs_months, *STUDY_RANGES["pfs_months"], log=True
        )
        os_ = split_normal_ppf(stratified_uniform(rng, m), g.os_months, *STUDY_RANGES["os_months"], log=True)
        pfs, os_ = rank_correlate(rng, pfs, os_, PFS_OS_RANK_CORRELATION)
        os_ = np.maximum(os_, pfs + 0.5)  # a patient survives at least until progression

        # recurrence pattern: CEL-only progressors recur inside the T2L (Results: the same 5/1/1 patients);
        # the others split between "within 2 cm" and "beyond", late progressors more often beyond
        others = [k for k in range(m) if progression[k] != "CEL"]
        n_beyond = int(allocate(len(others), g.pattern[1:])[1]) if others else 0
        ranks = stats.rankdata(pfs[others]) / (len(others) + 1) if others else np.array([])
        score = LATE_BEYOND_CORRELATION * stats.norm.ppf(ranks) + np.sqrt(
            1 - LATE_BEYOND_CORRELATION**2
        ) * rng.normal(size=len(others))
        beyond = {others[k] for k in np.argsort(-score)[:n_beyond]}
        for k, i in enumerate(members):
            if progression[k] == "CEL":
                pattern, advance = PATTERNS[0], 0.0
            elif k in beyond:
                pattern, advance = PATTERNS[2], float(rng.uniform(*ADVANCE_BEYOND_MM))
            else:
                pattern, advance = PATTERNS[1], float(rng.uniform(*ADVANCE_WITHIN_MM))
            values = {
                "sex": sex[k], "age": round(float(draws["age"][k])), "resection": resection[k],
                "progression_type": progression[k], "pfs_months": round(float(pfs[k]), 1),
                "os_months": round(float(os_[k]), 1), "lesion_cm3": float(draws["lesion_cm3"][k]),
                "pattern": pattern, "advance_mm": advance,
            }  # fmt: skip
            for key, v in values.items():
                fields[key][i] = v

    no_mrsi = set(rng.permutation(n)[: round(cfg.mrsi_missing_fraction * n)].tolist())
    # Drawn from their own stream, so that the clinical table above stays what it was.
    extra = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(7,)))
    # The signal settings' draws: their own stream again, the same number for every patient whatever
    # the settings, so that patient i's draws do not depend on them.
    signal = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(8,)))
    template_litres = template_brain_litres()
    advance = np.array([fields["advance_mm"][i] for i in range(n)], dtype=np.float64)
    compact = np.exp(extra.uniform(*np.log(COMPACT_MM), size=n))
    tied = advance / ADVANCE_PER_LAMBDA * np.exp(INFILTRATION_SCATTER * extra.normal(size=n))
    lambdas = np.clip(np.where(advance > 0, tied, compact), *INFILTRATION_MM)
    plans = []
    for i in range(n):
        cohort = cohort_of[i]
        cel_prog = cfg.cel_density + (ATT_CEL_SUPPRESSION if cohort == "ATT" else 0.0)
        rng.uniform(*np.log(LAMBDA_WM_MM))  # the old draw, so that the clinical stream's later draws stay
        lam = float(lambdas[i])
        cavity_cm3 = 4.0 / 3.0 * np.pi * float(rng.uniform(*GTR_CAVITY_RADIUS_MM)) ** 3 / 1000.0
        advance = fields["advance_mm"][i]
        sat_mm = advance - float(rng.uniform(*SATELLITE_SHORT_MM))
        has_sat = rng.uniform() < SATELLITE_PROBABILITY[fields["pattern"][i]] and sat_mm >= SATELLITE_MIN_MM
        sat_density = float(rng.uniform(*SATELLITE_DENSITY))
        registration = float(rng.uniform(*REGISTRATION_MM))
        spec = TumourSpec(
            lambda_wm_mm=lam,
            diffusion_ratio=float(rng.uniform(*DIFFUSION_RATIO)),
            lesion_cm3=fields["lesion_cm3"][i],
            resection=fields["resection"][i],
            progression_type=fields["progression_type"][i],
            advance_mm=fields["advance_mm"][i],
            new_cel_cm3=float(rng.uniform(*NEW_CEL_CM3)),
            heterogeneity=float(rng.uniform(*HETEROGENEITY)),
            satellite_mm=sat_mm if has_sat else 0.0,
            satellite_density=min(sat_density, 0.5 * cfg.t2l_density),
            rim_mm=float(rng.uniform(*RIM_MM)),
            gtr_cavity_cm3=cavity_cm3,
            str_residual_mm=float(rng.uniform(*STR_RESIDUAL_MM)),
            t2l_density=cfg.t2l_density,
            cel_density=cfg.cel_density,
            cel_density_progression=min(cel_prog, 0.95),
            oedema_fraction=float(extra.uniform(*OEDEMA_FRACTION)),
            oedema_wm_ratio=float(extra.uniform(*OEDEMA_WM_RATIO)),
            post_rt_correlation=float(np.exp(-fields["pfs_months"][i] / POST_RT_MEMORY_MONTHS)),
            post_rt_invasion=ATT_POST_RT_INVASION if cohort == "ATT" else 1.0,
            tract_anisotropy=float(extra.uniform(*TRACT_ANISOTROPY)),
            routes=int(extra.integers(ROUTES[0], ROUTES[1] + 1)) if advance > 0 else 0,
            off_route_invasion=float(extra.uniform(*OFF_ROUTE_INVASION)),
            route_width_mm=float(extra.uniform(*ROUTE_WIDTH_MM)),
            rt_kill=RT_KILL * (1.0 - float(np.exp(-fields["pfs_months"][i] / POST_RT_MEMORY_MONTHS))),
        )
        draws = signal.uniform(size=ROUTES[1] + 2)
        spec = with_signal(spec, cfg, draws[: ROUTES[1]], float(draws[-2]), float(draws[-1]))
        mean, sd = BRAIN_LITRES[fields["sex"][i]]
        litres = (mean + sd * float(extra.normal())) * (
            1.0 - BRAIN_LOSS_PER_YEAR * max(fields["age"][i] - 40.0, 0.0)
        )
        plans.append(
            PatientPlan(
                index=i, patient_id=patient_id(i, n), cohort=cohort, sex=fields["sex"][i],
                age=float(fields["age"][i]), resection=fields["resection"][i],
                progression_type=fields["progression_type"][i], pfs_months=fields["pfs_months"][i],
                os_months=fields["os_months"][i], pattern=fields["pattern"][i], has_mrsi=i not in no_mrsi,
                registration_mm=registration, tumour=spec, brain_scale=(litres / template_litres) ** (1 / 3),
            )
        )  # fmt: skip
    return plans


def template_brain_litres() -> float:
    """The template's brain-mask volume (litres)."""
    from ctvlab.synth.anatomy import load_template

    tpl = load_template()
    return float(tpl.brain.sum() * abs(np.linalg.det(tpl.affine[:3, :3])) / 1e6)
