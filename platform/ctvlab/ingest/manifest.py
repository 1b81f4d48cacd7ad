"""The cohort manifest: one row per patient, clinical fields plus a relative path per image and mask.

A cohort is a folder holding `manifest.csv` and one folder of NIfTI files per patient. Paths in the
manifest are relative to the cohort folder. The JSON Schema of a row is `schemas/manifest.schema.json`.
"""

from __future__ import annotations

import csv
import io
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST_NAME = "manifest.csv"


class Cohort(StrEnum):
    SOC = "SOC"  # standard of care
    ATT = "ATT"  # + bevacizumab (anti-angiogenic)
    ENZA = "ENZA"  # + enzastaurin


class Sex(StrEnum):
    M = "M"
    F = "F"


class Resection(StrEnum):
    GTR = "GTR"
    STR = "STR"
    biopsy = "biopsy"


class ProgressionType(StrEnum):
    CEL = "CEL"
    T2L = "T2L"
    both = "both"


CLINICAL_COLUMNS: tuple[str, ...] = (
    "patient_id", "cohort", "sex", "age", "resection", "progression_type", "pfs_months", "os_months",
)  # fmt: skip
ANATOMY_COLUMNS: tuple[str, ...] = ("t1c", "t1", "flair")
DIFFUSION_COLUMNS: tuple[str, ...] = ("adc", "fa")
MRSI_COLUMNS: tuple[str, ...] = ("cho", "cre", "naa", "lac", "lip", "cni", "ccri", "crni")
IMAGE_COLUMNS: tuple[str, ...] = ANATOMY_COLUMNS + DIFFUSION_COLUMNS + MRSI_COLUMNS
MASK_COLUMNS: tuple[str, ...] = (
    "brain_mask", "cel_mask", "t2l_mask", "cavity_mask", "ventricles_mask", "critical_mask",
    "cel_progression_mask", "t2l_progression_mask",
)  # fmt: skip
PATH_COLUMNS: tuple[str, ...] = IMAGE_COLUMNS + MASK_COLUMNS
COLUMNS: tuple[str, ...] = CLINICAL_COLUMNS + PATH_COLUMNS
# Where a patient came from, when the cohort was imported (`ctvlab import-dicom`): optional in every manifest.
# `dicom_patient_id` is the PatientID as the DICOM header spells it; `patient_id` is then a safe file name.
PROVENANCE_COLUMNS: tuple[str, ...] = ("dicom_patient_id",)
# What only follow-up can tell: prediction (`ctvlab predict`) runs before it, so these may be empty there.
OUTCOME_COLUMNS: tuple[str, ...] = ("progression_type", "pfs_months", "os_months")
PROGRESSION_MASK_COLUMNS: tuple[str, ...] = ("cel_progression_mask", "t2l_progression_mask")
# What a cohort may lack and still be a cohort (a public collection imported by `ctvlab import-layout` has
# no MRSI, often no FA, no ventricles or critical structures, and some have no clinical fields). An empty
# cell means "not available"; the stage that needs a missing item refuses, naming it and the patients.
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "cohort", "sex", "age", "resection", *OUTCOME_COLUMNS, *DIFFUSION_COLUMNS, *MRSI_COLUMNS,
    "cavity_mask", "ventricles_mask", "critical_mask", *PROGRESSION_MASK_COLUMNS,
)  # fmt: skip
PURPOSES: tuple[str, ...] = ("study", "predict")

# patient ids name folders, hive partitions and files: keep them to a portable character set.
PATIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Two ids must never name the same files: `<id>_masks.npy` sits beside `<id>.npy`, and ids that differ only in
# case write the same files on a case-insensitive file system (macOS, Windows, some NFS exports).
RESERVED_ID_SUFFIX = "_masks"

RelPath = Annotated[str, Field(min_length=1, description="Path relative to the cohort folder.")]


