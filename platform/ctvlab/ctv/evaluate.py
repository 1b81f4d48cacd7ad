"""One patient's CTV evaluation, given the network's probability: the three CTVs (`ctvlab.ctv.construct`),
their metrics against the composite lesion target (`ctvlab.ctv.metrics`), how much of the progression
beyond the pre-RT lesion each covers; the tables over patients (Supplementary Tables 1 and 2, Wilcoxon
tests) and the CTVs written as NIfTI. The stage that runs it over a split is `ctvlab.stages.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.config import StudyConfig
from ctvlab.data.readers import PreparedPatient
from ctvlab.study import CTV_NAMES

TABLE_METRICS = (
    "sensitivity",
    "specificity",
    "specificity_ring",  # within the 4 cm ring around the T2L: where a margin can spare tissue at all
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


def wilcoxon_table(per_patient: pd.DataFrame) -> pd.DataFrame:
    """Wilcoxon signed-rank p-values, model vs RTOG and model vs EORTC, for every metric."""
    from ctvlab.ctv.metrics import WILCOXON_COLUMNS, ctv_wilcoxon

    if "model" not in set(per_patient["ctv"]):
        return pd.DataFrame(columns=WILCOXON_COLUMNS)
    return ctv_wilcoxon(per_patient.rename(columns={"patient_id": "patient"}), reference="model",
                        metrics=[m for m in TABLE_METRICS if m != "progression_coverage"])  # fmt: skip


def write_ctv_nifti(ctv: np.ndarray, p: PreparedPatient, out_3mm: Path, out_native: Path | None) -> None:
    """A CTV as uint8 NIfTI on the 3 mm grid and, resampled (trilinear of 0/1, ≥ 0.5), on the T1c grid."""
    import nibabel as nib

    from ctvlab.atomic import atomic_path
    from ctvlab.preprocess.grid import resample_mask

    def save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
        img = nib.Nifti1Image(data.astype(np.uint8), affine)
        img.header.set_xyzt_units("mm")
        with atomic_path(path) as tmp:
            nib.save(img, tmp)

    save(ctv, p.affine, out_3mm)
    native_affine, native_shape = p.sidecar.get("native_affine"), p.sidecar.get("native_shape")
    if out_native is not None and native_affine is not None and native_shape is not None:
        native = resample_mask(ctv, p.affine, np.asarray(native_affine, float), tuple(native_shape))
        save(native, np.asarray(native_affine, float), out_native)
