"""A model's CTV thresholds, chosen once on its validation patients and recorded in the model itself.

After training, the model's probability on each validation patient gives:
- the study's threshold: the grid value with the highest mean validation Tversky (α = 0.02, β = 0.98) of the
  full model CTV (`ctvlab.ctv.metrics.choose_threshold`);
- one threshold per coverage target of `ctv.coverage_targets` (`ctvlab.ctv.conformal.crc_threshold`): the
  largest threshold whose CTV, on a new patient like the validation patients, misses on average at most
  1 − target of the new progression. A target that so few calibration patients cannot guarantee is recorded
  as unreachable, with the reason.

Both go into the model's spec (`model.json`: `threshold`, and `ctv` with the coverage rules, the
calibration patients' count and the CTV settings they were chosen with), so `ctvlab evaluate` and
`ctvlab predict` build the same CTVs from the model alone. The validation patients also chose the model's
checkpoint; the guarantee assumes they are otherwise like new patients (docs: "Coverage with a guarantee").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.config import StudyConfig

COVERAGE_GRID = tuple(round(0.01 * i, 2) for i in range(101))  # thresholds tried for a coverage target


def validation_maps(model, prep: Path, patient_ids: Sequence[str]) -> list[tuple[Any, np.ndarray]]:
    """(prepared patient, the model's probability on its 3 mm grid) for each patient."""
    from ctvlab.data.readers import load_patient
    from ctvlab.unet.inference import predict_probability

    out = []
    for pid in patient_ids:
        p = load_patient(prep, pid)
        out.append((p, predict_probability(model, p)))
    return out


def coverage_rules(maps: list[tuple[Any, np.ndarray]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """One conformal rule per target from the calibration patients' maps (model CTV at each threshold)."""
    from ctvlab.ctv import coverage as C
    from ctvlab.ctv.conformal import crc_threshold, miss_fractions
    from ctvlab.ctv.construct import model_ctv
    from ctvlab.ctv.scoring import patient_masks

    if not targets:
        return []
    ctvs, new = [], []
    for p, prob in maps:
        m = {**patient_masks(p), "ventricles": p.mask("ventricles") > 0}
        lesion = m["cel"] | m["t2l"]
        ctvs.append([model_ctv(prob, t, lesion, m["brain"], m["critical"]) for t in COVERAGE_GRID])
        new.append(C.new_progression(m))
    losses = miss_fractions(ctvs, new)
    rules = []
    for target in sorted(targets):
        r = crc_threshold(losses, COVERAGE_GRID, target)
        rules.append({"target": r.target, "name": r.name, "threshold": r.threshold, "n_calibration": r.n_calibration,
                      "calibration_miss": r.calibration_miss, "bound": r.bound, "reason": r.reason})  # fmt: skip
    return rules


def compute_calibration(model, prep: Path, cfg: StudyConfig, val_ids: Sequence[str]) -> dict[str, Any]:
    """The thresholds of a loaded model on `val_ids` with the settings of `cfg.ctv` (nothing is written)."""
    from ctvlab.ctv.metrics import choose_threshold
    from ctvlab.ctv.scoring import patient_masks

    maps = validation_maps(model, prep, val_ids)
    masks = [patient_masks(p) for p, _ in maps]
    threshold, table = choose_threshold(
        [prob for _, prob in maps], [m["target"] for m in masks], [m["brain"] for m in masks],
        cfg.ctv.threshold_grid, cfg.ctv.tversky_alpha, cfg.ctv.tversky_beta,
        lesions=[m["cel"] | m["t2l"] for m in masks], criticals=[m["critical"] for m in masks],
    )  # fmt: skip
    return {
        "threshold": float(threshold),
        "threshold_source": "validation Tversky",
        "threshold_table": {f"{t:g}": float(v) for t, v in table.items()},
        "n_calibration": len(val_ids),
        "coverage": coverage_rules(maps, cfg.ctv.coverage_targets),
        "settings": settings_of(cfg),
    }


def settings_of(cfg: StudyConfig) -> dict[str, Any]:
    """The `ctv` settings a calibration depends on: if they change, the recorded thresholds are not theirs."""
    return cfg.ctv.model_dump(mode="json", include={
        "rtog_margin_mm", "eortc_margin_mm", "eortc_fallback_t2l", "threshold_grid", "tversky_alpha",
        "tversky_beta", "coverage_targets",
    })  # fmt: skip


def calibrate(model_dir: Path, prep: Path, cfg: StudyConfig, val_ids: Sequence[str]) -> dict[str, Any]:
    """Choose the model's thresholds on `val_ids` and write them into `model_dir/model.json`; returns them."""
    from ctvlab.atomic import write_json_atomic
    from ctvlab.unet.inference import SPEC_FILE, load_model

    record = compute_calibration(load_model(model_dir, device="cpu"), prep, cfg, val_ids)
    spec_path = Path(model_dir) / SPEC_FILE
    spec = json.loads(spec_path.read_text())
    spec.update({"threshold": record["threshold"], "ctv": record})
    write_json_atomic(spec_path, spec)
    return record


def calibration_for(model, prep: Path, cfg: StudyConfig, val_ids: Sequence[str]) -> dict[str, Any]:
    """The model's recorded calibration when it was made with `cfg.ctv`'s settings, else a fresh one."""
    recorded = model.spec.get("ctv")
    if (
        recorded
        and recorded.get("settings") == settings_of(cfg)
        and recorded.get("n_calibration") == len(val_ids)
    ):
        return recorded
    return compute_calibration(model, prep, cfg, val_ids)


def coverage_thresholds(calibration: dict[str, Any] | None) -> dict[str, float]:
    """The reachable coverage CTVs of a calibration (`calibrate`, a model spec's "ctv" entry): {"cov95":
    threshold, ...}; empty without one."""
    rules = (calibration or {}).get("coverage") or []
    return {r["name"]: float(r["threshold"]) for r in rules if r.get("threshold") is not None}
