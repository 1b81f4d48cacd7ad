"""Write a NIfTI volume as a DICOM MR image series (one file per slice along k), with the geometry of
`ctvlab.dicom.geometry` and the attributes a validator (`dciodvfy`) asks of an MR image.

Integer images are stored as they are; other images as int16 with a RescaleSlope that keeps 15 bits of
their range (the values a reader gets back are `stored * slope + intercept`, see `stored_values`).
Used to hand a synthetic patient to DICOM tools (and to `ctvlab import-dicom`'s tests); real series come
from the scanner.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctvlab.dicom.geometry import slices_of

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class SeriesIds:
    """What the series of one patient share: patient, study and frame of reference."""

    patient_id: str
    study_uid: str
    frame_uid: str
    patient_sex: str = ""
    patient_age_years: float | None = None


def scaling(data: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the int16 storage of `data` (1, 0 for integers that fit)."""
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.issubdtype(data.dtype, np.integer) and lo >= -32768 and hi <= 32767:
        return 1.0, 0.0
    span = max(abs(lo), abs(hi)) or 1.0
    from pydicom.valuerep import format_number_as_ds

    return float(format_number_as_ds(span / 32000.0)), 0.0  # as the DS it is written as


def quantise(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The int16 pixels `write_series` stores for `data` (NaN as 0), with their slope and intercept."""
    slope, inter = scaling(data)
    q = np.rint((np.nan_to_num(np.asarray(data, dtype=np.float64)) - inter) / slope)
    return q.clip(-32768, 32767).astype(np.int16), slope, inter


def stored_values(data: np.ndarray) -> np.ndarray:
    """The values a DICOM reader gets back from `write_series(data)` (NaN stored as 0)."""
    q, slope, inter = quantise(data)
    return q * slope + inter


def write_series(image, out_dir: Path, ids: SeriesIds, description: str, series_number: int) -> list[Path]:
    """Write `image` (a nibabel image) as an MR series into the new folder `out_dir`; return the files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds

    data = np.asarray(image.dataobj).reshape(image.shape[:3])
    stored, slope, inter = quantise(data)
    geom = slices_of(image.affine, data.shape[2])
    ds_ = [format_number_as_ds(float(v)) for v in geom.pixel_spacing]
    series_uid = generate_uid()
    now = datetime.datetime.now()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    files = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.Modality, ds.Manufacturer = "MR", "ctvlab"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.PatientName, ds.PatientID = ids.patient_id, ids.patient_id
        ds.PatientBirthDate, ds.PatientSex = "", ids.patient_sex
        if ids.patient_age_years is not None:
            ds.PatientAge = f"{int(ids.patient_age_years):03d}Y"
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ids.study_uid, series_uid
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ids.frame_uid, ""
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, series_number, k + 1
        ds.Laterality, ds.PatientPosition = "", "HFS"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "3D", 0, 0, 1
        ds.ImageOrientationPatient = [format_number_as_ds(v) for v in geom.orientation]
        ds.ImagePositionPatient = [format_number_as_ds(v) for v in geom.positions[k]]
        ds.PixelSpacing = ds_
        ds.SliceThickness = format_number_as_ds(geom.slice_thickness)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), format_number_as_ds(inter)
        ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
