"""Hyperparameter search on Ray Tune: a small search, a failing trial, resuming, concurrent MLflow writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ctvlab.config import GridSpace, SearchSpace
from ctvlab.splits import load_split
from ctvlab.stages.tune import tune_study
from ctvlab.study import BEST_SELECTION_METRIC
from ctvlab.tracking import Tracker
from ctvlab.unet.spaces import narrow_space
from tests.conftest import session_ray_address, tiny_study

REPO = Path(__file__).resolve().parents[2]


def random_search(workdir: Path, uri: str, samples: int, epochs: int):
    """A tiny random search (no grid) of dice and pcc trials, two at a time."""
    cfg = tiny_study(workdir, uri)
    cfg.tune.run_grid = False
    cfg.tune.num_samples = samples
    cfg.tune.epochs_per_trial = epochs
    cfg.tune.space = SearchSpace(base_features=[4], batch_size=[1], loss=["dice", "pcc"])
    cfg.tune.max_concurrent_trials = 2
    return cfg


@pytest.mark.parametrize(
    ("best_lr", "best_bf", "expected_lr", "expected_bf"),
    [
        # middle of the grid: geometric midpoints to either neighbour
        (1e-4, 32, (pytest.approx(1e-4 / 10**0.5), pytest.approx(1e-4 * 10**0.5)), [32, 48]),
        # at an edge: the neighbour on one side, the same ratio beyond the edge on the other
        (1e-5, 64, (pytest.approx(1e-5 / 10**0.5), pytest.approx(1e-5 * 10**0.5)), [48, 64, 96]),
    ],
)
def test_narrow_space_around_the_best_grid_cell(best_lr, best_bf, expected_lr, expected_bf):
    grid = GridSpace(lr=[1e-5, 1e-4, 1e-3], base_features=[16, 32, 64], batch_size=[1])
    space = SearchSpace(base_features=[8, 16, 32, 48, 64, 96], batch_size=[1, 2])
    rows = [
        {
            "lr": lr,
            "base_features": bf,
            "batch_size": 1,
            BEST_SELECTION_METRIC: 0.9 if (lr, bf) == (best_lr, best_bf) else 0.1,
        }
        for lr in grid.lr
        for bf in grid.base_features
    ]
    narrowed = narrow_space(pd.DataFrame(rows), grid, space)
    assert (narrowed.lr.low, narrowed.lr.high) == expected_lr
    assert narrowed.base_features == expected_bf
    assert narrowed.batch_size == [1, 2]  # a one-value grid axis does not narrow its choices


@pytest.mark.ray
def test_small_search_logs_parent_children_and_survives_a_failing_trial(
    prepared_phantom, tmp_path, tracking_uri
):
    cfg = random_search(tmp_path, tracking_uri, 1, 2)  # x2 by the failure hook: one raises, one trains
    cfg.tune.trial_max_failures = 0
    out = tune_study(cfg, prepared_phantom, fail_trials=1)

    assert len(out.trials) == 2 and out.n_failed == 1
    failed = out.trials[out.trials["status"] == "ERROR"]
    assert "injected trial failure" in failed["error"].iloc[0]
    assert out.best_model_dir is not None and (out.best_model_dir / "weights.pt").exists()
    assert out.model_uri.startswith("models:/ctvlab-unet/")
    # The best trial's model names its training patients (pseudonyms), for evaluation's leakage guard.
    spec = json.loads((out.best_model_dir / "model.json").read_text())
    split = load_split(prepared_phantom)
    assert len(spec["train_patients"]) == len(split.patients("train")) > 0
    assert len(spec["val_patients"]) == len(split.patients("val")) > 0
    assert not any(p in spec["train_patients"] for p in split.patients("train"))  # pseudonyms, not ids

    tracker = Tracker(cfg.name, tracking_uri)
    parent = tracker.client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_trials"] == 2 and parent.data.metrics["n_failed"] == 1
    assert "best.lr" in parent.data.params
    # the runs table's description: the headline first
    assert (
        parent.data.tags["mlflow.note.content"].startswith(
            f"Best of 2 trials: validation Tversky {out.best_metric:.3f} (lr "
        )
        and "; 1 failed." in parent.data.tags["mlflow.note.content"]
    )
    children = tracker.find_runs(f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    done = next(c for c in children if c.info.status == "FINISHED")
    assert len(tracker.client.get_metric_history(done.info.run_id, "val_tversky")) == 2  # its curve
    assert {a.path for a in tracker.client.list_artifacts(out.parent_run_id, "search")} >= {
        "search/trials.csv", "search/search_space.json"
    }  # fmt: skip


@pytest.mark.ray
def test_trials_stopped_by_asha_end_finished_with_their_model_and_how_they_ended(
    prepared_phantom, tmp_path, tracking_uri
):
    """ASHA stops trials inside their report call (Tune raises SystemExit(0) there): a trial that ran without
    error ends FINISHED with its model and a tag saying when it stopped; FAILED is for errors only."""
    cfg = random_search(tmp_path, tracking_uri, 4, 3)
    cfg.tune.asha.enabled, cfg.tune.asha.grace_period, cfg.tune.asha.reduction_factor = True, 1, 2
    out = tune_study(cfg, prepared_phantom)

    assert out.n_failed == 0 and (out.trials["status"] != "ERROR").all()
    assert out.trials["epochs_run"].min() < 3 <= out.trials["epochs_run"].max()  # ASHA stopped some
    tracker = Tracker(cfg.name, tracking_uri)
    children = tracker.find_runs(f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    by_trial = {c.data.tags["ctvlab.trial_id"]: c for c in children}
    for row in out.trials.itertuples():
        run = by_trial[row.trial_id]
        assert "model" in {a.path for a in tracker.client.list_artifacts(run.info.run_id)}
        assert len(tracker.client.get_metric_history(run.info.run_id, "val_tversky")) == row.epochs_run
        if row.epochs_run < 3:
            assert run.data.tags["ctvlab.stopped_early"] == "true"
            assert run.data.tags["ctvlab.epochs_run"] == str(int(row.epochs_run))
        else:
            assert run.data.tags.get("ctvlab.stopped_early", "false") == "false"


@pytest.mark.ray
@pytest.mark.slow
def test_search_killed_in_its_random_phase_resumes_without_rerunning_the_grid_or_finished_trials(
    prepared_phantom, tmp_path, _session_tracking_uri
):
    prep = tmp_path / "prep"
    shutil.copytree(prepared_phantom, prep)  # the CLI writes next to the prepared data
    cfg = tiny_study(tmp_path, _session_tracking_uri)
    cfg.tune.run_grid = True  # a one-cell grid, then the random phase in which the search is killed
    cfg.tune.grid = GridSpace(lr=[1e-3], base_features=[4], batch_size=[1])
    cfg.tune.num_samples = 2
    # Long enough (several seconds) that the second random trial, which starts at once in the process the
    # first one used, is still training when the search is killed a moment after the first one is recorded
    # finished: Tune records it at its next state sync, up to 4 s later.
    cfg.tune.epochs_per_trial = 12
    cfg.tune.max_concurrent_trials = 1
    cfg.tune.space = SearchSpace(base_features=[4], batch_size=[1], loss=["dice"])
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # Tune saves its experiment state every 10 s or more by default; every 4 s here, to wait less.
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "TUNE_GLOBAL_CHECKPOINT_S": "4"}
    # The command joins the session's running Ray rather than starting one of its own.
    cmd = [sys.executable, "-m", "ctvlab.cli", "tune", "--data", str(prep), "--config", str(config),
           "--address", session_ray_address()]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 400
    try:
        # "Finished" is what a resume reads: a trial recorded TERMINATED in the experiment state that Tune
        # has synced to storage (every 4 s), not a model file on disk, which the trial writes before Tune
        # records it. Kill a moment after such a sync, well before the next one.
        while not _recorded_finished_trials(tmp_path):
            assert proc.poll() is None, "the search ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1)  # let the sync that wrote it finish copying the searcher's state beside it
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished_before = _recorded_finished_trials(tmp_path)
    assert len(finished_before) == 1  # one at a time: the second had not finished when the search was killed
    grid_before = _recorded_finished_trials(tmp_path, "grid")
    assert len(grid_before) == 1
    assert json.loads((tmp_path / "tune_last_search.json").read_text())["phase"] == "random"

    out = tune_study(cfg, prep, resume=True)
    assert len(out.trials) == 3 and out.n_failed == 0
    assert sorted(out.trials["step"]) == ["grid", "random", "random"]
    assert out.trials.loc[out.trials["step"] == "grid", "trial_id"].tolist() == grid_before
    tracker = Tracker(cfg.name, _session_tracking_uri)
    for trial_id in finished_before + grid_before:
        runs = tracker.find_runs(f"tags.`ctvlab.trial_id` = '{trial_id}'")
        assert len(runs) == 1, f"finished trial {trial_id} ran again"
    assert json.loads((tmp_path / "tune_last_search.json").read_text())["phase"] == "done"


def _recorded_finished_trials(workdir: Path, phase: str = "random") -> list[str]:
    """Ids of the trials of one phase that Tune's stored experiment state records as TERMINATED."""
    finished = []
    for state_file in workdir.glob(f"ray/tune/*{phase}*/experiment_state-*.json"):
        try:
            trials = json.loads(state_file.read_text())["trial_data"]
            states = [json.loads(t[0]) for t in trials]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue  # not synced yet, or caught mid-copy
        finished += [t["trial_id"] for t in states if t.get("status") == "TERMINATED"]
    return sorted(finished)


