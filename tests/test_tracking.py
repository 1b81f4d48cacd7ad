"""MLflow tracking: URIs, what a run holds, a real tracking server, and concurrent writers."""

from __future__ import annotations

import secrets

import pandas as pd
import pytest

from ctvlab.tracking import Tracker, TrackingAuthError, flatten, resolve_tracking_uri
from tests.conftest import start_mlflow_server


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"


def test_flatten_nested_settings():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def _log_a_run(tracker: Tracker) -> str:
    with tracker.run("cv", tags={"ctvlab.stage": "voxel-models"}) as parent:
        parent.params({"voxel_models": {"model": "rf", "rf": {"n_estimators": 10}}})
        parent.metrics({"auc_mean": 0.81, "auc_sd": 0.05, "skipped": float("nan")})
        parent.dataset("prepared", "d" * 64, "/data/prep", context="training")
        parent.table(pd.DataFrame({"fold": [0, 1], "auc": [0.8, 0.82]}), "folds.csv")
        for k in range(2):
            with tracker.run(f"fold-{k}", parent_run_id=parent.run_id) as child:
                child.metrics({"auc": [0.8, 0.82][k]})
    return parent.run_id


def _check_run(tracker: Tracker, run_id: str) -> None:
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["voxel_models.rf.n_estimators"] == "10"
    assert run.data.metrics == {"auc_mean": 0.81, "auc_sd": 0.05}
    assert run.data.tags["ctvlab.stage"] == "voxel-models"
    assert run.data.tags["ctvlab.git_commit"]
    assert run.data.tags["mlflow.note.content"].startswith("Voxel-wise progression model")  # UI description
    # opens in the UI's model-training view, not MLflow 3's GenAI view (traces, sessions)
    kind = tracker.client.get_experiment(tracker.experiment_id).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"
    assert run.inputs.dataset_inputs[0].dataset.name == "prepared"
    assert [f.path for f in tracker.client.list_artifacts(run_id, "tables")] == ["tables/folds.csv"]
    children = tracker.find_runs(f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.data.metrics["auc"] for c in children) == [0.8, 0.82]


def test_local_sqlite_store_holds_the_run(tracking_uri, experiment):
    tracker = Tracker(experiment, tracking_uri)
    _check_run(tracker, _log_a_run(tracker))


