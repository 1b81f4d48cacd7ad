"""`ctvlab import-dicom`: DICOM series of one or many patients to a cohort folder in the documented layout.

The DICOM folder is indexed by patient (PatientID) and series (`ctvlab.dicom.index`); a series map (YAML,
`SeriesMap`) says which series fills which manifest column by patterns on the SeriesDescription. Before
anything is converted, each chosen series must form one regular grid (`series_grid`, which names the files
of a missing, duplicated or misplaced slice) on the T1c's frame of reference. Each is then converted by
dcm2niix (`ctvlab.dicom.convert`) into `<out>/<patient_id>/<column>.nii.gz`, where `patient_id` is the
PatientID when it is a safe file name and a safe name made from it otherwise (the PatientID itself stays in
the manifest's `dicom_patient_id`). Masks come from the one RTSTRUCT that references the T1c series, on its
frame of reference and study (by ROI name, rasterised on the T1c's series and placed on the converted T1c's
grid), or from NIfTI files already on the T1c grid; clinical columns from a CSV, else sex and age from the
DICOM header. `provenance.json` records where each patient's images came from (patient, study, frame of
reference, series, RTSTRUCT) for `ctvlab predict --rtstruct` to compare a planning series with. The cohort
is written under a temporary name and renamed when complete: an existing folder is never written into, and
nothing is written outside it.
"""

from __future__ import annotations

import csv
import datetime
import fnmatch
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ctvlab.atomic import atomic_folder, write_json_atomic
from ctvlab.dicom.convert import convert_series
from ctvlab.dicom.index import (
    RTSTRUCT_SOP_CLASS,
    PatientDicom,
    Series,
    frame_of,
    index_dicom,
    safe_patient_ids,
    series_grid,
)
from ctvlab.errors import ConfigError, DataError
from ctvlab.ingest.manifest import (
    CLINICAL_COLUMNS,
    COLUMNS,
    IMAGE_COLUMNS,
    MANIFEST_NAME,
    MASK_COLUMNS,
    PATH_COLUMNS,
    PROVENANCE_COLUMNS,
)


