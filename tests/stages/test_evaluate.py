"""`ctvlab evaluate` on the phantom cohort with a small trained U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ctvlab.ctv.viewer import VIEWER_FOLDER
from ctvlab.data.readers import load_patient
from ctvlab.errors import LeakageError
from ctvlab.ingest.manifest import read_manifest
from ctvlab.splits import load_split
from ctvlab.stages.evaluate import evaluate_study
from ctvlab.tracking import Tracker
from tests.conftest import assert_deliverable

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def evaluation(trained_phantom, prepared_phantom):
    """The phantom's evaluation, with the study's cohort where the config says (its T1c-grid CTVs built
    from the cohort's own files, as `ctvlab run` builds them)."""
    cfg, trained = trained_phantom
    study = cfg.model_copy(deep=True)
    study.cohort.raw_dir = prepared_phantom.parent / "cohort"
    study.cohort.source = "raw"
    return study, evaluate_study(study, prepared_phantom, model_uri=trained.model_uri, progress=False)


def test_tables_hold_every_test_patient_and_ctv(evaluation, prepared_phantom):
    _, out = evaluation
    test_ids = load_split(prepared_phantom).patients("test")
    assert sorted(out.per_patient["patient_id"].unique()) == test_ids
    assert sorted(out.per_patient["ctv"].unique()) == ["eortc", "isovolume", "lesion", "model", "rtog"]
    assert list(out.summary["ctv"]) == ["model", "rtog", "eortc", "isovolume", "lesion"]
    # the bare pre-RT lesion: a table row (the paper's "pre-RT lesion only"), never tested or written
    lesion = out.per_patient[out.per_patient["ctv"] == "lesion"].set_index("patient_id")
    rtog = out.per_patient[out.per_patient["ctv"] == "rtog"].set_index("patient_id")
    assert (lesion["volume_cm3"] < rtog["volume_cm3"]).all() and (
        lesion["sensitivity"] <= rtog["sensitivity"]
    ).all()
    assert not list((out.out_dir / "ctv_3mm").glob("*_lesion.nii.gz"))
    assert {"sensitivity_mean", "specificity_sd", "pcc_mean", "hd95_mm_mean"} <= set(out.summary.columns)
    assert set(out.wilcoxon["other"]) == {"rtog", "eortc", "isovolume"}
    assert {"n", "n_zero", "p_value", "p_holm"} <= set(out.wilcoxon.columns)
    # the iso-volume control has the model CTV's volume within one 3 mm voxel layer of its surface
    vol = out.per_patient.pivot(index="patient_id", columns="ctv", values="volume_cm3")
    assert ((vol["isovolume"] - vol["model"]).abs() / vol["model"] < 0.25).all()
    assert (out.per_patient.loc[out.per_patient["ctv"] == "isovolume", "margin_mm"] >= 0).all()
    assert 0.0 < out.threshold < 1.0  # chosen on the validation patients
    # the paper's per-patient comparisons, over the same test patients, written beside the other tables
    comparisons = out.comparisons.set_index("comparison")
    assert comparisons.loc["model PCC > RTOG PCC (% of patients)", "n"] == len(test_ids)
    assert (out.out_dir / "comparisons.csv").read_text().startswith("comparison,value,n,study")


def test_rtog_covers_the_whole_phantom_target(evaluation):
    # The phantom's progression sphere (r 16 mm, 6 mm off the T2L centre) lies within 10 mm of the
    # T2L (r 12 mm), so the T2L + 20 mm CTV covers the whole composite target: sensitivity exactly 1.
    _, out = evaluation
    rtog = out.per_patient[out.per_patient["ctv"] == "rtog"]
    assert (rtog["sensitivity"] == 1.0).all()
    assert (rtog["progression_coverage"] == 1.0).all()
    # every false positive of a 2 cm margin lies inside the 4 cm ring, which holds fewer true negatives
    # than the brain: specificity within the ring can only be lower
    assert (rtog["specificity_ring"] <= rtog["specificity"] + 1e-12).all()
    assert (rtog["specificity_ring"] < 1.0).all()


def test_ctv_files_on_both_grids(evaluation, prepared_phantom):
    _cfg, out = evaluation
    cohort = Path(prepared_phantom).parent / "cohort"
    rows = {r.patient_id: r for r in read_manifest(cohort)[0]}
    for pid in out.per_patient["patient_id"].unique():
        p = load_patient(prepared_phantom, pid)
        lesion = (p.mask("cel") | p.mask("t2l")) & p.mask("brain") & ~p.mask("critical").astype(bool)
        for ctv in ("model", "rtog", "eortc"):
            img = nib.load(out.out_dir / "ctv_3mm" / f"{pid}_{ctv}.nii.gz")
            data = np.asanyarray(img.dataobj) > 0
            np.testing.assert_allclose(img.affine, p.affine)
            if ctv != "eortc":
                assert data[lesion > 0].all(), f"{ctv} CTV of {pid} misses part of the gross tumour"
            native = nib.load(out.out_dir / "ctv_native" / f"{pid}_{ctv}.nii.gz")
            t1c = nib.load(cohort / rows[pid].t1c)
            assert native.shape == t1c.shape
            np.testing.assert_allclose(native.affine, t1c.affine, atol=1e-4)
            # The same volume on both grids, within the partial-volume error of a 3 mm surface (the T1c-grid
            # CTV is built there, from the cohort's masks: up to half a 3 mm voxel at every surface voxel).
            vol_3mm = data.sum() * np.prod(p.spacing)
            vol_native = (np.asanyarray(native.dataobj) > 0).sum() * np.prod(t1c.header.get_zooms()[:3])
            surface = (
                (data & ~ndimage.binary_erosion(data)).sum() * np.prod(p.spacing) / 3.0
            )  # mm² (3 mm voxels)
            assert abs(vol_native - vol_3mm) <= 1.5 * surface, (pid, ctv, vol_native, vol_3mm)
            # one shape where it is delivered: no fragment or pinhole smaller than a 3 mm voxel
            assert_deliverable(
                native.dataobj, t1c.header.get_zooms()[:3], float(np.prod(p.spacing)), f"{pid} {ctv}"
            )


def test_figures_and_mlflow_run(evaluation, prepared_phantom):
    cfg, out = evaluation
    names = {f.name for f in out.figures}
    assert {"fig3_metric_boxes.png", "supp_fig4_by_cohort.png"} <= names
    assert any(n.startswith("fig4_contours_") for n in names)
    assert all(f.stat().st_size > 0 for f in out.figures)
    tracker = Tracker(cfg.name, cfg.tracking.tracking_uri)
    run = tracker.client.get_run(out.run_id)
    assert run.data.tags["ctvlab.stage"] == "evaluate"
    # the run's description (what the MLflow UI shows first) is the CTV table beside the study's
    note = run.data.tags["mlflow.note.content"]
    assert "| model |" in note and "[0.92]" in note and "| isovolume |" in note
    assert run.data.tags["ctvlab.split_digest"] == load_split(prepared_phantom).digest
    assert {"model_sensitivity_mean", "rtog_specificity_mean", "eortc_pcc_mean", "threshold"} <= set(
        run.data.metrics
    )
    artifacts = [a.path for a in tracker.client.list_artifacts(out.run_id, "ctv_3mm")]
    assert artifacts and not any("P00" in a for a in artifacts)  # pseudonyms only
    per_patient = tracker.client.download_artifacts(out.run_id, "tables/per_patient.csv")
    assert "P00" not in Path(per_patient).read_text()
    # Anatomy at full resolution stays local unless the study opts in (tracking.log_patient_images).
    assert not cfg.tracking.log_patient_images
    assert not tracker.client.list_artifacts(out.run_id, "ctv_native")
    logged = [a.path for a in tracker.client.list_artifacts(out.run_id, "figures")]
    assert "figures/fig3_metric_boxes.png" in logged and not any("fig4_contours_" in a for a in logged)
    # the report's 3D viewer: the contour figures' patients, under the same pseudonyms, kept local too
    contoured = {
        n.removeprefix("fig4_contours_").removesuffix(".png") for n in names if n.startswith("fig4_")
    }
    viewer = out.figures[0].parent / VIEWER_FOLDER
    assert {p.name for p in viewer.iterdir()} == contoured
    assert all(
        {"t1c.nii.gz", "model.nii.gz", "progression.nii.gz"} <= {f.name for f in p.iterdir()}
        for p in viewer.iterdir()
    )
    assert not any(VIEWER_FOLDER in a.path for a in tracker.client.list_artifacts(out.run_id))


def test_leakage_guard_refuses_the_training_patients(trained_phantom, prepared_phantom):
    cfg, trained = trained_phantom
    with pytest.raises(LeakageError, match="in both"):
        evaluate_study(cfg, prepared_phantom, model_uri=trained.model_uri, split_name="train", progress=False)


def test_model_spec_records_what_the_guard_checks(trained_phantom):
    _, trained = trained_phantom
    spec = json.loads((trained.model_dir / "model.json").read_text())
    assert spec["train_patients"] and spec["val_patients"]
    assert all(p.startswith("pt-") for p in spec["train_patients"] + spec["val_patients"])


def test_the_model_carries_its_thresholds_and_evaluation_uses_them(
    trained_phantom, evaluation, prepared_phantom
):
    """The training run chose the model's CTV thresholds on its validation patients and wrote them into its
    spec; evaluation (same settings) takes them from there, so `ctvlab predict` builds its CTVs with the very
    threshold the evaluation used. With one validation patient no coverage target is reachable, and the
    reason says how many calibration patients each would need."""
    _, trained = trained_phantom
    _, out = evaluation
    spec = json.loads((trained.model_dir / "model.json").read_text())
    assert spec["threshold"] == spec["ctv"]["threshold"] == out.threshold
    assert spec["ctv"]["n_calibration"] == len(load_split(prepared_phantom).patients("val"))
    rules = {r["name"]: r for r in spec["ctv"]["coverage"]}
    assert set(rules) == {"cov90", "cov95", "cov99"}
    assert rules["cov95"]["threshold"] is None and "at least 19" in rules["cov95"]["reason"]
    coverage = out.coverage.set_index("ctv")
    assert list(coverage.index) == ["cov90", "cov95", "cov99", "rtog", "eortc"]
    assert "at least 99" in coverage.loc["cov99", "reason"]
    assert (out.out_dir / "coverage.csv").is_file()
    from ctvlab.stages.predict import resolve_model

    resolved = resolve_model(str(trained.model_dir), lambda: None)
    assert (
        resolved.threshold == out.threshold
        and resolved.threshold_source == "the model's validation threshold"
    )


def test_the_coverage_volume_curve_is_drawn_and_logged(evaluation):
    """The phantom's test patients have new progression: their curves, the figure and the area's metric."""
    cfg, out = evaluation
    curves = out.out_dir / "coverage_volume.csv"
    assert curves.is_file() and (out.out_dir / "coverage_volume.png").is_file()
    import pandas as pd

    table = pd.read_csv(curves)
    assert set(table["curve"]) == {"model", "margin"} and table["coverage"].between(0, 1).all()
    run = Tracker(cfg.name, cfg.tracking.tracking_uri).client.get_run(out.run_id)
    assert "coverage_volume_gain" in run.data.metrics and "cov90_threshold" not in run.data.metrics


def test_evaluate_on_a_read_only_results_folder_is_one_line_exit_4_and_changes_nothing(
    trained_phantom, prepared_phantom, tmp_path, capsys
):
    """The command as a user runs it: one line naming the results folder and the cause, exit 4, nothing
    written (no file, no MLflow run)."""
    import yaml

    from ctvlab.cli import main
    from tests.conftest import read_only

    cfg, trained = trained_phantom
    study = cfg.model_copy(update={"workdir": tmp_path / "work"}, deep=True)
    results = study.results_dir
    (results / "evaluate").mkdir(parents=True)
    (results / "evaluate" / "summary.csv").write_text("old\n")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study.model_dump(mode="json")))
    tracker = Tracker(cfg.name, cfg.tracking.tracking_uri)
    runs_before = len(tracker.find_runs("tags.`ctvlab.stage` = 'evaluate'"))
    capsys.readouterr()
    with read_only(results), pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--config", str(config), "--data", str(prepared_phantom),
              "--workdir", str(tmp_path / "work"), "--model-uri", str(trained.model_dir)])  # fmt: skip
    assert exit_.value.code == 4
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and f"cannot write to {results}:" in err[0], err
    assert "permission denied" in err[0] or "read-only file system" in err[0]
    assert sorted(p.name for p in results.rglob("*")) == ["evaluate", "summary.csv"]
    assert (results / "evaluate" / "summary.csv").read_text() == "old\n"
    assert len(tracker.find_runs("tags.`ctvlab.stage` = 'evaluate'")) == runs_before


