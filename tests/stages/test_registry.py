"""The registered model is an MLflow model: `mlflow.pyfunc.load_model` and `mlflow models predict` load it
and give the network's own probabilities; the version carries its provenance, the `candidate` alias and a
model card; the study's evaluated model becomes `champion`; evaluation refuses a model of other data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctvlab.data.readers import load_patient
from ctvlab.errors import LeakageError
from ctvlab.splits import load_split, salt_fingerprint
from ctvlab.stages.evaluate import evaluate_study
from ctvlab.stages.registry import (
    CANDIDATE,
    CHAMPION,
    CROWNED_TAG,
    DISCLAIMER,
    EVALUATION_RUN_TAG,
    crown,
)
from ctvlab.study import FEATURES
from ctvlab.tracking import Tracker
from ctvlab.unet.inference import load_model, predict_arrays
from ctvlab.unet.inputs import network_input, network_view


def patient_input(model, prep, pid):
    p = load_patient(prep, pid)
    brain = p.mask("brain") > 0
    view = network_view(model.spec, brain, p.mask("t2l"), p.spacing)
    x = network_input(p.features, FEATURES, brain, model.spec["modality_set"], view)
    return p, brain, view, x


def test_the_registered_version_loads_as_an_mlflow_pyfunc(trained_phantom, prepared_phantom, monkeypatch):
    import mlflow

    cfg, trained = trained_phantom
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.tracking_uri)
    assert trained.model_uri.startswith("models:/")
    pyfunc = mlflow.pyfunc.load_model(trained.model_uri)
    model = load_model(trained.model_dir, device="cpu")
    pid = load_split(prepared_phantom).patients("val")[0]
    p, brain, view, x = patient_input(model, prepared_phantom, pid)
    prob = pyfunc.predict(x[None])
    assert prob.shape == (1, 1, *view.grid) and prob.dtype == np.float32
    # the pyfunc's probability, put back on the patient's grid, is evaluation's own to 1e-5
    ours = view.uncrop(prob[0, 0], p.features.shape[1:]) * brain
    np.testing.assert_allclose(
        ours, predict_arrays(model, p.features, brain, p.mask("t2l"), p.spacing), atol=1e-5
    )
    # what MLflow stored beside the network: a tensor signature, an input example, pinned requirements
    meta = pyfunc.metadata
    assert meta.signature.inputs.inputs[0].shape == (-1, model.spec["in_channels"], -1, -1, -1)
    assert meta.saved_input_example_info is not None
    local = mlflow.artifacts.download_artifacts(artifact_uri=trained.model_uri)
    reqs = (Path(local) / "requirements.txt").read_text()
    assert "torch==2.13.0" in reqs and "mlflow==" in reqs


@pytest.mark.slow
def test_mlflow_models_predict_serves_the_registered_version(trained_phantom, prepared_phantom, tmp_path):
    """`mlflow models predict` (the CLI a serving team uses) in the current environment."""
    cfg, trained = trained_phantom
    model = load_model(trained.model_dir, device="cpu")
    pid = load_split(prepared_phantom).patients("val")[0]
    x = patient_input(model, prepared_phantom, pid)[3]
    (tmp_path / "input.json").write_text(json.dumps({"inputs": x[None].tolist()}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri}
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    out = subprocess.run([mlflow_bin, "models", "predict", "-m", trained.model_uri, "-i", str(tmp_path / "input.json"),
                          "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"], dtype=np.float32)
    import torch

    with torch.no_grad():
        expected = torch.sigmoid(model.net(torch.from_numpy(x[None]))).numpy()
    np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=1e-5)


def test_the_version_carries_provenance_an_alias_and_a_model_card(trained_phantom, prepared_phantom):
    cfg, trained = trained_phantom
    tracker = Tracker(cfg.name, cfg.tracking.tracking_uri)
    version = tracker.model_version(trained.model_uri)
    split = load_split(prepared_phantom)
    assert version.tags["dataset_digest"] == split.dataset_digest
    assert version.tags["split_digest"] == split.digest
    assert version.tags["salt_fingerprint"] == salt_fingerprint(prepared_phantom)
    assert (
        tracker.model_version(f"models:/{cfg.unet.registered_model_name}@{CANDIDATE}").version
        == version.version
    )
    card = version.description
    salt = (prepared_phantom / "pseudonym_salt").read_text().strip()
    assert salt not in card  # the fingerprint, never the salt
    assert DISCLAIMER in card and split.dataset_digest in card and split.digest in card
    assert "## Intended use" in card and "## Limitations" in card
    spec = json.loads((trained.model_dir / "model.json").read_text())
    assert spec["salt_fingerprint"] == salt_fingerprint(prepared_phantom)


def test_the_evaluated_model_becomes_champion_with_its_test_results(trained_phantom, prepared_phantom):
    cfg, trained = trained_phantom
    evaluation = evaluate_study(cfg, prepared_phantom, model_uri=trained.model_uri, progress=False)
    tracker = Tracker(cfg.name, cfg.tracking.tracking_uri)
    version = crown(tracker, cfg, trained.model_uri, evaluation)
    champion = tracker.model_version(f"models:/{cfg.unet.registered_model_name}@{CHAMPION}")
    assert str(champion.version) == version == str(tracker.model_version(trained.model_uri).version)
    assert "## Test patients" in champion.description and "| model |" in champion.description
    # the version and the evaluation that crowned it name each other (the card links to the run's page)
    assert f"[{evaluation.run_id}]({tracker.run_url(evaluation.run_id)})" in champion.description
    assert champion.tags[EVALUATION_RUN_TAG] == evaluation.run_id
    evaluated = tracker.client.get_run(evaluation.run_id).data.tags
    assert evaluated[CROWNED_TAG] == f"models:/{cfg.unet.registered_model_name}/{version}"
    assert crown(tracker, cfg, str(trained.model_dir), evaluation) is None  # a folder is not registered


def test_evaluation_refuses_a_model_of_other_data(trained_phantom, prepared_phantom, tmp_path):
    """Whatever the salt: a model whose recorded dataset digest differs is refused with exit 3, naming it."""
    cfg, trained = trained_phantom
    other = tmp_path / "other_model"
    shutil.copytree(trained.model_dir, other)
    spec = json.loads((other / "model.json").read_text())
    spec["dataset_digest"] = "0" * 64
    (other / "model.json").write_text(json.dumps(spec))
    with pytest.raises(LeakageError, match="was trained on other data: dataset_digest 000000000000") as info:
        evaluate_study(cfg, prepared_phantom, model_uri=str(other), progress=False)
    assert info.value.exit_code == 3