def _logging_trial(config):
    tracker = Tracker(config["experiment"], config["uri"])
    i = config["i"]
    with tracker.run(f"trial-{i}", parent_run_id=config["parent"]) as run:
        for step in range(20):
            run.metrics({"value": float(i * 100 + step)}, step=step)
    import ray.tune

    ray.tune.report({"done": 1})


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["sqlite", "server"])
def test_eight_concurrent_trials_lose_no_mlflow_rows(backend, ray_local, tmp_path, request):
    import ray.cloudpickle
    from ray import tune

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trial workers cannot import tests/
    uri = (
        f"sqlite:///{tmp_path / 'trials.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("mlflow_server")
    )
    experiment = f"concurrent-trials-{backend}-{time.time_ns()}"
    tracker = Tracker(experiment, uri)
    parent = tracker.start_run("search")
    tuner = tune.Tuner(
        tune.with_resources(_logging_trial, {"CPU": 0.5}),
        param_space={
            "i": tune.grid_search(list(range(8))),
            "experiment": experiment,
            "uri": uri,
            "parent": parent,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=8),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="concurrent", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    children = tracker.find_runs(f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        i = int(c.info.run_name.split("-")[1])
        history = tracker.client.get_metric_history(c.info.run_id, "value")
        assert sorted(m.value for m in history) == [float(i * 100 + s) for s in range(20)]


class _TrialError(Exception):
    """As Ray can hand a trial's error to the driver: only the worker's traceback, as text."""


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device", "/w/ray/tune/s/run_trial_1/checkpoint_000001/state.pt"),
        _TrialError(
            "Traceback (most recent call last):\nOSError: [Errno 28] No space left on device: '/w/x'"
        ),
    ],
)
def test_trials_stopped_by_a_full_disk_fail_the_search_with_one_line_and_the_space_it_needs(error, tmp_path):
    from ctvlab.errors import StorageError
    from ctvlab.unet.search import search_storage_error

    err = search_storage_error(
        [None, error], tmp_path / "ray", written_bytes=30e6, epochs_done=3, epochs_left=5
    )
    assert isinstance(err, StorageError) and err.exit_code == 4
    assert str(err).startswith(
        f"cannot write to {tmp_path / 'ray'}: the disk is full; the search still needs about 50 MB more "
        "(10 MB per trial epoch from the 3 written, 5 left)"
    )
    assert search_storage_error([None, RuntimeError("injected trial failure")], tmp_path, 1, 1, 1) is None


