"""Training on Ray Train: a tiny DDP run, fault tolerance, and resuming a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from ctvlab.stages.train import train_unet
from ctvlab.tracking import Tracker
from ctvlab.unet.trainer import HOLD_ENV, SPEC_FILE, WEIGHTS_FILE
from tests.conftest import free_port, session_ray_address, start_mlflow_server, tiny_study

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def test_two_cpu_workers_train_checkpoint_and_register(trained_phantom):
    cfg, out = trained_phantom  # 2 gloo workers, 4 epochs (tests/conftest.py)

    epochs = [h["epoch"] for h in out.history]
    assert epochs == [0, 1, 2, 3]
    assert out.history[-1]["train_loss"] < out.history[0]["train_loss"]
    assert all(h["train_volumes"] >= 2 for h in out.history)  # both ranks trained on their shard
    assert 0.0 <= out.best_metrics["val_tversky"] <= 1.0

    # The exported model: a plain state dict (weights_only) plus a JSON spec that records the split.
    state = torch.load(out.model_dir / WEIGHTS_FILE, weights_only=True)
    spec = json.loads((out.model_dir / SPEC_FILE).read_text())
    assert spec["base_features"] == 4 and spec["train_patients"] and spec["split_digest"]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert not any("P00" in p for p in spec["train_patients"])  # pseudonyms, never patient ids

    tracker = Tracker(cfg.name, cfg.tracking.tracking_uri)
    assert out.model_uri.startswith("models:/ctvlab-unet/")
    version = out.model_uri.rsplit("/", 1)[1]
    assert tracker.client.get_model_version("ctvlab-unet", version).run_id == out.run_id
    curve = tracker.client.get_metric_history(out.run_id, "train_loss")
    assert sorted(m.step for m in curve) == [0, 1, 2, 3]  # rank 0 logged one point per epoch
    assert list(Path(cfg.workdir, "ray").glob("unet-*/checkpoint_*"))


def test_early_stopping_ends_training_patience_epochs_after_the_best_and_keeps_the_best(
    prepared_phantom, tmp_path, tracking_uri
):
    # A step far below float32 resolution: the weights, hence the validation Tversky, never change, so
    # epoch 0 stays the best and training must end at epoch 0 + patience instead of running 8 epochs.
    cfg = tiny_study(tmp_path, tracking_uri, epochs=8, patience=2, checkpoint_every=1)
    cfg.unet.optim.name, cfg.unet.optim.lr = "sgd", 1e-20
    out = train_unet(cfg, prepared_phantom, register=False)
    assert [h["epoch"] for h in out.history] == [0, 1, 2]
    assert out.history[-1]["best_epoch"] == 0 and out.epochs_run == 3
    # The exported model scores the best validation Tversky (all epochs tie here; Ray keeps the newest of
    # equal checkpoints).
    exported = json.loads((out.model_dir / SPEC_FILE).read_text())["epoch"]
    assert out.history[exported]["val_tversky"] == max(h["val_tversky"] for h in out.history)


def test_the_early_stopping_rule():
    from ctvlab.unet.trainer import early_stop

    assert not early_stop(5, 2, None)  # off
    assert [early_stop(e, 2, 3) for e in (3, 4, 5, 6)] == [False, False, True, True]
    assert early_stop(2, -1, 3)  # three epochs with no finite validation score


def test_worker_failure_restarts_from_checkpoint(prepared_phantom, tmp_path, tracking_uri):
    cfg = tiny_study(tmp_path, tracking_uri, epochs=3, max_failures=1, checkpoint_every=1)
    out = train_unet(cfg, prepared_phantom, inject_failure_at=1, register=False)
    assert [h["epoch"] for h in out.history] == [0, 1, 2]
    # Epoch 0 ran in the first worker group; after the injected failure at epoch 1 the new group
    # started from the epoch-0 checkpoint, not from scratch.
    assert [h["start_epoch"] for h in out.history] == [0, 1, 1]
    assert list((tmp_path / "ray").glob("*.fault"))


def test_resume_after_killed_run_continues_the_epochs(prepared_phantom, tmp_path, _session_tracking_uri):
    # `ctvlab train --data PREP` writes next to PREP (PREP/../ray, ../results): use a private copy.
    prep = tmp_path / "prep"
    shutil.copytree(prepared_phantom, prep)
    cfg = tiny_study(tmp_path, _session_tracking_uri, epochs=6, checkpoint_every=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # The command joins the session's running Ray rather than starting one of its own.
    cmd = [sys.executable, "-m", "ctvlab.cli", "train", "--data", str(prep), "--config", str(config),
           "--address", session_ray_address()]  # fmt: skip
    # The run stops at the start of epoch 3, after reporting epoch 2's checkpoint; it is killed once Ray has
    # recorded that checkpoint as the run's latest. Nothing is written after that point, so the kill is not
    # a race with the checkpoint bookkeeping.
    hold_at = 3
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), HOLD_ENV: str(hold_at)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while _recorded_latest_epoch(tmp_path) != hold_at - 1 or not list(tmp_path.glob("ray/*.held")):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, (
                f"epoch {hold_at - 1}'s checkpoint not recorded within 5 minutes"
            )
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(_checkpoint_epochs(tmp_path)) == hold_at - 1  # no later epoch was checkpointed
    killed_run = json.loads((tmp_path / "train_last_run.json").read_text())

    out = train_unet(cfg, prep, resume=True, register=False)
    # Continued from the latest recorded checkpoint with the same epoch numbering: every epoch once.
    assert [h["epoch"] for h in out.history] == list(range(6))
    assert [h["start_epoch"] for h in out.history] == [0] * hold_at + [hold_at] * (6 - hold_at)
    # The same MLflow run continued, and its curve has each epoch once.
    assert out.run_id == killed_run["mlflow_run_id"]
    pointer = json.loads((tmp_path / "train_last_run.json").read_text())
    assert pointer["run_name"] == killed_run["run_name"] and pointer["mlflow_run_id"] == out.run_id
    curve = Tracker(cfg.name, _session_tracking_uri).client.get_metric_history(out.run_id, "train_loss")
    assert sorted(m.step for m in curve) == list(range(6))


@pytest.mark.slow
def test_tracking_server_down_mid_training_loses_no_epoch(prepared_phantom, tmp_path):
    """A real `mlflow server` is stopped after epoch 1's checkpoint and started again (same port, same
    store) two epochs later: training goes on through the outage and the curve ends complete, each
    epoch once (values the server missed are sent when it answers again, or from the checkpoint's
    history at the end)."""
    EPOCHS = 32
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    ready, up_again, done = threading.Event(), threading.Event(), threading.Event()
    outage: list[tuple[int, int]] = []

    def server_life() -> None:
        with start_mlflow_server(root, port=port):
            ready.set()
            _wait_for_checkpoint(tmp_path, 1, done)
        stopped_after = max(_checkpoint_epochs(tmp_path))
        _wait_for_checkpoint(tmp_path, stopped_after + 2, done)  # two epochs reported with no server
        outage.append((stopped_after, max(_checkpoint_epochs(tmp_path))))
        with start_mlflow_server(root, port=port):
            up_again.set()
            done.wait(300)

    life = threading.Thread(target=server_life, daemon=True)
    life.start()
    try:
        assert ready.wait(180), "the mlflow server did not start"
        # Enough epochs (under a second each) to still be training when the server is back (it takes a few
        # seconds to start).
        cfg = tiny_study(tmp_path, uri, epochs=EPOCHS, checkpoint_every=1, val_every=1)
        out = train_unet(cfg, prepared_phantom, register=False)
        assert up_again.is_set() and outage  # the server went down after epoch 1 and came back
        assert [h["epoch"] for h in out.history] == list(range(EPOCHS))
        client = Tracker(cfg.name, uri).client
        for key in ("train_loss", "val_tversky", "best_val_tversky"):
            steps = [m.step for m in client.get_metric_history(out.run_id, key)]
            assert sorted(steps) == list(range(EPOCHS)), (key, steps)
        assert client.get_run(out.run_id).info.status == "FINISHED"
    finally:
        done.set()
        life.join(60)


def _wait_for_checkpoint(workdir: Path, epoch: int, stop: threading.Event) -> None:
    deadline = time.monotonic() + 300
    while not stop.is_set() and max(_checkpoint_epochs(workdir), default=-1) < epoch:
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} within 5 minutes"
        time.sleep(0.1)


def _recorded_latest_epoch(workdir: Path) -> int | None:
    """The epoch of the checkpoint that Ray Train has recorded as the run's latest (what a resume starts
    from), read from the run's checkpoint-manager snapshot; None until there is one."""
    pointer = workdir / "train_last_run.json"
    try:
        run_name = json.loads(pointer.read_text())["run_name"]
        snapshot = json.loads((workdir / "ray" / run_name / "checkpoint_manager_snapshot.json").read_text())
        latest = snapshot["latest_checkpoint_result"]
        return int(latest["metrics"]["epoch"]) if latest else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or caught mid-write


