"""One patient's CTV evaluation, given the network's probability: the three CTVs (`ctvlab.ctv.construct`),
their metrics against the composite lesion target (`ctvlab.ctv.metrics`), how much of the progression
beyond the pre-RT lesion each covers; the tables over patients (Supplementary Tables 1 and 2, Wilcoxon
tests, the per-patient comparisons of the paper's Results) and the CTVs written as NIfTI. The stage that runs it over a split is `ctvlab.stages.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.config import StudyConfig
from ctvlab.data.readers import PreparedPatient
from ctvlab.study import CTV_NAMES, REFERENCE_ONLY_CTVS

TABLE_METRICS = (
    "sensitivity",
    "specificity",
    "specificity_ring",  # within the 4 cm ring around the T2L: where a margin can spare tissue at all
    "ppv",  # positive predictive value: the share of the CTV that progressed
    "dice",
    "hd95_mm",
    "tversky",
    "pcc",
    "volume_cm3",
    "progression_coverage",
)


PATIENT_FIGURE_PREFIX = "fig4_contours_"  # MRI slices of one patient: logged only on opt-in


# --- per-patient evaluation (pure apart from reading the prepared arrays) ---------------------------------


def patient_masks(p: PreparedPatient) -> dict[str, np.ndarray]:
    names = ("brain", "cel", "t2l", "cavity", "critical", "target", "cel_prog", "t2l_prog", "ring")
    return {n: p.mask(n) > 0 for n in names}


def evaluate_patient(
    prob: np.ndarray | None, threshold: float, p: PreparedPatient, cfg: StudyConfig
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], str]:
    """The CTVs of one patient and one metrics row per CTV; also which GTV the EORTC CTV used.

    With a model CTV, the iso-volume control joins them: a uniform margin around the lesion with the model
    CTV's volume (`ctvlab.ctv.construct.isovolume_ctv`; its row records the margin in `margin_mm`)."""
    from ctvlab.ctv.construct import build_ctvs, eortc_gtv, isovolume_ctv
    from ctvlab.ctv.metrics import coverage, ctv_metrics, specificity

    masks = patient_masks(p)
    ctvs = build_ctvs(prob, threshold, masks, p.spacing, cfg.ctv)
    lesion = masks["cel"] | masks["t2l"]
    margins: dict[str, float] = {}
    if "model" in ctvs:
        ctvs["isovolume"], margins["isovolume"] = isovolume_ctv(
            lesion, masks["brain"], masks["critical"], p.spacing, int(ctvs["model"].sum())
        )
    ctvs["lesion"] = lesion & masks["brain"]  # no margin: the paper's "pre-RT lesion only" row
    progression = (masks["cel_prog"] | masks["t2l_prog"]) & masks["brain"] & ~lesion
    rows = []
    for name in CTV_NAMES:
        if name not in ctvs:
            continue
        m = ctv_metrics(ctvs[name], masks["target"], masks["brain"], p.spacing,
                        cfg.ctv.tversky_alpha, cfg.ctv.tversky_beta)  # fmt: skip
        m["progression_coverage"] = coverage(ctvs[name], progression)
        m["specificity_ring"] = specificity(ctvs[name], masks["target"], masks["brain"] & masks["ring"])
        rows.append(
            {"patient_id": p.patient_id, "ctv": name, **m, "margin_mm": margins.get(name, float("nan"))}
        )
    source = eortc_gtv(masks["cel"], masks["cavity"], masks["t2l"] if cfg.ctv.eortc_fallback_t2l else None)[1]
    return ctvs, rows, source


def summary_table(per_patient: pd.DataFrame) -> pd.DataFrame:
    """Supplementary Table 1: mean ± SD of every metric per CTV (NaN values left out, counted in n)."""
    rows = []
    for ctv in [c for c in CTV_NAMES if c in set(per_patient["ctv"])]:
        sub = per_patient[per_patient["ctv"] == ctv]
        row: dict[str, Any] = {"ctv": ctv, "n": len(sub)}
        for m in TABLE_METRICS:
            vals = sub[m].astype(float)
            row[f"{m}_mean"] = float(vals.mean())
            row[f"{m}_sd"] = float(vals.std(ddof=1)) if vals.notna().sum() > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# The paper's per-patient comparisons (Results, "CTV evaluation"; Supplementary Fig. 4), with its values.
MISS_FRACTION = 0.13  # "only missing more than 13% of the lesion in 3 patients"
EARLY_PFS_MONTHS = 7.0  # the study's median PFS: early < 7 months ≤ late
COMPARISON_COLUMNS = ["comparison", "value", "n", "study"]


