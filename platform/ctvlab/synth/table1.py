"""Cohort statistics beside the study's Table 1 and recurrence pattern, for any cohort folder.

From the manifest: patients per treatment cohort, % male, resection, progression type, age, PFS and OS
(median and range). From the masks: the pre-RT lesion volume (T2L ∪ CEL, cm³, with the voxel spacing)
and each patient's recurrence pattern: "within T2L" when every new progression voxel lies inside the
pre-RT T2L, "within 2 cm" when the farthest lies within 20 mm of it, else "beyond 2 cm" (Euclidean
distance in mm). New progression voxels are those that changed class: NAV→NEL, NAV→CEL and NEL→CEL,
i.e. (CEL at progression − pre-RT CEL) ∪ (T2L at progression − pre-RT T2L ∪ CEL).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field
from scipy import ndimage as ndi

from ctvlab.errors import DataError
from ctvlab.synth.clinical import COHORTS, PATTERNS, PROGRESSION_TYPES, RESECTIONS, STUDY, STUDY_RANGES

if TYPE_CHECKING:
    from rich.console import Console

    from ctvlab.ingest.manifest import ManifestRow
    from ctvlab.synth.clinical import PatientPlan

MARGIN_MM = 20.0  # the RTOG expansion that separates "within 2 cm" from "beyond"
GROUPS = ("all", *COHORTS)


class Summary(BaseModel):
    """Median and range of a quantity (None where no patient has it)."""

    median: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Summary:
        v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
        if v.size == 0:
            return cls()
        return cls(median=float(np.median(v)), min=float(v.min()), max=float(v.max()))


class PatientStats(BaseModel):
    """One patient's row of the report: clinical fields and what the masks say."""

    patient_id: str
    cohort: str
    sex: str
    age: float
    resection: str
    progression_type: str
    pfs_months: float
    os_months: float
    lesion_cm3: float | None = Field(None, description="Pre-RT T2L ∪ CEL volume.")
    pattern: str | None = Field(None, description="within T2L / within 2 cm / beyond 2 cm.")
    max_distance_mm: float | None = Field(None, description="Farthest new progression voxel from the T2L.")
    new_voxels: int | None = None
    problem: str | None = Field(None, description="Why the masks could not be measured.")


class GroupStats(BaseModel):
    """One column of Table 1 for a group of patients."""

    n: int
    male_pct: float | None
    lesion_cm3: Summary
    resection: dict[str, int]
    progression: dict[str, int]
    age: Summary
    pfs_months: Summary
    os_months: Summary
    pattern: dict[str, int]

    @property
    def pattern_pct(self) -> dict[str, float]:
        total = sum(self.pattern.values())
        return {k: (100.0 * v / total if total else 0.0) for k, v in self.pattern.items()}


class CohortReport(BaseModel):
    """Statistics of a cohort per group ("all", "SOC", "ATT", "ENZA") and per patient."""

    root: str | None = None
    groups: dict[str, GroupStats]
    patients: list[PatientStats]
    problems: list[str] = Field(default_factory=list)


# --- per-patient measurements ----------------------------------------------------------------------


def lesion_volume_cm3(t2l: np.ndarray, cel: np.ndarray, spacing_mm: tuple[float, float, float]) -> float:
    """Volume of T2L ∪ CEL in cm³ for voxels of `spacing_mm`."""
    return float(np.count_nonzero(t2l | cel) * np.prod(spacing_mm) / 1000.0)


