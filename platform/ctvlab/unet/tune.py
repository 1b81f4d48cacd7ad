"""Hyperparameter search on Ray Tune (SPEC: Hyperparameter search; the paper's Methods).

As in the study, the search has two steps: a coarse grid over learning rate, base features and batch size
finds the region of good settings, then random search (30 trials by default) samples within the ranges
around the best grid cell, over learning rate (log-uniform), base features, batch size, loss and Tversky β
schedule. Each trial is one Ray Train run of `ctvlab.unet.train` launched from a Tune function trainable;
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.atomic import atomic_folder
from ctvlab.config import BetaSchedule, GridSpace, SearchSpace, StudyConfig, TuneConfig, UNetConfig
from ctvlab.errors import CtvlabError, DataError
from ctvlab.study import BEST_SELECTION_METRIC, SELECTION_METRIC

TRIAL_PARAMS = ("lr", "base_features", "batch_size", "loss", "beta_schedule", "modality_set")


# --- search spaces (pure) ------------------------------------------------------------------------


def trial_unet_config(base: UNetConfig, params: dict[str, Any], tcfg: TuneConfig) -> UNetConfig:
    """The U-Net settings of one trial: the study's settings with the trial's sampled values."""
    u = base.model_copy(deep=True)
    if "lr" in params:
        u.optim.lr = float(params["lr"])
    if "base_features" in params:
        u.model.base_features = int(params["base_features"])
    if "batch_size" in params:
        u.train.batch_size = int(params["batch_size"])
    if "loss" in params:
        u.loss.name = params["loss"]
    if "beta_schedule" in params:
        u.loss.beta = BetaSchedule.model_validate(params["beta_schedule"])
    if "modality_set" in params:
        u.model.modality_set = params["modality_set"]
    u.train.epochs = tcfg.epochs_per_trial
    u.train.cpus_per_worker = tcfg.cpus_per_trial
    if tcfg.gpus_per_trial > 0:
        u.train.use_gpu = True
        u.train.gpus_per_worker = tcfg.gpus_per_trial
    u.train.checkpoint_every = max(u.train.checkpoint_every, tcfg.epochs_per_trial)  # best + last suffice
    return u


def grid_param_space(grid: GridSpace, space: SearchSpace, modality_set: str) -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.grid_search(list(grid.lr)),
        "base_features": tune.grid_search(list(grid.base_features)),
        "batch_size": tune.grid_search(list(grid.batch_size)),
        "loss": space.loss[0],
        "beta_schedule": space.beta_schedule[0].model_dump(mode="json"),
        "modality_set": modality_set,
    }


def random_param_space(space: SearchSpace, modality_set: str) -> dict[str, Any]:
    from ray import tune

    def choice(values):
        return tune.choice(values) if len(values) > 1 else values[0]

    return {
        "lr": tune.loguniform(space.lr.low, space.lr.high) if space.lr.high > space.lr.low else space.lr.low,
        "base_features": choice(list(space.base_features)),
        "batch_size": choice(list(space.batch_size)),
        "loss": choice(list(space.loss)),
        "beta_schedule": choice([b.model_dump(mode="json") for b in space.beta_schedule]),
        "modality_set": modality_set,
    }


def _neighbours(values: list[float], best: float) -> tuple[float, float]:
    """The grid values on either side of `best` (itself at an edge of the grid)."""
    ordered = sorted(set(values))
    i = ordered.index(best)
    return ordered[max(i - 1, 0)], ordered[min(i + 1, len(ordered) - 1)]


def narrow_space(grid_results: pd.DataFrame, grid: GridSpace, space: SearchSpace) -> SearchSpace:
    """Random-search ranges from the grid step: around the best grid cell, bounded by its neighbours.

    Learning rate: log-uniform between the geometric midpoints of the best grid value and its neighbours
    (the best value ×/÷ the grid ratio at an edge). Base features and batch size: the choices of the
    configured space strictly between the best grid value's neighbours, open beyond an edge of the grid,
    and always the best value itself.

    Args:
        grid_results: one row per finished grid trial with columns lr, base_features, batch_size and
            BEST_SELECTION_METRIC.
    """
    ok = grid_results.dropna(subset=[BEST_SELECTION_METRIC])
    if ok.empty:
        return space
    best = ok.loc[ok[BEST_SELECTION_METRIC].idxmax()]
    lo, hi = _neighbours(list(grid.lr), float(best["lr"]))
    b = float(best["lr"])
    ratio = (hi / lo) ** 0.5 if hi > lo else 3.0
    low = math.sqrt(lo * b) if lo < b else b / ratio
    high = math.sqrt(hi * b) if hi > b else b * ratio

    def between(choices: list[int], grid_values: list[int], best_value: int) -> list[int]:
        lo_, hi_ = _neighbours(list(grid_values), best_value)
        above = lo_ < best_value  # at an edge of the grid, the range stays open beyond it
        below = hi_ > best_value
        kept = {c for c in choices if (not above or c > lo_) and (not below or c < hi_)}
        return sorted(kept | {best_value})

    return space.model_copy(
        update={
            "lr": space.lr.model_copy(update={"low": low, "high": high}),
            "base_features": between(
                list(space.base_features), list(grid.base_features), int(best["base_features"])
            ),
            "batch_size": between(list(space.batch_size), list(grid.batch_size), int(best["batch_size"])),
        }
    )


# --- the trial -----------------------------------------------------------------------------------


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
    extra_spec: dict[str, Any] = field(default_factory=dict)


def run_trial(params: dict[str, Any], ctx: SearchContext) -> None:
    """Tune function trainable: one U-Net training run with the trial's parameters (a Ray Train driver)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ctvlab.tracking import Tracker, base_tags
    from ctvlab.unet.train import best_checkpoint, build_trainer, export_model

    study = StudyConfig.model_validate(ctx.study)
    ucfg = trial_unet_config(study.unet, params, study.tune)
    tctx = ray.tune.get_context()
    trial_id = tctx.get_trial_id()
    tracker = Tracker(ctx.experiment, ctx.tracking_uri)
    shown = {k: params[k] for k in TRIAL_PARAMS if k in params}
    run_id = tracker.start_run(f"trial-{trial_id}", {**base_tags("tune-trial"), "ctvlab.trial_id": trial_id,
                                                     "ctvlab.search": ctx.search_name}, ctx.parent_run_id)  # fmt: skip
    log = tracker.logger(run_id)
    log.params({"trial": shown, "unet": ucfg.model_dump(mode="json")})
    try:
        if params.get("_inject_failure"):
            raise RuntimeError("injected trial failure (fault-tolerance test hook)")
        trainer = build_trainer(
            Path(ctx.prep), ucfg, ctx.train_ids, ctx.val_ids,
            storage_path=ctx.storage, run_name=f"{ctx.search_name}-{trial_id}",
            loop_extra={"mlflow_run_id": run_id, "experiment": ctx.experiment, "tracking_uri": ctx.tracking_uri},
            callbacks=[TuneReportCallback()],
        )  # fmt: skip
        result = trainer.fit()
        ckpt, best = best_checkpoint(result)
        if ckpt is not None:
            model_dir = export_model(ckpt, trial_model_dir(ctx.storage, ctx.search_name, trial_id),
                                     {**ctx.extra_spec, "trial_id": trial_id,
                                                                  "mlflow_run_id": run_id})  # fmt: skip
            log.artifact(model_dir, "model")
        log.metrics({f"best_{k}": v for k, v in best.items() if k.startswith("val_")})
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")


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


