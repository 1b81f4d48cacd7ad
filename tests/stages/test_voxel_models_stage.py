"""The voxel-models stage itself: what it writes and records beside each model (the models' statistics have
their own tests in tests/voxel_models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctvlab.config import StudyConfig
from ctvlab.stages.analysis import voxel_models_stage
from ctvlab.tracking import Tracker
from tests.voxel_models.conftest import tiny_config

pytestmark = pytest.mark.ray


def test_the_stage_records_the_missing_mrsi_policies_beside_its_models(
    prepared_phantom, tmp_path, tracking_uri, experiment
):
    cfg = StudyConfig(name=experiment, workdir=tmp_path)
    cfg.tracking.tracking_uri = tracking_uri
    cfg.voxel_models = tiny_config(
        targets=["nel"], subgroups=["all"], missing_check=True, bootstrap_resamples=50
    )
    cfg.voxel_models.rf = cfg.voxel_models.rf.model_copy(update={"n_estimators": 5, "max_samples": 0.2})
    results = voxel_models_stage(cfg, prepared_phantom, parallel=False)

    out = tmp_path / "results" / "voxel_models"
    assert (out / "rf-nel-all" / "roc.json").is_file()
    policies = pd.read_csv(out / "missing_policies.csv")
    assert list(policies["policy"]) == ["impute_nav", "covered_only"] and set(policies["target"]) == {"nel"}
    np.testing.assert_allclose(policies["gain"], policies["auc_all"] - policies["auc_anat"])
    chosen = policies[policies["chosen"]]
    assert list(chosen["policy"]) == [cfg.voxel_models.rf_missing]
    # the chosen policy's AUC with every feature is the stage's own model, not a second fit
    np.testing.assert_allclose(chosen["auc_all"], [results[("nel", "all")].auc_mean])

    runs = Tracker(experiment, tracking_uri).find_runs()
    [run] = [r for r in runs if r.info.run_name == "voxel-models missing MRSI policies"]
    assert run.data.tags["ctvlab.stage"] == "voxel-models"
    for r in policies.itertuples():
        for key in ("auc_all", "auc_anat", "gain"):
            recorded = run.data.metrics.get(f"{key}.nel.{r.policy}")
            expected = getattr(r, key)
            assert (recorded is None and np.isnan(expected)) or recorded == pytest.approx(expected)
