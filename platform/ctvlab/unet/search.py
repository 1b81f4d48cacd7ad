"""Hyperparameter search on Ray Tune (the study's Methods: Hyperparameter search; the paper's Methods).

As in the study, the search has two steps: a coarse grid over learning rate, base features and batch size
finds the region of good settings, then random search (30 trials by default) samples within the ranges
around the best grid cell, over learning rate (log-uniform), base features, batch size, loss and Tversky β
schedule. Each trial is one Ray Train run of `ctvlab.unet.trainer` launched from a Tune function trainable;
`TuneReportCallback` passes the per-epoch metrics to Tune, whose target is the validation Tversky
coefficient (α = 0.02, β = 0.98), maximised. ASHA can stop weak trials early.

MLflow: one parent run per search, a nested child run per trial (its config and curve, written by the
trial's rank-0 worker), and on the parent the search space, the narrowed ranges, a table of every trial,
the best configuration and metric. The best trial's model is registered as the model of the study.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError, folder_bytes
from ctvlab.study import BEST_SELECTION_METRIC, SELECTION_METRIC
from ctvlab.unet.search_progress import progress_callback, say
from ctvlab.unet.trial import TRIAL_PARAMS, SearchContext, run_trial, stop_tags, trial_model_dir

__all__ = ["TRIAL_PARAMS", "run_search", "trial_model_dir"]


# --- the search driver -----------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str | None
    trials: pd.DataFrame
    best_params: dict[str, Any]
    best_metric: float
    best_model_dir: Path | None
    space: dict[str, Any]
    n_failed: int
    elapsed_s: float
    model_uri: str | None = None


def param_space_with_hooks(space: dict[str, Any], fail_trials: int) -> dict[str, Any]:
    if fail_trials:
        from ray import tune

        return {**space, "_inject_failure": tune.grid_search([True] * fail_trials + [False])}
    return space


def run_search(
    cfg: StudyConfig,
    prep: Path,
    param_space: dict[str, Any],
    *,
    name: str,
    num_samples: int,
    parent_run_id: str | None,
    resume: bool = False,
    use_asha: bool | None = None,
    extra_spec: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Run (or resume) one Tune search of U-Net trials; returns one row per trial."""
    import ray.tune
    from ray import tune

    from ctvlab.splits import load_split
    from ctvlab.tracking import resolve_tracking_uri
    from ctvlab.unet.trainer import run_view

    prep = Path(prep).resolve()
    split = load_split(prep)
    tcfg = cfg.tune
    storage = Path(cfg.workdir, "ray").resolve()
    ctx = SearchContext(
        study=cfg.model_dump(mode="json"), prep=str(prep),
        train_ids=split.patients("train"), val_ids=split.patients("val"),
        storage=str(storage / "trials"), search_name=name, parent_run_id=parent_run_id,
        experiment=cfg.tracking.experiment or cfg.name, tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri),
        view=run_view(prep, cfg.unet, split.patients("train"), split.patients("val")),
        extra_spec=extra_spec or {},
    )  # fmt: skip
    # Create the store and the experiment here, once: concurrent trials creating a new SQLite store would
    # race on its schema migrations. The trials get its id (a placeholder while the store is away).
    from ctvlab.tracking import tracker_for

    tracker = tracker_for(cfg)
    ctx.experiment_id, ctx.spool = tracker.experiment_id, str(tracker.spool.root)
    from ctvlab import resources as res

    demand, cluster = res.trial_demand(cfg), res.cluster_view(cfg.ray.max_resources)
    res.check_fits(demand, cluster)
    at_once = res.trials_at_once(demand, cluster, tcfg.max_concurrent_trials)
    kept = f", with {demand.data_cpus:g} CPU kept for Ray Data" if demand.data_cpus else ""
    say(
        f"search {name}: {at_once} trial(s) at once, each holding {res.format_resources(demand.held())}"
        f"{kept}; {cluster.source} has {res.format_resources(cluster.total)}"
    )
    # A one-worker trial trains in its own process, which holds the trial's resources; a multi-worker
    # trial's process holds a CPU share and its Ray Train workers get their own placement group.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), demand.driver)
    every = cfg.ray.progress_every_s
    watch = res.StallWatch(
        f"search {name}", cfg.ray.stall_timeout_s, poll_s=min(10.0, cfg.ray.stall_timeout_s / 5),
        report_every_s=every, on_stall=res.interrupt_main, say=say,
    )  # fmt: skip
    progress = progress_callback(name, tcfg.epochs_per_trial, watch, every)
    path = storage / "tune" / name
    asha = tcfg.asha.enabled if use_asha is None else use_asha
    if resume and tune.Tuner.can_restore(str(path)):
        check_private_state(path)
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_errored=False, restart_errored=False
        )
    else:
        if path.exists():
            shutil.rmtree(path)
        scheduler = None
        if asha:
            scheduler = ray.tune.schedulers.ASHAScheduler(
                time_attr="training_iteration", max_t=tcfg.epochs_per_trial,
                grace_period=min(tcfg.asha.grace_period, tcfg.epochs_per_trial),
                reduction_factor=tcfg.asha.reduction_factor,
            )  # fmt: skip
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=SELECTION_METRIC, mode="max", num_samples=num_samples, scheduler=scheduler,
                # A slot's next trial runs in the process its last one used: PyTorch, MONAI and MLflow are
                # imported once per slot, not once per trial (about 9 s of a trial's start on 2 cores).
                reuse_actors=True,
                # The limit goes to the generator: Tune ignores `max_concurrent_trials` next to one.
                search_alg=tune.search.BasicVariantGenerator(
                    random_state=tcfg.seed, max_concurrent=at_once
                ),
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage / "tune"),
                failure_config=tune.FailureConfig(max_failures=tcfg.trial_max_failures),
                # A one-worker trial's own checkpoints (the latest is always kept, for a resume).
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute=SELECTION_METRIC, checkpoint_score_order="max"
                ),
                verbose=0, callbacks=[progress],
            ),
        )  # fmt: skip
    # On a stall the watch interrupts the search as Ctrl+C would: Tune stops its trials and returns.
    with watch:
        grid = tuner.fit()
    if watch.message:
        raise res.ResourceError(watch.message)
    table = trials_table(grid)
    planned = tcfg.epochs_per_trial * max(len(table), num_samples)
    trials_dirs = list(Path(ctx.storage).glob(f"{name}-*"))
    full = search_storage_error(
        [r.error for r in grid], storage, written_bytes=folder_bytes(path) + sum(folder_bytes(d) for d in trials_dirs),
        epochs_done=int(table["epochs_run"].sum()), epochs_left=max(0, planned - int(table["epochs_run"].sum())),
    )  # fmt: skip
    if full is not None:  # the other trials failed or will fail the same way: stop here, with the estimate
        raise full
    # A failed trial's error can name a patient or a folder: the table goes to the shared tracking store.
    from ctvlab.splits import pseudonymise
    from ctvlab.tracking import scrub_text

    names = pseudonymise(prep, [p for role in ("train", "val", "test") for p in split.patients(role)])
    table["error"] = [scrub_text(e, names) if isinstance(e, str) else e for e in table["error"]]
    table["model_dir"] = [str(trial_model_dir(ctx.storage, name, t)) for t in table["trial_id"]]
    tracker.drain()  # what the trials kept while the store was away goes first: their own ends are in it
    finish_stopped_trials(ctx, table, tracker)
    return table