def test_real_tracking_server_over_http(mlflow_server):
    tracker = Tracker("ctvlab-http", mlflow_server)
    run_id = _log_a_run(tracker)
    # Read back through a fresh client, as a reviewer's machine would.
    _check_run(Tracker("ctvlab-http", mlflow_server), run_id)


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1, as docs/guides/mlflow.md ("MLflow for teams") runs it: no user may
    read anything by default, the admin password comes from the environment, never the command line."""
    root = tmp_path_factory.mktemp("mlflow_auth")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    password = secrets.token_urlsafe(16)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}  # fmt: skip
    with start_mlflow_server(root, ["--app-name", "basic-auth"], env) as (uri, cmd):
        assert password not in " ".join(cmd)
        yield uri, ("admin", password)


def test_authenticated_server_refuses_anonymous_clients(mlflow_auth_server, monkeypatch):
    uri, _ = mlflow_auth_server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(TrackingAuthError, match="MLFLOW_TRACKING_USERNAME"):
        Tracker("ctvlab-auth", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(TrackingAuthError):
        Tracker("ctvlab-auth", uri)


def test_authenticated_server_accepts_a_study_logged_with_credentials(mlflow_auth_server, monkeypatch):
    uri, (user, password) = mlflow_auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    tracker = Tracker("ctvlab-auth", uri)
    _check_run(Tracker("ctvlab-auth", uri), _log_a_run(tracker))


def test_an_experiment_made_before_the_kind_tag_gets_it_and_the_review_view(tracking_uri, experiment):
    import json

    from mlflow.tracking import MlflowClient

    from ctvlab.tracking import REVIEW_VIEW_ID

    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment(experiment)
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    Tracker(experiment, tracking_uri)
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    # the saved view "CTV review" as MLflow's UI stores one: an envelope whose state lists the columns
    view = tags[f"mlflow.sharedViewState.{REVIEW_VIEW_ID}"]
    state = json.loads(json.loads(view)["state"])
    assert state["selectedColumns"][:2] == ["attributes.`Description`", "metrics.`model_pcc_mean`"]
    Tracker(experiment, tracking_uri)  # looked up again: the view is kept as it was, creation time included
    assert client.get_experiment(exp_id).tags[f"mlflow.sharedViewState.{REVIEW_VIEW_ID}"] == view
    assert Tracker(experiment, tracking_uri).review_url() == (
        f"#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={REVIEW_VIEW_ID}"
    )


def test_failed_block_marks_run_failed(tracking_uri, experiment):
    tracker = Tracker(experiment, tracking_uri)
    with pytest.raises(ZeroDivisionError), tracker.run("boom") as r:
        1 / 0  # noqa: B018
    assert tracker.client.get_run(r.run_id).info.status == "FAILED"


@pytest.mark.parametrize(("code", "status"), [(0, "RUNNING"), (None, "RUNNING"), (3, "FAILED")])
def test_a_clean_exit_is_not_a_failure(tracking_uri, experiment, code, status):
    """Ray Tune stops a trial that its scheduler ends with SystemExit(0) inside the trial's report: the run
    is left for the search to close (FINISHED, with how it ended); another exit code is a failure."""
    tracker = Tracker(experiment, tracking_uri)
    run_id = tracker.start_run("trial", {})
    with pytest.raises(SystemExit), tracker.failing(run_id):
        raise SystemExit(code)
    assert tracker.client.get_run(run_id).info.status == status


# Concurrent writers: tests/unet/test_tune.py runs 8 concurrent Tune trials against SQLite and a server.


def test_a_run_that_cannot_be_marked_failed_keeps_its_own_error(
    tracking_uri, experiment, monkeypatch, capsys
):
    tracker = Tracker(experiment, tracking_uri)
    # A store that cannot take the status (the server went down with the stage): the stage's error still
    # surfaces, and the lost status is reported.
    parent = tracker.start_run("search")

    def store_down(*_args, **_kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(tracker, "end_run", store_down)
    with pytest.raises(KeyError, match="trial table"), tracker.failing(parent):
        raise KeyError("trial table")
    assert f"could not mark MLflow run {parent} FAILED" in capsys.readouterr().err
    monkeypatch.undo()
    tracker.reopen_run(parent)
    assert tracker.client.get_run(parent).info.status == "RUNNING"


def test_buffered_metrics_keep_values_through_an_outage_and_replay_them_once(tracking_uri, experiment):
    from ctvlab.tracking import BufferedMetrics

    tracker = Tracker(experiment, tracking_uri)
    run_id = tracker.start_run("train")
    said: list[str] = []
    buffered = BufferedMetrics(tracking_uri, run_id, say=said.append)
    real = buffered.client.log_batch
    buffered.metrics({"loss": 0.9}, step=0)
    buffered.client.log_batch = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("refused"))
    buffered.metrics({"loss": 0.8}, step=1)
    buffered.metrics({"loss": 0.7, "skipped": float("nan")}, step=2)
    assert len(buffered.pending) == 2 and "unreachable" in said[0] and len(said) == 1
    sent_twice = buffered.pending[0]
    buffered.client.log_batch = real
    real(run_id, metrics=[sent_twice])  # an answer lost on the way back: the server has it already
    buffered.metrics({"loss": 0.6}, step=3)
    assert buffered.pending == [] and buffered.replayed == 2 and "replayed 2" in said[-1]
    curve = tracker.client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in curve) == [(0, 0.9), (1, 0.8), (2, 0.7), (3, 0.6)]

    # A refusal that retrying cannot change is raised, not buffered.
    with pytest.raises(Exception, match=r"(?i)run .* not found|RESOURCE_DOES_NOT_EXIST"):
        BufferedMetrics(tracking_uri, "0" * 32).metrics({"loss": 1.0}, step=0)


def test_a_voxel_models_run_says_its_auc_beside_the_distance_baseline_first():
    from ctvlab.stages.analysis import voxel_models_note

    note = voxel_models_note("cel", "all", 0.8123, 0.0456, 0.9012, 101)
    assert note.startswith(
        "CEL progression (all): ROC AUC 0.81 ± 0.05 over the folds, distance to the T2L alone 0.90; 101 patients."
    )
    undefined = voxel_models_note("cel", "early", float("nan"), float("nan"), float("nan"), 8)
    assert undefined.startswith(
        "CEL progression (early): ROC AUC undefined: no test fold held both classes; 8 patients."
    )
