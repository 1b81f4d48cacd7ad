"""`ctvlab import-dicom`: DICOM series of one or many patients to a cohort folder in the documented layout.

The DICOM folder is indexed by patient (PatientID) and series; a series map (YAML, `SeriesMap`) says
which series fills which manifest column by patterns on the SeriesDescription. Each chosen series is
converted by dcm2niix (its Python package ships the binary) into `<out>/<patient_id>/<column>.nii.gz`.
Masks come from an RTSTRUCT's ROIs (by name, rasterised on the T1c's series and placed on the converted
T1c's grid) or from NIfTI files already on the T1c grid; clinical columns from a CSV, else sex
and age from the DICOM header. The cohort is written under a temporary name and renamed when complete: an
existing folder is never written into.
"""

from __future__ import annotations

import csv
import fnmatch
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ctvlab.atomic import atomic_folder
from ctvlab.errors import ConfigError, DataError
from ctvlab.ingest.manifest import (
    CLINICAL_COLUMNS,
    COLUMNS,
    IMAGE_COLUMNS,
    MANIFEST_NAME,
    MASK_COLUMNS,
    PATH_COLUMNS,
)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


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
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return SeriesMap.model_validate(raw)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML: {e}") from None
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {where}") from None


@dataclass
class Series:
    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)  # each file's dataset without pixel data, read once
    sop_class: str = ""


@dataclass
class PatientDicom:
    patient_id: str
    sex: str = ""
    age: str = ""
    series: dict[str, Series] = field(default_factory=dict)


def index_dicom(folder: Path) -> dict[str, PatientDicom]:
    """Every DICOM file under `folder`, grouped by PatientID and SeriesInstanceUID (headers only)."""
    import pydicom

    patients: dict[str, PatientDicom] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            pid, uid = str(ds.PatientID), str(ds.SeriesInstanceUID)
        except Exception:
            continue  # not DICOM, or no patient/series: not a series to import
        p = patients.setdefault(pid, PatientDicom(pid, str(getattr(ds, "PatientSex", "") or ""),
                                                  str(getattr(ds, "PatientAge", "") or "")))  # fmt: skip
        s = p.series.setdefault(uid, Series(uid, str(getattr(ds, "SeriesDescription", "") or ""),
                                            str(getattr(ds, "Modality", "") or ""),
                                            sop_class=str(getattr(ds, "SOPClassUID", ""))))  # fmt: skip
        s.files.append(path)
        s.headers.append(ds)
    return patients


def _choose(patient: PatientDicom, column: str, patterns: list[str]) -> Series:
    images = [s for s in patient.series.values() if s.sop_class != RTSTRUCT_SOP_CLASS]
    hits = [s for s in images if any(fnmatch.fnmatch(s.description.lower(), p.lower()) for p in patterns)]
    if len(hits) != 1:
        seen = ", ".join(sorted(repr(s.description) for s in images)) or "none"
        what = "no series matches" if not hits else f"{len(hits)} series match"
        raise DataError(f"patient {patient.patient_id}: {column}: {what} {patterns} (series: {seen})")
    return hits[0]


def dcm2niix_binary() -> str:
    """The dcm2niix executable: the one the `dcm2niix` Python package installs beside this Python, else on
    the PATH."""
    import sys

    here = Path(sys.executable).parent / "dcm2niix"
    found = str(here) if here.is_file() else shutil.which("dcm2niix")
    if not found:
        raise ConfigError("dcm2niix not found: pip install dcm2niix (ctvlab's dependencies include it)")
    return found


def convert_series(series: Series, out_file: Path) -> None:
    """One series to one NIfTI file with dcm2niix (scanner coordinates kept, no cropping or reorienting)."""
    with tempfile.TemporaryDirectory(prefix="ctvlab-dcm-") as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.mkdir()
        dst.mkdir()
        for n, f in enumerate(series.files):
            os.symlink(f.resolve(), src / f"{n:05d}.dcm")
        r = subprocess.run([dcm2niix_binary(), "-z", "y", "-b", "n", "-f", "image", "-o", str(dst), str(src)],
                           capture_output=True, text=True)  # fmt: skip
        made = sorted(dst.glob("image*.nii.gz"))
        if r.returncode != 0 or len(made) != 1:
            why = (r.stdout + r.stderr).strip().splitlines()[-3:]
            raise DataError(f"series {series.description!r}: dcm2niix made {len(made)} image(s) from "
                            f"{len(series.files)} files: {' / '.join(why)}")  # fmt: skip
        shutil.move(str(made[0]), out_file)