def search_storage_error(errors, folder: Path, written_bytes: float, epochs_done: int, epochs_left: int):
    """The search's `StorageError` when a trial failed because the search's storage cannot be written (a
    full disk while a checkpoint or a model was written): named for the storage folder, with the space the
    search still needs at the rate its epochs wrote so far. None when no trial failed that way.

    Args:
        errors: each trial's error (None for a trial without one), as Ray hands them to the driver: the
            original exception, one that carries it as its cause, or only its traceback's text.
    """
    import re

    from ctvlab.errors import FULL, space_needed, storage_error

    for error in errors:
        seen, found = error, None
        while seen is not None and found is None:
            found = storage_error(seen)
            seen = getattr(seen, "cause", None) or seen.__cause__
        if found is None and error is not None:  # only the text crossed the process boundary
            m = re.search(r"OSError: \[Errno (\d+)\]", str(error))
            if m:
                found = storage_error(OSError(int(m.group(1)), os.strerror(int(m.group(1)))))
        if found is not None:
            needs = space_needed("the search", written_bytes, epochs_done, epochs_left, unit="trial epoch")
            return storage_error(OSError(found.errno, os.strerror(found.errno)), folder,
                                 needs=needs if found.errno in FULL else None)  # fmt: skip
    return None


def check_private_state(path: Path) -> None:
    """Refuse to restore a search whose state others could have written: `Tuner.restore` unpickles it, and
    unpickling runs code. The working directory must be trusted (docs/explanation/security.md).

    Raises:
        CtvlabError: an entry under `path` (or `path` itself) is writable by its group or by others, or is
            owned by another user.
    """
    uid = os.getuid()
    for entry in [path, *path.rglob("*")]:
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o022 or st.st_uid != uid:
            who = "writable by others" if st.st_mode & 0o022 else f"owned by user {st.st_uid}"
            raise CtvlabError(
                f"refusing to resume the search from {path}: {entry} is {who}, and resuming unpickles that "
                "state (which can run code). Check who changed it; if it is yours, `chmod -R go-w` it and "
                "resume, else start a new search."
            )