def test_a_full_disk_while_writing_the_ctvs_names_the_folder_and_what_is_still_needed(
    trained_phantom, prepared_phantom, tmp_path, monkeypatch
):
    import errno

    import ctvlab.stages.evaluate as evaluate_module
    from ctvlab.errors import StorageError

    cfg, trained = trained_phantom
    study = cfg.model_copy(update={"workdir": tmp_path / "work"}, deep=True)
    real = evaluate_module.write_ctv_nifti
    calls = []

    def disk_fills(ctv, p, path, native=None, allowed=None, delivered=None):
        calls.append(path)
        if len(calls) > 2:  # two CTVs written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(ctv, p, path, native, allowed, delivered)

    monkeypatch.setattr(evaluate_module, "write_ctv_nifti", disk_fills)
    with pytest.raises(StorageError) as e:
        evaluate_study(study, prepared_phantom, model_uri=str(trained.model_dir), progress=False)
    message = str(e.value)
    assert f"cannot write to {study.results_dir}: the disk is full" in message
    assert "the evaluation still needs" in message
    assert not (study.results_dir / "evaluate").exists() and not list(study.results_dir.glob(".tmp-*"))


def test_predict_on_an_evaluated_patient_delivers_the_evaluations_ctvs(
    evaluation, prepared_phantom, tmp_path
):
    """One function builds the CTVs on the T1c grid for both: the model's threshold and preprocessing, the
    cohort's own masks, the same shape rules. Every CTV file of the evaluation equals predict's."""
    from ctvlab.stages.predict import predict_cohort

    cfg, out = evaluation
    pid = load_split(prepared_phantom).patients("test")[0]
    cohort = prepared_phantom.parent / "cohort"
    predicted = predict_cohort(
        cohort, tmp_path / "out", cfg, model_uri=out.model_uri, patients=[pid], progress=False
    )
    assert predicted.done == [pid]
    assert json.loads((tmp_path / "out" / pid / "report.json").read_text())["threshold"] == out.threshold
    files = sorted((out.out_dir / "ctv_native").glob(f"{pid}_*.nii.gz"))
    names = [f.name[len(pid) + 1 : -len(".nii.gz")] for f in files]
    delivered = {f.name[4 : -len(".nii.gz")] for f in (tmp_path / "out" / pid).glob("ctv_*.nii.gz")}
    assert set(names) - delivered == {"isovolume"}  # the evaluation's control, not a CTV to deliver
    assert {"model", "rtog", "eortc"} <= delivered
    for name, f in zip(names, files, strict=True):
        if name != "isovolume":
            evaluated = np.asanyarray(nib.load(f).dataobj) > 0
            mine = np.asanyarray(nib.load(tmp_path / "out" / pid / f"ctv_{name}.nii.gz").dataobj) > 0
            assert evaluated.any() and np.array_equal(evaluated, mine), name