def rtstruct_masks(patient: PatientDicom, t1c: Series, wanted_rois: dict[str, list[str]], t1c_nifti: Path,
                   out_dir: Path) -> dict[str, str]:  # fmt: skip
    """Rasterise the ROIs of the RTSTRUCT that references the T1c series onto the converted T1c's grid."""
    import nibabel as nib

    from ctvlab.dicom.rtstruct import rasterise, read_rois
    from ctvlab.preprocess.grid import resample_mask

    structs = [s for s in patient.series.values() if s.sop_class == RTSTRUCT_SOP_CLASS]
    chosen = []
    for s in structs:
        ds = s.headers[0]  # an RTSTRUCT has no pixel data: the header is the whole file
        refs = {str(rs.SeriesInstanceUID) for f in ds.ReferencedFrameOfReferenceSequence
                for st in getattr(f, "RTReferencedStudySequence", [])
                for rs in getattr(st, "RTReferencedSeriesSequence", [])}  # fmt: skip
        if t1c.uid in refs:
            chosen.append(s)
    if len(chosen) != 1:
        raise DataError(f"patient {patient.patient_id}: {len(chosen)} RTSTRUCTs reference the T1c series "
                        f"{t1c.description!r}; the series map names ROIs, so exactly one is needed")  # fmt: skip
    from ctvlab.dicom.geometry import series_affine

    series_aff, slices = series_affine(t1c.headers)
    shape = (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    path = chosen[0].files[0]
    rois = {name.lower(): (name, c) for name, c in read_rois(chosen[0].headers[0]).items()}
    t1c_img = nib.load(str(t1c_nifti))
    written = {}
    for column, wanted in wanted_rois.items():
        hit = [rois[w.lower()] for w in wanted if w.lower() in rois]
        if not hit:
            raise DataError(f"patient {patient.patient_id}: {column}: no ROI named {wanted} in {path} "
                            f"(ROIs: {', '.join(sorted(n for n, _ in rois.values()))})")  # fmt: skip
        try:
            mask = rasterise(hit[0][1], series_aff, shape)
        except ValueError as e:
            raise DataError(f"patient {patient.patient_id}: ROI {hit[0][0]} in {path}: {e}") from None
        on_t1c = resample_mask(mask, series_aff, t1c_img.affine, tuple(t1c_img.shape[:3]))
        img = nib.Nifti1Image(on_t1c.astype(np.uint8), t1c_img.affine, t1c_img.header.copy())
        img.header.set_data_dtype(np.uint8)
        img.header.set_slope_inter(1.0, 0.0)
        nib.save(img, out_dir / f"{column}.nii.gz")
        written[column] = f"{column}.nii.gz"
    return written


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
    patients: list[str]
    columns: dict[str, list[str]]


def import_dicom(dicom_dir: Path, out: Path, series_map_path: Path, patients: list[str] | None = None,
                 progress=None, clinical: Path | None = None) -> ImportOutcome:  # fmt: skip
    """Convert the mapped series (and masks) of every patient under `dicom_dir` into the new cohort `out`.

    Raises:
        DataError: a series map that does not pick exactly one series, a failed conversion, a missing ROI.
        ConfigError: the series map or clinical CSV is wrong, or `out` already exists.
    """
    smap = load_series_map(series_map_path)
    base = Path(series_map_path).resolve().parent
    dicom_dir, out = Path(dicom_dir), Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: import-dicom writes a new cohort folder and never into an old one")
    found = index_dicom(dicom_dir)
    if not found:
        raise DataError(f"{dicom_dir}: no DICOM files")
    ids = patients or sorted(found)
    missing = [p for p in ids if p not in found]
    if missing:
        raise DataError(f"{dicom_dir}: no DICOM files of patient {', '.join(missing)} "
                        f"(PatientIDs found: {', '.join(sorted(found))})")  # fmt: skip
    clinical_rows = _clinical(
        clinical if clinical is not None else (base / smap.clinical if smap.clinical else None)
    )
    rows, columns = [], defaultdict(list)
    with atomic_folder(out) as tmp:
        for pid in ids:
            p = found[pid]
            pdir = tmp / pid
            pdir.mkdir()
            row = {c: "" for c in COLUMNS}
            row.update(
                {"patient_id": pid, "sex": p.sex if p.sex in ("M", "F") else "", "age": _dicom_age(p.age)}
            )
            row.update({k: v for k, v in clinical_rows.get(pid, {}).items() if v not in ("", None)})
            chosen = {col: _choose(p, col, pats) for col, pats in smap.series.items()}
            for col, s in chosen.items():
                convert_series(s, pdir / f"{col}.nii.gz")
                row[col] = f"{pid}/{col}.nii.gz"
            if smap.rois:
                for col, name in rtstruct_masks(
                    p, chosen["t1c"], smap.rois, pdir / "t1c.nii.gz", pdir
                ).items():
                    row[col] = f"{pid}/{name}"
            if smap.nifti_dir:
                mdir = base / smap.nifti_dir.replace("{patient_id}", pid)
                for col in PATH_COLUMNS:
                    src = next(
                        (f for f in (mdir / f"{col}.nii.gz", mdir / f"{col}.nii") if f.is_file()), None
                    )
                    if src is not None and not row[col]:
                        shutil.copyfile(src, pdir / src.name)
                        row[col] = f"{pid}/{src.name}"
            for col in COLUMNS:
                if row[col]:
                    columns[col].append(pid)
            rows.append(row)
            if progress is not None:
                progress(pid)
        with open(tmp / MANIFEST_NAME, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS))
            w.writeheader()
            w.writerows(rows)
    return ImportOutcome(out, ids, dict(columns))