def finish_stopped_trials(ctx: SearchContext, table: pd.DataFrame, tracker) -> None:
    """Complete the trials that the scheduler ended from outside.

    ASHA stops a trial (at a rung, or at `max_t`) inside the trial's report, and Tune then ends the trial's
    process without waiting for it (`FunctionTrainable.cleanup` joins the training thread with timeout 0):
    a trial's own end (its curve, its best epoch's summary, its model, FINISHED) is cut off wherever it was,
    the more often the slower the tracking server. The driver completes each such run (still RUNNING) from
    what the trial left on the shared storage: its history (a one-worker trial writes it before every
    report; a Ray Train trial's checkpoints carry it) and its model (a one-worker trial exports its best
    model at every improvement; a Ray Train trial's best kept checkpoint becomes its model). The run then
    holds what an undisturbed trial's does and ends FINISHED with how it ended (`stop_tags`): it ran without
    error, and FAILED is for errors.
    """
    from ctvlab.unet.trainer import best_summary, export_model

    planned = StudyConfig.model_validate(ctx.study).tune.epochs_per_trial
    for row in table.itertuples():
        if row.status == "ERROR":
            continue
        run_dir = Path(ctx.storage) / f"{ctx.search_name}-{row.trial_id}"
        dst = Path(row.model_dir)
        if not dst.exists():
            ckpt = best_stored_checkpoint(run_dir)
            if ckpt is not None:
                import ray.train

                export_model(ray.train.Checkpoint.from_directory(str(ckpt)), dst,
                             {**ctx.extra_spec, "trial_id": row.trial_id})  # fmt: skip
        history = stored_history(ctx, row.trial_id)
        best = next((h for h in reversed(history) if h.get("is_best")), {})
        query = f"tags.`ctvlab.trial_id` = '{row.trial_id}' and tags.`ctvlab.search` = '{ctx.search_name}'"
        # One write (kept whole while the store is away): the runs of this trial still RUNNING then.
        tracker.finish_if_running(query, stop_tags(int(row.epochs_run), planned), dst if dst.exists() else None,
                                  history=history, summary=best_summary(best, history) if history else {})  # fmt: skip


