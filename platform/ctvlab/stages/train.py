"""The training stage (`ctvlab train`): one U-Net training run on Ray Train with its MLflow run, checkpoints,
resume, the best model exported and registered."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError, DataError
from ctvlab.stages.registry import log_model
from ctvlab.stages.registry import register as register_model
from ctvlab.tracking import NOTE, STAGE_DESCRIPTIONS
from ctvlab.unet.trainer import (
    HOLD_ENV,
    MODEL_ARTIFACT,
    best_checkpoint,
    best_summary,
    build_trainer,
    checkpoint_history,
    export_model,
    provenance_spec,
)

TRAIN_POINTER = "train_last_run.json"  # in the working directory: the last training run, for --resume


@dataclass
class TrainOutcome:
    """What a finished training run produced."""

    run_id: str | None
    model_dir: Path
    model_uri: str | None
    best_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    metrics_replayed: int = 0  # epoch values the tracking server missed during training, logged at the end


def train_unet(
    cfg: StudyConfig,
    prep: Path | None = None,
    *,
    resume: bool = False,
    run_name: str | None = None,
    register: bool = True,
    parent_run_id: str | None = None,
    inject_failure_at: int | None = None,
    console=None,
    settings_key: str | None = None,
    run_label: str = "train",
) -> TrainOutcome:
    """Train the U-Net of `cfg.unet` on the split of a prepared dataset; log and register the best model.

    Args:
        cfg: the study config (unet, split, tracking, ray sections).
        prep: prepared dataset folder (default: the study's).
        resume: continue the last interrupted run of this study from its latest checkpoint.
        run_name: Ray run name (default: a new timestamped one, or the last one when resuming).
        register: register the best model in the MLflow Model Registry.
        parent_run_id: nest the MLflow run under this one (used by the search).
        inject_failure_at: test hook: rank 0 raises once at this epoch (fault-tolerance tests).
        settings_key: `ctvlab run`'s key of the model stage, recorded in the run's pointer file so that an
            interrupted run of the same settings and data is continued (`interrupted_run`).
        run_label: the MLflow run's name and `ctvlab.stage` tag ("final" for the model trained after a search).
    """
    from ctvlab.runtime import start_unet_stage
    from ctvlab.splits import check_disjoint, load_split, pseudonymise
    from ctvlab.tracking import base_tags, complete_curve, tracker_for

    prep = Path(prep or cfg.prep_dir).resolve()
    split = load_split(prep)
    train_ids, val_ids, test_ids = split.patients("train"), split.patients("val"), split.patients("test")
    check_disjoint(train=train_ids, val=val_ids, test=test_ids)
    if not train_ids or not val_ids:
        raise DataError(f"the split of {prep} has no training or no validation patients")
    from ctvlab.unet.inputs import require_channels

    require_channels(prep, [*train_ids, *val_ids, *test_ids], cfg.unet.model.modality_set)
    ucfg = cfg.unet
    storage = Path(cfg.workdir, "ray").resolve()
    pointer = Path(cfg.workdir, TRAIN_POINTER).resolve()
    previous = json.loads(pointer.read_text()) if pointer.exists() else None
    if resume:
        if previous is None:
            raise CtvlabError(f"nothing to resume: no earlier training run recorded in {pointer}")
        if (previous.get("split_digest"), previous.get("dataset_digest")) != (
            split.digest,
            split.dataset_digest,
        ):
            # The split digest alone misses a dataset prepared again with other settings.
            raise CtvlabError(
                "cannot resume: the prepared data or the split changed since that run; start a new run instead"
            )
        run_name = run_name or previous["run_name"]
        mlflow_run_id = previous.get("mlflow_run_id")
    else:
        run_name = run_name or time.strftime("unet-%Y%m%d-%H%M%S")
        mlflow_run_id = None

    start_unet_stage(cfg, search=False)
    tracker = tracker_for(cfg)
    names = pseudonymise(prep, train_ids + val_ids)
    if mlflow_run_id is None:
        mlflow_run_id = tracker.start_run(
            run_label, base_tags(run_label, split.dataset_digest, split.digest), parent_run_id=parent_run_id
        )
        log = tracker.logger(mlflow_run_id)
        log.params({"unet": ucfg.model_dump(mode="json"), "n_train": len(train_ids), "n_val": len(val_ids)})
        log.dataset("prepared", split.dataset_digest, str(prep), context="training")
        log.json({"train": sorted(names[p] for p in train_ids), "val": sorted(names[p] for p in val_ids)},
                 "patients.json", "split")  # fmt: skip
    from ctvlab.atomic import write_json_atomic

    record = {
        "run_name": run_name,
        "mlflow_run_id": mlflow_run_id,
        "split_digest": split.digest,
        "dataset_digest": split.dataset_digest,
        "settings_key": settings_key,
        "finished": False,
    }
    write_json_atomic(pointer, record)

    extra = {"mlflow_run_id": mlflow_run_id, "experiment": tracker.experiment_name,
             "tracking_uri": tracker.tracking_uri, "spool": str(tracker.spool.root), "print_epochs": True}  # fmt: skip
    if inject_failure_at is not None:
        extra["inject_failure"] = {"epoch": inject_failure_at, "marker": str(storage / f"{run_name}.fault")}
    if os.environ.get(HOLD_ENV):
        extra["hold"] = {"epoch": int(os.environ[HOLD_ENV]), "marker": str(storage / f"{run_name}.held")}
    from ctvlab.resources import ResourceError, StallWatch, interrupt_main

    # Ray Data (building the datasets) and Ray Train (starting its worker group) wait for resources without
    # a word: the watch stops the run, as Ctrl+C would, when demands stay pending with no progress for
    # ray.stall_timeout_s.
    watch = StallWatch("training", cfg.ray.stall_timeout_s, poll_s=min(10.0, cfg.ray.stall_timeout_s / 5),
                       report_every_s=cfg.ray.progress_every_s, on_stall=interrupt_main)  # fmt: skip
    try:
        with watch:
            trainer = build_trainer(
                prep, ucfg, train_ids, val_ids, storage_path=storage, run_name=run_name, loop_extra=extra
            )
            result = trainer.fit()
    except CtvlabError:
        tracker.end_failed(mlflow_run_id)
        raise
    except (Exception, KeyboardInterrupt) as e:  # failed beyond max_failures, or stopped by the watch
        tracker.end_failed(mlflow_run_id)
        if watch.message:
            raise ResourceError(watch.message) from None
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CtvlabError(
            f"training failed after {ucfg.train.max_failures} restart(s): {e}. Checkpoints are kept in "
            f"{storage / run_name}; fix the cause and run again with --resume."
        ) from None
    if watch.message:  # Ray Train returned after the watch aborted it
        tracker.end_failed(mlflow_run_id)
        raise ResourceError(watch.message)
    ckpt, best = best_checkpoint(result)
    if ckpt is None:
        raise CtvlabError("training finished without a checkpoint; increase unet.train.epochs")
    model_dir = Path(cfg.results_dir, "model").resolve()
    export_model(ckpt, model_dir, {
        **provenance_spec(prep, split),
        "mlflow_run_id": mlflow_run_id,
    })  # fmt: skip
    from ctvlab.stages.calibrate import calibrate

    calibration = calibrate(model_dir, prep, cfg, val_ids)  # the CTV thresholds travel with the model
    log = tracker.logger(mlflow_run_id)
    log.metrics({"ctv_threshold": calibration["threshold"],
                 **{f"ctv_{r['name']}_threshold": r["threshold"] for r in calibration["coverage"] if r["threshold"] is not None}})  # fmt: skip
    history = checkpoint_history(result)
    replayed = complete_curve(log, history)
    log.metrics(best_summary(best, history))
    log_model(log, model_dir, MODEL_ARTIFACT)
    model_uri = f"runs:/{mlflow_run_id}/{MODEL_ARTIFACT}"
    if register:
        tracker.drain()  # the run's kept writes first, and the registration answered at once
        spec = json.loads((model_dir / "model.json").read_text())
        version = register_model(tracker, cfg, mlflow_run_id, spec, artifact_path=MODEL_ARTIFACT)
        # Kept with the spool while the server is away: `evaluate` then finds the version by its tags.
        model_uri = f"models:/{ucfg.registered_model_name}/{version.version}" if version is not None else None
    log.tags({NOTE: training_note(run_label, best, len(history), model_uri)})
    tracker.end_run(mlflow_run_id, "FINISHED")
    write_json_atomic(pointer, {**record, "finished": True})
    return TrainOutcome(
        run_id=mlflow_run_id, model_dir=model_dir, model_uri=model_uri,
        best_metrics={k: float(v) for k, v in best.items() if isinstance(v, (int, float))},
        best_epoch=int(best.get("epoch", -1)), epochs_run=len(history), history=history,
        metrics_replayed=replayed,
    )  # fmt: skip


def training_note(run_label: str, best: dict, epochs: int, model_uri: str | None) -> str:
    """The training run's description in the MLflow UI: what the stage did, then its headline (the kept
    epoch, counted from 1 as the progress lines count it, chosen by validation Tversky, with its validation
    Tversky and PCC) and the model it left, so that the runs table says it in one line."""
    scores = [f"{label} {float(best[key]):.2f}" for key, label in (("val_tversky", "Tversky"), ("val_pcc", "PCC"))
              if isinstance(best.get(key), (int, float))]  # fmt: skip
    headline = (f"Best epoch {int(best['epoch']) + 1} of {epochs} by validation Tversky ({', '.join(scores)})"
                if scores and isinstance(best.get("epoch"), (int, float)) else f"{epochs} epochs")  # fmt: skip
    model = f"; model {model_uri}" if model_uri else ""
    return f"{headline}{model}.\n\n{STAGE_DESCRIPTIONS.get(run_label, STAGE_DESCRIPTIONS['train'])}"


def interrupted_run(pointer: Path, settings_key: str) -> bool:
    """True when `pointer` (train_last_run.json, tune_last_search.json) records a run of these settings
    (`ctvlab run`'s stage key) that started and did not finish: `ctvlab run` continues it."""
    try:
        state = json.loads(Path(pointer).read_text())
    except (OSError, ValueError):
        return False
    unfinished = state.get("phase") != "done" if "phase" in state else not state.get("finished", True)
    return state.get("settings_key") == settings_key and unfinished
