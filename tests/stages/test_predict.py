"""`ctvlab predict` on phantom patients whose manifest has no outcomes and no progression masks."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctvlab.data.readers import load_patient
from ctvlab.errors import CtvlabError
from ctvlab.ingest.manifest import OUTCOME_COLUMNS, PROGRESSION_MASK_COLUMNS
from ctvlab.ingest.validate import validate_cohort
from ctvlab.preprocess.grid import resample
from ctvlab.splits import load_split
from ctvlab.stages.predict import OUTPUT_FILES, predict_cohort
from ctvlab.unet.inference import load_model, predict_probability
from tests.conftest import assert_deliverable

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def prediction_cohort(prepared_phantom: Path, dst: Path, ids: list[str]) -> Path:
    """The phantom patients `ids` as a cohort before follow-up: outcomes and progression masks empty."""
    src = prepared_phantom.parent / "cohort"
    dst.mkdir()
    with open(src / "manifest.csv", newline="") as fh:
        records = [r for r in csv.DictReader(fh) if r["patient_id"] in ids]
    for r in records:
        shutil.copytree(src / r["patient_id"], dst / r["patient_id"])
        for column in OUTCOME_COLUMNS + PROGRESSION_MASK_COLUMNS:
            r[column] = ""
    with open(dst / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return dst


@pytest.fixture(scope="module")
def prediction(trained_phantom, prepared_phantom, tmp_path_factory):
    cfg, trained = trained_phantom
    ids = load_split(prepared_phantom).patients("test")[:2]
    raw = prediction_cohort(prepared_phantom, tmp_path_factory.mktemp("predict") / "raw", ids)
    out = raw.parent / "out"
    outcome = predict_cohort(raw, out, cfg, model_uri=trained.model_uri, threshold=0.5, progress=False)
    return cfg, trained, raw, outcome


def test_validate_for_predict_accepts_what_the_study_lacks(prediction):
    _, _, raw, _ = prediction
    assert validate_cohort(raw, progress=False, purpose="predict").ok
    # The study's validation names what is missing (a warning); preprocessing refuses such a patient by name.
    study = validate_cohort(raw, progress=False)
    assert all(any("not available" in q.message and "pfs_months" in q.message for q in p.problems)
               for p in study.patients)  # fmt: skip


def test_outputs_on_the_native_t1c_grid(prediction):
    _, trained, raw, outcome = prediction
    assert outcome.done and not outcome.failed
    for pid in outcome.done:
        t1c = nib.load(raw / pid / "t1c.nii.gz")
        folder = outcome.out_dir / pid
        assert sorted(p.name for p in folder.iterdir()) == sorted(OUTPUT_FILES)
        report = json.loads((folder / "report.json").read_text())
        assert report["model_uri"] == trained.model_uri
        assert report["model_version"] == trained.model_uri.rsplit("/", 1)[1]
        assert report["threshold"] == 0.5
        assert set(report["inputs_sha256"]) >= {"t1c", "brain_mask"}
        assert not {"cel_progression_mask", "t2l_progression_mask"} & set(report["inputs_sha256"])
        for name in ("probability", "ctv_model", "ctv_rtog", "ctv_eortc"):
            img = nib.load(folder / f"{name}.nii.gz")
            assert img.shape == t1c.shape
            np.testing.assert_allclose(img.affine, t1c.affine, atol=1e-6)
            assert int(img.header["qform_code"]) == int(t1c.header["qform_code"])
            assert int(img.header["sform_code"]) == int(t1c.header["sform_code"])
            if name.startswith("ctv_"):
                data = np.asanyarray(img.dataobj)
                voxel_cm3 = np.prod(t1c.header.get_zooms()[:3]) / 1000
                assert report["volumes_cm3"][name[4:]] == pytest.approx(data.sum() * voxel_cm3)
                # one shape where it is delivered: no fragment or pinhole smaller than a 3 mm voxel
                assert_deliverable(data, t1c.header.get_zooms()[:3], 27.0, f"{pid} {name}")
        assert (folder / "overlay.png").stat().st_size > 10_000


def test_probability_is_evaluations_map_resampled(prediction, prepared_phantom):
    # The same network input as evaluation: the 3 mm map of the prepared patient, resampled to the T1c grid.
    _, trained, raw, outcome = prediction
    model = load_model(trained.model_dir, device="cpu")
    for pid in outcome.done:
        p = load_patient(prepared_phantom, pid)
        t1c = nib.load(raw / pid / "t1c.nii.gz")
        brain = np.asanyarray(nib.load(raw / pid / "brain_mask.nii.gz").dataobj) > 0.5
        expected = resample(predict_probability(model, p), p.affine, t1c.affine, t1c.shape) * brain
        got = np.asanyarray(nib.load(outcome.out_dir / pid / "probability.nii.gz").dataobj)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_model_ctv_follows_the_resampled_probability(prediction):
    # Built on the native grid: it holds every brain voxel at or above the threshold that is connected
    # to the lesion, so it is not a 3 mm staircase (it differs from the 3 mm mask resampled).
    _, _, raw, outcome = prediction
    pid = outcome.done[0]
    prob = np.asanyarray(nib.load(outcome.out_dir / pid / "probability.nii.gz").dataobj)
    ctv = np.asanyarray(nib.load(outcome.out_dir / pid / "ctv_model.nii.gz").dataobj) > 0
    lesion = (np.asanyarray(nib.load(raw / pid / "t2l_mask.nii.gz").dataobj) > 0.5) | (
        np.asanyarray(nib.load(raw / pid / "cel_mask.nii.gz").dataobj) > 0.5
    )
    critical = np.asanyarray(nib.load(raw / pid / "critical_mask.nii.gz").dataobj) > 0.5
    brain = np.asanyarray(nib.load(raw / pid / "brain_mask.nii.gz").dataobj) > 0.5
    assert ctv[lesion & ~critical].all()
    # Independently of the construction code (ctvlab.ctv.construct.model_ctv, deliverable): every predicted
    # voxel whose face-connected component of (prob >= 0.5) ∪ lesion touches the lesion is in the CTV
    # (within the brain, critical structures out), except pieces the carve-out leaves smaller than one
    # 3 mm voxel, which are not delivered; islands touching the shape only at an edge or a corner are
    # dropped, and nothing else is added but filled holes. (With 26-connectivity this test passed or failed
    # by the trained map: a corner-attached island is the construction's documented exclusion.)
    from scipy import ndimage

    faces = ndimage.generate_binary_structure(3, 1)
    labels, _ = ndimage.label((prob >= 0.5) | lesion, structure=faces)
    attached = np.isin(labels, np.unique(labels[lesion])) & (labels > 0)
    expected = attached & brain & ~critical
    pieces, _ = ndimage.label(expected, structure=faces)
    voxel_mm3 = float(np.prod(nib.load(raw / pid / "t1c.nii.gz").header.get_zooms()[:3]))
    expected &= (np.bincount(pieces.ravel()) >= np.ceil(27.0 / voxel_mm3 - 1e-9))[pieces] & (pieces > 0)
    assert ctv[expected].all()
    filled = ndimage.binary_fill_holes(attached) & brain & ~critical
    assert not (ctv & ~filled).any()


def test_unknown_alias_is_a_clear_error(prediction, tmp_path):
    cfg, _, raw, _ = prediction
    with pytest.raises(CtvlabError, match="models:/ctvlab-unet@nosuchalias"):
        predict_cohort(
            raw, tmp_path / "out", cfg, model_uri="models:/ctvlab-unet@nosuchalias", progress=False
        )


def test_cli_skips_a_bad_patient_and_exits_non_zero(prediction, tmp_path):
    cfg, trained, raw, _ = prediction
    bad_raw = tmp_path / "raw"
    shutil.copytree(raw, bad_raw)
    with open(bad_raw / "manifest.csv", newline="") as fh:
        first, second = [r["patient_id"] for r in csv.DictReader(fh)]
    (bad_raw / first / "flair.nii.gz").write_bytes(b"not a NIfTI file")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}", "COLUMNS": "500"}
    out = subprocess.run(
        [sys.executable, "-m", "ctvlab.cli", "predict", str(bad_raw), "--out", str(tmp_path / "out"),
         "--model", str(trained.model_dir), "--threshold", "0.5", "--tracking-uri", cfg.tracking.tracking_uri],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 1, text
    assert "Traceback" not in text
    assert f"patient {first}" in text and "flair.nii.gz" in text
    assert (tmp_path / "out" / second / "report.json").exists()
    assert not (tmp_path / "out" / first).exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def test_ray_tasks_write_the_same_ctvs_and_a_valid_rtstruct(prediction, tmp_path, dciodvfy):
    """Each patient as a Ray task (what `jobs/predict.py` does on a cluster), with `--rtstruct` on the
    planning series `ctvlab export-dicom` wrote: the same NIfTI outputs as in-process prediction, and an
    RTSTRUCT that dciodvfy accepts whose contours, filled back by an independent centre-inside reader, are
    the CTVs."""
    from typer.testing import CliRunner

    from ctvlab.cli import app
    from tests.dicom.test_dicom import centre_inside_read, validator_errors

    cfg, trained, raw, serial = prediction
    assert (
        CliRunner().invoke(app, ["export-dicom", str(raw), "--out", str(tmp_path / "dicom")]).exit_code == 0
    )
    on_ray = cfg.model_copy(deep=True)
    on_ray.ray.address = "auto"  # the session's Ray is running: the tasks go to it
    out = predict_cohort(raw, tmp_path / "out", on_ray, model_uri=trained.model_uri, threshold=0.5,
                         progress=False, dicom_ref=tmp_path / "dicom")  # fmt: skip
    assert sorted(out.done) == sorted(serial.done) and not out.failed
    for pid in out.done:
        for name in ("probability", "ctv_model", "ctv_rtog", "ctv_eortc"):
            a = nib.load(serial.out_dir / pid / f"{name}.nii.gz").get_fdata()
            b = nib.load(out.out_dir / pid / f"{name}.nii.gz").get_fdata()
            assert np.allclose(a, b, atol=1e-6), (pid, name)
        rt = out.out_dir / pid / "rtstruct.dcm"
        assert validator_errors(dciodvfy, rt) == []
        # the probability beside it, as a Parametric Map on the same series that the validator accepts
        pm = out.out_dir / pid / "probability.dcm"
        assert validator_errors(dciodvfy, pm) == []
        import pydicom

        ds = pydicom.dcmread(pm)
        assert (
            ds.FrameOfReferenceUID
            == pydicom.dcmread(rt).ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
        )
        prob = np.asarray(nib.load(out.out_dir / pid / "probability.nii.gz").dataobj)
        assert abs(float(ds.pixel_array.max()) - float(prob.max())) < 1e-3  # the same map on the same grid
        report = json.loads((out.out_dir / pid / "report.json").read_text())
        assert report["rtstruct"]["series_description"] == "T1C"
        # A planning system's centre-inside rule reads the CTVs back voxel for voxel (series grid = T1c grid).
        read, contours = centre_inside_read(rt, tmp_path / "dicom" / pid / "t1c")
        for roi, name in (("CTV_model", "model"), ("CTV_RTOG", "rtog"), ("CTV_EORTC", "eortc")):
            ctv = np.asarray(nib.load(out.out_dir / pid / f"ctv_{name}.nii.gz").dataobj) > 0
            assert np.array_equal(read[roi], ctv), (pid, roi)
        # LPS flipped to RAS puts each point of the RTOG contours half-way between a CTV voxel and one
        # outside it (RAS read as LPS would not).
        ctv_img = nib.load(out.out_dir / pid / "ctv_rtog.nii.gz")
        rtog = np.asarray(ctv_img.dataobj) > 0
        for ijk in contours["CTV_RTOG"]:
            frac = np.abs(ijk[:, :2] - np.floor(ijk[:, :2]) - 0.5) < 1e-3
            lo = np.rint(ijk).astype(int)
            lo[:, :2] = np.where(frac, np.floor(ijk[:, :2]), np.rint(ijk[:, :2]))
            hi = lo.copy()
            hi[:, :2] += frac
            assert (rtog[tuple(lo.T)] != rtog[tuple(hi.T)]).all()


def test_coverage_ctvs_the_model_records_are_written_nested(prediction, tmp_path):
    """A model that records coverage thresholds (90% at 0.4, 95% at 0.2) gives ctv_cov90 ⊆ ctv_cov95, each the
    model CTV at its threshold (a lower threshold only adds voxels), with their volumes in the report; an
    unreachable target gives no file."""
    cfg, trained, raw, _ = prediction
    model = tmp_path / "model"
    shutil.copytree(trained.model_dir, model)
    spec = json.loads((model / "model.json").read_text())
    spec["ctv"]["coverage"] = [
        {"target": 0.9, "name": "cov90", "threshold": 0.4, "n_calibration": 20},
        {"target": 0.95, "name": "cov95", "threshold": 0.2, "n_calibration": 20},
        {"target": 0.99, "name": "cov99", "threshold": None, "n_calibration": 20, "reason": "too few"},
    ]
    (model / "model.json").write_text(json.dumps(spec))
    pid = sorted(p.name for p in raw.iterdir() if p.is_dir())[0]
    outcome = predict_cohort(raw, tmp_path / "out", cfg, model_uri=str(model), patients=[pid], progress=False)
    folder = outcome.out_dir / pid
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*OUTPUT_FILES, "ctv_cov90.nii.gz", "ctv_cov95.nii.gz"])
    cov90, cov95 = (np.asarray(nib.load(folder / f"ctv_{n}.nii.gz").dataobj) > 0 for n in ("cov90", "cov95"))
    assert cov90.sum() > 0 and not (cov90 & ~cov95).any()
    prob = np.asarray(nib.load(folder / "probability.nii.gz").dataobj)
    assert (prob[cov90 & (prob > 0)] > 0).all() and (prob[cov95] >= 0.2).mean() > 0.5  # drawn from the map
    report = json.loads((folder / "report.json").read_text())
    assert report["volumes_cm3"]["cov95"] >= report["volumes_cm3"]["cov90"] > 0


def test_the_model_carries_its_preprocessing_and_predict_prepares_new_patients_with_it(
    trained_phantom, prepared_phantom
):
    from ctvlab.data.readers import load_dataset_meta

    _, trained = trained_phantom
    spec = json.loads((trained.model_dir / "model.json").read_text())
    assert spec["preprocess"] == load_dataset_meta(prepared_phantom)["settings"]


def test_preprocessing_comes_from_the_model_and_a_conflicting_explicit_setting_is_an_error():
    from ctvlab.config import PreprocessConfig
    from ctvlab.errors import ConfigError
    from ctvlab.preprocess.prepare import output_settings
    from ctvlab.stages.predict import preprocess_for

    spec = {"preprocess": output_settings(PreprocessConfig(voxel_mm=5.0, ring_mm=30.0))}
    configured = PreprocessConfig(cpus_per_patient=2.0)  # defaults (3 mm, 40 mm) not given explicitly
    used, source = preprocess_for(spec, configured)
    assert (used.voxel_mm, used.ring_mm, used.cpus_per_patient, source) == (5.0, 30.0, 2.0, "the model")
    assert preprocess_for(spec, PreprocessConfig(voxel_mm=5.0))[0].voxel_mm == 5.0  # explicit and equal
    with pytest.raises(ConfigError, match=r"preprocess.voxel_mm: the model's 5.0, the config's 3.0"):
        preprocess_for(spec, PreprocessConfig(voxel_mm=3.0))
    legacy, why = preprocess_for({}, PreprocessConfig(voxel_mm=4.0))
    assert legacy.voxel_mm == 4.0 and "records no preprocessing" in why


def test_predict_with_an_explicit_preprocessing_the_model_was_not_trained_on_writes_nothing(
    trained_phantom, prepared_phantom, tmp_path
):
    from ctvlab.config import PreprocessConfig
    from ctvlab.errors import ConfigError

    cfg, trained = trained_phantom
    ids = load_split(prepared_phantom).patients("test")[:1]
    raw = prediction_cohort(prepared_phantom, tmp_path / "raw", ids)
    other = cfg.model_copy(update={"preprocess": PreprocessConfig(voxel_mm=5.0)})
    with pytest.raises(ConfigError, match=r"preprocess\.voxel_mm"):
        predict_cohort(raw, tmp_path / "out", other, model_uri=str(trained.model_dir), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_patient_without_the_masks_the_ctvs_need_is_refused_by_name(prediction, tmp_path):
    """A cohort imported from a public collection has no critical-structure mask: that patient is refused,
    naming the column; the other is predicted."""
    cfg, trained, raw, _ = prediction
    lacking = tmp_path / "raw"
    shutil.copytree(raw, lacking)
    with open(lacking / "manifest.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    records[0]["critical_mask"] = ""
    with open(lacking / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    first, second = (r["patient_id"] for r in records)
    outcome = predict_cohort(lacking, tmp_path / "out", cfg, model_uri=trained.model_uri, threshold=0.5,
                             progress=False)  # fmt: skip
    assert outcome.done == [second]
    assert f"patient {first}: critical_mask not available" in outcome.failed[first]
    assert not (tmp_path / "out" / first).exists()