def _record(tracker: Tracker, parent_run_id: str) -> dict:
    """What a reviewer sees of a search in MLflow: each run's status, metric keys and point counts (trials
    in order of their metrics), the parent's artifacts."""
    client = tracker.client

    def shape(run):
        points = {k: len(client.get_metric_history(run.info.run_id, k)) for k in sorted(run.data.metrics)}
        arts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
        return run.info.status, points, arts, run.data.tags.get("ctvlab.stopped_early")

    children = tracker.find_runs(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {
        "parent": shape(client.get_run(parent_run_id)),
        "trials": sorted((shape(c) for c in children), key=repr),
    }


@pytest.mark.ray
def test_a_search_while_the_tracking_server_is_away_records_what_an_undisturbed_search_records(
    prepared_phantom, tmp_path, tracking_uri, monkeypatch
):
    """The server is away for the whole search: the trials train, stop and end as usual (none ERROR), the
    stage ends saying what is unrecorded and how to send it; once it answers, `sync` leaves the same record
    as a search the server saw: statuses, metric keys and points per run, the model, its registration."""
    from ctvlab.outages import recording
    from ctvlab.tracking import TrackingError, sync_spool
    from tests.conftest import free_port, start_mlflow_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no minutes of retries against no server

    def study(workdir: Path, uri: str):
        cfg = random_search(workdir, uri, 2, 2)
        cfg.tracking.outage_wait_s = 1
        return cfg

    undisturbed = tune_study(study(tmp_path / "undisturbed", tracking_uri), prepared_phantom)
    expected = _record(Tracker("tiny", tracking_uri), undisturbed.parent_run_id)

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = study(tmp_path / "away", uri)
    said: list[str] = []
    with pytest.raises(TrackingError) as e, recording(cfg, say=said.append):
        out = tune_study(cfg, prepared_phantom)
    assert "ctvlab sync" in str(e.value) and uri in str(e.value)
    assert sum(uri in line and "since" in line for line in said) == 1, said  # said once
    assert (out.trials["status"] != "ERROR").all() and len(out.trials) == 2
    results = cfg.results_dir / "model"
    assert (results / "weights.pt").exists()  # the search's outputs are complete on disk

    root = tmp_path / "server"
    root.mkdir()
    with start_mlflow_server(root, port=port):
        assert sync_spool(Path(cfg.workdir) / "tracking-spool") > 0
        tracker = Tracker("tiny", uri)
        parents = tracker.find_runs("tags.`ctvlab.stage` = 'tune'")
        assert len(parents) == 1
        got = _record(tracker, parents[0].info.run_id)
        assert got == expected
        versions = tracker.search_versions(cfg.unet.registered_model_name)
        assert len(versions) == 1 and versions[0].run_id == parents[0].info.run_id


def test_a_trial_cut_off_by_its_stop_is_completed_from_what_it_left_on_the_storage(tmp_path, tracking_uri):
    """Tune ends a stopped trial's process without waiting for it (`FunctionTrainable.cleanup` joins the
    training thread with timeout 0): a trial whose end is slow (a tracking server over HTTP) is cut off with
    half its run written. The driver completes it from the history the trial keeps on the storage: every
    epoch once, the best epoch's summary, how it ended, its model, FINISHED; as an undisturbed trial."""
    from ctvlab.atomic import write_json_atomic
    from ctvlab.tracking import base_tags
    from ctvlab.unet.search import finish_stopped_trials
    from ctvlab.unet.trial import SearchContext, trial_history_file, trial_model_dir

    cfg = tiny_study(tmp_path, tracking_uri)
    cfg.tune.epochs_per_trial = 3
    tracker = Tracker("tiny", tracking_uri)
    history = [
        {"epoch": e, "train_loss": 1.0 - e / 10, "val_tversky": 0.5 + e / 10, "val_dice": 0.4 + e / 10,
         "best_val_tversky": 0.5 + e / 10, "is_best": 1}
        for e in range(2)
    ]  # fmt: skip
    ctx = SearchContext(study=cfg.model_dump(mode="json"), prep="", train_ids=[], val_ids=[],
                        storage=str(tmp_path / "trials"), search_name="s1", parent_run_id=None,
                        experiment="tiny", tracking_uri=tracking_uri)  # fmt: skip
    run_id = tracker.start_run(
        "trial-t1", {**base_tags("tune-trial"), "ctvlab.trial_id": "t1", "ctvlab.search": "s1"}
    )
    tracker.logger(run_id).metrics(
        {k: v for k, v in history[0].items() if k != "epoch"}, step=0
    )  # then cut off
    write_json_atomic(trial_history_file(ctx.storage, "s1", "t1"), history)
    model = trial_model_dir(ctx.storage, "s1", "t1")
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    (model / "weights.pt").write_bytes(b"w")
    table = pd.DataFrame(
        [{"trial_id": "t1", "status": "TERMINATED", "epochs_run": 2, "model_dir": str(model)}]
    )

    finish_stopped_trials(ctx, table, tracker)

    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_tversky", "best_val_tversky"):
        assert sorted(m.step for m in tracker.client.get_metric_history(run_id, key)) == [0, 1], key
    assert run.data.metrics["best_val_dice"] == pytest.approx(0.5)  # the best epoch's summary
    assert run.data.tags["ctvlab.stopped_early"] == "true" and run.data.tags["ctvlab.epochs_run"] == "2"
    assert {a.path for a in tracker.client.list_artifacts(run_id, "model")} == {
        "model/model.json",
        "model/weights.pt",
    }
    finish_stopped_trials(ctx, table, tracker)  # twice: nothing more
    assert len(tracker.client.get_metric_history(run_id, "val_tversky")) == 2


def test_a_process_reads_a_searchs_examples_once_and_no_trial_can_change_them(tmp_path):
    """Tune gives a slot's next trial the same process: its examples come from the first trial's read,
    as read-only arrays; data prepared again (a new dataset record) or another input set is read again."""
    import numpy as np

    from ctvlab.unet import trial
    from ctvlab.unet.trial import SearchContext, search_examples

    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "dataset.json").write_text("{}")
    reads: list[tuple] = []

    def load(folder, ids, modality_set, view):
        reads.append((tuple(ids), modality_set))
        return [{"patient_id": i, "image": np.zeros((2, 3, 3, 3), np.float32)} for i in ids]

    ctx = SearchContext(study={}, prep=str(prep), train_ids=["a", "b"], val_ids=["c"], storage="", search_name="s",
                        parent_run_id=None, experiment="e", tracking_uri="", view={"grid": [3, 3, 3]})  # fmt: skip
    first = search_examples(ctx, "all", load)
    assert search_examples(ctx, "all", load) is first and reads == [(("a", "b"), "all"), (("c",), "all")]
    with pytest.raises(ValueError, match="read-only"):
        first[0][0]["image"] += 1
    search_examples(ctx, "anatomy", load)  # another input set
    assert reads[-2:] == [(("a", "b"), "anatomy"), (("c",), "anatomy")] and len(trial._EXAMPLES) == 1
    time.sleep(0.01)
    (prep / "dataset.json").write_text('{"again": 1}')  # prepared again
    search_examples(ctx, "anatomy", load)
    assert len(reads) == 6


def test_a_searchs_description_names_its_best_trial_first():
    from ctvlab.stages.tune import search_note

    schedule = {"kind": "constant", "start": 0.98, "end": 0.98}
    params = {"lr": 0.0012345, "base_features": 8, "loss": "pcc", "beta_schedule": schedule}
    note = search_note(0.61234, params, 30, 0)
    assert note.startswith(
        "Best of 30 trials: validation Tversky 0.612 (lr 0.0012, base_features 8, loss pcc, beta_schedule constant)."
    )
    assert "failed" not in note.split("\n")[0]