def _checkpoint_epochs(workdir: Path) -> list[int]:
    epochs = []
    for spec in workdir.glob("ray/unet-*/checkpoint_*/" + SPEC_FILE):
        try:
            epochs.append(json.loads(spec.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            continue
    return epochs


STARVED_RUN = """
import sys, yaml, ray
from pathlib import Path
from ctvlab.config import StudyConfig
from ctvlab.resources import ResourceError
from ctvlab.runtime import init_ray
from ctvlab.stages.train import train_unet

cfg = StudyConfig.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
init_ray(num_cpus=2)
pg = ray.util.placement_group([{"CPU": 2}])  # someone else holds every CPU of this Ray
ray.get(pg.ready(), timeout=120)
try:
    train_unet(cfg, Path(sys.argv[2]), register=False)
except ResourceError as e:
    print("RESOURCE-ERROR:", e)
"""


def test_a_run_starved_of_resources_fails_naming_the_pending_demand(prepared_phantom, tmp_path, tracking_uri):
    """Every CPU of the run's Ray is held by someone else, so its data tasks can never start: it fails after
    ray.stall_timeout_s, naming the demand that waits, instead of hanging. (A Ray of its own: the shared
    test Ray may still be releasing the CPUs of earlier tests, which would make "every CPU" a race.)"""
    cfg = tiny_study(tmp_path, tracking_uri)
    cfg.ray.stall_timeout_s = 5
    config = tmp_path / "starved.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    prep = tmp_path / "prep"
    shutil.copytree(prepared_phantom, prep)
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", STARVED_RUN, str(config), str(prep)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    message = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESOURCE-ERROR:")), None)
    assert message, out.stdout[-2000:] + out.stderr[-3000:]
    assert time.monotonic() - t0 < 240
    assert "training made no progress for" in message
    assert "of {0.25 CPU}" in message  # a Ray Data task of the run, as `ray status` lists it