class SeriesMap(BaseModel):
    """Which DICOM series and ROIs fill which manifest columns (the YAML given to `--series`)."""

    model_config = ConfigDict(extra="forbid")

    series: dict[str, list[str]] = Field(
        description="Image column -> SeriesDescription patterns (shell-style, case-insensitive); "
        "exactly one series of each patient must match. `t1c` is required."
    )
    rois: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Mask column -> RTSTRUCT ROI names (case-insensitive) on the T1c series.",
    )
    nifti_dir: str | None = Field(
        None,
        description="Folder of NIfTI files for the columns no series or ROI fills (MRSI maps, masks on "
        "the T1c grid), named <column>.nii.gz, `{patient_id}` replaced; relative to the series map's folder.",
    )
    clinical: str | None = Field(
        None, description="CSV with patient_id and clinical columns; relative to the series map's folder."
    )

    @field_validator("series")
    @classmethod
    def _images(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        _only(v, IMAGE_COLUMNS, "image")
        if "t1c" not in v:
            raise ValueError("t1c is required: it is the grid of every mask")
        return v

    @field_validator("rois")
    @classmethod
    def _masks(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        _only(v, MASK_COLUMNS, "mask")
        return v


def _only(mapping: dict, known: tuple[str, ...], kind: str) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ValueError(f"not {kind} columns: {', '.join(unknown)} (known: {', '.join(known)})")


def load_series_map(path: Path) -> SeriesMap:
    """The series map in the YAML file `path`, read as safely as a config (`ctvlab.config.read_yaml`).

    Raises:
        ConfigError: the file cannot be read or is not a valid series map; the message names it.
    """
    from ctvlab.config import read_yaml

    raw = read_yaml(path, "series map")
    try:
        return SeriesMap.model_validate(raw)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {where}") from None


def _choose(patient: PatientDicom, column: str, patterns: list[str]) -> Series:
    images = [s for s in patient.series.values() if s.sop_class != RTSTRUCT_SOP_CLASS]
    hits = [s for s in images if any(fnmatch.fnmatch(s.description.lower(), p.lower()) for p in patterns)]
    if len(hits) != 1:
        seen = ", ".join(sorted(repr(s.description) for s in images)) or "none"
        what = "no series matches" if not hits else f"{len(hits)} series match"
        raise DataError(f"patient {patient.patient_id}: {column}: {what} {patterns} (series: {seen})")
    return hits[0]


def _studies_of(frame_item) -> dict[str, set[str]]:
    """Referenced study UID -> the series UIDs it lists, in one ReferencedFrameOfReferenceSequence item."""
    return {str(st.get("ReferencedSOPInstanceUID", "") or ""):
            {str(rs.SeriesInstanceUID) for rs in getattr(st, "RTReferencedSeriesSequence", [])}
            for st in getattr(frame_item, "RTReferencedStudySequence", [])}  # fmt: skip


def _referenced_series(ds) -> set[str]:
    return {uid for f in getattr(ds, "ReferencedFrameOfReferenceSequence", [])
            for uids in _studies_of(f).values() for uid in uids}  # fmt: skip


def _check_rtstruct_identity(pid: str, path: Path, ds, t1c: Series, rois: list[str]) -> None:
    """The RTSTRUCT's frame of reference (the one it lists the T1c series under, and each wanted ROI's) and
    the study it lists the T1c under must be the T1c series' own: a structure set drawn on another frame
    would be filled onto the T1c as if it were its own."""
    t1c_frame, t1c_study = frame_of(t1c), str(t1c.headers[0].get("StudyInstanceUID", "") or "")
    frames, studies = set(), set()
    for f in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        for study, series in _studies_of(f).items():
            if t1c.uid in series:
                frames.add(str(f.get("FrameOfReferenceUID", "") or ""))
                studies.add(study)
    wanted = {r.casefold() for r in rois}
    frames |= {str(r.get("ReferencedFrameOfReferenceUID", "") or "") for r in ds.StructureSetROISequence
               if str(r.ROIName).casefold() in wanted}  # fmt: skip
    other = sorted(f for f in frames if f != t1c_frame)
    if other:
        raise DataError(f"patient {pid}: {path}: the structure set is drawn on frame of reference "
                        f"{', '.join(o or '(none)' for o in other)}, but the T1c series {t1c.description!r} "
                        f"({t1c.folder}) is on {t1c_frame or '(none)'}: its contours are not in the T1c's "
                        "coordinates; register them onto the T1c (or export the RTSTRUCT on the T1c) first")  # fmt: skip
    if studies - {t1c_study}:
        raise DataError(f"patient {pid}: {path}: the structure set lists the T1c series under study "
                        f"{', '.join(sorted(studies - {t1c_study}))}, but the T1c series {t1c.description!r} "
                        f"({t1c.folder}) belongs to study {t1c_study}")  # fmt: skip


def rtstruct_masks(patient: PatientDicom, t1c: Series, wanted_rois: dict[str, list[str]], t1c_nifti: Path,
                   out_dir: Path, grid: tuple[np.ndarray, list] | None = None,
                   pid: str | None = None) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """Rasterise the ROIs of the RTSTRUCT that references the T1c series onto the converted T1c's grid.

    Returns:
        (mask column -> file name written in `out_dir`, the RTSTRUCT's provenance: file and SOP instance).

    Raises:
        DataError: not exactly one RTSTRUCT references the T1c, it is on another frame of reference or
            study, an ROI is missing, or a contour does not lie on a slice of the series.
    """
    import nibabel as nib

    from ctvlab.dicom.rtstruct import rasterise, read_rois
    from ctvlab.preprocess.grid import resample_mask

    pid = pid or patient.patient_id
    structs = [s for s in patient.series.values() if s.sop_class == RTSTRUCT_SOP_CLASS]
    chosen = [s for s in structs if t1c.uid in _referenced_series(s.headers[0])]
    if len(chosen) != 1:
        named = f" ({', '.join(str(s.files[0]) for s in chosen)})" if chosen else ""
        raise DataError(f"patient {pid}: {len(chosen)} RTSTRUCTs reference the T1c series "
                        f"{t1c.description!r} ({t1c.folder}){named}; the series map names ROIs, so exactly one "
                        "is needed")  # fmt: skip
    path = chosen[0].files[0]
    ds = chosen[0].headers[0]  # an RTSTRUCT has no pixel data: the header is the whole file
    _check_rtstruct_identity(pid, path, ds, t1c, [n for names in wanted_rois.values() for n in names])
    series_aff, slices = grid if grid is not None else series_grid(t1c)
    shape = (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    try:
        rois = {name.lower(): (name, c) for name, c in read_rois(ds).items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"patient {pid}: {path}: not a readable structure set ({e})") from None
    t1c_img = nib.load(str(t1c_nifti))
    written = {}
    for column, wanted in wanted_rois.items():
        hit = [rois[w.lower()] for w in wanted if w.lower() in rois]
        if not hit:
            raise DataError(f"patient {pid}: {column}: no ROI named {wanted} in {path} "
                            f"(ROIs: {', '.join(sorted(n for n, _ in rois.values()))})")  # fmt: skip
        try:
            mask = rasterise(hit[0][1], series_aff, shape)
        except ValueError as e:
            raise DataError(f"patient {pid}: ROI {hit[0][0]} in {path}: {e}") from None
        on_t1c = resample_mask(mask, series_aff, t1c_img.affine, tuple(t1c_img.shape[:3]))
        img = nib.Nifti1Image(on_t1c.astype(np.uint8), t1c_img.affine, t1c_img.header.copy())
        img.header.set_data_dtype(np.uint8)
        img.header.set_slope_inter(1.0, 0.0)
        nib.save(img, out_dir / f"{column}.nii.gz")
        written[column] = f"{column}.nii.gz"
    return written, {"file": str(path), "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                     "series_instance_uid": chosen[0].uid}  # fmt: skip


def _clinical(path: Path | None) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    bad = sorted(set(rows[0]) - set(CLINICAL_COLUMNS)) if rows else []
    if not rows or "patient_id" not in rows[0] or bad:
        raise ConfigError(f"{path}: needs a patient_id column and only clinical columns "
                          f"({', '.join(CLINICAL_COLUMNS)}){'; unknown: ' + ', '.join(bad) if bad else ''}")  # fmt: skip
    return {r["patient_id"]: r for r in rows}


def _dicom_age(value: str) -> str:
    """DICOM AS ('067Y', '030M') to years."""
    if len(value) == 4 and value[:3].isdigit():
        n = int(value[:3])
        return str({"Y": n, "M": round(n / 12, 1), "W": round(n / 52, 1), "D": round(n / 365, 1)}[value[3]])
    return ""


@dataclass
class ImportOutcome:
    out: Path
    patients: list[str]  # cohort ids, in the order imported
    columns: dict[str, list[str]]
    ids: dict[str, str] = field(default_factory=dict)  # PatientID -> cohort id, where they differ


PROVENANCE_FILE = "provenance.json"


def _import_patient(p: PatientDicom, pid: str, smap: SeriesMap, base: Path, clinical: dict[str, str],
                    pdir: Path) -> tuple[dict[str, str], dict]:  # fmt: skip
    """Convert one patient's mapped series (and masks) into `pdir`; its manifest row and provenance."""
    row = {c: "" for c in COLUMNS + PROVENANCE_COLUMNS}
    row.update({"patient_id": pid, "dicom_patient_id": p.patient_id,
                "sex": p.sex if p.sex in ("M", "F") else "", "age": _dicom_age(p.age)})  # fmt: skip
    row.update({k: v for k, v in clinical.items() if v not in ("", None) and k != "patient_id"})
    chosen = {col: _choose(p, col, pats) for col, pats in smap.series.items()}
    grids = {}
    for col, s in chosen.items():
        try:
            grids[col] = series_grid(s)
        except DataError as e:
            raise DataError(f"patient {pid}: {col}: {e}") from None
    t1c = chosen["t1c"]
    for col, s in chosen.items():  # one world for all of them: ctvlab resamples by world coordinates
        if frame_of(s) != frame_of(t1c):
            raise DataError(f"patient {pid}: {col}: series {s.description!r} in {s.folder} is on frame of "
                            f"reference {frame_of(s) or '(none)'}, the T1c series {t1c.description!r} in "
                            f"{t1c.folder} on {frame_of(t1c) or '(none)'}: their coordinates are not "
                            "comparable; register the series onto the T1c first")  # fmt: skip
    for col, s in chosen.items():
        try:
            convert_series(s, pdir / f"{col}.nii.gz", grids[col])
        except DataError as e:
            raise DataError(f"patient {pid}: {col}: {e}") from None
        row[col] = f"{pid}/{col}.nii.gz"
    first = t1c.headers[0]
    provenance = {
        "patient_id": p.patient_id, "patient_name": p.name,
        "study_instance_uid": str(first.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": frame_of(t1c),
        "series": {col: {"series_instance_uid": s.uid, "description": s.description, "modality": s.modality,
                         "folder": str(s.folder), "files": len(s.files)} for col, s in chosen.items()},
    }  # fmt: skip
    if smap.rois:
        written, provenance["rtstruct"] = rtstruct_masks(p, t1c, smap.rois, pdir / "t1c.nii.gz", pdir,
                                                         grids["t1c"], pid)  # fmt: skip
        for col, name in written.items():
            row[col] = f"{pid}/{name}"
    if smap.nifti_dir:
        mdir = base / smap.nifti_dir.replace("{patient_id}", pid)
        for col in PATH_COLUMNS:
            src = next((f for f in (mdir / f"{col}.nii.gz", mdir / f"{col}.nii") if f.is_file()), None)
            if src is not None and not row[col]:
                shutil.copyfile(src, pdir / src.name)
                row[col] = f"{pid}/{src.name}"
                provenance.setdefault("nifti", {})[col] = str(src)
    return row, provenance


def import_dicom(dicom_dir: Path, out: Path, series_map_path: Path, patients: list[str] | None = None,
                 progress=None, clinical: Path | None = None) -> ImportOutcome:  # fmt: skip
    """Convert the mapped series (and masks) of every patient under `dicom_dir` into the new cohort `out`.

    Each patient's folder is named by its cohort id: the PatientID when it is a safe file name, else a safe
    name made from it (`safe_patient_ids`); the PatientID itself stays in the manifest's `dicom_patient_id`.
    `provenance.json` records, per patient, the PatientID and name, the study and frame of reference, each
    series and the RTSTRUCT used: `ctvlab predict --rtstruct` compares a planning series with it.

    Raises:
        DataError: a series map that does not pick exactly one series, series on different frames of
            reference, slices that do not form one grid, a failed conversion, an RTSTRUCT on another frame,
            a missing ROI, or DICOM files without a PatientID.
        ConfigError: the series map or clinical CSV is wrong, or `out` already exists.
    """
    smap = load_series_map(series_map_path)
    base = Path(series_map_path).resolve().parent
    dicom_dir, out = Path(dicom_dir), Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: import-dicom writes a new cohort folder and never into an old one")
    if not dicom_dir.is_dir():
        raise ConfigError(f"{dicom_dir} is {'a file' if dicom_dir.exists() else 'not found'}: give the folder "
                          "that holds the DICOM files")  # fmt: skip
    clinical_rows = _clinical(  # the small files first: a wrong option is reported before any DICOM is read
        clinical if clinical is not None else (base / smap.clinical if smap.clinical else None)
    )
    found = index_dicom(dicom_dir)
    if not found:
        raise DataError(f"{dicom_dir}: no DICOM files")
    ids = patients or sorted(found)
    missing = [p for p in ids if p not in found]
    if missing:
        raise DataError(f"{dicom_dir}: no DICOM files of patient {', '.join(missing)} "
                        f"(PatientIDs found: {', '.join(sorted(found))})")  # fmt: skip
    if "" in ids:
        folders = sorted({str(s.folder) for s in found[""].series.values()})
        raise DataError(f"{dicom_dir}: the DICOM files in {', '.join(folders)} have no PatientID: ctvlab cannot "
                        "tell whose images they are; fill in PatientID, or import the other patients with "
                        "--patient")  # fmt: skip
    cohort_id = safe_patient_ids(ids)
    rows, columns, provenance = [], defaultdict(list), {}
    with atomic_folder(out) as tmp:
        for dicom_id in ids:
            pid = cohort_id[dicom_id]
            pdir = tmp / pid
            pdir.mkdir()
            clinical_row = clinical_rows.get(dicom_id) or clinical_rows.get(pid, {})
            row, provenance[pid] = _import_patient(found[dicom_id], pid, smap, base, clinical_row, pdir)
            for col in COLUMNS:
                if row[col]:
                    columns[col].append(pid)
            rows.append(row)
            if progress is not None:
                progress(pid if pid == dicom_id else f"{pid} (PatientID {dicom_id!r})")
        with open(tmp / MANIFEST_NAME, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS + PROVENANCE_COLUMNS))
            w.writeheader()
            w.writerows(rows)
        write_json_atomic(tmp / PROVENANCE_FILE, {
            "source": str(dicom_dir.resolve()), "series_map": str(Path(series_map_path).resolve()),
            "imported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "patients": provenance,
        })  # fmt: skip
    return ImportOutcome(out, [cohort_id[i] for i in ids], dict(columns),
                         {i: cohort_id[i] for i in ids if cohort_id[i] != i})  # fmt: skip


def read_provenance(cohort: Path) -> dict[str, dict]:
    """Patient id -> its provenance as `import_dicom` recorded it; {} for a cohort not imported from DICOM.

    Raises:
        DataError: provenance.json exists but cannot be read.
    """
    import json

    path = Path(cohort) / PROVENANCE_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        patients = data["patients"]
        if not isinstance(patients, dict):
            raise TypeError("patients is not a mapping")
        return patients
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: cannot read the cohort's DICOM provenance ({e})") from None