def _param_space_with_hooks(space: dict[str, Any], fail_trials: int) -> dict[str, Any]:
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

    prep = Path(prep).resolve()
    split = load_split(prep)
    tcfg = cfg.tune
    storage = Path(cfg.workdir, "ray").resolve()
    ctx = SearchContext(
        study=cfg.model_dump(mode="json"), prep=str(prep),
        train_ids=split.patients("train"), val_ids=split.patients("val"),
        storage=str(storage / "trials"), search_name=name, parent_run_id=parent_run_id,
        experiment=cfg.tracking.experiment or cfg.name, tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri),
        extra_spec=extra_spec or {},
    )  # fmt: skip
    # Create the store and the experiment here, once: concurrent trials creating a new SQLite store would
    # race on its schema migrations.
    from ctvlab.tracking import Tracker

    tracker = Tracker(ctx.experiment, ctx.tracking_uri)
    from ctvlab import resources as res

    demand, cluster = res.trial_demand(cfg), res.cluster_view(cfg.ray.max_resources)
    res.check_fits(demand, cluster)
    at_once = res.trials_at_once(demand, cluster, tcfg.max_concurrent_trials)
    say(
        f"search {name}: {at_once} trial(s) at once, each holding {res.format_resources(demand.held())}, "
        f"with {demand.data_cpus:g} CPU kept for Ray Data; {cluster.source} has "
        f"{res.format_resources(cluster.total)}"
    )
    # The trial's own process holds a CPU share; its Ray Train workers get their own placement group.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": res.TRIAL_DRIVER_CPUS})
    every = cfg.ray.progress_every_s
    watch = res.StallWatch(
        f"search {name}", cfg.ray.stall_timeout_s, poll_s=min(10.0, cfg.ray.stall_timeout_s / 5),
        report_every_s=every, on_stall=res.interrupt_main, say=say,
    )  # fmt: skip
    progress = _progress_callback(name, tcfg.epochs_per_trial, watch, every)
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
                # The limit goes to the generator: Tune ignores `max_concurrent_trials` next to one.
                search_alg=tune.search.BasicVariantGenerator(
                    random_state=tcfg.seed, max_concurrent=at_once
                ),
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage / "tune"),
                failure_config=tune.FailureConfig(max_failures=tcfg.trial_max_failures),
                verbose=0, callbacks=[progress],
            ),
        )  # fmt: skip
    # On a stall the watch interrupts the search as Ctrl+C would: Tune stops its trials and returns.
    with watch:
        grid = tuner.fit()
    if watch.message:
        raise res.ResourceError(watch.message)
    table = trials_table(grid)
    # A failed trial's error can name a patient or a folder: the table goes to the shared tracking store.
    from ctvlab.splits import pseudonymise
    from ctvlab.tracking import scrub_text

    names = pseudonymise(prep, [p for role in ("train", "val", "test") for p in split.patients(role)])
    table["error"] = [scrub_text(e, names) if isinstance(e, str) else e for e in table["error"]]
    table["model_dir"] = [str(trial_model_dir(ctx.storage, name, t)) for t in table["trial_id"]]
    finish_stopped_trials(ctx, table, tracker)
    return table