def test_training_that_can_never_fit_fails_before_it_starts(prepared_phantom, tmp_path, tracking_uri):
    from ctvlab.resources import ResourceError

    cfg = tiny_study(tmp_path, tracking_uri, num_workers=9)  # 9 CPUs of workers on the shared 8-CPU Ray
    with pytest.raises(ResourceError) as e:
        train_unet(cfg, prepared_phantom, register=False)
    assert "the training run can never fit on this cluster: it needs 9.5 CPU" in str(e.value)
    assert "the Ray cluster has 8 CPU" in str(e.value) and "unet.train.num_workers" in str(e.value)
    assert not (tmp_path / "train_last_run.json").exists()  # nothing started


def test_each_epoch_of_a_training_run_prints_one_progress_line():
    from ctvlab.unet.batches import epoch_line

    line = epoch_line(
        2, 60, {"train_loss": 0.41234, "val_tversky": 0.7, "is_best": 1, "val_pcc": float("nan")}
    )
    assert line == "epoch 3/60 · train loss 0.4123 · val Tversky 0.7000 · best so far"
    assert epoch_line(0, 4, {"train_loss": float("nan")}) == "epoch 1/4"


def test_a_training_runs_description_counts_its_kept_epoch_from_one_and_says_how_it_was_chosen():
    from ctvlab.stages.train import training_note

    note = training_note("final", {"epoch": 1, "val_tversky": 0.5712, "val_pcc": 0.0849}, 2, "models:/m/3")
    assert note.startswith(
        "Best epoch 2 of 2 by validation Tversky (Tversky 0.57, PCC 0.08); model models:/m/3."
    )
    assert training_note("train", {}, 4, None).startswith("4 epochs.")