def recurrence_pattern(
    t2l_pre: np.ndarray,
    cel_pre: np.ndarray,
    t2l_prog: np.ndarray,
    cel_prog: np.ndarray,
    spacing_mm: tuple[float, float, float],
    margin_mm: float = MARGIN_MM,
) -> tuple[str | None, float | None, int]:
    """Where the new progression voxels lie relative to the pre-RT T2L.

    Args:
        t2l_pre, cel_pre, t2l_prog, cel_prog: boolean masks on one grid (X, Y, Z).
        spacing_mm: voxel size (mm) along X, Y, Z.

    Returns:
        (pattern, farthest distance in mm of a new voxel from the pre-RT T2L, number of new voxels).
        Pattern is None when the pre-RT T2L is empty (nothing to measure from); with no new voxel it is
        "within T2L" (every new voxel, of none, lies inside).
    """
    new = (cel_prog & ~cel_pre) | (t2l_prog & ~(t2l_pre | cel_pre))
    n_new = int(np.count_nonzero(new))
    if not t2l_pre.any():
        return None, None, n_new
    if n_new == 0:
        return PATTERNS[0], 0.0, 0
    # crop to the box holding the T2L and the new voxels: the nearest T2L voxel is always inside it
    idx = np.argwhere(t2l_pre | new)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, t2l_pre.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dist = ndi.distance_transform_edt(~t2l_pre[box], sampling=spacing_mm)
    far = float(dist[new[box]].max())
    if far == 0.0:
        return PATTERNS[0], far, n_new
    return (PATTERNS[1] if far <= margin_mm else PATTERNS[2]), far, n_new


def _clinical(row: ManifestRow | PatientPlan) -> dict:
    return {k: v for k, v in row.clinical().items()}


def measure_patient(root: Path, row: ManifestRow) -> PatientStats:
    """Read a patient's four lesion masks and measure lesion volume and recurrence pattern."""
    import nibabel as nib

    stats = PatientStats(**_clinical(row))
    names = ("t2l_mask", "cel_mask", "t2l_progression_mask", "cel_progression_mask")
    masks, spacing, shape = {}, None, None
    for name in names:
        path = root / getattr(row, name)
        try:
            img = nib.load(path)
            data = np.asarray(img.dataobj)
        except Exception as e:  # any unreadable file is reported, never fatal for the cohort
            stats.problem = f"{path}: cannot read ({e})"
            return stats
        if data.ndim != 3:
            stats.problem = f"{path}: expected a 3-D mask, got shape {data.shape}"
            return stats
        if shape is None:
            shape, spacing = data.shape, tuple(float(z) for z in img.header.get_zooms()[:3])
        elif data.shape != shape:
            stats.problem = f"{path}: shape {data.shape} differs from the T2L mask's {shape}"
            return stats
        masks[name] = data > 0
    stats.lesion_cm3 = lesion_volume_cm3(masks["t2l_mask"], masks["cel_mask"], spacing)
    pattern, far, n_new = recurrence_pattern(
        masks["t2l_mask"], masks["cel_mask"], masks["t2l_progression_mask"], masks["cel_progression_mask"],
        spacing,
    )  # fmt: skip
    stats.pattern, stats.max_distance_mm, stats.new_voxels = pattern, far, n_new
    return stats


# --- summaries -------------------------------------------------------------------------------------


def summarise(patients: list[PatientStats]) -> dict[str, GroupStats]:
    """Table 1 per group from per-patient rows."""
    out = {}
    for group in GROUPS:
        ps = [p for p in patients if group == "all" or p.cohort == group]
        out[group] = GroupStats(
            n=len(ps),
            male_pct=100.0 * sum(p.sex == "M" for p in ps) / len(ps) if ps else None,
            lesion_cm3=Summary.of(p.lesion_cm3 for p in ps),
            resection={r: sum(p.resection == r for p in ps) for r in RESECTIONS},
            progression={t: sum(p.progression_type == t for p in ps) for t in PROGRESSION_TYPES},
            age=Summary.of(p.age for p in ps),
            pfs_months=Summary.of(p.pfs_months for p in ps),
            os_months=Summary.of(p.os_months for p in ps),
            pattern={k: sum(p.pattern == k for p in ps) for k in PATTERNS},
        )
    return out


def cohort_report(root: str | Path) -> CohortReport:
    """Statistics of the cohort in folder `root` (manifest layout; synthetic or not).

    Raises:
        DataError: the folder has no readable manifest.
    """
    from ctvlab.ingest.manifest import read_manifest

    root = Path(root)
    rows, problems, _ = read_manifest(root)
    if not rows:
        detail = "; ".join(p.message for p in problems[:3]) or "no patients"
        raise DataError(f"{root}: no patient could be read from the manifest ({detail}).")
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        patients = list(pool.map(lambda r: measure_patient(root, r), rows))
    messages = [
        f"manifest line {p.line}: {p.patient_id or '?'}: {p.column or ''} {p.message}".strip()
        for p in problems
    ]
    messages += [f"{p.patient_id}: {p.problem}" for p in patients if p.problem]
    return CohortReport(root=str(root), groups=summarise(patients), patients=patients, problems=messages)


