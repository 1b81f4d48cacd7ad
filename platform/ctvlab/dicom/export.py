"""`ctvlab export-dicom`: a cohort's images as DICOM MR series and its masks as one RTSTRUCT per patient.

For each patient, `<out>/<patient_id>/<column>/` holds one series per anatomical and diffusion image of the
manifest (each on its own grid), sharing one study and frame of reference, and
`<out>/<patient_id>/masks/rtstruct.dcm` holds the pre-RT masks as ROIs named by their manifest column, on
the T1c series; `<out>/clinical.csv` holds their clinical columns. It hands a (synthetic) cohort to DICOM viewers and treatment planning systems, and gives
`ctvlab import-dicom` and `ctvlab predict --rtstruct` a planning series to work on. MRSI maps stay NIfTI,
as spectroscopy software exports them (their NaN outside the PRESS box has no DICOM pixel value).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from ctvlab.atomic import atomic_folder
from ctvlab.errors import ConfigError, DataError
from ctvlab.ingest.manifest import (
    ANATOMY_COLUMNS,
    CLINICAL_COLUMNS,
    DIFFUSION_COLUMNS,
    MASK_COLUMNS,
    PROGRESSION_MASK_COLUMNS,
)

SERIES_DESCRIPTIONS = {"t1c": "T1C", "t1": "T1", "flair": "FLAIR", "adc": "ADC", "fa": "FA"}
ROI_KINDS = {"brain_mask": "ORGAN", "cel_mask": "GTV", "t2l_mask": "GTV", "cavity_mask": "CAVITY",
             "ventricles_mask": "ORGAN", "critical_mask": "AVOIDANCE"}  # fmt: skip
MASKS_FOLDER = "masks"
CLINICAL_FILE = "clinical.csv"  # the patients' clinical columns, for `ctvlab import-dicom --clinical`


def export_patient(row, raw: Path, dst: Path) -> None:
    """Write one patient's series and mask RTSTRUCT into the new folder `dst`."""
    import nibabel as nib
    from pydicom.uid import generate_uid

    from ctvlab.dicom.rtstruct import write_rtstruct
    from ctvlab.dicom.series import SeriesIds, write_series

    paths = row.paths(raw)
    ids = SeriesIds(row.patient_id, generate_uid(), generate_uid(), str(row.sex or ""), row.age)
    for number, column in enumerate(c for c in ANATOMY_COLUMNS + DIFFUSION_COLUMNS if c in paths):
        try:
            img = nib.load(str(paths[column]))
            write_series(img, dst / column, ids, SERIES_DESCRIPTIONS.get(column, column.upper()), number + 1)
        except (OSError, ValueError) as e:
            raise DataError(f"patient {row.patient_id}: {column} file {paths[column]}: {e}") from None
    t1c = nib.load(str(paths["t1c"]))
    masks = {}
    for column in MASK_COLUMNS:
        if column in paths and column not in PROGRESSION_MASK_COLUMNS:
            img = nib.load(str(paths[column]))
            masks[column] = (img.get_fdata(dtype="float32") > 0.5).reshape(img.shape[:3])
    (dst / MASKS_FOLDER).mkdir()
    write_rtstruct(dst / "t1c", masks, t1c.affine, dst / MASKS_FOLDER / "rtstruct.dcm",
                   description="pre-RT masks", kinds=ROI_KINDS)  # fmt: skip


def export_cohort(raw: Path, out: Path, patients: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> list[str]:  # fmt: skip
    """Export the chosen patients (default: all) of the cohort `raw` into the new folder `out`.

    Raises:
        ConfigError: `out` exists (export never writes into an existing folder).
        DataError: the manifest cannot be read, a patient is unknown, or a file cannot be read.
    """
    from ctvlab.ingest.manifest import read_manifest

    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise ConfigError(f"{raw} is {'a file' if raw.exists() else 'not found'}: give the cohort folder that "
                          "holds manifest.csv")  # fmt: skip
    if out.exists():
        raise ConfigError(f"{out} exists: export-dicom writes a new folder and never into an old one")
    rows, problems, ids = read_manifest(raw, "predict")
    by_id = {r.patient_id: r for r in rows}
    wanted = list(patients) if patients else ids
    bad = [p for p in wanted if p not in by_id]
    if bad:
        why = "; ".join(p.message for p in problems if p.patient_id in bad)
        raise DataError(
            f"{raw / 'manifest.csv'}: cannot export patient {', '.join(bad)}{': ' + why if why else ''}"
        )
    with atomic_folder(out) as tmp:
        with open(tmp / CLINICAL_FILE, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(CLINICAL_COLUMNS))
            w.writeheader()
            w.writerows(by_id[pid].clinical() for pid in wanted)
        for pid in wanted:
            export_patient(by_id[pid], raw, tmp / pid)
            if progress is not None:
                progress(pid)
    return wanted