class ManifestRow(BaseModel):
    """One patient of a cohort. The columns of `OPTIONAL_COLUMNS` may be empty (not available for this
    patient): MRSI, diffusion, the masks a public collection does not draw, the clinical fields."""

    model_config = ConfigDict(extra="forbid", title="ctvlab cohort manifest row")

    patient_id: str = Field(pattern=PATIENT_ID_PATTERN)
    cohort: Cohort | None = None
    sex: Sex | None = None
    age: float | None = Field(None, ge=0, le=120, allow_inf_nan=False, description="Years at diagnosis.")
    resection: Resection | None = None
    progression_type: ProgressionType | None = None
    pfs_months: float | None = Field(
        None, ge=0, le=600, allow_inf_nan=False, description="Progression-free survival (months)."
    )
    os_months: float | None = Field(
        None, ge=0, le=600, allow_inf_nan=False, description="Overall survival (months)."
    )

    t1c: RelPath
    t1: RelPath
    flair: RelPath
    adc: RelPath | None = None
    fa: RelPath | None = None
    cho: RelPath | None = None
    cre: RelPath | None = None
    naa: RelPath | None = None
    lac: RelPath | None = None
    lip: RelPath | None = None
    cni: RelPath | None = None
    ccri: RelPath | None = None
    crni: RelPath | None = None

    brain_mask: RelPath
    cel_mask: RelPath
    t2l_mask: RelPath
    cavity_mask: RelPath | None = None
    ventricles_mask: RelPath | None = None
    critical_mask: RelPath | None = None
    cel_progression_mask: RelPath | None = None
    t2l_progression_mask: RelPath | None = None

    dicom_patient_id: str | None = Field(
        None,
        max_length=64,  # LO, PS3.5 6.2
        description="The PatientID of the DICOM series this patient was imported from (`ctvlab import-dicom`), "
        "as the header spells it; `patient_id` is then its safe file name. Empty for other cohorts.",
    )

    @field_validator(*OPTIONAL_COLUMNS, "dicom_patient_id", mode="before")
    @classmethod
    def _empty_is_missing(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("age", "pfs_months", "os_months", mode="before")
    @classmethod
    def _decimal_point(cls, v: Any) -> Any:
        if isinstance(v, str) and re.fullmatch(r"[+-]?\d+,\d+", v.strip()):
            raise ValueError(f"decimal comma in {v!r}: write {v.strip().replace(',', '.')!r}")
        return v

    @field_validator("patient_id")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.endswith(RESERVED_ID_SUFFIX):
            raise ValueError(
                f"ids may not end in {RESERVED_ID_SUFFIX!r}: prepared data stores <id>{RESERVED_ID_SUFFIX}.npy "
                "beside <id>.npy"
            )
        return v

    def missing(self, columns: tuple[str, ...] = OPTIONAL_COLUMNS) -> list[str]:
        """The columns among `columns` that this patient leaves empty."""
        return [c for c in columns if getattr(self, c) is None]

    @property
    def has_mrsi(self) -> bool:
        return all(getattr(self, c) for c in MRSI_COLUMNS)

    def paths(self, root: Path) -> dict[str, Path]:
        """Absolute path of every file column that is set."""
        return {c: root / getattr(self, c) for c in PATH_COLUMNS if getattr(self, c)}

    def clinical(self) -> dict[str, Any]:
        return {c: (v.value if isinstance(v := getattr(self, c), StrEnum) else v) for c in CLINICAL_COLUMNS}


class PredictionRow(ManifestRow):
    """A patient to predict (`ctvlab predict`): outcome fields and progression masks are empty, because
    prediction happens before follow-up (every `ManifestRow` may leave them empty)."""

    model_config = ConfigDict(extra="forbid", title="ctvlab prediction manifest row")


class ManifestProblem(BaseModel):
    """A problem found while reading the manifest (before any image is opened)."""

    line: int | None  # 1-based line in manifest.csv; None for file-level problems
    patient_id: str | None
    column: str | None
    message: str


def read_manifest(
    root: str | Path, purpose: str = "study"
) -> tuple[list[ManifestRow], list[ManifestProblem], list[str]]:
    """Parse `root/manifest.csv` against the row schema.

    The columns of `OPTIONAL_COLUMNS` may be empty or absent from the header, for either `purpose` ("study"
    parses `ManifestRow`s, "predict" `PredictionRow`s); the stages that need one of them refuse a patient
    without it, by name.

    Returns:
        (rows that parsed, problems, the ids of every row in file order, parsed or not). A row with a
        problem is left out of `rows` and named in `problems`; other rows are unaffected, so one bad
        patient never hides the rest of the cohort. Duplicate ids are reported for every occurrence
        after the first, and those rows are left out.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    row_model = PredictionRow if purpose == "predict" else ManifestRow
    optional = set(OPTIONAL_COLUMNS)
    root = Path(root)
    path = root / MANIFEST_NAME
    problems: list[ManifestProblem] = []
    if not path.is_file():
        problems.append(
            ManifestProblem(
                line=None,
                patient_id=None,
                column=None,
                message=f"{path} not found: a cohort folder needs a manifest.csv",
            )
        )
        return [], problems, []
    raw = path.read_bytes()
    try:
        # utf-8-sig: a byte-order mark (as Excel writes) is accepted and dropped; CRLF line ends are CSV's own.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problems.append(
            ManifestProblem(
                line=None,
                patient_id=None,
                column=None,
                message=f"is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} (Latin-1 or another "
                "legacy encoding?); save manifest.csv as UTF-8",
            )
        )
        return [], problems, []
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            problems.append(
                ManifestProblem(
                    line=1, patient_id=None, column=None, message=f"repeated columns: {', '.join(repeated)}"
                )
            )
            return [], problems, []
        missing = [c for c in COLUMNS if c not in header and c not in optional]
        unknown = [c for c in header if c not in COLUMNS + PROVENANCE_COLUMNS]
        if missing:
            problems.append(
                ManifestProblem(
                    line=1, patient_id=None, column=None, message=f"missing columns: {', '.join(missing)}"
                )
            )
            return [], problems, []
        if unknown:
            problems.append(
                ManifestProblem(
                    line=1,
                    patient_id=None,
                    column=None,
                    message=f"unknown columns: {', '.join(unknown)} (see schemas/manifest.schema.json)",
                )
            )
            return [], problems, []
        rows: list[ManifestRow] = []
        ids: list[str] = []
        seen: dict[str, int] = {}
        folded: dict[str, tuple[str, int]] = {}
        start = 2
        for record in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines: report the first
            pid = (record.get("patient_id") or "").strip()
            ids.append(pid)
            shape = _row_shape_problem(record, len(header))
            if shape:
                problems.append(
                    ManifestProblem(line=line, patient_id=pid or None, column=None, message=shape)
                )
                continue
            record = {k: (v.strip() if isinstance(v, str) else v) for k, v in record.items() if k}
            if pid and pid in seen:
                problems.append(
                    ManifestProblem(
                        line=line,
                        patient_id=pid,
                        column="patient_id",
                        message=f"duplicate patient_id (first on line {seen[pid]})",
                    )
                )
                continue
            if pid and pid.casefold() in folded:
                other, other_line = folded[pid.casefold()]
                problems.append(
                    ManifestProblem(
                        line=line,
                        patient_id=pid,
                        column="patient_id",
                        message=f"differs from {other!r} (line {other_line}) only in letter case: both would "
                        "write the same files on a case-insensitive file system",
                    )
                )
                continue
            if pid:
                seen[pid] = line
                folded[pid.casefold()] = (pid, line)
            try:
                rows.append(row_model.model_validate(record))
            except ValidationError as e:
                for err in e.errors():
                    col = ".".join(str(p) for p in err["loc"]) or None
                    problems.append(
                        ManifestProblem(
                            line=line,
                            patient_id=pid or None,
                            column=col,
                            message=f"{err['msg']} (got {err.get('input')!r})",
                        )
                    )
    # A duplicate id invalidates the first occurrence too: which row is the real patient is unknown.
    dup_ids = {p.patient_id for p in problems if p.column == "patient_id" and "duplicate" in p.message}
    if dup_ids:
        for r in rows:
            if r.patient_id in dup_ids:
                problems.append(
                    ManifestProblem(
                        line=seen[r.patient_id],
                        patient_id=r.patient_id,
                        column="patient_id",
                        message="patient_id appears more than once in the manifest",
                    )
                )
        rows = [r for r in rows if r.patient_id not in dup_ids]
    return rows, problems, ids


def _row_shape_problem(record: dict, n_columns: int) -> str | None:
    """A row whose fields do not line up with the header: extra or missing values, or a line break inside a
    quoted field (a pasted note, or an unclosed quote that swallowed the next rows)."""
    extra = record.get(None)
    if extra:
        return f"has {n_columns + len(extra)} values, the header has {n_columns} columns (a stray comma?)"
    n_missing = sum(1 for k, v in record.items() if k is not None and v is None)
    if n_missing:
        return f"has {n_columns - n_missing} values, the header has {n_columns} columns"
    broken = [k for k, v in record.items() if isinstance(v, str) and ("\n" in v or "\r" in v)]
    if broken:
        return f"{broken[0]} holds a line break (an unclosed quote?); each patient must be one line"
    return None


def write_manifest(root: str | Path, rows: list[ManifestRow]) -> Path:
    """Write `root/manifest.csv` atomically, columns in the documented order."""
    from ctvlab.atomic import atomic_path

    path = Path(root) / MANIFEST_NAME
    extra = tuple(c for c in PROVENANCE_COLUMNS if any(getattr(r, c, None) for r in rows))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS + extra))
        writer.writeheader()
        for row in rows:
            d = row.model_dump(mode="json")
            writer.writerow({c: ("" if d[c] is None else d[c]) for c in COLUMNS + extra})
    return path