def test_the_coverage_tables_match_their_published_schemas(evaluation):
    """Every row of coverage.csv, coverage_volume.csv, reliability.csv (and control.csv where written)
    validates against the JSON Schema in schemas/, read with jsonschema, not with ctvlab's own models."""
    import jsonschema
    import pandas as pd

    from ctvlab.ctv.tables import TABLES

    _, out = evaluation
    repo = Path(__file__).resolve().parents[2]
    checked = []
    for name in TABLES:
        path = out.out_dir / name
        if not path.exists():
            continue
        schema = json.loads(
            (repo / "schemas" / f"evaluate_{name.removesuffix('.csv')}.schema.json").read_text()
        )
        table = pd.read_csv(path)
        assert set(table.columns) == set(schema["properties"])
        for record in json.loads(table.to_json(orient="records")):  # empty cells as null
            jsonschema.validate(record, schema)
        checked.append(name)
    assert {"coverage.csv", "coverage_volume.csv", "reliability.csv"} <= set(checked)


def test_the_evaluation_draws_every_reachable_coverage_ctv(tmp_path):
    """The evaluation's coverage CTVs come from the model's calibration record itself (the 101-patient study
    once reported cov90 reachable at 0.21 yet scored it on no patient: the thresholds were read from the
    wrong level of the record)."""
    from ctvlab.config import StudyConfig
    from ctvlab.stages.calibrate import coverage_thresholds
    from ctvlab.stages.coverage_outputs import CoverageOutputs

    calibration = {"threshold": 0.3, "coverage": [
        {"target": 0.9, "name": "cov90", "threshold": 0.21, "n_calibration": 16},
        {"target": 0.95, "name": "cov95", "threshold": None, "n_calibration": 16, "reason": "needs 19"},
    ]}  # fmt: skip
    cfg = StudyConfig(name="cov", workdir=tmp_path)
    assert CoverageOutputs(cfg, None, calibration, tmp_path).thresholds == {"cov90": 0.21}
    assert coverage_thresholds({"threshold": 0.3, "ctv": calibration}) == {}  # a spec is not a calibration
    assert coverage_thresholds(None) == {}