def report_from_plans(plans: list[PatientPlan]) -> CohortReport:
    """The report a cohort drawn by `draw_cohort` will have, from the drawn table alone (no images):
    lesion volumes are the growth targets and patterns the drawn ones."""
    patients = [
        PatientStats(**_clinical(p), lesion_cm3=p.tumour.lesion_cm3, pattern=p.pattern) for p in plans
    ]
    return CohortReport(groups=summarise(patients), patients=patients)


def study_groups() -> dict[str, GroupStats]:
    """Table 1 of the study in the report's form (ranges for "all" only, as the paper gives them)."""
    out = {}
    for group, g in STUDY.items():
        rng = group == "all"

        def s(key: str, median: float, with_range: bool = rng) -> Summary:
            lo, hi = STUDY_RANGES[key] if with_range else (None, None)
            return Summary(median=median, min=lo, max=hi)

        out[group] = GroupStats(
            n=g.n, male_pct=g.male_pct, lesion_cm3=s("lesion_cm3", g.lesion_cm3),
            resection=dict(zip(RESECTIONS, g.resection, strict=True)),
            progression=dict(zip(PROGRESSION_TYPES, g.progression, strict=True)),
            age=s("age", g.age), pfs_months=s("pfs_months", g.pfs_months), os_months=s("os_months", g.os_months),
            pattern=dict(zip(PATTERNS, g.pattern, strict=True)),
        )  # fmt: skip
    return out


# Tolerances of `compare_to_study` (for a cohort of about 101 patients).
TOLERANCE = {
    "male_pct_points": 8.0,
    "median_rel": {"lesion_cm3": 0.2, "age": 0.08, "pfs_months": 0.15, "os_months": 0.15},
    "count_share_points": 6.0,  # resection, progression type, pattern: share of the group, % points
}


def compare_to_study(report: CohortReport, groups: Iterable[str] = ("all",)) -> list[str]:
    """Where the cohort departs from the study beyond TOLERANCE (empty list: within tolerance).

    Medians are compared relative to the study's; categorical fields as shares of the group in
    percentage points; the cohort's size per treatment group as a share of the cohort.
    """
    study = study_groups()
    out = []
    n_all = report.groups["all"].n
    for group in groups:
        ours, ref = report.groups[group], study[group]
        if ours.n == 0:
            out.append(f"{group}: no patients")
            continue
        share = 100.0 * ours.n / max(n_all, 1) - 100.0 * ref.n / study["all"].n
        if group != "all" and abs(share) > TOLERANCE["count_share_points"]:
            out.append(f"{group}: share of the cohort off by {share:+.1f} points")
        if ours.male_pct is not None and abs(ours.male_pct - ref.male_pct) > TOLERANCE["male_pct_points"]:
            out.append(f"{group}: male {ours.male_pct:.0f}% vs study {ref.male_pct:.0f}%")
        for key, tol in TOLERANCE["median_rel"].items():
            m, r = getattr(ours, key).median, getattr(ref, key).median
            if m is None or abs(m - r) > tol * r:
                out.append(f"{group}: median {key} {m} vs study {r} (tolerance {tol:.0%})")
        for field in ("resection", "progression", "pattern"):
            ours_d, ref_d = getattr(ours, field), getattr(ref, field)
            n_ours, n_ref = max(sum(ours_d.values()), 1), max(sum(ref_d.values()), 1)
            for k in ref_d:
                diff = 100.0 * ours_d.get(k, 0) / n_ours - 100.0 * ref_d[k] / n_ref
                if abs(diff) > TOLERANCE["count_share_points"]:
                    out.append(f"{group}: {field} {k} share off by {diff:+.1f} points")
    return out


# --- printing --------------------------------------------------------------------------------------


def _fmt_summary(s: Summary, digits: int = 1) -> str:
    if s.median is None:
        return "–"
    text = f"{s.median:.{digits}f}"
    if s.min is not None and s.max is not None:
        text += f" [{s.min:.{digits}f}–{s.max:.{digits}f}]"
    return text


