"""One trial of a search: the Tune function trainable that trains one U-Net configuration.

A trial of one worker runs the training loop (`ctvlab.unet.loop`) in its own process with its examples in
memory: no Ray Train worker group and no Ray Data pipeline to start per trial. A trial of several workers
launches a Ray Train run and passes its metrics on to Tune (`TuneReportCallback`). Each trial has its own
nested MLflow run (config, curve, model); a trial keeps its best model exported at every improvement, so a
trial that the scheduler stops inside its report still has its model, and its run ends FINISHED with how it
ended (`stop_tags`), never FAILED.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctvlab.config import StudyConfig
from ctvlab.unet.spaces import trial_unet_config

TRIAL_PARAMS = ("lr", "base_features", "batch_size", "loss", "beta_schedule", "modality_set")


@dataclass
class SearchContext:
    """Everything a trial needs besides its sampled parameters (put in the object store once)."""

    study: dict[str, Any]
    prep: str
    train_ids: list[str]
    val_ids: list[str]
    storage: str
    search_name: str
    parent_run_id: str | None
    experiment: str
    tracking_uri: str
    experiment_id: str | None = (
        None  # the driver's (a placeholder while the store is away): no lookup per trial
    )
    spool: str | None = None  # the study's tracking spool: what the store cannot take now waits there
    view: dict[str, Any] = field(default_factory=dict)  # the models' view keys (`train.run_view`)
    extra_spec: dict[str, Any] = field(default_factory=dict)


# The examples of the last search this process trained a trial of. Tune hands a slot's next trial to the
# same process (`reuse_actors`), and every one-worker trial of a search reads the same patients: read once,
# they serve each later trial (0.4 s a trial on the demo's 20 patients, seconds on a study's). One entry, so
# a process never holds two datasets; read-only arrays, so no trial can change what the next one sees.
_EXAMPLES: dict[tuple, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}


def search_examples(ctx: SearchContext, modality_set: str, load) -> tuple[list[dict], list[dict]]:
    """The search's training and validation examples (`load(prep, ids, modality_set, view)`), read once
    per process and data: the key holds the prepared folder, the dataset record's identity (so data
    prepared again is read again), the patients, the input set and the models' view."""
    import numpy as np

    prep = Path(ctx.prep)
    record = (prep / "dataset.json").stat()
    key = (str(prep), record.st_mtime_ns, record.st_size, tuple(ctx.train_ids), tuple(ctx.val_ids),
           modality_set, json.dumps(ctx.view, sort_keys=True, default=str))  # fmt: skip
    if key not in _EXAMPLES:
        _EXAMPLES.clear()
        sets = (
            load(prep, ctx.train_ids, modality_set, ctx.view),
            load(prep, ctx.val_ids, modality_set, ctx.view),
        )
        for example in (ex for examples in sets for ex in examples):
            for value in example.values():
                if isinstance(value, np.ndarray):
                    value.setflags(write=False)
        _EXAMPLES[key] = sets
    return _EXAMPLES[key]


def run_trial(params: dict[str, Any], ctx: SearchContext) -> None:
    """Tune function trainable: one U-Net training run with the trial's parameters."""
    import ray
    import ray.tune

    from ctvlab.tracking import Tracker, base_tags

    study = StudyConfig.model_validate(ctx.study)
    ucfg = trial_unet_config(study.unet, params, study.tune)
    tctx = ray.tune.get_context()
    trial_id = tctx.get_trial_id()
    tracker = Tracker(ctx.experiment, ctx.tracking_uri, spool=ctx.spool, experiment_id=ctx.experiment_id)
    shown = {k: params[k] for k in TRIAL_PARAMS if k in params}
    node = ray.get_runtime_context().get_node_id()  # where the trial ran, for a cluster's post-mortems
    run_id = tracker.start_run(f"trial-{trial_id}", {**base_tags("tune-trial"), "ctvlab.trial_id": trial_id,
                                                     "ctvlab.search": ctx.search_name, "ctvlab.ray_node": node},
                               ctx.parent_run_id)  # fmt: skip
    log = tracker.logger(run_id)
    log.params({"trial": shown, "unet": ucfg.model_dump(mode="json")})
    with tracker.failing(run_id):
        if params.get("_inject_failure"):
            raise RuntimeError("injected trial failure (fault-tolerance test hook)")
        train = _train_in_trial if ucfg.train.num_workers == 1 else _train_with_ray_train
        train(ucfg, ctx, trial_id, run_id, log)
    tracker.end_run(run_id, "FINISHED")


