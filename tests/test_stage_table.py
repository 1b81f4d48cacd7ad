"""One vocabulary: every stage is named once, in `ctvlab.stage_table`, and its command, job script, stamp,
MLflow tag, results folder and settings follow from that name.

`assert_one_vocabulary` is also run on the working directories and MLflow runs that real studies wrote
(the two-node job test, the stage-by-stage session in the docs), so a stage that writes under another name
fails there, not only here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from ctvlab.config import StudyConfig
from ctvlab.stage_table import BY_NAME, STAGES, STAMPED, settings_of, stage
from ctvlab.tracking import CHILD_RUN_TAGS, STAGE_DESCRIPTIONS, base_tags

REPO = Path(__file__).resolve().parents[1]
# Folders under results/ that hold the study's model rather than one stage's results.
MODEL_FOLDERS = {"model", "search_model"}


def assert_one_vocabulary(workdir: Path, runs=()) -> None:
    """What a study wrote under `workdir` and in MLflow uses the table's names: every stamp is a stamped
    stage's, every folder under results/ a stage's (or the model's), every run's `ctvlab.stage` tag a
    stage's name (or a search trial's)."""
    stamps = {p.stem for p in (workdir / "stamps").glob("*.json")}
    assert stamps <= {s.ident for s in STAMPED}, stamps
    folders = {p.name for p in (workdir / "results").iterdir() if p.is_dir()}
    assert folders <= {s.ident for s in STAGES if s.folder} | MODEL_FOLDERS, folders
    tags = {r.data.tags.get("ctvlab.stage") for r in runs}
    assert tags <= set(BY_NAME) | set(CHILD_RUN_TAGS), tags


def test_names_are_unique_and_follow_one_rule():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    for s in STAGES:
        assert s.name == s.name.lower() and "_" not in s.name and " " not in s.name, s.name
        assert s.ident == s.name.replace("-", "_") and stage(s.ident) is s and stage(s.name) is s
    with pytest.raises(KeyError):
        stage("rf-cv")


def test_every_stage_has_its_command_and_its_job():
    from ctvlab.cli import app

    commands = set(typer.main.get_command(app).commands)
    for s in STAGES:
        assert s.name in commands, s.name
        job = REPO / s.job
        assert job.is_file() and f'run_job("{s.name}")' in job.read_text(), s.job


def test_a_stage_with_its_own_config_section_is_named_after_it():
    sections = set(StudyConfig.model_fields)
    for s in STAGES:
        own = [p for p in s.reads if "." not in p and p == s.ident]
        if s.ident in sections:
            assert own or not s.stamped, f"{s.name} has a section of its own but is keyed on {s.reads}"


def test_mlflow_tags_are_stage_names():
    assert set(STAGE_DESCRIPTIONS) <= set(BY_NAME) | set(CHILD_RUN_TAGS)
    assert base_tags("voxel-models")["ctvlab.stage"] == "voxel-models"
    with pytest.raises(ValueError, match="rf-cv"):
        base_tags("rf-cv")


def _paths(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix}
    return {p for k, v in tree.items() for p in _paths(v, f"{prefix}.{k}" if prefix else k)}


def test_settings_are_each_stage_s_reads_less_what_other_stages_own():
    dump = StudyConfig(name="t", workdir=Path("/nonexistent")).model_dump(mode="json")
    tune = _paths(settings_of("tune", dump))
    # a search is not run again for the loss study's, the ablation's or the final model's own settings
    for owned in ("unet.final_loss", "unet.train.epochs", "unet.train.patience", "tune.ablation_sets",
                  "tune.ablation_samples", "tune.ablation_loss"):  # fmt: skip
        assert owned not in tune, owned
    assert not any(p.startswith("tune.loss_study") for p in tune)
    assert {"unet.optim.lr", "tune.num_samples", "tune.epochs_per_trial"} <= tune
    train = _paths(settings_of("train", dump))
    assert {"unet.train.epochs", "unet.train.patience"} <= train and "unet.final_loss" not in train
    assert {"unet.final_loss", "unet.train.epochs"} <= _paths(settings_of("final", dump))
    ablation = _paths(settings_of("ablation", dump))
    assert "tune.ablation_samples" in ablation and not any(p.startswith("tune.loss_study") for p in ablation)
    loss_study = settings_of("loss-study", dump)
    assert set(loss_study) == {"unet", "tune"} and set(loss_study["tune"]) == {
        "loss_study",
        "epochs_per_trial",
    }
    assert settings_of("evaluate", dump) == {"ctv": dump["ctv"]}
    assert settings_of("voxel_models", dump) == {"voxel_models": dump["voxel_models"]}
    # reading the settings never changes the config dump it reads
    assert dump == StudyConfig(name="t", workdir=Path("/nonexistent")).model_dump(mode="json")


def test_the_checker_refuses_a_stage_that_writes_under_another_name(tmp_path):
    (tmp_path / "stamps").mkdir()
    (tmp_path / "results" / "voxel_models").mkdir(parents=True)
    (tmp_path / "stamps" / "voxel_models.json").write_text("{}")
    assert_one_vocabulary(tmp_path)
    (tmp_path / "results" / "rf_cv").mkdir()
    with pytest.raises(AssertionError, match="rf_cv"):
        assert_one_vocabulary(tmp_path)
