"""Does the model put the CTV where the recurrence is, better than geometry? The positive control's scoring.

For each test patient, on the prepared 3 mm grid (definitions in `ctvlab.ctv.coverage`):
- the model CTV (the evaluation's: validation-chosen threshold, `ctvlab.ctv.construct.model_ctv`) against
  the uniform margin of the same volume (`isovolume_ctv`): the share of the new progression each covers;
- PREDICT-GBM's protocol: the model's probability, its top k candidate voxels at the volume of the RTOG
  CTV, the EORTC CTV and a 15 mm margin, against the k nearest (the margin itself);
- on a synthetic cohort, the same for the generator's TRUE pre-RT tumour density (its ground truth,
  `<cohort>/truth/<patient>_density_pre.nii.gz`): the **ceiling** at each volume, the most any map made
  from that density could gain, printed beside the model's gain.

`summary` gives, per volume and map, the mean coverage gain over the margin with a patient-bootstrap 95%
interval, the paired Wilcoxon p and the model's gain as a share of the ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ctvlab.config import StudyConfig

TRUTH_DIR = "truth"
VOLUMES = ("model CTV", "RTOG", "EORTC", "margin 15 mm", "margin 10 mm", "margin 20 mm")


def truth_path(cohort: Path, patient_id: str) -> Path:
    """Where a synthetic cohort keeps a patient's true pre-RT tumour density."""
    return Path(cohort) / TRUTH_DIR / f"{patient_id}_density_pre.nii.gz"


def truth_on_grid(cohort: Path, patient) -> np.ndarray | None:
    """The true pre-RT density of a prepared patient on its 3 mm grid (trilinear), or None without one."""
    import nibabel as nib

    from ctvlab.preprocess.grid import resample

    path = truth_path(cohort, patient.patient_id)
    if not path.is_file():
        return None
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return resample(data, img.affine, patient.affine, tuple(patient.masks.shape[1:]))


