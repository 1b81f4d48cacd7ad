"""Whose images: the patient, study and frame of reference of a DICOM series, compared before any RT object
is written onto it.

A structure set belongs to one patient, one study and one frame of reference (PS3.3 C.8.8.5). ctvlab writes
CTVs onto a planning series only when that series is the patient's: its PatientID (and Patient's Name, when
both sides have one), StudyInstanceUID and FrameOfReferenceUID must be those recorded when the patient was
imported (`ctvlab import-dicom` writes them to the cohort's provenance.json). For a cohort that was not
imported from DICOM only the PatientID can be compared, with the manifest's id. A mismatch is a refusal that
names both sides, never a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from ctvlab.errors import DataError


@dataclass(frozen=True)
class Identity:
    """Whose images a series holds. An empty field is unknown and is not compared."""

    patient_id: str
    patient_name: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    source: str = ""  # where the identity comes from, for messages ("provenance.json", "manifest", a path)


LABELS = {"patient_id": "PatientID", "patient_name": "PatientName", "study_instance_uid": "StudyInstanceUID",
          "frame_of_reference_uid": "FrameOfReferenceUID"}  # fmt: skip


def _name(value) -> str:
    """A person name compared as a planning system shows it: components by '^', case and padding ignored."""
    return "^".join(part.strip().casefold() for part in str(value or "").split("^")).rstrip("^")


def of_series(slices: Sequence, where: str) -> Identity:
    """The identity every slice of a series shares.

    Raises:
        DataError: the slices disagree (files of two patients, studies or frames mixed in one series).
    """
    seen: dict[str, set[str]] = {f: set() for f in LABELS}
    for ds in slices:
        for f, attr in LABELS.items():
            value = str(ds.get(attr, "") or "").strip()
            seen[f].add(_name(value) if f == "patient_name" else value)
    mixed = [f"{LABELS[f]} {' / '.join(sorted(v))}" for f, v in seen.items() if len(v) > 1]
    if mixed:
        raise DataError(
            f"{where}: its slices belong to different {', '.join(mixed)}: give the folder of one series"
        )
    first = slices[0]
    return Identity(
        str(first.get("PatientID", "") or "").strip(), str(first.get("PatientName", "") or "").strip(),
        str(first.get("StudyInstanceUID", "") or "").strip(), str(first.get("FrameOfReferenceUID", "") or "").strip(),
        where,
    )  # fmt: skip


def expected(patient_id: str, dicom_patient_id: str | None, provenance: dict | None, source: str) -> Identity:
    """The identity a patient's planning series must have: the imported one (provenance.json), else the
    PatientID the manifest gives (`dicom_patient_id`, else `patient_id`)."""
    if provenance:
        return Identity(str(provenance.get("patient_id") or dicom_patient_id or patient_id),
                        str(provenance.get("patient_name") or ""), str(provenance.get("study_instance_uid") or ""),
                        str(provenance.get("frame_of_reference_uid") or ""), source)  # fmt: skip
    return Identity(dicom_patient_id or patient_id, source=source)


def check(want: Identity, got: Identity, patient: str) -> None:
    """Refuse a series whose identity differs from the patient's in any field both sides know.

    Raises:
        DataError: naming the patient, every differing field with both values, and both sources.
    """
    diffs = []
    for f in fields(Identity):
        if f.name == "source":
            continue
        a, b = getattr(want, f.name), getattr(got, f.name)
        same = _name(a) == _name(b) if f.name == "patient_name" else a == b
        if f.name == "patient_id" and not b:
            diffs.append(f"PatientID {a!r} (the patient's) vs none (the series')")
        elif a and b and not same:
            diffs.append(f"{LABELS[f.name]} {a!r} (the patient's) vs {b!r} (the series')")
    if diffs:
        raise DataError(
            f"patient {patient}: the planning series {got.source} is not this patient's: {'; '.join(diffs)} "
            f"(the patient's identity from {want.source}). Nothing was written onto it: give the series of "
            "this patient, study and frame of reference"
        )
