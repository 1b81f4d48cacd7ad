"""Coverage of the new progression at a fixed volume: a map against a uniform margin of the same volume.

A CTV trades volume for coverage, so a map is only better than geometry if, at the SAME volume, its
voxels hold more of the recurrence than a uniform margin's do. This module scores any per-voxel map that
way, per patient (arrays (X, Y, Z) on one grid, spacing in mm):

- **candidates**: the normal-appearing brain (NAV: brain minus cavity, ventricles and the pre-RT lesion)
  within the analysis ring (4 cm of the pre-RT T2L): the voxels a CTV adds to the visible lesion;
- **new progression**: candidates that are lesion (T2L or CEL) at progression;
- **volume k**: a number of candidate voxels, e.g. a uniform margin's (`margin_volume`) or a CTV's
  (`ctv_volume`);
- **coverage at k**: the share of the new progression inside the k candidates of highest score
  (`top_k`; ties go to the voxel nearer the lesion, then to the lower flat index, so it is deterministic).
  The uniform margin is the score −distance: its top k are the k nearest candidates.

The **ceiling** of a synthetic cohort is the coverage gain, at k, of the generator's TRUE pre-RT tumour
density over the margin: every image is computed from that density, so a model cannot know more (it may
rank a little differently, so the ceiling is a reference, not a proof). PREDICT-GBM scores the field's
models the same way (top-k of a map at a standard plan's volume).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "candidates",
    "coverage_at",
    "coverage_summary",
    "ctv_volume",
    "lesion_distance",
    "margin_volume",
    "new_progression",
    "top_k",
]


def candidates(masks: Mapping[str, np.ndarray]) -> np.ndarray:
    """NAV within the ring: brain − cavity − ventricles − T2L − CEL, within `ring` (masks of `layout.MASKS`)."""
    m = {k: np.asarray(masks[k], dtype=bool) for k in ("brain", "cavity", "ventricles", "t2l", "cel", "ring")}
    return m["brain"] & m["ring"] & ~m["cavity"] & ~m["ventricles"] & ~m["t2l"] & ~m["cel"]


def new_progression(masks: Mapping[str, np.ndarray]) -> np.ndarray:
    """Candidates that are lesion at progression (T2L or CEL): where the tumour newly appeared."""
    prog = np.asarray(masks["t2l_prog"], dtype=bool) | np.asarray(masks["cel_prog"], dtype=bool)
    return prog & candidates(masks)


def lesion_distance(masks: Mapping[str, np.ndarray], spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance (mm) of every voxel to the pre-RT lesion (T2L ∪ CEL)."""
    lesion = np.asarray(masks["t2l"], dtype=bool) | np.asarray(masks["cel"], dtype=bool)
    return ndimage.distance_transform_edt(~lesion, sampling=tuple(float(s) for s in spacing))


def margin_volume(distance: np.ndarray, candidate: np.ndarray, margin_mm: float) -> int:
    """k of a uniform margin: the candidates within `margin_mm` of the lesion."""
    return int(np.count_nonzero(candidate & (distance <= margin_mm + 1e-6)))


def ctv_volume(ctv: np.ndarray, candidate: np.ndarray) -> int:
    """k of a CTV: the candidates it contains (its volume beyond the visible lesion)."""
    return int(np.count_nonzero(np.asarray(ctv, dtype=bool) & candidate))


def top_k(score: np.ndarray, candidate: np.ndarray, k: int, distance: np.ndarray) -> np.ndarray:
    """The k candidates of highest `score` (ties: nearer the lesion first, then lower flat index), a mask."""
    idx = np.flatnonzero(candidate)
    out = np.zeros(candidate.shape, dtype=bool)
    k = max(0, min(int(k), idx.size))
    if k == 0:
        return out
    s = np.asarray(score, dtype=np.float64).ravel()[idx]
    d = np.asarray(distance, dtype=np.float64).ravel()[idx]
    order = np.lexsort((idx, d, -s))  # last key first: score descending, then distance, then index
    out.ravel()[idx[order[:k]]] = True
    return out