def check_private_state(path: Path) -> None:
    """Refuse to restore a search whose state others could have written: `Tuner.restore` unpickles it, and
    unpickling runs code. The working directory must be trusted (README, "Security and privacy").

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

    ASHA stops a trial (at a rung, or at `max_t`) inside the trial's report, so its driver never reaches
    the lines after `trainer.fit()`: no exported model, an MLflow run left RUNNING. Both are done here
    from what the trial left on the shared storage: its best kept checkpoint (Ray Train keeps the best by
    validation Tversky) becomes its model, and its run is closed as KILLED (stopped early) with the model.
    """
    from ctvlab.unet.train import export_model

    for row in table.itertuples():
        if row.status == "ERROR":
            continue
        dst = Path(row.model_dir)
        if not dst.exists():
            ckpt = best_stored_checkpoint(Path(ctx.storage) / f"{ctx.search_name}-{row.trial_id}")
            if ckpt is None:
                continue
            import ray.train

            export_model(ray.train.Checkpoint.from_directory(str(ckpt)), dst,
                         {**ctx.extra_spec, "trial_id": row.trial_id})  # fmt: skip
        query = f"tags.`ctvlab.trial_id` = '{row.trial_id}' and tags.`ctvlab.search` = '{ctx.search_name}'"
        for run in tracker.find_runs(query):
            if run.info.status == "RUNNING":
                log = tracker.logger(run.info.run_id)
                log.tags({"ctvlab.stopped_early": "true"})
                log.artifact(dst, "model")
                tracker.end_run(run.info.run_id, "KILLED")