def _fmt_counts(d: dict[str, int]) -> str:
    return "/".join(str(v) for v in d.values())


def _fmt_pattern(g: GroupStats) -> str:
    return "/".join(f"{v:.0f}" for v in g.pattern_pct.values())


# Table 1's rows: (label, the cell of one group).
TABLE1_ROWS: tuple[tuple[str, Callable[[GroupStats], str]], ...] = (
    ("N", lambda g: str(g.n)),
    ("male %", lambda g: "–" if g.male_pct is None else f"{g.male_pct:.0f}"),
    ("lesion T2L∪CEL cm³", lambda g: _fmt_summary(g.lesion_cm3)),
    ("resection GTR/STR/biopsy", lambda g: _fmt_counts(g.resection)),
    ("progression CEL/T2L/both", lambda g: _fmt_counts(g.progression)),
    ("age", lambda g: _fmt_summary(g.age, 0)),
    ("PFS months", lambda g: _fmt_summary(g.pfs_months)),
    ("OS months", lambda g: _fmt_summary(g.os_months)),
    ("recurrence in T2L/≤2 cm/>2 cm %", _fmt_pattern),
)


# Table 1's between-cohort comparisons (Results, "Patient characteristics"): (quantity, cohorts, study p).
STUDY_BETWEEN_COHORTS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("pfs_months", ("SOC", "ATT", "ENZA"), 0.021),
    ("os_months", ("ATT", "SOC"), 0.0012),
    ("os_months", ("ENZA", "SOC"), 0.22),
    ("os_months", ("ENZA", "ATT"), 0.14),
)


def between_cohorts(patients: Iterable[PatientStats]) -> list[dict[str, object]]:
    """The study's between-cohort tests on this cohort: PFS across the three cohorts (Kruskal–Wallis), OS
    between pairs (two-sided Mann–Whitney). The paper does not name its tests; these are the rank tests
    for "do the cohorts differ" without censoring (every patient here progressed and died). A test with a
    group under 2 patients gives NaN."""
    from scipy import stats

    patients = list(patients)
    out = []
    for field, cohorts, study_p in STUDY_BETWEEN_COHORTS:
        groups = [[float(getattr(p, field)) for p in patients if p.cohort == c] for c in cohorts]
        p_value = float("nan")
        if all(len(g) >= 2 for g in groups):
            if len(groups) > 2:
                p_value = float(stats.kruskal(*groups).pvalue)
            else:
                p_value = float(stats.mannwhitneyu(*groups, alternative="two-sided").pvalue)
        test = "Kruskal–Wallis" if len(cohorts) > 2 else "Mann–Whitney"
        label = f"{'PFS' if field == 'pfs_months' else 'OS'} {' vs '.join(cohorts)}"
        out.append({"comparison": label, "test": test, "p": p_value, "study_p": study_p})
    return out


def print_report(report: CohortReport, console: Console) -> None:
    """Print the cohort's Table 1 and recurrence pattern beside the study's."""
    from ctvlab.terminal import print_table

    study = study_groups()
    title = "Cohort vs study (Table 1, Tran et al. 2025)"
    if report.root:
        title += f" — {report.root}"
    columns = [""] + [c for group in GROUPS for c in (group, "study")]
    rows = [[label] + [fmt(g) for group in GROUPS for g in (report.groups[group], study[group])]
            for label, fmt in TABLE1_ROWS]  # fmt: skip
    print_table(console, title, columns, rows, dim=range(2, len(columns), 2))
    measured = [p for p in report.patients if p.max_distance_mm is not None]
    if measured:
        far = np.asarray([p.max_distance_mm for p in measured])
        console.print(
            f"farthest new progression voxel from the pre-RT T2L: median {np.median(far):.1f} mm, "
            f"max {far.max():.1f} mm ({len(measured)} patients measured)"
        )
    tests = between_cohorts(report.patients)
    console.print("between cohorts: " + "; ".join(
        f"{t['comparison']} {t['test']} p = {t['p']:.2g} [study {t['study_p']:g}]" for t in tests
    ))  # fmt: skip
    for message in report.problems:
        console.print(f"[yellow]warning:[/] {message}")