def _train_in_trial(ucfg, ctx: SearchContext, trial_id: str, run_id: str, log) -> None:
    """One worker: the training loop in this process, reporting to Tune; the best model exported whenever
    the validation score improves (a trial that ASHA stops inside its report keeps its model)."""
    import ray.tune
    import torch

    from ctvlab.atomic import write_json_atomic
    from ctvlab.unet.loop import STATE_FILE, LocalSession, load_examples, run_training
    from ctvlab.unet.trainer import export_model_dir

    train, val = search_examples(ctx, ucfg.model.modality_set, load_examples)
    model_dir = trial_model_dir(ctx.storage, ctx.search_name, trial_id)
    extra = {**ctx.extra_spec, "trial_id": trial_id, "mlflow_run_id": run_id}

    reported: list[dict[str, Any]] = []  # the trial's history, from its first epoch (also after a restore)
    history_file = trial_history_file(ctx.storage, ctx.search_name, trial_id)

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        reported.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        # On the storage before Tune sees the epoch: Tune may stop the trial inside this report and end its
        # process without waiting, and the driver then completes the trial's run from this file.
        write_json_atomic(history_file, reported)
        if checkpoint is not None and metrics.get("is_best"):
            export_model_dir(checkpoint, model_dir, extra)
        if checkpoint is None:
            ray.tune.report(metrics)
        else:
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(str(checkpoint)))

    def restored() -> dict[str, Any] | None:
        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        reported[:] = json.loads(state["history"])
        return state

    device = torch.device("cuda" if ucfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    config = {"unet": ucfg.model_dump(mode="json"), "view": ctx.view, "mlflow_run_id": run_id,
              "tracking_uri": ctx.tracking_uri, "spool": ctx.spool,
              "threads_per_worker": max(1, math.ceil(ucfg.train.cpus_per_worker))}  # fmt: skip
    try:
        history = run_training(config, LocalSession(train, val, report, device, restored))
    except SystemExit as stop:  # the scheduler ended the trial inside its report (ASHA, or max_t)
        if stop.code not in (0, None):
            raise
        # Best effort: Tune ends this process without waiting for these writes; whatever they leave out,
        # the driver completes from the history file (`finish_stopped_trials`).
        _record_trial(log, model_dir, reported)
        log.tags(stop_tags(len(reported), ucfg.train.epochs))
        log.tracker.end_run(log.run_id, "FINISHED")
        raise
    _record_trial(log, model_dir, history)


def _record_trial(log, model_dir: Path, history: list[dict[str, Any]]) -> None:
    """The trial's curve completed (epochs an unreachable server missed), its model and best metrics."""
    from ctvlab.tracking import complete_curve
    from ctvlab.unet.trainer import best_summary

    complete_curve(log, history)
    best = next((h for h in reversed(history) if h.get("is_best")), {})
    if model_dir.exists():
        log.artifact(model_dir, "model")
    log.metrics(best_summary(best, history))


def stop_tags(epochs_run: int, planned: int) -> dict[str, str]:
    """How a trial that the scheduler ended did end: after all its epochs, or stopped early at epoch N."""
    return {"ctvlab.stopped_early": str(epochs_run < planned).lower(), "ctvlab.epochs_run": str(epochs_run),
            "ctvlab.stopped_by": "scheduler"}  # fmt: skip


def _train_with_ray_train(ucfg, ctx: SearchContext, trial_id: str, run_id: str, log) -> None:
    """Several workers: a Ray Train run launched from this trial, its metrics passed on to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ctvlab.tracking import complete_curve
    from ctvlab.unet.trainer import (
        best_checkpoint,
        best_summary,
        build_trainer,
        checkpoint_history,
        export_model,
    )

    trainer = build_trainer(
        Path(ctx.prep), ucfg, ctx.train_ids, ctx.val_ids,
        storage_path=ctx.storage, run_name=f"{ctx.search_name}-{trial_id}",
        loop_extra={"mlflow_run_id": run_id, "experiment": ctx.experiment, "tracking_uri": ctx.tracking_uri,
                    "spool": ctx.spool},
        callbacks=[TuneReportCallback()],
    )  # fmt: skip
    result = trainer.fit()
    history = checkpoint_history(result)
    complete_curve(log, history)  # epochs an unreachable server missed
    ckpt, best = best_checkpoint(result)
    if ckpt is not None:
        model_dir = export_model(ckpt, trial_model_dir(ctx.storage, ctx.search_name, trial_id),
                                 {**ctx.extra_spec, "trial_id": trial_id, "mlflow_run_id": run_id})  # fmt: skip
        log.artifact(model_dir, "model")
    log.metrics(best_summary(best, history))


def trial_history_file(storage: str | Path, search_name: str, trial_id: str) -> Path:
    """Where a one-worker trial keeps its history (every epoch's metrics), beside its model."""
    return Path(storage) / f"{search_name}-{trial_id}" / "history.json"


def trial_model_dir(storage: str | Path, search_name: str, trial_id: str) -> Path:
    """Where a trial's best model is exported: next to its Ray Train run, on the study's storage (not in
    Tune's local trial folder, which reaches the storage only when the search ends)."""
    return Path(storage) / f"{search_name}-{trial_id}" / "model"
