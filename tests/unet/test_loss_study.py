"""The loss study (Supp. Figs. 2 and 3) at tiny size on the phantom: the given configuration trained per loss
and per Tversky β, every model scored on the test patients, each loss tested against PCC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ctvlab.splits import load_split, pseudonymise
from ctvlab.stages.loss_study import run_loss_study, summarise
from ctvlab.tracking import Tracker
from ctvlab.unet.modality_ablation import ABLATION_METRICS
from tests.conftest import tiny_study

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_loss_study_trains_each_loss_and_beta_from_the_best_configuration(
    prepared_phantom, tmp_path, tracking_uri
):
    cfg = tiny_study(tmp_path, tracking_uri)
    cfg.name = "loss-study"
    cfg.tune.loss_study.losses = ["tversky", "pcc", "pcc+bce"]
    cfg.tune.loss_study.betas = [0.7]  # the sweep adds the study's 0.98, shared with the comparison
    cfg.tune.loss_study.epochs = 1
    best = {"lr": 2e-3, "base_features": 4, "batch_size": 1, "loss": "dice", "modality_set": "all"}
    out = run_loss_study(cfg, prepared_phantom, best=best)

    test_ids = sorted(load_split(prepared_phantom).patients("test"))
    table = out.per_patient
    runs = {(r.study, r.loss, None if np.isnan(r.beta) else r.beta) for r in table.itertuples()}
    assert runs == {("loss", "pcc", None), ("loss", "pcc+bce", None), ("loss", "tversky", 0.98),
                    ("beta", "tversky", 0.7), ("beta", "tversky", 0.98)}  # fmt: skip
    for (_, _, _), rows in table.groupby(["study", "loss", "beta"], dropna=False):
        assert sorted(rows["patient_id"]) == test_ids
    for m in ABLATION_METRICS:
        assert table[m].dropna().between(0, 1).all(), m
    # the comparison's Tversky model is the sweep's β = 0.98 model: the same per-patient values
    shared = table[(table["loss"] == "tversky") & np.isclose(table["beta"], 0.98)]
    a, b = (
        shared[shared["study"] == s].sort_values("patient_id")[list(ABLATION_METRICS)]
        for s in ("loss", "beta")
    )
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    # each loss against PCC, Holm over the table
    assert set(zip(out.tests["set_a"], out.tests["set_b"], strict=True)) == {
        ("pcc", "tversky"),
        ("pcc", "pcc+bce"),
    }
    assert (out.tests["p_holm"].dropna() >= out.tests["p_value"].dropna()).all()
    for f in out.figures:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every run trained the given configuration, one epoch, without the test patients
    specs = [
        json.loads(p.read_text())
        for p in Path(cfg.workdir, "ray", "trials").glob("losses-*/model/model.json")
    ]
    assert len(specs) == 4 and {s["base_features"] for s in specs} == {4}
    names = set(pseudonymise(prepared_phantom, test_ids).values())
    assert all(not names & (set(s["train_patients"]) | set(s["val_patients"])) for s in specs)
    tracker = Tracker(cfg.name, tracking_uri)
    run = tracker.client.get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ctvlab.stage"] == "loss-study"
    assert {"pcc_pcc_mean", "pcc_plus_bce_pcc_mean", "tversky_beta_0.7_sensitivity_mean"} <= set(
        run.data.metrics
    )
    trials = tracker.client.search_runs([tracker.experiment_id], "tags.`ctvlab.stage` = 'tune-trial'")
    assert len(trials) == 4


def test_summary_keeps_each_run_apart_and_counts_its_patients():
    import pandas as pd

    table = pd.DataFrame({"patient_id": ["a", "b", "a", "b"], "study": ["loss", "loss", "beta", "beta"],
                          "loss": ["pcc", "pcc", "tversky", "tversky"], "beta": [np.nan, np.nan, 0.9, 0.9],
                          "sensitivity": [1.0, 0.5, 0.2, 0.4], "specificity": [0.9, 0.8, 1.0, 1.0],
                          "pcc": [0.7, 0.5, 0.1, 0.3]})  # fmt: skip
    s = summarise(table).set_index("study")
    assert s.loc["loss", "n"] == 2 and np.isnan(s.loc["loss", "beta"]) and s.loc["beta", "beta"] == 0.9
    assert s.loc["loss", "sensitivity_mean"] == 0.75 and s.loc["beta", "pcc_mean"] == pytest.approx(0.2)
    assert s.loc["beta", "sensitivity_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))


def test_rows_are_named_by_loss_and_tversky_rows_by_beta():
    from ctvlab.stages.loss_study import run_label

    assert run_label("pcc+bce", "loss", float("nan")) == "pcc+bce"
    assert run_label("tversky", "beta", 0.7) == "tversky β=0.7"
    assert run_label("tversky", "loss", 0.98) == "tversky β=0.98 (comparison)"