def comparison_table(per_patient: pd.DataFrame, clinical: pd.DataFrame) -> pd.DataFrame:
    """Per-patient comparisons of the model CTV: how often it beats RTOG and EORTC by PCC (ties are not
    wins), how many patients it misses more than 13% of the progression in, its PCC in early and late
    progressors and per treatment cohort; each beside the study's value where the paper gives one.

    Args:
        per_patient: the evaluation's rows (patient_id, ctv, sensitivity, pcc, ...).
        clinical: patient_id, cohort and pfs_months of the same patients (prep's patients.parquet).
    """
    if "model" not in set(per_patient["ctv"]):
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    pcc = per_patient.pivot_table(index="patient_id", columns="ctv", values="pcc", aggfunc="first")
    sens = per_patient[per_patient["ctv"] == "model"].set_index("patient_id")["sensitivity"]
    info = clinical.set_index("patient_id").reindex(pcc.index)
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float, n: int, study: float = float("nan")) -> None:
        rows.append({"comparison": name, "value": float(value), "n": int(n), "study": study})

    for other, study in (("rtog", 72.0), ("eortc", 94.0)):
        if other in pcc:
            both = pcc[["model", other]].dropna()
            add(f"model PCC > {other.upper()} PCC (% of patients)", 100.0 * (both["model"] > both[other]).mean()
                if len(both) else float("nan"), len(both), study)  # fmt: skip
    valid = sens.dropna()
    add(f"patients whose model CTV misses > {MISS_FRACTION:.0%} of the progression", (valid < 1 - MISS_FRACTION).sum(),
        len(valid), 3.0)  # fmt: skip
    model_pcc = pcc["model"]
    early = info["pfs_months"] < EARLY_PFS_MONTHS
    for name, mask, study in (("early", early, 0.803), ("late", ~early, 0.815)):
        vals = model_pcc[mask].dropna()
        add(f"model PCC, {name} progressors (PFS {'<' if name == 'early' else '≥'} {EARLY_PFS_MONTHS:g} months)",
            vals.mean() if len(vals) else float("nan"), len(vals), study)  # fmt: skip
    for cohort in sorted(info["cohort"].dropna().unique()):
        vals = model_pcc[info["cohort"] == cohort].dropna()
        add(f"model PCC, {cohort} cohort", vals.mean(), len(vals))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def wilcoxon_table(per_patient: pd.DataFrame) -> pd.DataFrame:
    """Wilcoxon signed-rank p-values, model vs RTOG and model vs EORTC, for every metric."""
    from ctvlab.ctv.metrics import WILCOXON_COLUMNS, ctv_wilcoxon

    if "model" not in set(per_patient["ctv"]):
        return pd.DataFrame(columns=WILCOXON_COLUMNS)
    tested = per_patient[~per_patient["ctv"].isin(REFERENCE_ONLY_CTVS)]
    return ctv_wilcoxon(tested.rename(columns={"patient_id": "patient"}), reference="model",
                        metrics=[m for m in TABLE_METRICS if m != "progression_coverage"])  # fmt: skip


def native_allowed(p: PreparedPatient) -> np.ndarray | None:
    """Where a CTV may be on the patient's T1c grid (brain without critical structures), resampled from the
    prepared grid; None when the patient records no T1c grid."""
    from ctvlab.preprocess.grid import resample_mask

    native_affine, native_shape = p.sidecar.get("native_affine"), p.sidecar.get("native_shape")
    if native_affine is None or native_shape is None:
        return None
    allowed = (p.mask("brain") > 0) & ~(p.mask("critical") > 0)
    return resample_mask(allowed, p.affine, np.asarray(native_affine, float), tuple(native_shape))


def write_ctv_nifti(
    ctv: np.ndarray,
    p: PreparedPatient,
    out_3mm: Path,
    out_native: Path | None,
    allowed_native: np.ndarray | None = None,
    delivered: np.ndarray | None = None,
) -> None:
    """A CTV as uint8 NIfTI on the 3 mm grid and, resampled (trilinear of 0/1, ≥ 0.5), on the T1c grid,
    where the delivered shape's rules apply (`construct.deliverable`: no piece or hole smaller than one
    prepared voxel; a filled hole only within `allowed_native`, see `native_allowed`). `delivered`: the
    CTV already built on the T1c grid (`stages.predict.native_ctvs`), written there instead."""
    import nibabel as nib

    from ctvlab.atomic import atomic_path
    from ctvlab.ctv.construct import deliverable
    from ctvlab.preprocess.grid import resample_mask

    def save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
        img = nib.Nifti1Image(data.astype(np.uint8), affine)
        img.header.set_xyzt_units("mm")
        with atomic_path(path) as tmp:
            nib.save(img, tmp)

    save(ctv, p.affine, out_3mm)
    native_affine, native_shape = p.sidecar.get("native_affine"), p.sidecar.get("native_shape")
    if out_native is not None and native_affine is not None and native_shape is not None:
        affine = np.asarray(native_affine, float)
        if delivered is not None:
            save(delivered, affine, out_native)
            return
        native = resample_mask(ctv, p.affine, affine, tuple(native_shape))
        native = deliverable(
            native, np.linalg.norm(affine[:3, :3], axis=0), float(np.prod(p.spacing)), allowed_native
        )
        save(native, affine, out_native)


def write_map_nifti(data: np.ndarray, p: PreparedPatient, path: Path) -> None:
    """A float32 map (probability, its spread) as NIfTI on the patient's 3 mm grid."""
    import nibabel as nib

    from ctvlab.atomic import atomic_path

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), p.affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
