"""The evaluation's coverage tables, one row model each: what `coverage.csv`, `coverage_volume.csv`,
`reliability.csv` and `control.csv` in `results/evaluate/` hold, exported to `schemas/` as JSON Schemas of
one row (`ctvlab schemas`). A number the table cannot give (a target no calibration set reaches, a ceiling
without the cohort's truth) is empty in the CSV and null here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Number = float | None


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CoverageRow(_Row):
    """`coverage.csv`: each coverage target beside what the test patients achieved; RTOG and EORTC at their
    own volumes."""

    ctv: str = Field(description="cov90, cov95, … (a coverage CTV), rtog or eortc.")
    target: Number = Field(description="The coverage asked for (0–1); empty for RTOG and EORTC.")
    threshold: Number = Field(description="The model's threshold for the target; empty when unreachable.")
    n_calibration: Number = Field(description="Calibration patients the threshold was chosen on.")
    calibration_miss: Number = Field(description="Their mean miss fraction at that threshold.")
    n: int = Field(ge=0, description="Test patients with new progression.")
    miss: Number = Field(description="The test patients' mean miss fraction of the new progression.")
    miss_low: Number = Field(description="Patient-bootstrap 95% interval of `miss`, low end.")
    miss_high: Number = Field(description="… high end.")
    below_target: Number = Field(description="Share of test patients covered below the target.")
    volume_cm3: Number = Field(description="Mean CTV volume (cm³).")
    reason: str | None = Field(None, description="Why a target gives no CTV (too few calibration patients).")


class CoverageVolumeRow(_Row):
    """`coverage_volume.csv`: one point of a test patient's coverage-volume curve."""

    patient_id: str = Field(description="The patient (a pseudonym in MLflow).")
    curve: str = Field(
        pattern="^(model|margin)$", description="model: the threshold swept; margin: its width."
    )
    setting: float = Field(description="The threshold (model) or the margin in mm (margin).")
    volume_cm3: float = Field(ge=0, description="The CTV's volume (cm³).")
    coverage: float = Field(ge=0, le=1, description="Share of the patient's new progression it covers.")


class ReliabilityRow(_Row):
    """`reliability.csv`: one bin of the reliability diagram over the test patients' ring voxels."""

    low: float = Field(ge=0, le=1, description="Bin's lower probability edge.")
    high: float = Field(ge=0, le=1, description="Bin's upper edge.")
    n: int = Field(ge=0, description="Voxels in the bin.")
    confidence: Number = Field(description="Their mean predicted probability.")
    frequency: Number = Field(description="Their share of target voxels.")


class ControlRow(_Row):
    """`control.csv` (cohorts with ground truth): the model's, or the true density's, gain over the uniform
    margin of the same volume, and the ceiling (`ctvlab.stages.control`)."""

    volume: str = Field(
        description="The volume compared at: model CTV (as drawn), model CTV, RTOG, EORTC, margin N mm."
    )
    map: str = Field(
        pattern="^(model|density)$", description="Ranked by the model's probability or the true density."
    )
    coverage: Number = Field(description="Mean share of the new progression covered.")
    margin: Number = Field(description="The same-volume margin's mean coverage.")
    n: int = Field(ge=0, description="Test patients with new progression.")
    gain: Number = Field(description="Mean coverage − margin.")
    low: Number = Field(description="Patient-bootstrap 95% interval of `gain`, low end.")
    high: Number = Field(description="… high end.")
    p: Number = Field(description="Paired Wilcoxon p of coverage against margin.")
    better: int = Field(ge=0, description="Patients where it covers more than the margin.")
    worse: int = Field(ge=0, description="… less.")
    ceiling: Number = Field(description="The true density's gain at the same volume.")
    share_of_ceiling: Number = Field(description="gain ÷ ceiling.")


TABLES: dict[str, type[_Row]] = {
    "coverage.csv": CoverageRow,
    "coverage_volume.csv": CoverageVolumeRow,
    "reliability.csv": ReliabilityRow,
    "control.csv": ControlRow,
}


def row_schema(model: type[_Row]) -> dict:
    return model.model_json_schema()
