"""`ctvlab predict --rtstruct`: the CTVs of one patient never land on another patient's, study's or frame of
reference's series, the RTSTRUCT says whose it is and what drew it, and a patient stored in any voxel order
gets the same CTVs in world space."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from ctvlab.cli import app
from ctvlab.splits import load_split
from ctvlab.stages.predict import predict_cohort
from tests.dicom.test_dicom import centre_inside_read, ctvlab
from tests.stages.test_predict import prediction_cohort

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cohort(trained_phantom, prepared_phantom, tmp_path_factory):
    """Two phantom patients before follow-up, and their series as `ctvlab export-dicom` writes them."""
    cfg, trained = trained_phantom
    ids = load_split(prepared_phantom).patients("test")[:2]
    root = tmp_path_factory.mktemp("predict_safety")
    raw = prediction_cohort(prepared_phantom, root / "raw", ids)
    assert CliRunner().invoke(app, ["export-dicom", str(raw), "--out", str(root / "dicom")]).exit_code == 0
    return cfg, trained, raw, root / "dicom", ids


def predict_cli(
    capsys, cfg, trained, raw: Path, out: Path, dicom_ref: Path, *patients: str
) -> tuple[int, str]:
    args = ["predict", str(raw), "--out", str(out), "--model", str(trained.model_dir), "--threshold", "0.5",
            "--tracking-uri", cfg.tracking.tracking_uri, "--rtstruct", "--dicom-ref", str(dicom_ref)]  # fmt: skip
    for p in patients:
        args += ["--patient", p]
    return ctvlab(capsys, *args)


def test_a_planning_series_of_another_patient_is_refused(cohort, tmp_path, capsys):
    cfg, trained, raw, dicom, (a, b) = cohort
    swapped = tmp_path / "ref"
    shutil.copytree(dicom / b, swapped / a)  # patient b's series in patient a's folder
    shutil.copytree(dicom / a, swapped / b)
    out = tmp_path / "out"
    code, text = predict_cli(capsys, cfg, trained, raw, out, swapped)
    assert code == 2 and "Traceback" not in text, text
    assert f"patient {a}" in text and f"patient {b}" in text
    assert f"PatientID '{a}' (the patient's) vs '{b}' (the series')" in text
    assert str(swapped / a / "t1c") in text
    assert not out.exists()  # nothing predicted, nothing written


def imported(dicom: Path, raw: Path, dst: Path) -> Path:
    """The exported DICOM imported back (with provenance), MRSI maps from the NIfTI cohort."""
    smap = dst.parent / "series.yaml"
    text = (REPO / "jobs" / "series.yaml").read_text()
    smap.write_text(text + f"nifti_dir: {raw}/{{patient_id}}\n")
    result = CliRunner().invoke(app, ["import-dicom", str(dicom), "--out", str(dst), "--series", str(smap)])
    assert result.exit_code == 0, result.output
    # outcomes are not needed to predict; the clinical columns the study needs come from the raw cohort
    with open(raw / "manifest.csv", newline="") as f:
        clinical = {r["patient_id"]: r for r in csv.DictReader(f)}
    with open(dst / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in ("cohort", "sex", "age", "resection"):
            r[c] = clinical[r["patient_id"]][c]
    with open(dst / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


def test_an_imported_patient_predicts_onto_its_own_series_only(cohort, tmp_path, capsys, dciodvfy):
    from tests.dicom.test_dicom import validator_errors

    cfg, trained, raw, dicom, (a, _) = cohort
    cohort_dir = imported(dicom, raw, tmp_path / "imported")
    out = tmp_path / "out"
    code, text = predict_cli(capsys, cfg, trained, cohort_dir, out, dicom, a)
    assert code == 0, text
    rt = out / a / "rtstruct.dcm"
    assert validator_errors(dciodvfy, rt) == []
    ds = pydicom.dcmread(rt)
    image = pydicom.dcmread(next((dicom / a / "t1c").iterdir()), stop_before_pixels=True)
    for attr in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert ds.get(attr) == image.get(attr), attr
    assert ds.StructureSetLabel == "RESEARCH CTV" and ds.ApprovalStatus == "UNAPPROVED"
    run_id = json.loads((Path(trained.model_dir) / "model.json").read_text())["mlflow_run_id"]
    for roi in ds.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription.startswith("ctvlab ")
    model_roi = next(r for r in ds.StructureSetROISequence if r.ROIName == "CTV_model")
    assert model_roi.ROIGenerationDescription.endswith(f"U-Net runs:/{run_id}")  # the model that drew it
    # A planning system's centre-inside rule reads the CTVs back voxel for voxel (series grid = T1c grid).
    read, _ = centre_inside_read(rt, dicom / a / "t1c")
    for roi, name in (("CTV_model", "model"), ("CTV_RTOG", "rtog"), ("CTV_EORTC", "eortc")):
        ctv = np.asarray(nib.load(out / a / f"ctv_{name}.nii.gz").dataobj) > 0
        assert np.array_equal(read[roi], ctv), roi

    # The same patient's series re-stamped with another frame of reference: refused, both frames named.
    moved = tmp_path / "moved"
    shutil.copytree(dicom / a, moved / a)
    recorded = json.loads((cohort_dir / "provenance.json").read_text())["patients"][a][
        "frame_of_reference_uid"
    ]
    other = generate_uid()
    for f in (moved / a / "t1c").iterdir():
        d = pydicom.dcmread(f)
        d.FrameOfReferenceUID = other
        d.save_as(f)
    for f in [p for p in (moved / a).iterdir() if p.name != "t1c"]:
        shutil.rmtree(f)
    code, text = predict_cli(capsys, cfg, trained, cohort_dir, tmp_path / "out2", moved, a)
    assert code == 2 and "Traceback" not in text, text
    assert f"patient {a}" in text and recorded in text and other in text and "provenance.json" in text
    assert not (tmp_path / "out2").exists()


STORAGE_ORDERS = {
    "LPS": (("L", "P", "S"),),
    "sagittal": (("A", "S", "R"),),  # columns along A, rows along S, slices along R: a sagittal acquisition
    "PIL": (("P", "I", "L"),),
}


def reoriented_patient(raw: Path, pid: str, dst_root: Path, new_id: str, axcodes: tuple[str, ...]) -> dict:
    """Every file of patient `pid` stored in the voxel order `axcodes` (same world positions, same values)."""
    with open(raw / "manifest.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["patient_id"] == pid)
    (dst_root / new_id).mkdir()
    out = dict(row, patient_id=new_id)
    for col, rel in row.items():
        if rel.endswith(".nii.gz"):
            img = nib.load(raw / rel)
            ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                                   nib.orientations.axcodes2ornt(axcodes))  # fmt: skip
            nib.save(img.as_reoriented(ornt), dst_root / new_id / Path(rel).name)
            out[col] = f"{new_id}/{Path(rel).name}"
    return out


def test_a_patient_in_several_storage_orders_gets_the_same_ctvs_in_world_space(cohort, tmp_path):
    cfg, trained, raw, _, (a, _) = cohort
    dst = tmp_path / "orders"
    shutil.copytree(raw, dst)
    with open(raw / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name, (codes,) in STORAGE_ORDERS.items():
        rows.append(reoriented_patient(raw, a, dst, f"{a}-{name}", codes))
    with open(dst / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ids = [a] + [f"{a}-{n}" for n in STORAGE_ORDERS]
    outcome = predict_cohort(dst, tmp_path / "out", cfg, model_uri=trained.model_uri, threshold=0.5,
                             patients=ids, progress=False)  # fmt: skip
    assert sorted(outcome.done) == sorted(ids), outcome.failed
    for name in ("ctv_model", "ctv_rtog", "ctv_eortc", "probability"):
        ref = nib.as_closest_canonical(nib.load(outcome.out_dir / a / f"{name}.nii.gz"))
        for other in ids[1:]:
            img = nib.load(outcome.out_dir / other / f"{name}.nii.gz")
            assert nib.aff2axcodes(img.affine) == STORAGE_ORDERS[other.split("-", 1)[1]][0]  # stored as given
            back = nib.as_closest_canonical(img)
            np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)
            if name == "probability":
                np.testing.assert_allclose(back.get_fdata(), ref.get_fdata(), atol=1e-4)
            else:
                a_, b_ = np.asarray(ref.dataobj) > 0, np.asarray(back.dataobj) > 0
                assert (a_ != b_).sum() <= 0.001 * a_.sum(), (name, other, int((a_ != b_).sum()))