def coverage_at(
    scores: Mapping[str, np.ndarray],
    candidate: np.ndarray,
    new: np.ndarray,
    distance: np.ndarray,
    volumes: Mapping[str, int],
) -> list[dict[str, float]]:
    """Coverage of `new` by the top k of each score and by the uniform margin, at each volume.

    Args:
        scores: named per-voxel maps (a model's probability, the true density, ...).
        candidate, new: `candidates` and `new_progression`.
        distance: `lesion_distance`.
        volumes: named volumes k (candidates), e.g. {"margin 10 mm": 1234, "RTOG": 2345}.

    Returns:
        One row per volume: {"volume": name, "k": k, "n_new": voxels of new progression, "margin": its
        coverage, <score name>: coverage, ...}; coverages NaN when the patient has no new progression.
    """
    n_new = int(np.count_nonzero(new))
    rows = []
    for vname, k in volumes.items():
        row: dict[str, float] = {"volume": vname, "k": int(k), "n_new": n_new}  # type: ignore[dict-item]
        for sname, score in {"margin": -distance, **scores}.items():
            chosen = top_k(score, candidate, k, distance)
            row[sname] = float(np.count_nonzero(chosen & new)) / n_new if n_new else float("nan")
        rows.append(row)
    return rows


def coverage_summary(rows, rules: list[dict]) -> pd.DataFrame:  # noqa: F821
    """Target against achieved: one row per coverage CTV (and RTOG, EORTC for comparison) over the evaluated
    patients. `rows`: per patient and CTV {"patient_id", "ctv", "miss", "volume_cm3"} (miss NaN without new
    progression); `rules`: the model's coverage rules (`ctvlab.stages.calibrate`).

    Columns: ctv, target, threshold, n_calibration, calibration_miss, n (patients with new progression),
    miss (mean achieved miss fraction), miss_low/miss_high (patient-bootstrap 95%), below_target (share of
    patients covered below the target), volume_cm3 (mean), reason (why a target has no CTV).
    """
    import pandas as pd

    from ctvlab.statistics import patient_bootstrap

    df = pd.DataFrame(rows)
    out = []
    by_name = {r["name"]: r for r in rules}
    names = [r["name"] for r in rules] + ["rtog", "eortc"]
    for name in names:
        rule = by_name.get(name, {})
        part = df[df["ctv"] == name] if not df.empty else df
        miss = part["miss"].dropna().to_numpy(dtype=float) if len(part) else np.array([])
        ci = patient_bootstrap([str(i) for i in range(miss.size)], lambda idx, m=miss: float(m[idx].mean()))
        target = rule.get("target", float("nan"))
        out.append({
            "ctv": name, "target": target, "threshold": rule.get("threshold"),
            "n_calibration": rule.get("n_calibration"), "calibration_miss": rule.get("calibration_miss"),
            "n": int(miss.size), "miss": ci.estimate, "miss_low": ci.low, "miss_high": ci.high,
            "below_target": float(np.mean(1 - miss < target)) if miss.size and np.isfinite(target) else float("nan"),
            "volume_cm3": float(part["volume_cm3"].mean()) if len(part) else float("nan"),
            "reason": rule.get("reason", ""),
        })  # fmt: skip
    return pd.DataFrame(out)


def volume_curves(
    prob: np.ndarray,
    masks: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    thresholds: Sequence[float],
    margins_mm: Sequence[float],
) -> list[dict[str, float]] | None:
    """The coverage-volume curves of one patient: the share of its new progression inside the model CTV at
    each threshold and inside the uniform margin at each width, against the CTV's volume (cm³).

    Both CTVs are built as evaluated (the model CTV: `construct.model_ctv`; the margin: the lesion grown by
    m mm, clipped to the brain, critical structures removed, as `construct.isovolume_ctv`). None for a
    patient without new progression.

    Returns:
        rows {"curve": "model" | "margin", "setting": threshold or mm, "volume_cm3", "coverage"}.
    """
    from ctvlab.ctv.construct import model_ctv

    m = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
    new = new_progression(m)
    n = int(new.sum())
    if n == 0:
        return None
    lesion = m["cel"] | m["t2l"]
    allowed = m["brain"] & ~m["critical"]
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    dist = lesion_distance(m, spacing)
    rows = []
    for t in thresholds:
        ctv = model_ctv(prob, float(t), lesion, m["brain"], m["critical"])
        rows.append({"curve": "model", "setting": float(t), "volume_cm3": float(ctv.sum()) * voxel_cm3,
                     "coverage": float((ctv & new).sum()) / n})  # fmt: skip
    for mm in margins_mm:
        ctv = allowed & ((dist <= float(mm) + 1e-6) | lesion)
        rows.append({"curve": "margin", "setting": float(mm), "volume_cm3": float(ctv.sum()) * voxel_cm3,
                     "coverage": float((ctv & new).sum()) / n})  # fmt: skip
    return rows


