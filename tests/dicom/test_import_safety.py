"""`ctvlab import-dicom` on DICOM as hospitals write it: identifiers that are not file names, RTSTRUCTs on
another frame of reference, positions with two decimals, and series dcm2niix refuses. Every refusal exits
non-zero, names the patient and the user's file, writes nothing and prints no traceback."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from ctvlab.dicom.rtstruct import write_rtstruct
from ctvlab.dicom.series import SeriesIds, write_series
from ctvlab.ingest.manifest import PATIENT_ID_PATTERN
from tests.dicom.test_dicom import ctvlab, ellipsoid, oblique_affine

SHAPE = (24, 20, 12)
MAP = "series:\n  t1c: ['T1C']\nrois:\n  cel_mask: [CEL]\n"


def write_patient(root: Path, patient_id: str, *, affine=None, frame_uid: str | None = None,
                  rtstruct: bool = True) -> tuple[Path, np.ndarray]:  # fmt: skip
    """A tiny patient: a T1c series under `root/<n>/t1c` and an RTSTRUCT with one ROI `CEL` on it (written
    by ctvlab's own writer); the folder is numbered, never named by the PatientID. Returns the patient's
    folder and the mask."""
    affine = oblique_affine(spacing=(2.0, 2.0, 3.0)) if affine is None else affine
    folder = root / f"p{len(list(root.glob('p*')))}" if root.exists() else root / "p0"
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 500
    ids = SeriesIds(patient_id, generate_uid(), frame_uid or generate_uid())
    write_series(nib.Nifti1Image(data, affine), folder / "t1c", ids, "T1C", 1)
    mask = ellipsoid(SHAPE, (12, 10, 6), (6, 5, 3))
    if rtstruct:
        (folder / "rt").mkdir()
        write_rtstruct(folder / "t1c", {"CEL": mask}, affine, folder / "rt" / "rt.dcm")
    return folder, mask


def series_map(tmp_path: Path, text: str = MAP) -> Path:
    path = tmp_path / "series.yaml"
    path.write_text(text)
    return path


def import_(capsys, dicom: Path, out: Path, smap: Path, *extra: str) -> tuple[int, str]:
    return ctvlab(capsys, "import-dicom", str(dicom), "--out", str(out), "--series", str(smap), *extra)


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.mark.parametrize("patient_id", ["../../x", "RT/2024/017", "..", "a b:c*?", "Ünïcødé-01", "X" * 70])
def test_a_patient_id_that_is_no_safe_file_name_is_mapped_to_one(tmp_path, capsys, patient_id):
    dicom = tmp_path / "dicom"
    write_patient(dicom, patient_id)
    smap = series_map(tmp_path)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    before = files_under(tmp_path)
    out = work / "cohort"
    code, text = import_(capsys, dicom, out, smap)
    assert code == 0 and "Traceback" not in text, text
    assert files_under(tmp_path) - files_under(out) - {out} == before  # nothing written outside --out
    (row,) = manifest(out)
    assert re.fullmatch(PATIENT_ID_PATTERN, row["patient_id"]), row["patient_id"]
    assert row["dicom_patient_id"] == patient_id  # the original, kept
    assert (out / row["t1c"]).resolve().is_relative_to(out.resolve())
    assert Path(row["t1c"]).parts[0] == row["patient_id"]
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())


def test_two_patient_ids_that_map_to_one_name_stay_two_patients(tmp_path, capsys):
    dicom = tmp_path / "dicom"
    write_patient(dicom, "RT/17")
    write_patient(dicom, "RT_17")
    out = tmp_path / "cohort"
    code, text = import_(capsys, dicom, out, series_map(tmp_path))
    assert code == 0, text
    rows = manifest(out)
    assert sorted(r["dicom_patient_id"] for r in rows) == ["RT/17", "RT_17"]
    assert len({r["patient_id"].casefold() for r in rows}) == 2


def test_an_empty_patient_id_is_refused(tmp_path, capsys):
    dicom = tmp_path / "dicom"
    folder, _ = write_patient(dicom, "", rtstruct=False)
    out = tmp_path / "cohort"
    code, text = import_(capsys, dicom, out, series_map(tmp_path, "series:\n  t1c: ['T1C']\n"))
    assert code == 2 and "Traceback" not in text, text
    assert "PatientID" in text and str(folder / "t1c") in text
    assert not out.exists()


def test_provenance_is_recorded_in_the_cohort(tmp_path, capsys):
    dicom = tmp_path / "dicom"
    folder, _ = write_patient(dicom, "P1")
    out = tmp_path / "cohort"
    code, text = import_(capsys, dicom, out, series_map(tmp_path))
    assert code == 0, text
    t1c = pydicom.dcmread(next((folder / "t1c").iterdir()), stop_before_pixels=True)
    rt = pydicom.dcmread(folder / "rt" / "rt.dcm")
    prov = json.loads((out / "provenance.json").read_text())["patients"]["P1"]
    assert prov["patient_id"] == "P1"
    assert prov["study_instance_uid"] == t1c.StudyInstanceUID
    assert prov["frame_of_reference_uid"] == t1c.FrameOfReferenceUID
    assert prov["series"]["t1c"]["series_instance_uid"] == t1c.SeriesInstanceUID
    assert prov["series"]["t1c"]["folder"] == str(folder / "t1c")
    assert prov["rtstruct"]["sop_instance_uid"] == rt.SOPInstanceUID
    assert prov["rtstruct"]["file"] == str(folder / "rt" / "rt.dcm")


def test_an_rtstruct_on_another_frame_of_reference_is_refused(tmp_path, capsys):
    dicom = tmp_path / "dicom"
    folder, _ = write_patient(dicom, "P1")
    rt_path = folder / "rt" / "rt.dcm"
    rt = pydicom.dcmread(rt_path)
    other = generate_uid()
    rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other
    for roi in rt.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = other
    rt.FrameOfReferenceUID = other
    rt.save_as(rt_path)
    t1c = pydicom.dcmread(next((folder / "t1c").iterdir()), stop_before_pixels=True)
    out = tmp_path / "cohort"
    code, text = import_(capsys, dicom, out, series_map(tmp_path))
    assert code == 2 and "Traceback" not in text, text
    assert "patient P1" in text and str(rt_path) in text
    assert other in text and t1c.FrameOfReferenceUID in text  # both identities
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_image_series_on_different_frames_of_reference_are_refused(tmp_path, capsys):
    dicom = tmp_path / "dicom"
    folder, _ = write_patient(dicom, "P1", rtstruct=False)
    t1c = pydicom.dcmread(next((folder / "t1c").iterdir()), stop_before_pixels=True)
    img = nib.Nifti1Image(np.ones(SHAPE, np.int16), oblique_affine(spacing=(2.0, 2.0, 3.0)))
    ids = SeriesIds("P1", t1c.StudyInstanceUID, generate_uid())
    write_series(img, folder / "flair", ids, "FLAIR", 2)
    out = tmp_path / "cohort"
    code, text = import_(
        capsys, dicom, out, series_map(tmp_path, "series:\n  t1c: [T1C]\n  flair: [FLAIR]\n")
    )
    assert code == 2 and "Traceback" not in text, text
    assert "patient P1" in text and "frame of reference" in text and str(folder / "flair") in text
    assert not out.exists()


def two_decimal_positions(series_dir: Path) -> None:
    """Rewrite ImagePositionPatient with two decimals, as many scanners do."""
    for f in sorted(series_dir.iterdir()):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [f"{float(v):.2f}" for v in ds.ImagePositionPatient]
        ds.save_as(f)


def test_positions_written_with_two_decimals_are_a_valid_series(tmp_path, capsys):
    # 2.37 mm slices on an oblique grid: rounded positions make steps that differ by 0.01 mm
    affine = oblique_affine(spacing=(2.0, 2.0, 2.37))
    dicom = tmp_path / "dicom"
    folder, mask = write_patient(dicom, "P1", affine=affine)
    two_decimal_positions(folder / "t1c")
    steps = np.diff(
        [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in sorted((folder / "t1c").iterdir())]
    )
    assert np.ptp(steps) >= 0.0099  # the case the old tolerance refused
    out = tmp_path / "cohort"
    code, text = import_(capsys, dicom, out, series_map(tmp_path))
    assert code == 0 and "Traceback" not in text, text
    back = np.asarray(nib.load(out / manifest(out)[0]["cel_mask"]).dataobj) > 0
    assert back.shape == SHAPE and (back == mask).mean() > 0.99


def test_rtstruct_written_on_a_two_decimal_series(tmp_path):
    affine = oblique_affine(spacing=(2.0, 2.0, 2.37))
    folder = tmp_path / "p"
    write_series(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), folder / "t1c",
                 SeriesIds("P1", generate_uid(), generate_uid()), "T1C", 1)  # fmt: skip
    two_decimal_positions(folder / "t1c")
    mask = ellipsoid(SHAPE, (12, 10, 6), (6, 5, 3))
    write_rtstruct(folder / "t1c", {"CTV_model": mask}, affine, tmp_path / "rt.dcm")
    assert (tmp_path / "rt.dcm").is_file()


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", ["missing slice"]),
        ("duplicate", ["same position"]),
        ("uneven", ["not evenly spaced"]),
        ("truncated", ["0006.dcm"]),
        ("no orientation", ["ImageOrientationPatient"]),
        ("other spacing", ["different PixelSpacing"]),
        ("other orientation", ["different ImageOrientationPatient"]),
    ],
)
def test_a_broken_series_is_refused_naming_the_patient_and_the_users_file(tmp_path, capsys, damage, words):
    dicom = tmp_path / "dicom"
    folder, _ = write_patient(dicom, "P1", rtstruct=False)
    files = sorted((folder / "t1c").iterdir())
    if damage == "missing":
        files[5].unlink()
    elif damage == "duplicate":
        ds = pydicom.dcmread(files[5])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / "t1c" / "0006b.dcm")
    elif damage == "uneven":
        ds = pydicom.dcmread(files[5])
        ds.ImagePositionPatient = [format_number_as_ds(float(v) + 1.0) for v in ds.ImagePositionPatient]
        ds.save_as(files[5])
    elif damage == "truncated":
        files[5].write_bytes(files[5].read_bytes()[:-300])
    elif damage == "no orientation":
        ds = pydicom.dcmread(files[5])
        del ds.ImageOrientationPatient
        ds.save_as(files[5])
    elif damage == "other spacing":
        ds = pydicom.dcmread(files[5])
        ds.PixelSpacing = ["1.5", "1.5"]
        ds.save_as(files[5])
    elif damage == "other orientation":
        ds = pydicom.dcmread(files[5])
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.save_as(files[5])
    out = tmp_path / "cohort"
    code, text = import_(capsys, dicom, out, series_map(tmp_path, "series:\n  t1c: ['T1C']\n"))
    assert code == 2 and "Traceback" not in text, text
    assert "patient P1" in text, text
    assert str(folder / "t1c") in text, text
    for w in words:
        assert w in text, text
    assert "ctvlab-dcm-" not in text  # never a temporary link's name
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