def stored_history(ctx: SearchContext, trial_id: str) -> list[dict[str, Any]]:
    """A trial's history from the storage: a one-worker trial's history file, else the latest checkpoint of
    its Ray Train run (each carries the history up to its epoch); [] when there is none."""
    from ctvlab.unet.trainer import HISTORY_FILE, SPEC_FILE
    from ctvlab.unet.trial import trial_history_file

    candidates = [trial_history_file(ctx.storage, ctx.search_name, trial_id)]
    run_dir = Path(ctx.storage) / f"{ctx.search_name}-{trial_id}"
    epochs = []
    for d in run_dir.glob("checkpoint_*"):
        try:
            epochs.append((json.loads((d / SPEC_FILE).read_text())["epoch"], d / HISTORY_FILE))
        except (OSError, ValueError, KeyError):
            continue
    candidates += [path for _, path in sorted(epochs, reverse=True)]
    for path in candidates:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return []


def best_stored_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder of a Ray Train run with the highest validation Tversky at its own epoch
    (each checkpoint holds the history up to it); the latest when none has a finite score."""
    from ctvlab.unet.trainer import HISTORY_FILE, SPEC_FILE

    scored = []
    for d in sorted(Path(run_dir).glob("checkpoint_*")):
        try:
            epoch = json.loads((d / SPEC_FILE).read_text())["epoch"]
            history = json.loads((d / HISTORY_FILE).read_text())
        except (OSError, ValueError, KeyError):
            continue
        score = next(
            (h.get(SELECTION_METRIC, math.nan) for h in history if h.get("epoch") == epoch), math.nan
        )
        scored.append((score if math.isfinite(score) else -math.inf, epoch, d))
    return max(scored)[2] if scored else None


def trials_table(grid) -> pd.DataFrame:
    """One row per trial: its parameters, best and last validation Tversky, epochs run, status, error."""
    rows = []
    for r in grid:
        cfg = r.config or {}
        metrics = r.metrics or {}
        df = r.metrics_dataframe
        best = (
            float(df[SELECTION_METRIC].max())
            if df is not None and SELECTION_METRIC in df
            else metrics.get(BEST_SELECTION_METRIC, np.nan)
        )
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(r.path).name,
                "status": "ERROR" if r.error else "TERMINATED",
                "lr": cfg.get("lr"),
                "base_features": cfg.get("base_features"),
                "batch_size": cfg.get("batch_size"),
                "loss": cfg.get("loss"),
                "beta_schedule": json.dumps(cfg.get("beta_schedule"), sort_keys=True),
                "modality_set": cfg.get("modality_set"),
                BEST_SELECTION_METRIC: best,
                "last_" + SELECTION_METRIC: metrics.get(SELECTION_METRIC, np.nan),
                "epochs_run": int(df["epoch"].max() + 1) if df is not None and "epoch" in df else 0,
                "train_seconds": float(df["epoch_seconds"].sum())
                if df is not None and "epoch_seconds" in df
                else 0.0,
                "error": _error_line(r.error),
                "path": r.path,
            }
        )
    return pd.DataFrame(rows)


def _error_line(error: BaseException | None) -> str:
    """The exception's own line ("RuntimeError: ...") out of Ray's wrapped traceback, without colours."""
    import re

    if error is None:
        return ""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(error).splitlines()]
    lines = [x for x in lines if x]
    return (lines[-1] if lines else type(error).__name__)[:300]


def best_trial(trials: pd.DataFrame) -> pd.Series:
    ok = trials[(trials["status"] != "ERROR") & trials[BEST_SELECTION_METRIC].notna()]
    if ok.empty:
        raise CtvlabError("every trial of the search failed; see the trial errors in the summary table")
    return ok.loc[ok[BEST_SELECTION_METRIC].idxmax()]
