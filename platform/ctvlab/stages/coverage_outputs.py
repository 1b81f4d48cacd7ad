"""What the evaluation adds for a planner, beside the study's tables: coverage CTVs, the coverage-volume
curve, the reliability of the probability and its spread.

For each evaluated patient (`CoverageOutputs.add`):
- the coverage CTVs the model records (`cov90`, ...; `ctvlab.stages.calibrate`) and, for them and RTOG and
  EORTC, the share of the new progression each misses and its volume;
- the coverage-volume curves (`ctvlab.ctv.coverage.volume_curves`): the model CTV with its threshold swept,
  the uniform margin with its width swept;
- the voxel counts of the reliability diagram (`ctvlab.ctv.calibration`), over the brain within the ring;
- with `ctv.uncertainty: tta`, the test-time-augmentation mean and spread of the probability as NIfTI
  (`uncertainty/<patient>_tta_mean.nii.gz`, `_tta_sd.nii.gz`);
- on a synthetic cohort that keeps its ground truth (`<cohort>/truth/`), the positive control's scoring
  (`ctvlab.stages.control.score_patient`): the model against the same-volume margin at fixed volumes,
  beside the ceiling (the true pre-RT density's gain).
Then (`finish`): `coverage.csv` (target against achieved), `coverage_volume.csv` and its figure with the
area between the curves, `reliability.csv` and its figure, `control.csv` (with truth); `metrics` and `log`
give them to MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.config import StudyConfig

CURVE_MARGINS_MM = tuple(range(0, 42, 2))  # the uniform margin's widths on the coverage-volume curve


class CoverageOutputs:
    """Collects one evaluation's coverage outputs patient by patient, then writes them into `out`."""

    def __init__(self, cfg: StudyConfig, model, calibration: dict[str, Any], out: Path):
        from ctvlab.ctv.calibration import ReliabilityCounts
        from ctvlab.stages.calibrate import coverage_thresholds

        self.cfg, self.model, self.calibration, self.out = cfg, model, calibration, Path(out)
        self.thresholds = coverage_thresholds(calibration)
        self.reliability = ReliabilityCounts()
        self.rows: list[dict[str, Any]] = []
        self.curve_rows: list[dict[str, Any]] = []
        self.coverage: pd.DataFrame | None = None
        self.curves: pd.DataFrame | None = None
        self.volume: dict[str, Any] | None = None
        self.n_patients = 0
        self.threshold = float(calibration["threshold"])
        self.control_ctv: list[dict[str, Any]] = []
        self.control_rows: list[dict[str, Any]] = []
        self.control: pd.DataFrame | None = None
        if cfg.ctv.uncertainty == "tta":
            (self.out / "uncertainty").mkdir(exist_ok=True)

    def add(self, p, prob: np.ndarray, ctvs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Take one patient (its probability and its RTOG and EORTC CTVs); returns its coverage CTVs."""
        from ctvlab.ctv.construct import model_ctv
        from ctvlab.ctv.coverage import new_progression, volume_curves
        from ctvlab.ctv.scoring import patient_masks, write_map_nifti
        from ctvlab.stages.calibrate import COVERAGE_GRID
        from ctvlab.unet.inference import predict_with_spread

        self.n_patients += 1
        m = {**patient_masks(p), "ventricles": p.mask("ventricles") > 0}
        lesion = m["cel"] | m["t2l"]
        cov = {
            name: model_ctv(prob, t, lesion, m["brain"], m["critical"]) for name, t in self.thresholds.items()
        }
        new = new_progression(m)
        n, voxel_cm3 = int(new.sum()), float(np.prod(p.spacing)) / 1000.0
        for name, ctv in {**cov, "rtog": ctvs["rtog"], "eortc": ctvs["eortc"]}.items():
            self.rows.append({"patient_id": p.patient_id, "ctv": name,
                              "miss": float((new & ~ctv).sum()) / n if n else float("nan"),
                              "volume_cm3": float(ctv.sum()) * voxel_cm3})  # fmt: skip
        curve = volume_curves(prob, m, p.spacing, COVERAGE_GRID, CURVE_MARGINS_MM)
        self.curve_rows.extend({"patient_id": p.patient_id, **r} for r in curve or [])
        self.reliability.add(prob, m["target"], m["brain"] & m["ring"])
        from ctvlab.stages.control import score_patient, truth_on_grid

        density = truth_on_grid(self.cfg.raw_dir, p)
        if density is not None:  # a synthetic cohort with its ground truth: the positive control's scoring
            c, r = score_patient(prob, self.threshold, p, self.cfg, density)
            self.control_ctv.append(c)
            self.control_rows.extend(r)
        if self.cfg.ctv.uncertainty == "tta":
            mean, sd = predict_with_spread(self.model, p.features, p.mask("brain"), p.mask("t2l"), p.spacing)
            write_map_nifti(mean, p, self.out / "uncertainty" / f"{p.patient_id}_tta_mean.nii.gz")
            write_map_nifti(sd, p, self.out / "uncertainty" / f"{p.patient_id}_tta_sd.nii.gz")
        return cov

    def finish(self) -> list[Path]:
        """Write the tables and figures; returns the figures."""
        from ctvlab.atomic import write_csv_atomic
        from ctvlab.ctv.coverage import coverage_summary, volume_summary
        from ctvlab.ctv.figures import plot_coverage_volume, plot_reliability

        self.coverage = coverage_summary(self.rows, self.calibration["coverage"])
        write_csv_atomic(self.out / "coverage.csv", self.coverage)
        write_csv_atomic(self.out / "reliability.csv", self.reliability.table())
        figures = [plot_reliability(self.reliability.table(), self.reliability.ece(), self.out / "reliability.png",
                                    f"Voxel probability on {self.n_patients} patients (brain within the ring)")]  # fmt: skip
        self.curves = pd.DataFrame(self.curve_rows)
        if len(self.curves):
            v = self.volume = volume_summary(self.curves, self.rows)
            write_csv_atomic(self.out / "coverage_volume.csv", self.curves)
            figures.append(plot_coverage_volume(
                v["grid"], v["model"], v["margin"], v["marks"], self.out / "coverage_volume.png",
                f"Coverage against volume, {v['n']} patients: model − margin {v['gain']:+.3f} "
                f"[{v['low']:+.3f}, {v['high']:+.3f}]",
            ))  # fmt: skip
        if self.control_ctv:
            from ctvlab.stages.control import summary

            self.control = summary(pd.DataFrame(self.control_ctv), pd.DataFrame(self.control_rows))
            write_csv_atomic(self.out / "control.csv", self.control)
        return figures

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics: calibration error, the area between the curves, target against achieved."""
        out = {"expected_calibration_error": self.reliability.ece()}
        if self.volume is not None:  # the area between the coverage-volume curves, per unit volume
            v = self.volume
            out.update({"coverage_volume_gain": v["gain"], "coverage_volume_gain_low": v["low"],
                        "coverage_volume_gain_high": v["high"], "coverage_volume_gain_p": v["p"]})  # fmt: skip
        for r in self.coverage.itertuples() if self.coverage is not None else []:
            if r.ctv.startswith("cov") and r.threshold is not None and r.threshold == r.threshold:
                out.update({f"{r.ctv}_threshold": r.threshold, f"{r.ctv}_test_miss": r.miss,
                            f"{r.ctv}_volume_cm3": r.volume_cm3})  # fmt: skip
        if self.control is not None:  # the model's gain over the same-volume margin, and the ceiling
            for r in self.control.itertuples():
                if r.map == "model" and r.volume in ("model CTV (as drawn)", "model CTV"):
                    key = "control_drawn" if "drawn" in r.volume else "control_at_volume"
                    out.update({f"{key}_gain": r.gain, f"{key}_p": r.p})
                    if key == "control_at_volume":
                        out[f"{key}_ceiling"] = r.ceiling
        return out

    def log(self, run, prep: Path) -> None:
        """The tables as MLflow artifacts, patients under their pseudonyms."""
        from ctvlab.splits import pseudonymised

        run.table(self.coverage, "coverage.csv")
        run.table(self.reliability.table(), "reliability.csv")
        if self.curves is not None and len(self.curves):
            run.table(pseudonymised(prep, self.curves), "coverage_volume.csv")
        if self.control is not None:
            run.table(self.control, "control.csv")
