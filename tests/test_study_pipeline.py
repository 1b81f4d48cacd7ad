"""`ctvlab run`'s provenance: which stages a change re-runs, failed stages, and the leakage guard.

The stamp table tests `stage_key` directly, one changed setting or input per row. The end-to-end tests run
`run_study` on the phantom cohort with the real cohort, validation, preprocessing and split stages; the
voxel models, statistics, training and evaluation are replaced by recorders (they have their own tests and
cost minutes here), so what is checked is which stages run and what they are keyed on.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctvlab.atomic import digest
from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError, LeakageError
from ctvlab.pipeline import STAGE_INPUTS, StageFailed, run_study, stage_key
from ctvlab.stage_table import BY_NAME
from tests.test_stage_table import assert_one_vocabulary

STAMPED = list(
    STAGE_INPUTS
)  # synth, split, voxel-models, stats, tune, train, final, loss-study, ablation, evaluate


def _keys(cfg: StudyConfig, dataset: str = "dataset-0") -> dict[str, str]:
    """Every stage's key, with each stage's output digest derived as the real stage derives it: the split
    digest covers (patient, role, fold), which the split settings decide and the data's content does not
    (the bug of issue 14); a model trained again has new weights, so its digest follows its key. The
    default config searches and trains a final model: `train` is keyed but feeds nothing."""
    inputs: dict[str, str | None] = {"dataset": dataset}
    keys = {}
    for stage in STAMPED:
        keys[stage] = stage_key(stage, cfg, inputs)
        if stage == "split":
            inputs["split"] = digest(cfg.split.model_dump(mode="json"))
        elif stage == "tune":  # the search: its best configuration, and a model
            inputs["search"] = digest(["best configuration", keys[stage]])
            inputs["model"] = digest(["weights", keys[stage]])
        elif stage == "final":  # the evaluated model is the final one
            inputs["model"] = digest(["weights", keys[stage]])
    return keys


def _set(path: str, value):
    def change(cfg: StudyConfig) -> StudyConfig:
        cfg = cfg.model_copy(deep=True)
        *parents, leaf = path.split(".")
        obj = cfg
        for name in parents:
            obj = getattr(obj, name)
        setattr(obj, leaf, value)
        return cfg

    return change


DOWNSTREAM_OF_DATA = {
    "split",
    "voxel-models",
    "stats",
    "tune",
    "train",
    "final",
    "loss-study",
    "ablation",
    "evaluate",
}

# (what changes, the config change, the new dataset digest or None, the stages that must re-run)
ROWS = [
    ("synth.n_patients", _set("synth.n_patients", 9), None, {"synth"}),
    # preprocessing settings and input files reach later stages only through the dataset digest
    ("preprocess.ring_mm", _set("preprocess.ring_mm", 30.0), "dataset-ring30", DOWNSTREAM_OF_DATA),
    ("one input file", lambda c: c, "dataset-new-flair", DOWNSTREAM_OF_DATA),
    ("split.seed", _set("split.seed", 7), None, DOWNSTREAM_OF_DATA),
    ("voxel_models.model", _set("voxel_models.model", "xgboost"), None, {"voxel-models"}),
    ("stats.primary_test", _set("stats.primary_test", "mannwhitney"), None, {"stats"}),
    # the search's trials train tune.epochs_per_trial epochs: the final model's settings retrain it alone
    # (and a single training run, which trains unet.train.epochs too, but not the final loss)
    ("unet.train.epochs", _set("unet.train.epochs", 5), None, {"train", "final", "evaluate"}),
    ("unet.final_loss", _set("unet.final_loss", "pcc+bce"), None, {"final", "evaluate"}),
    ("unet.train.patience", _set("unet.train.patience", 10), None, {"train", "final", "evaluate"}),
    ("tune.loss_study.betas", _set("tune.loss_study.betas", [0.9]), None, {"loss-study"}),
    ("tune.ablation_samples", _set("tune.ablation_samples", 3), None, {"ablation"}),
    (
        "unet.optim.lr (the search's base)",
        _set("unet.optim.lr", 1e-4),
        None,
        {"tune", "train", "final", "loss-study", "ablation", "evaluate"},
    ),
    (
        "tune.num_samples",
        _set("tune.num_samples", 3),
        None,
        {"tune", "final", "loss-study", "ablation", "evaluate"},
    ),
    ("ctv.rtog_margin_mm", _set("ctv.rtog_margin_mm", 25.0), None, {"evaluate"}),
    ("ray.num_cpus (execution only)", _set("ray.num_cpus", 3), None, set()),
    ("tracking.experiment (bookkeeping only)", _set("tracking.experiment", "other"), None, set()),
]


@pytest.mark.parametrize(("what", "change", "dataset", "rerun"), ROWS, ids=[r[0] for r in ROWS])
def test_a_change_reruns_exactly_its_stage_and_the_ones_downstream(what, change, dataset, rerun):
    cfg = StudyConfig(name="keys", workdir=Path("/nonexistent"))
    try:
        new_cfg = change(cfg)
    except (AttributeError, ValueError) as e:  # the row names a setting the config does not have
        pytest.fail(f"{what}: {e}")
    before, after = _keys(cfg), _keys(new_cfg, dataset or "dataset-0")
    assert {s for s in STAMPED if before[s] != after[s]} == rerun


def test_a_new_ctvlab_version_reruns_every_stamped_stage(monkeypatch):
    import ctvlab.pipeline

    cfg = StudyConfig(name="keys", workdir=Path("/nonexistent"))
    before = _keys(cfg)
    monkeypatch.setattr(ctvlab.pipeline, "__version__", "999.0")
    after = _keys(cfg)
    assert all(before[s] != after[s] for s in STAMPED)


def test_a_stage_key_needs_every_input_the_stage_reads():
    cfg = StudyConfig(name="keys", workdir=Path("/nonexistent"))
    with pytest.raises(KeyError):
        stage_key("evaluate", cfg, {"dataset": "d", "split": "s"})  # no model digest: never stamped blind


# --- end to end ---------------------------------------------------------------------------------------


class Recorder:
    """Stand-ins for the expensive stages; `ran` lists what ran, `fail` names a stage to raise in."""

    def __init__(self, monkeypatch):
        import ctvlab.stages.analysis
        import ctvlab.stages.evaluate
        import ctvlab.stages.train
        import ctvlab.stages.tune

        self.ran: list[str] = []
        self.fail: str | None = None
        self.trained = 0
        self.searched = 0
        self.trained_with: list = []
        self.resumed: list[bool] = []
        monkeypatch.setattr(ctvlab.stages.analysis, "voxel_models_stage", self.voxel_models)
        monkeypatch.setattr(ctvlab.stages.analysis, "stats_stage", self.stats)
        monkeypatch.setattr(ctvlab.stages.train, "train_unet", self.train)
        monkeypatch.setattr(ctvlab.stages.tune, "tune_study", self.search)
        monkeypatch.setattr(ctvlab.stages.evaluate, "evaluate_study", self.evaluate)
        monkeypatch.setattr(ctvlab.stages.evaluate, "print_evaluation", lambda *a, **k: None)

    def _enter(self, name: str) -> None:
        self.ran.append(name)
        if self.fail == name:
            raise CtvlabError(f"{name} broke (injected)")

    def voxel_models(self, cfg, prep, parallel=True):
        self._enter("voxel_models")
        Path(cfg.results_dir, "voxel_models").mkdir(parents=True, exist_ok=True)  # as the real stage
        return {}

    def stats(self, cfg, prep):
        self._enter("stats")
        Path(cfg.results_dir, "stats").mkdir(parents=True, exist_ok=True)
        result = SimpleNamespace(summary=lambda: {"n_significant": 0}, tests=[])
        return result, "run-stats"

    def train(self, cfg, prep, resume=False, settings_key=None, run_label="train"):
        # As train_unet does: the pointer names the run's settings at its start and says when it finished.
        self.resumed.append(resume)
        self.trained_with.append(cfg.unet)
        pointer = Path(cfg.workdir, "train_last_run.json")
        pointer.write_text(json.dumps({"settings_key": settings_key, "finished": False}))
        self._enter("final" if run_label == "final" else "model")
        self.trained += 1
        model = Path(cfg.results_dir, "model")
        model.mkdir(parents=True, exist_ok=True)
        (model / "model.json").write_text(json.dumps({"n": self.trained}))
        (model / "weights.pt").write_bytes(b"weights %d" % self.trained)
        pointer.write_text(json.dumps({"settings_key": settings_key, "finished": True}))
        return SimpleNamespace(model_uri=str(model), best_metrics={}, run_id="run-train", best_epoch=0,
                               epochs_run=cfg.unet.train.epochs)  # fmt: skip

    def search(self, cfg, prep, resume=False, settings_key=None, model_dir=None, register=True):
        self._enter("search")
        self.searched += 1
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "model.json").write_text(json.dumps({"n": -self.searched}))  # < 0: a search's model
        best = {"lr": 3e-4, "base_features": 12, "batch_size": 2, "loss": "tversky", "modality_set": "all",
                "beta_schedule": json.dumps({"kind": "constant", "start": 0.9, "end": 0.9})}  # fmt: skip
        return SimpleNamespace(model_uri=str(model_dir) if register else None, trials=[1, 2], best_metric=0.5, best_params=best,
                               parent_run_id="run-search")  # fmt: skip

    def evaluate(self, cfg, prep, model_uri=None, console=None):
        self._enter("evaluate")
        self.evaluated_model = json.loads((Path(model_uri) / "model.json").read_text())["n"]
        out = Path(cfg.results_dir, "evaluate")
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.csv").write_text("x\n1\n")
        return SimpleNamespace(out_dir=out, run_id="run-eval", model_uri=str(model_uri))


@pytest.fixture
def study(phantom_cohort, tmp_path, tracking_uri, experiment, ray_local, monkeypatch):
    cfg = StudyConfig(name="e2e", workdir=tmp_path / "work")
    cfg.cohort.raw_dir = phantom_cohort
    cfg.cohort.source = "raw"
    cfg.tracking.tracking_uri = tracking_uri
    cfg.tracking.experiment = experiment
    cfg.pipeline.search = False
    cfg.split.n_folds = 2  # 4 phantom patients
    return cfg, Recorder(monkeypatch)


def _statuses(outcome) -> dict[str, str]:
    return {r.name: r.status for r in outcome.stages}


@pytest.mark.ray
def test_a_new_ring_reruns_preprocessing_and_everything_after_it(study):
    cfg, rec = study
    first = run_study(cfg)
    assert rec.ran == ["voxel_models", "stats", "model", "evaluate"]
    assert _statuses(first)["split"] == "ran"
    assert set(_statuses(first)) <= set(BY_NAME)  # the run prints the stage table's names
    assert_one_vocabulary(Path(cfg.workdir))

    rec.ran.clear()
    again = run_study(cfg)
    assert rec.ran == [] and _statuses(again)["stats"] == "skipped (current)"

    changed = cfg.model_copy(deep=True)
    changed.preprocess.ring_mm = 30.0
    third = run_study(changed)
    assert _statuses(third)["preprocess"] == "ran"
    assert rec.ran == ["voxel_models", "stats", "model", "evaluate"]  # none "skipped (current)" on old data


def _touch_one_flair(cfg: StudyConfig) -> StudyConfig:
    """One input file changes: a patient's FLAIR, brighter by one unit in one voxel."""
    import nibabel as nib
    import numpy as np

    path = next(Path(cfg.cohort.raw_dir).glob("*/flair.nii.gz"))
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data.flat[data.size // 2] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return cfg


# (what changes, the change, the stages that must run again; the others are reported current)
E2E_ROWS = [
    (
        "one input file",
        _touch_one_flair,
        ["preprocess", "split", "voxel_models", "stats", "model", "evaluate"],
    ),
    ("split.seed", _set("split.seed", 7), ["split", "voxel_models", "stats", "model", "evaluate"]),
    ("voxel_models.model", _set("voxel_models.model", "xgboost"), ["voxel_models"]),
    ("stats.primary_test", _set("stats.primary_test", "mannwhitney"), ["stats"]),
    ("unet.train.epochs", _set("unet.train.epochs", 5), ["model", "evaluate"]),
    ("ctv.rtog_margin_mm", _set("ctv.rtog_margin_mm", 25.0), ["evaluate"]),
]


@pytest.mark.ray
@pytest.mark.parametrize(("what", "change", "rerun"), E2E_ROWS, ids=[r[0] for r in E2E_ROWS])
def test_one_change_reruns_its_stage_and_those_downstream_and_evaluates_the_matching_model(
    study, what, change, rerun
):
    cfg, rec = study
    run_study(cfg)
    rec.ran.clear()
    outcome = run_study(change(cfg))
    ran = [r.name for r in outcome.stages if r.status == "ran"]
    recorded = [s for s in rerun if s not in ("preprocess", "split")]
    assert rec.ran == recorded, what
    for stage in ("preprocess", "split"):
        assert (stage in ran) == (stage in rerun), (what, stage, ran)
    assert all(
        r.status in ("ran", "skipped (current)", "cohort given", "off", "nothing to do")
        for r in outcome.stages
    ), outcome.stages
    # Evaluation ran on the model of this run's data and settings: the one trained last.
    assert rec.evaluated_model == rec.trained == (2 if "model" in rerun else 1), what


@pytest.mark.ray
def test_a_failed_stage_stops_the_run_unless_keep_going(study):
    cfg, rec = study
    rec.fail = "stats"
    with pytest.raises(CtvlabError, match="stats broke"):
        run_study(cfg)
    assert rec.ran == ["voxel_models", "stats"]  # nothing after the failure

    rec.ran.clear()
    with pytest.raises(StageFailed, match="stats broke"):
        run_study(cfg, keep_going=True)
    assert rec.ran == ["stats", "model", "evaluate"]  # voxel models current; the rest do not need stats


@pytest.mark.ray
def test_ctvlab_run_continues_an_interrupted_training_run_of_the_same_settings(study):
    cfg, rec = study
    rec.fail = "model"  # the training run starts (its pointer written) and dies
    with pytest.raises(CtvlabError, match="model broke"):
        run_study(cfg)
    rec.fail = None
    outcome = run_study(cfg)
    assert rec.resumed == [False, True]  # continued, not started again
    assert "continued the interrupted run" in {r.name: r.detail for r in outcome.stages}["train"]

    rec.fail = "model"  # interrupted again, then the settings change: a new run, not the old one's
    with pytest.raises(CtvlabError):
        run_study(_set("unet.train.epochs", 5)(cfg))
    rec.fail = None
    run_study(_set("unet.train.epochs", 7)(cfg))
    assert rec.resumed[-1] is False


@pytest.mark.ray
def test_a_leaking_split_is_never_drawn_again(study):
    import pandas as pd

    cfg, _ = study
    run_study(cfg)
    splits = cfg.prep_dir / "splits.parquet"
    table = pd.read_parquet(splits)
    table.loc[0, "dl_role"] = "test" if table.loc[0, "dl_role"] != "test" else "train"
    table.to_parquet(splits)
    edited = splits.read_bytes()
    with pytest.raises(LeakageError):
        run_study(cfg)
    assert splits.read_bytes() == edited


@pytest.mark.ray
def test_the_final_model_trains_the_searchs_best_configuration_and_resumes_without_searching_again(study):
    cfg, rec = study
    cfg.pipeline.search = True
    cfg.unet.train.epochs, cfg.unet.train.patience = 9, 3
    rec.fail = "final"  # the search finishes, then the final training run starts and dies
    with pytest.raises(CtvlabError, match="final broke"):
        run_study(cfg)
    assert rec.ran == ["voxel_models", "stats", "search", "final"]
    trained = rec.trained_with[-1]  # the best configuration, the final loss, the final epochs
    assert (trained.optim.lr, trained.model.base_features, trained.train.batch_size) == (3e-4, 12, 2)
    assert (trained.loss.name, trained.loss.beta.start) == ("pcc", 0.9)
    assert (trained.train.epochs, trained.train.patience) == (9, 3)

    rec.fail, rec.ran = None, []
    outcome = run_study(cfg)
    assert rec.ran == ["final", "evaluate"] and rec.searched == 1  # the finished search is not run again
    assert rec.resumed == [False, True]
    assert "continued the interrupted run" in {r.name: r.detail for r in outcome.stages}["final"]
    assert rec.evaluated_model == rec.trained  # evaluation got the final model, not the search's best

    rec.ran = []  # another final loss: a new final model, the same search
    run_study(_set("unet.final_loss", "pcc+0.5bce")(cfg))
    assert rec.ran == ["final", "evaluate"] and rec.searched == 1
    assert rec.trained_with[-1].loss.name == "pcc+0.5bce" and rec.resumed[-1] is False

    rec.ran = []  # no final model: the search's best trial is evaluated, and the search is current
    run_study(_set("unet.final_loss", None)(cfg))
    assert rec.ran == ["search", "evaluate"]  # its model lives in results/model then: searched once more
    assert rec.evaluated_model == -2


@pytest.mark.ray
def test_the_evaluate_command_is_the_evaluate_stage_of_run(study, tmp_path, capsys):
    """`ctvlab evaluate` on the study's own data and model does what `ctvlab run` does: its results are
    stamped current for `ctvlab report`; another model's evaluation is said not to be the study's."""
    import yaml

    from ctvlab.cli import main
    from ctvlab.pipeline import current_stages

    cfg, rec = study
    run_study(cfg)
    stamps = list(Path(cfg.workdir).rglob("evaluate.json"))
    assert len(stamps) == 1 and current_stages(cfg)["evaluate"]
    stamp = stamps[0]
    stamp.unlink()  # as an evaluation made by the command alone left it before
    assert not current_stages(cfg)["evaluate"]
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rec.ran.clear()
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--config", str(config)])
    assert done.value.code in (0, None), capsys.readouterr().err
    assert rec.ran == ["evaluate"] and stamp.is_file() and current_stages(cfg)["evaluate"]
    assert rec.evaluated_model == json.loads(Path(cfg.results_dir, "model", "model.json").read_text())["n"]


@pytest.mark.ray
def test_dry_run_says_what_would_run_and_why_and_run_does_exactly_that(study):
    from ctvlab.pipeline import plan_study

    cfg, rec = study

    def planned(c) -> dict[str, tuple[str, str]]:
        return {p.name: (p.status, p.why) for p in plan_study(c)}

    fresh = planned(cfg)
    assert fresh["synth"][0] == "cohort given" and fresh["preprocess"] == ("will run", "no prepared data")
    assert fresh["split"][0] == "will run" and fresh["evaluate"][0] == "will run"
    run_study(cfg)
    rec.ran.clear()
    done = planned(cfg)
    assert {n for n, (s, _) in done.items() if s == "will run"} == {
        "validate",
        "report",
    }  # the two that always run
    assert done["preprocess"][0] == "checks each patient" and done["train"] == ("current", "")

    changed = cfg.model_copy(deep=True)
    changed.ctv.rtog_margin_mm = 15.0
    plan = planned(changed)
    assert plan["evaluate"] == ("will run", "settings changed: ctv.rtog_margin_mm")
    assert plan["train"][0] == plan["split"][0] == "current"

    changed.split.seed = 7
    plan = planned(changed)
    assert plan["split"] == ("will run", "settings changed: split.seed")
    assert plan["train"] == ("will run", "after split") and plan["voxel-models"] == (
        "will run",
        "after split",
    )
    assert plan["evaluate"] == ("will run", "after split, train")
    assert planned(changed) == plan and rec.ran == []  # a dry run runs nothing
    run_study(changed)
    assert rec.ran == ["voxel_models", "stats", "model", "evaluate"]  # what the plan said
    assert planned(cfg)["split"] == ("will run", "settings changed: split.seed")  # and back


@pytest.mark.ray
def test_a_stage_command_runs_the_stage_of_run_and_stamps_it(study):
    """`ctvlab voxel-models`, `stats`, `train` (`pipeline.run_stage`) run the very function `ctvlab run`
    runs for the stage, always, and stamp it: `ctvlab run` then sees them current and runs only what reads
    their new outputs (the evaluation of the new model)."""
    from ctvlab.pipeline import plan_study, run_stage

    cfg, rec = study
    with pytest.raises(CtvlabError, match="split"):  # nothing to read yet: said, not a traceback
        run_stage(cfg, "stats")
    run_study(cfg)
    rec.ran.clear()
    for name in ("voxel-models", "stats", "train"):
        record, outcome = run_stage(cfg, name)
        assert record.name == name and record.status == "ran" and outcome is not None
    assert rec.ran == ["voxel_models", "stats", "model"]
    plan = {p.name: p.status for p in plan_study(cfg)}
    assert plan["voxel-models"] == plan["stats"] == plan["train"] == plan["split"] == "current"
    assert plan["evaluate"] == "will run"  # the model is new
    rec.ran.clear()
    run_study(cfg)
    assert rec.ran == ["evaluate"] and rec.evaluated_model == rec.trained == 2