def score_patient(
    prob: np.ndarray, threshold: float, patient, cfg: StudyConfig, density: np.ndarray | None = None
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The CTV comparison and the fixed-volume rows of one patient.

    Returns:
        ({"patient_id", "n_new", "model_ctv", "isovolume", "isovolume_margin_mm", "k_model"}: coverage of the
        new progression by the model CTV and by its same-volume margin), and `coverage_at` rows (one per
        volume in `VOLUMES`) with the "model" and, when given, "density" maps.
    """
    from ctvlab.ctv import coverage as C
    from ctvlab.ctv.construct import build_ctvs, isovolume_ctv
    from ctvlab.ctv.scoring import patient_masks

    masks = {
        **patient_masks(patient),
        "nav": patient.mask("nav") > 0,
        "ventricles": patient.mask("ventricles") > 0,
    }
    ctvs = build_ctvs(prob, threshold, masks, patient.spacing, cfg.ctv)
    lesion = masks["cel"] | masks["t2l"]
    iso, iso_margin = isovolume_ctv(
        lesion, masks["brain"], masks["critical"], patient.spacing, int(ctvs["model"].sum())
    )
    cand, new = C.candidates(masks), C.new_progression(masks)
    dist = C.lesion_distance(masks, patient.spacing)
    n_new = int(new.sum())

    def cov(ctv):
        return float((ctv & new).sum()) / n_new if n_new else float("nan")

    ctv_row = {"patient_id": patient.patient_id, "n_new": n_new, "model_ctv": cov(ctvs["model"]),
               "isovolume": cov(iso), "isovolume_margin_mm": iso_margin,
               "k_model": C.ctv_volume(ctvs["model"], cand)}  # fmt: skip
    volumes = {
        "model CTV": C.ctv_volume(ctvs["model"], cand),
        "RTOG": C.ctv_volume(ctvs["rtog"], cand),
        "EORTC": C.ctv_volume(ctvs["eortc"], cand),
        **{f"margin {m} mm": C.margin_volume(dist, cand, float(m)) for m in (15, 10, 20)},
    }
    scores = {"model": prob, **({"density": density} if density is not None else {})}
    rows = [{"patient_id": patient.patient_id, **r} for r in C.coverage_at(scores, cand, new, dist, volumes)]
    return ctv_row, rows


def model_threshold(model, prep: Path, cfg: StudyConfig) -> float:
    """The model CTV's threshold: chosen on the validation patients of `prep`'s split, or `cfg.ctv`'s own."""
    from ctvlab.splits import load_split
    from ctvlab.stages.calibrate import calibration_for

    if cfg.ctv.threshold == "validation":
        return float(calibration_for(model, prep, cfg, load_split(prep).patients("val"))["threshold"])
    return float(cfg.ctv.threshold)


def score_patients(
    model,
    threshold: float,
    prep: Path,
    patient_ids: Sequence[str],
    cfg: StudyConfig,
    cohort: Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`score_patient` for each of `patient_ids` of `prep` with `model` at `threshold`.

    Returns:
        (the CTV table, the fixed-volume table).
    """
    from ctvlab.data.readers import load_patient
    from ctvlab.unet.inference import predict_probability

    ctv_rows, rows = [], []
    for pid in patient_ids:
        p = load_patient(prep, pid)
        density = truth_on_grid(cohort, p) if cohort is not None else None
        c, r = score_patient(predict_probability(model, p), threshold, p, cfg, density)
        ctv_rows.append(c)
        rows.extend(r)
    return pd.DataFrame(ctv_rows), pd.DataFrame(rows)


def score_test_patients(
    prep: Path, model_dir: Path, cfg: StudyConfig, cohort: Path | None = None, split_name: str = "test"
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """`score_patient` for every patient of a split with the model at its validation-chosen threshold.

    Returns:
        (the CTV table, the fixed-volume table, the threshold).
    """
    from ctvlab.splits import load_split
    from ctvlab.unet.inference import load_model

    model = load_model(model_dir, device="cpu")
    threshold = model_threshold(model, prep, cfg)
    ctv_table, volume_table = score_patients(
        model, threshold, prep, load_split(prep).patients(split_name), cfg, cohort
    )
    return ctv_table, volume_table, threshold


def score_external(
    model_dir: Path, cfg: StudyConfig, train_prep: Path, prep: Path, cohort: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Every patient of another prepared cohort, none of whom the model saw, scored like the test patients.

    The threshold is the one the test patients get (chosen on the validation patients of `train_prep`), so
    the external patients only add precision: an independent draw of the same population, e.g. a synthetic
    cohort generated with the same settings and another seed. A patient whose input files are those of a
    patient of `train_prep` is refused (`LeakageError`).

    Returns:
        (the CTV table, the fixed-volume table, the threshold).
    """
    from ctvlab.data.readers import read_patients
    from ctvlab.errors import LeakageError
    from ctvlab.unet.inference import load_model

    patients, seen = read_patients(prep), read_patients(train_prep)
    # Patient ids say nothing here (two synthetic cohorts number their patients alike): the inputs' hashes do.
    known = dict(zip(seen["input_hash"], seen["patient_id"], strict=True))
    same = [(pid, known[h]) for pid, h in zip(patients["patient_id"], patients["input_hash"], strict=True)
            if h in known]  # fmt: skip
    if same:
        shown = ", ".join(f"{a} (= {b})" for a, b in same[:5]) + (" …" if len(same) > 5 else "")
        raise LeakageError(
            f"{len(same)} patient(s) of {prep} have the same input files as patients of the dataset the model "
            f"was trained, validated and tested on ({train_prep}): {shown}. External patients must be others."
        )
    model = load_model(model_dir, device="cpu")
    threshold = model_threshold(model, train_prep, cfg)
    ids = sorted(patients["patient_id"])
    ctv_table, volume_table = score_patients(model, threshold, prep, ids, cfg, cohort)
    return ctv_table, volume_table, threshold


def paired_gain(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Mean of a − b over patients with a patient-bootstrap 95% interval and the paired Wilcoxon p."""
    from ctvlab.statistics import paired_wilcoxon, patient_bootstrap

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    ci = patient_bootstrap([str(i) for i in range(d.size)], lambda idx: float(d[idx].mean()), seed=seed)
    test = paired_wilcoxon(x[keep], y[keep])
    return {"n": int(d.size), "gain": ci.estimate, "low": ci.low, "high": ci.high, "p": test.p,
            "better": int((d > 0).sum()), "worse": int((d < 0).sum())}  # fmt: skip


def summary(ctv_table: pd.DataFrame, volume_table: pd.DataFrame) -> pd.DataFrame:
    """One row per (volume, map): mean coverage, gain over the same-volume margin with its interval and p,
    the ceiling (the true density's gain) and the map's gain as a share of it."""
    rows = []
    if not ctv_table.empty:
        g = paired_gain(ctv_table["model_ctv"], ctv_table["isovolume"])
        rows.append({"volume": "model CTV (as drawn)", "map": "model", "coverage": float(ctv_table["model_ctv"].mean()),
                     "margin": float(ctv_table["isovolume"].mean()), **g})  # fmt: skip
    for vname in VOLUMES:
        part = volume_table[volume_table["volume"] == vname]
        if part.empty:
            continue
        ceiling = paired_gain(part["density"], part["margin"])["gain"] if "density" in part else float("nan")
        for mname in ("model", "density"):
            if mname not in part:
                continue
            g = paired_gain(part[mname], part["margin"])
            rows.append({"volume": vname, "map": mname, "coverage": float(part[mname].mean()),
                         "margin": float(part["margin"].mean()), **g, "ceiling": ceiling,
                         "share_of_ceiling": g["gain"] / ceiling if ceiling and np.isfinite(ceiling) and ceiling > 0 else float("nan")})  # fmt: skip
    return pd.DataFrame(rows)