def curve_at(volumes: np.ndarray, coverages: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A coverage-volume curve read at the volumes of `grid`: the best coverage of any point whose volume is
    at most that (a step function, as a planner picking the setting that fits the volume would); NaN below
    the curve's smallest volume."""
    order = np.argsort(volumes)
    v, c = (
        np.asarray(volumes, dtype=float)[order],
        np.maximum.accumulate(np.asarray(coverages, dtype=float)[order]),
    )
    idx = np.searchsorted(v, grid, side="right") - 1
    return np.where(idx >= 0, c[np.clip(idx, 0, None)], np.nan)


def volume_gain(curves: pd.DataFrame, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: F821
    """Per patient (rows of `curves` with "patient_id"), the model's and the margin's coverage on `grid`
    (cm³): arrays (patients, grid), and their difference. Where a patient's curve does not reach a volume
    (its lesion alone is larger, or its whole brain smaller), the value is NaN."""
    model, margin = [], []
    for _, part in curves.groupby("patient_id", sort=True):
        for name, out in (("model", model), ("margin", margin)):
            c = part[part["curve"] == name]
            row = curve_at(c["volume_cm3"].to_numpy(), c["coverage"].to_numpy(), grid)
            row[grid > c["volume_cm3"].max() + 1e-9] = np.nan  # beyond the largest CTV of that curve
            out.append(row)
    model_a, margin_a = np.array(model), np.array(margin)
    return model_a, margin_a, model_a - margin_a


def volume_summary(curves: pd.DataFrame, coverage_rows: list[dict], points: int = 60) -> dict:  # noqa: F821
    """The cohort's coverage-volume comparison: the curves on a common volume grid (0 to the largest RTOG
    CTV), each patient's gain (the model's coverage minus the margin's, averaged over the volumes both of
    its curves reach: the area between them over that range), its mean with a patient-bootstrap 95%
    interval and the Wilcoxon p against 0, and the fixed CTVs' mean (volume, coverage) to mark.

    Args:
        curves: `volume_curves` rows of every patient, with "patient_id".
        coverage_rows: per patient and CTV {"ctv", "miss", "volume_cm3"} (`stages.evaluate`).
    """
    import pandas as pd

    from ctvlab.statistics import paired_wilcoxon, patient_bootstrap

    rows = pd.DataFrame(coverage_rows)
    rtog = rows[rows["ctv"] == "rtog"]["volume_cm3"] if len(rows) else pd.Series(dtype=float)
    top = float(rtog.max()) if len(rtog) else float(curves["volume_cm3"].max())
    grid = np.linspace(0.0, top, points)
    model, margin, diff = volume_gain(curves, grid)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_patient = np.nanmean(diff, axis=1)
    per_patient = per_patient[np.isfinite(per_patient)]
    ci = patient_bootstrap(
        [str(i) for i in range(per_patient.size)], lambda idx: float(per_patient[idx].mean())
    )
    test = paired_wilcoxon(per_patient, np.zeros_like(per_patient))
    marks = {}
    for name, part in rows.groupby("ctv") if len(rows) else []:
        covered = 1.0 - part["miss"].dropna()
        if len(covered):
            marks[name.upper() if name in ("rtog", "eortc") else name] = (
                float(part["volume_cm3"].mean()),
                float(covered.mean()),
            )
    return {"grid": grid, "model": model, "margin": margin, "marks": marks, "n": int(per_patient.size),
            "gain": ci.estimate, "low": ci.low, "high": ci.high, "p": test.p}  # fmt: skip
