"""A folder of DICOM files as ctvlab sees it: patients (by PatientID), their series (headers read once),
the regular grid and frame of reference of a series, and the cohort id (a safe file name) of a PatientID."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctvlab.errors import DataError
from ctvlab.ingest.manifest import PATIENT_ID_PATTERN, RESERVED_ID_SUFFIX

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class Series:
    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)  # each file's dataset without pixel data, read once
    sop_class: str = ""

    @property
    def folder(self) -> Path:
        """The folder that holds the series' files, as the user's path names it."""
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))


@dataclass
class PatientDicom:
    patient_id: str  # as the DICOM header spells it (`safe_patient_ids` maps it to a cohort id)
    sex: str = ""
    age: str = ""
    name: str = ""
    series: dict[str, Series] = field(default_factory=dict)


def index_dicom(folder: Path) -> dict[str, PatientDicom]:
    """Every DICOM file under `folder`, grouped by PatientID and SeriesInstanceUID (headers only). Files
    with an empty or absent PatientID are grouped under "" (`import_dicom` refuses them)."""
    import pydicom

    patients: dict[str, PatientDicom] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            pid = str(ds.get("PatientID", "") or "").strip()
        except Exception:
            continue  # not DICOM, or no series: not a series to import
        p = patients.setdefault(pid, PatientDicom(pid, str(getattr(ds, "PatientSex", "") or ""),
                                                  str(getattr(ds, "PatientAge", "") or ""),
                                                  str(ds.get("PatientName", "") or "")))  # fmt: skip
        s = p.series.setdefault(uid, Series(uid, str(getattr(ds, "SeriesDescription", "") or ""),
                                            str(getattr(ds, "Modality", "") or ""),
                                            sop_class=str(getattr(ds, "SOPClassUID", ""))))  # fmt: skip
        s.files.append(path)
        s.headers.append(ds)
    return patients


def safe_patient_ids(dicom_ids: list[str]) -> dict[str, str]:
    """A cohort id (a portable folder and file name, `PATIENT_ID_PATTERN`) for each PatientID.

    A PatientID is whatever the hospital's system wrote (`RT/2024/017`, `../x`, accents, 64 characters
    of LO): it names a folder only when it already is a safe name; otherwise its safe characters are kept
    and a digest of the whole id is added, so that two PatientIDs never share a folder, even when they
    differ only in letter case or in the characters replaced. The original stays in the manifest
    (`dicom_patient_id`) and in provenance.json."""
    import hashlib
    import unicodedata

    out: dict[str, str] = {}
    taken: set[str] = set()
    as_is = [p for p in dicom_ids if _safe_as_is(p)]
    for pid in sorted(as_is, key=lambda p: (p.casefold(), p)):  # the first of two case-twins keeps its id
        if pid.casefold() not in taken:
            out[pid] = pid
            taken.add(pid.casefold())
    for pid in sorted(p for p in dicom_ids if p not in out):
        ascii_ = unicodedata.normalize("NFKD", pid).encode("ascii", "ignore").decode()
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_)
        stem = re.sub(r"^[^A-Za-z0-9]+", "", stem)[:40].rstrip("._-") or "patient"
        digest = hashlib.sha256(pid.encode("utf-8", "surrogatepass")).hexdigest()
        n = 8
        while (candidate := f"{stem}-{digest[:n]}").casefold() in taken:
            n += 2
        out[pid] = candidate
        taken.add(candidate.casefold())
    return out


def _safe_as_is(pid: str) -> bool:
    return bool(re.fullmatch(PATIENT_ID_PATTERN, pid)) and not pid.endswith(RESERVED_ID_SUFFIX)


def series_grid(series: Series) -> tuple[np.ndarray, list]:
    """The series' RAS affine and sorted slices, checked to form one regular grid of one frame of reference.

    Raises:
        DataError: the slices do not form one grid (`ctvlab.dicom.geometry.series_affine` names the files),
            or belong to several frames of reference.
    """
    from ctvlab.dicom.geometry import GeometryError, series_affine

    where = f"series {series.description!r} in {series.folder}"
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in series.headers}
    if len(frames) > 1:
        raise DataError(f"{where}: its slices are on {len(frames)} frames of reference "
                        f"({', '.join(sorted(f or '(none)' for f in frames))}): not one series")  # fmt: skip
    try:
        return series_affine(series.headers)
    except GeometryError as e:
        raise DataError(f"{where}: {e}") from None


def frame_of(series: Series) -> str:
    return str(series.headers[0].get("FrameOfReferenceUID", "") or "")