def best_stored_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder of a Ray Train run with the highest validation Tversky at its own epoch
    (each checkpoint holds the history up to it); the latest when none has a finite score."""
    from ctvlab.unet.train import HISTORY_FILE, SPEC_FILE

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


def trial_model_dir(storage: str | Path, search_name: str, trial_id: str) -> Path:
    """Where a trial's best model is exported: next to its Ray Train run, on the study's storage (not in
    Tune's local trial folder, which reaches the storage only when the search ends)."""
    return Path(storage) / f"{search_name}-{trial_id}" / "model"


def say(line: str) -> None:
    """A progress line on stderr (a submitted job's log shows it)."""
    import sys

    print(line, file=sys.stderr, flush=True)


def trial_state_line(trial_id: str, status: str, epoch: int | None, epochs: int) -> str:
    """What one trial is doing or waiting for, in a few words."""
    if status == "PENDING":
        return f"{trial_id} waiting for a trial slot"
    if status == "RUNNING" and epoch is None:
        return f"{trial_id} preparing its data and waiting for its training workers"
    if status == "RUNNING":
        return f"{trial_id} epoch {epoch + 1}/{epochs}"
    return f"{trial_id} {status.lower()}"


def trial_done_line(name: str, trial_id: str, result: dict, done: int, total: int) -> str:
    """A finished trial and its best validation Tversky (the selection metric)."""
    best = result.get(BEST_SELECTION_METRIC)
    score = f"best val Tversky {best:.4f}" if isinstance(best, (int, float)) else "no validation score"
    epochs = (
        f" after {int(result['epoch']) + 1} epochs" if isinstance(result.get("epoch"), (int, float)) else ""
    )
    return f"search {name}: trial {trial_id} finished ({done} of {total} so far){epochs}: {score}"


def progress_line(name: str, states: list[str], pending: list[str]) -> str:
    """One line per progress report: every unfinished trial, and what the cluster cannot schedule."""
    line = f"search {name}: " + (" · ".join(states) or "no trial running")
    if pending:
        line += f" · pending on the cluster: {'; '.join(pending)}"
    return line


def _progress_callback(name: str, epochs: int, watch, every_s: float):
    """A Tune callback: each result counts as progress for the stall watch; every `every_s` seconds a
    line says what each unfinished trial is doing or waiting for."""
    from ray.tune import Callback

    class SearchProgress(Callback):
        def __init__(self):
            self.last = time.monotonic()
            self.finished = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            watch.progress()

        def on_trial_complete(self, iteration, trials, trial, **info):
            watch.progress()
            self.finished += 1
            say(trial_done_line(name, trial.trial_id, trial.last_result or {}, self.finished, len(trials)))

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last < every_s:
                return
            self.last = time.monotonic()
            states = [
                trial_state_line(t.trial_id, t.status, (t.last_result or {}).get("epoch"), epochs)
                for t in trials
                if t.status in ("PENDING", "RUNNING", "PAUSED")
            ]
            say(progress_line(name, states, watch.last_pending))

    return SearchProgress()


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


def tune_study(
    cfg: StudyConfig, prep: Path | None = None, *, resume: bool = False, fail_trials: int = 0
) -> SearchOutcome:
    """The study's two-step search (grid, then random search in the narrowed ranges); registers the best.

    Args:
        fail_trials: test hook: this many extra grid cells raise on purpose (fault-tolerance tests).
    """
    from ctvlab.atomic import write_json_atomic
    from ctvlab.runtime import init_ray
    from ctvlab.splits import load_split
    from ctvlab.stages import tracker_for
    from ctvlab.tracking import base_tags
    from ctvlab.unet.train import provenance_spec

    t0 = time.perf_counter()
    prep = Path(prep or cfg.prep_dir).resolve()
    split = load_split(prep)
    if not split.patients("train") or not split.patients("val"):
        raise DataError(f"the split of {prep} has no training or no validation patients")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    from ctvlab.resources import check_study_fits

    check_study_fits(cfg, search=True)
    tracker = tracker_for(cfg)
    pointer = Path(cfg.workdir, "tune_last_search.json").resolve()
    state = json.loads(pointer.read_text()) if resume and pointer.exists() else None
    if resume and state is None:
        raise CtvlabError(f"nothing to resume: no earlier search recorded in {pointer}")
    if state is None:
        name = time.strftime("search-%Y%m%d-%H%M%S")
        parent = tracker.start_run("tune", base_tags("tune", split.dataset_digest, split.digest))
        state = {"name": name, "parent_run_id": parent, "phase": "grid", "split_digest": split.digest,
                 "dataset_digest": split.dataset_digest}  # fmt: skip
        tracker.logger(parent).params({"tune": cfg.tune.model_dump(mode="json")})
        tracker.logger(parent).json(cfg.tune.model_dump(mode="json"), "search_space.json", "search")
        write_json_atomic(pointer, state)
    elif (state.get("split_digest"), state.get("dataset_digest")) != (split.digest, split.dataset_digest):
        # The split digest alone misses a dataset prepared again with other settings.
        raise CtvlabError("cannot resume the search: the prepared data or the split changed since it started")
    name, parent = state["name"], state["parent_run_id"]
    log = tracker.logger(parent)
    modality = cfg.unet.model.modality_set
    tcfg = cfg.tune
    extra_spec = provenance_spec(prep, split)

    space = tcfg.space
    grid_trials = pd.DataFrame()
    if tcfg.run_grid:
        grid_space = _param_space_with_hooks(grid_param_space(tcfg.grid, tcfg.space, modality), fail_trials)
        grid_trials = run_search(cfg, prep, grid_space, name=f"{name}-grid", num_samples=1, parent_run_id=parent,
                                 resume=resume and state["phase"] == "grid", use_asha=False, extra_spec=extra_spec)  # fmt: skip
        space = narrow_space(grid_trials, tcfg.grid, tcfg.space)
        log.json(space.model_dump(mode="json"), "narrowed_space.json", "search")
        state["phase"] = "random"
        write_json_atomic(pointer, state)
    random_space = random_param_space(space, modality)
    if not tcfg.run_grid:
        random_space = _param_space_with_hooks(random_space, fail_trials)
    random_trials = run_search(cfg, prep, random_space, name=f"{name}-random", num_samples=tcfg.num_samples,
                               parent_run_id=parent, resume=resume and state["phase"] == "random",
                               extra_spec=extra_spec)  # fmt: skip
    trials = pd.concat(
        [grid_trials.assign(step="grid"), random_trials.assign(step="random")], ignore_index=True
    )
    outcome = _finish_search(
        cfg, tracker, parent, name, trials, space, t0, split.digest, dataset_digest=split.dataset_digest
    )
    state["phase"] = "done"
    write_json_atomic(pointer, state)
    return outcome


def _finish_search(
    cfg,
    tracker,
    parent,
    name,
    trials,
    space,
    t0,
    split_digest: str,
    register: bool = True,
    dataset_digest: str | None = None,
) -> SearchOutcome:
    """Log the summary to the parent run, copy the best trial's model to results/, register it."""
    best = best_trial(trials)
    log = tracker.logger(parent)
    shown = trials.drop(columns=["path", "model_dir"])
    log.table(shown, "trials.csv", "search")
    best_params = {k: best[k] for k in TRIAL_PARAMS if k in best and best[k] is not None}
    log.params({"best": best_params})
    n_failed = int((trials["status"] == "ERROR").sum())
    log.metrics({BEST_SELECTION_METRIC: float(best[BEST_SELECTION_METRIC]), "n_trials": len(trials), "n_failed": n_failed,
                 "trial_epochs_total": int(trials["epochs_run"].sum())})  # fmt: skip
    src = Path(best["model_dir"])
    model_dir = None
    model_uri = None
    if src.exists():
        model_dir = Path(cfg.results_dir, "model").resolve()
        with atomic_folder(model_dir) as staged:  # the old model stays until the new one is complete
            shutil.copytree(src, staged, dirs_exist_ok=True)
        log.artifact(model_dir, "model")
        if register:
            version = tracker.register_model(cfg.unet.registered_model_name, parent, "model",
                                             tags={"search": name, "split_digest": split_digest,
                                                   "dataset_digest": dataset_digest or ""})  # fmt: skip
            model_uri = f"models:/{cfg.unet.registered_model_name}/{version.version}"
            log.tags({"ctvlab.registered_model": model_uri})
    tracker.end_run(parent, "FINISHED")
    return SearchOutcome(
        name=name, parent_run_id=parent, trials=trials, best_params=best_params,
        best_metric=float(best[BEST_SELECTION_METRIC]), best_model_dir=model_dir, space=space.model_dump(mode="json"),
        n_failed=n_failed, elapsed_s=time.perf_counter() - t0, model_uri=model_uri,
    )  # fmt: skip


def print_search(outcome: SearchOutcome, console) -> None:
    from rich.table import Table

    t = outcome.trials.sort_values(BEST_SELECTION_METRIC, ascending=False)
    table = Table(title=f"search {outcome.name}: {len(t)} trials, {outcome.n_failed} failed, "
                        f"{outcome.elapsed_s / 60:.1f} min")  # fmt: skip
    for col in (
        "step",
        "lr",
        "base_features",
        "batch_size",
        "loss",
        BEST_SELECTION_METRIC,
        "epochs_run",
        "status",
    ):
        table.add_column(col, justify="right")
    for r in t.head(15).to_dict("records"):
        table.add_row(
            str(r.get("step", "")), f"{r['lr']:.2e}" if r["lr"] is not None else "", str(r["base_features"]),
            str(r["batch_size"]), str(r["loss"]), f"{r[BEST_SELECTION_METRIC]:.4f}", str(r["epochs_run"]), r["status"],
        )  # fmt: skip
    console.print(table)
    console.print(f"best: {outcome.best_params} → validation Tversky {outcome.best_metric:.4f}")
    console.print(
        f"model: {outcome.best_model_dir} registered as {outcome.model_uri}; MLflow run {outcome.parent_run_id}"
    )
