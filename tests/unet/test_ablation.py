"""The modality ablation (Fig. 2) at tiny size: one trial per input set on the phantom, then each set's best
model on the test patients, paired tests between sets, the figure and the MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctvlab.config import SearchSpace
from ctvlab.splits import load_split, pseudonymise
from ctvlab.stages.ablation import run_ablation
from ctvlab.tracking import Tracker
from ctvlab.unet.modality_ablation import ABLATION_METRICS
from tests.conftest import tiny_study

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ablation_mechanics(prepared_phantom, tmp_path, tracking_uri):
    cfg = tiny_study(tmp_path, tracking_uri)
    cfg.name = "ablation-mechanics"
    cfg.tune.ablation_sets = ["anat", "all"]
    cfg.tune.ablation_samples = 1
    cfg.tune.epochs_per_trial = 2
    cfg.tune.space = SearchSpace(base_features=[4], batch_size=[1], loss=["dice"])
    out = run_ablation(cfg, prepared_phantom)

    test_ids = load_split(prepared_phantom).patients("test")
    assert test_ids
    table = out.per_patient
    assert sorted(table["modality_set"].unique()) == ["all", "anat"]
    for s in ("anat", "all"):
        assert sorted(table.loc[table["modality_set"] == s, "patient_id"]) == sorted(test_ids)
    for m in ABLATION_METRICS:
        values = table[m].dropna()
        assert ((values >= 0) & (values <= 1)).all(), m
    assert set(out.tests["metric"]) == set(ABLATION_METRICS)
    assert set(zip(out.tests["set_a"], out.tests["set_b"], strict=True)) == {("anat", "all")}
    p = out.tests["p_value"].dropna()
    assert ((p >= 0) & (p <= 1)).all()
    assert list(out.best["modality_set"]) == ["anat", "all"]
    assert out.figure.is_file() and out.figure.stat().st_size > 0
    # Fig. 2a: each set's best trial's validation PCC per epoch, from its MLflow run
    assert out.curves_figure.is_file() and out.curves_figure.stat().st_size > 0
    for s in ("anat", "all"):
        curve = out.curves[out.curves["modality_set"] == s]
        assert list(curve["epoch"]) == [0, 1] and curve["value"].between(0, 1).all()
    # One loss for every set (the study's PCC + BCE), whatever the search space says
    assert set(out.best["loss"]) == {"pcc+bce"} and cfg.tune.space.loss == ["dice"]

    # Each set's best model was trained without the test patients it is evaluated on.
    names = set(pseudonymise(prepared_phantom, test_ids).values())
    for spec_path in Path(cfg.workdir, "ray", "trials").glob("ablation-*/model/model.json"):
        spec = json.loads(spec_path.read_text())
        assert not names & (set(spec["train_patients"]) | set(spec["val_patients"]))

    tracker = Tracker(cfg.name, tracking_uri)
    run = tracker.client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ctvlab.stage"] == "ablation"
    assert {"anat_pcc_mean", "all_pcc_mean"} <= set(run.data.metrics)
    artifacts = {a.path for a in tracker.client.list_artifacts(out.run_id, "tables")}
    assert "tables/per_patient.csv" in artifacts


def test_a_stage_scored_on_test_patients_refuses_a_split_without_them(monkeypatch, tmp_path):
    """The loss study and the ablation score their searches on the test patients: none is an error that
    names the prepared data, before Ray or any search starts."""
    from types import SimpleNamespace

    import ctvlab.splits
    from ctvlab.config import StudyConfig
    from ctvlab.errors import CtvlabError
    from ctvlab.stages.tune import scored_on_test_patients

    split = SimpleNamespace(patients=lambda role: [] if role == "test" else ["P1", "P2"])
    monkeypatch.setattr(ctvlab.splits, "load_split", lambda prep: split)
    with pytest.raises(CtvlabError, match="prep has no test patients"):
        scored_on_test_patients(StudyConfig(name="t", workdir=tmp_path), tmp_path / "prep")
