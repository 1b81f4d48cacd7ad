"""A tracking server that stops answering: ctvlab says so once, keeps what it could not send in a spool in
the working directory, sends it when the server answers again (or `ctvlab sync` does), and a stage that
ends with the server still away fails with what is unrecorded and the command that sends it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ctvlab.errors import InfrastructureError
from ctvlab.outages import settle
from ctvlab.spool import Spool, outage_notice
from ctvlab.tracking import Tracker, TrackingError, sync_spool
from tests.conftest import free_port, start_mlflow_server


def _down_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused at once


def _write_a_study(tracker: Tracker, artifact: Path) -> dict[str, str]:
    """What a stage writes: a parent and a child run, params, a curve, tags, an artifact, a dataset, ends."""
    parent = tracker.start_run("tune", {"ctvlab.stage": "tune"})
    child = tracker.start_run("trial-1", {"ctvlab.trial_id": "1"}, parent_run_id=parent)
    log = tracker.logger(child)
    log.params({"unet": {"lr": 0.001, "base_features": 4}})
    log.metrics({"val_tversky": 0.5, "train_loss": 0.9}, step=0)
    log.metrics({"val_tversky": 0.6, "train_loss": 0.8}, step=1)
    log.tags({"ctvlab.stopped_early": "false"})
    log.artifact(artifact, "model")
    log.dataset("prepared", "ab" * 32, "/somewhere/prep")
    tracker.end_run(child, "FINISHED")
    tracker.logger(parent).metrics({"best_val_tversky": 0.6})
    tracker.end_run(parent, "FINISHED")
    return {"parent": parent, "child": child}


def test_writes_while_the_server_is_down_are_kept_and_sent_once_it_answers(tmp_path, experiment):
    uri = _down_uri()
    spool = tmp_path / "work" / "tracking-spool"
    artifact = tmp_path / "model.json"
    artifact.write_text('{"base_features": 4}')
    said: list[str] = []
    t0 = time.monotonic()
    with outage_notice(said.append):
        tracker = Tracker(experiment, uri, spool=spool)  # no server: the experiment is looked up later
        ids = _write_a_study(tracker, artifact)
    assert time.monotonic() - t0 < 30  # one quick attempt, never MLflow's minutes of retries
    artifact.unlink()  # the spool holds its own copy
    assert len(said) == 1 and uri in said[0] and "since" in said[0] and str(spool) in said[0], said
    assert all(i.startswith("pending-") for i in ids.values())

    root = tmp_path / "server"
    root.mkdir()
    written_by = time.time()
    with start_mlflow_server(root, port=int(uri.rsplit(":", 1)[1])):
        sent = sync_spool(spool)
        assert sent > 0 and not list(spool.glob("*.jsonl"))  # everything sent, the journals removed
        assert sync_spool(spool) == 0  # nothing twice
        live = Tracker(experiment, uri)
        runs = {r.info.run_name: r for r in live.find_runs()}
        assert set(runs) == {"tune", "trial-1"}
        parent, child = runs["tune"], runs["trial-1"]
        assert parent.info.status == child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params == {"unet.lr": "0.001", "unet.base_features": "4"}
        assert child.data.tags["ctvlab.stopped_early"] == "false"
        for key in ("val_tversky", "train_loss"):
            assert sorted(m.step for m in live.client.get_metric_history(child.info.run_id, key)) == [0, 1]
        assert parent.data.metrics == {"best_val_tversky": 0.6}
        assert [a.path for a in live.client.list_artifacts(child.info.run_id, "model")] == [
            "model/model.json"
        ]
        assert live.client.get_run(child.info.run_id).inputs.dataset_inputs
        # The runs keep the times they really started and ended, not the time they were sent.
        assert child.info.start_time <= child.info.end_time < written_by * 1000


def test_a_stage_that_ends_with_the_server_away_fails_naming_what_is_unrecorded(tmp_path, experiment):
    uri = _down_uri()
    spool = tmp_path / "runs" / "demo" / "tracking-spool"
    artifact = tmp_path / "model.json"
    artifact.write_text("{}")
    with outage_notice(lambda _: None):
        _write_a_study(Tracker(experiment, uri, spool=spool), artifact)
    with pytest.raises(TrackingError) as e:
        settle(spool, wait_s=1, say=lambda _: None)
    message = str(e.value)
    assert isinstance(e.value, InfrastructureError) and e.value.exit_code == 4
    assert uri in message and "2 runs (tune, trial-1)" in message and "5 metric values" in message
    assert f"ctvlab sync {spool}" in message and "\n" not in message
    assert list(spool.glob("*.jsonl"))  # kept for later


def test_sync_command_sends_the_spool_or_says_the_server_is_still_away(tmp_path, experiment, capsys):
    from ctvlab.cli import main

    uri = _down_uri()
    spool = tmp_path / "tracking-spool"
    artifact = tmp_path / "model.json"
    artifact.write_text("{}")
    with outage_notice(lambda _: None):
        _write_a_study(Tracker(experiment, uri, spool=spool), artifact)
    with pytest.raises(SystemExit) as e:
        main(["sync", str(spool)])
    assert e.value.code == 4 and uri in capsys.readouterr().err
    root = tmp_path / "server"
    root.mkdir()
    with start_mlflow_server(root, port=int(uri.rsplit(":", 1)[1])):
        with pytest.raises(SystemExit) as e:
            main(["sync", str(spool)])
        assert e.value.code == 0, capsys.readouterr().err
        assert "2 runs" in capsys.readouterr().out
        statuses = {r.info.run_name: r.info.status for r in Tracker(experiment, uri).find_runs()}
        assert statuses == {"tune": "FINISHED", "trial-1": "FINISHED"}


def test_a_store_that_answers_is_written_at_once_and_the_spool_stays_empty(
    tmp_path, tracking_uri, experiment
):
    spool = tmp_path / "tracking-spool"
    artifact = tmp_path / "model.json"
    artifact.write_text("{}")
    tracker = Tracker(experiment, tracking_uri, spool=spool)
    ids = _write_a_study(tracker, artifact)
    assert not any(i.startswith("pending-") for i in ids.values())
    assert not spool.exists() or not list(spool.glob("*.jsonl"))
    assert tracker.client.get_run(ids["child"]).info.status == "FINISHED"


def test_a_write_waits_behind_the_writes_kept_before_it(tmp_path, experiment):
    """Writes reach the store in the order they were made, across processes: while the spool holds writes
    for the store (a trial's end kept during an outage), a later write that the store would take at once
    (the driver completing that trial) is kept behind them, else it would land first and the trial's own
    end after it (seen: a stopped trial's best-epoch summary logged twice)."""
    uri = _down_uri()
    spool = tmp_path / "tracking-spool"
    with outage_notice(lambda _: None):
        away = Tracker(experiment, uri, spool=spool)
        away.logger(away.start_run("trial-1")).metrics({"best_val_dice": 0.4})
    root = tmp_path / "server"
    root.mkdir()
    with start_mlflow_server(root, port=int(uri.rsplit(":", 1)[1])):
        here = Tracker(experiment, uri, spool=spool)  # the store answers now
        run_id = here.client.create_run(here.experiment_id, run_name="trial-2").info.run_id
        here.logger(run_id).metrics({"best_val_dice": 0.5})
        assert here.client.get_run(run_id).data.metrics == {}  # behind the kept writes, not ahead of them
        ops = [r["op"] for _, _, r in Spool(spool).pending()]
        assert ops == ["create_experiment", "create_run", "log_batch", "log_batch"]
        sync_spool(spool)
        assert here.client.get_run(run_id).data.metrics == {"best_val_dice": 0.5}


def test_a_kept_metric_point_the_run_already_holds_is_not_sent_twice(tmp_path, experiment):
    """The driver completed a cut-off trial's run from its history (its summary at the best epoch); the
    trial's own late writes of the same points arrive afterwards from the spool: each point once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(experiment, uri)
    run_id = tracker.start_run("trial-1", {})
    tracker.logger(run_id).metrics({"best_val_dice": 0.7}, step=3)
    spool = Spool(tmp_path / "spool")
    spool.append("log_batch", uri, {"run_id": run_id, "metrics": [
        ["best_val_dice", 0.7, 1, 3],  # the same point: held already
        ["best_val_pcc", 0.6, 1, 3],  # new
        ["best_val_dice", 0.8, 2, 4],  # another point of the same key: sent
    ]})  # fmt: skip
    assert sync_spool(tmp_path / "spool") == 1
    history = tracker.client.get_metric_history(run_id, "best_val_dice")
    assert sorted((m.step, m.value) for m in history) == [(3, 0.7), (4, 0.8)]
    assert len(tracker.client.get_metric_history(run_id, "best_val_pcc")) == 1
