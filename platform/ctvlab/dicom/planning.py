"""A patient's planning series for `ctvlab predict --rtstruct`: where it is under `--dicom-ref`, and whether it
is that patient's (`ctvlab.dicom.identity`) before any CTV is computed or written onto it."""

from __future__ import annotations

from pathlib import Path

from ctvlab.errors import DataError


def planning_series(dicom_ref: Path, pid: str, n_patients: int) -> Path:
    """The folder of a patient's planning series: `<dicom_ref>/<pid>/` when it exists, else `dicom_ref`
    itself for a single patient."""
    per_patient = Path(dicom_ref) / pid
    if per_patient.is_dir():
        return per_patient
    if n_patients == 1:
        return Path(dicom_ref)
    raise DataError(f"patient {pid}: no planning series folder {per_patient} (with several patients, "
                    "--dicom-ref holds one <patient_id>/ folder per patient)")  # fmt: skip


def planning_identity(row, raw: Path, provenance: dict, series_dir: Path):
    """The identity (`ctvlab.dicom.identity.Identity`) the patient's planning series must have, checked
    against the series in `series_dir` that `write_rtstruct` would write onto: the one imported
    (provenance.json) when the cohort came from `ctvlab import-dicom`, else the manifest's PatientID.

    Raises:
        DataError: the series is another patient's, study's or frame of reference's (both sides named), or
            cannot be read.
    """
    import nibabel as nib

    from ctvlab.dicom import identity
    from ctvlab.dicom.importer import PROVENANCE_FILE
    from ctvlab.dicom.rtstruct import read_series, series_folder

    pid = row.patient_id
    recorded = provenance.get(pid)
    source = str(raw / PROVENANCE_FILE) if recorded else f"{raw / 'manifest.csv'} (no DICOM provenance)"
    want = identity.expected(pid, row.dicom_patient_id, recorded, source)
    try:
        t1c = nib.load(str(row.paths(raw)["t1c"]))
        like = (t1c.affine, tuple(t1c.shape[:3]))
    except Exception:  # the patient's own failure, reported when it is predicted; the series is still checked
        like = None
    try:
        _, slices = read_series(series_dir, like=like)
    except DataError as e:
        raise DataError(f"patient {pid}: planning series {series_dir}: {e}") from None
    identity.check(want, identity.of_series(slices, series_folder(slices)), pid)
    return want
