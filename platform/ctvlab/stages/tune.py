"""The hyperparameter-search stage (`ctvlab tune`): the study's two steps on Ray Tune (a grid over learning
rate and loss, then a random search in the neighbourhood of the grid's best), the trial table, the best
trial's model exported, logged and registered."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd

from ctvlab.atomic import atomic_folder
from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError, DataError
from ctvlab.stages.registry import log_model
from ctvlab.stages.registry import register as register_model
from ctvlab.study import BEST_SELECTION_METRIC
from ctvlab.tracking import NOTE, STAGE_DESCRIPTIONS
from ctvlab.unet.search import TRIAL_PARAMS, SearchOutcome, best_trial, param_space_with_hooks, run_search
from ctvlab.unet.search_progress import say
from ctvlab.unet.spaces import grid_param_space, narrow_space, random_param_space

SEARCH_POINTER = "tune_last_search.json"  # in the working directory: the last search, for --resume


def tune_study(
    cfg: StudyConfig,
    prep: Path | None = None,
    *,
    resume: bool = False,
    fail_trials: int = 0,
    settings_key: str | None = None,
    model_dir: Path | None = None,
    register: bool = True,
) -> SearchOutcome:
    """The study's two-step search (grid, then random search in the narrowed ranges); registers the best.

    Args:
        resume: continue the search recorded in `tune_last_search.json`, skipping finished phases and trials.
        fail_trials: test hook: this many extra grid cells raise on purpose (fault-tolerance tests).
        settings_key: `ctvlab run`'s key of the model stage, recorded so that `ctvlab run` continues an
            interrupted search of the same settings and data.
        model_dir: where the best trial's model goes (default: `<results>/model`, the evaluated model).
        register: register the best trial's model (off when a final model is trained from it).
    """
    from ctvlab.atomic import write_json_atomic
    from ctvlab.runtime import start_unet_stage
    from ctvlab.splits import load_split
    from ctvlab.tracking import base_tags, tracker_for

    t0 = time.perf_counter()
    prep = Path(prep or cfg.prep_dir).resolve()
    split = load_split(prep)
    if not split.patients("train") or not split.patients("val"):
        raise DataError(f"the split of {prep} has no training or no validation patients")
    from ctvlab.unet.inputs import require_channels

    require_channels(prep, sorted(split.table["patient_id"]), cfg.unet.model.modality_set)
    start_unet_stage(cfg, search=True)
    tracker = tracker_for(cfg)
    pointer = Path(cfg.workdir, SEARCH_POINTER).resolve()
    state = json.loads(pointer.read_text()) if resume and pointer.exists() else None
    if resume and state is None:
        raise CtvlabError(f"nothing to resume: no earlier search recorded in {pointer}")
    if state is None:
        name = time.strftime("search-%Y%m%d-%H%M%S")
        parent = tracker.start_run("tune", base_tags("tune", split.dataset_digest, split.digest))
        state = {"name": name, "parent_run_id": parent, "phase": "grid", "split_digest": split.digest,
                 "dataset_digest": split.dataset_digest, "settings_key": settings_key}  # fmt: skip
        tracker.logger(parent).params({"tune": cfg.tune.model_dump(mode="json")})
        tracker.logger(parent).json(cfg.tune.model_dump(mode="json"), "search_space.json", "search")
        write_json_atomic(pointer, state)
    elif (state.get("split_digest"), state.get("dataset_digest")) != (split.digest, split.dataset_digest):
        # The split digest alone misses a dataset prepared again with other settings.
        raise CtvlabError("cannot resume the search: the prepared data or the split changed since it started")
    parent = state["parent_run_id"]
    if resume:
        tracker.reopen_run(parent)  # an interrupted search's parent ended FAILED or KILLED
    with tracker.failing(parent):
        outcome = _search(
            cfg, prep, tracker, state, pointer, resume, fail_trials, t0, split, model_dir, register
        )
    state["phase"] = "done"
    state["best_params"] = outcome.best_params  # what `ctvlab loss-study` starts from
    write_json_atomic(pointer, state)
    return outcome


def scored_on_test_patients(cfg: StudyConfig, prep: Path | None):
    """For a stage whose searches are scored on the test patients (the loss study, the ablation): the
    prepared data folder, its split and the test patients, with Ray started for a search.

    Raises:
        CtvlabError: the split has no test patients.
    """
    from ctvlab.runtime import start_unet_stage
    from ctvlab.splits import load_split

    prep = Path(prep or cfg.prep_dir).resolve()
    split = load_split(prep)
    test_ids = split.patients("test")
    if not test_ids:
        raise CtvlabError(f"the split of {prep} has no test patients")
    start_unet_stage(cfg, search=True)
    return prep, split, test_ids


def last_best_params(cfg: StudyConfig, split) -> dict | None:
    """The best configuration of the last finished search on this split and data, or None."""
    try:
        state = json.loads(Path(cfg.workdir, SEARCH_POINTER).read_text())
    except (OSError, ValueError):
        return None
    same = (state.get("split_digest"), state.get("dataset_digest")) == (split.digest, split.dataset_digest)
    return state.get("best_params") if same and state.get("phase") == "done" else None


def _search(
    cfg, prep, tracker, state, pointer, resume, fail_trials, t0, split, model_dir, register
) -> SearchOutcome:
    """The grid (unless it finished before an interruption), the random search, the summary."""
    from ctvlab.atomic import write_json_atomic
    from ctvlab.unet.trainer import provenance_spec

    name, parent = state["name"], state["parent_run_id"]
    log = tracker.logger(parent)
    modality = cfg.unet.model.modality_set
    tcfg = cfg.tune
    extra_spec = provenance_spec(prep, split)

    space = tcfg.space
    grid_trials = pd.DataFrame()
    if tcfg.run_grid and state["phase"] != "grid":
        # A finished grid is never run again: its trial table was recorded when it ended.
        grid_trials = pd.DataFrame(state["grid_trials"])
        space = narrow_space(grid_trials, tcfg.grid, tcfg.space)
        say(f"search {name}: the grid finished before the interruption ({len(grid_trials)} trials); resuming "
            "the random search")  # fmt: skip
    elif tcfg.run_grid:
        grid_space = param_space_with_hooks(grid_param_space(tcfg.grid, tcfg.space, modality), fail_trials)
        grid_trials = run_search(cfg, prep, grid_space, name=f"{name}-grid", num_samples=1, parent_run_id=parent,
                                 resume=resume, use_asha=False, extra_spec=extra_spec)  # fmt: skip
        space = narrow_space(grid_trials, tcfg.grid, tcfg.space)
        log.json(space.model_dump(mode="json"), "narrowed_space.json", "search")
        state["phase"] = "random"
        state["grid_trials"] = json.loads(grid_trials.to_json(orient="records"))
        write_json_atomic(pointer, state)
    random_space = random_param_space(space, modality)
    if not tcfg.run_grid:
        random_space = param_space_with_hooks(random_space, fail_trials)
    random_trials = run_search(cfg, prep, random_space, name=f"{name}-random", num_samples=tcfg.num_samples,
                               parent_run_id=parent, resume=resume and state["phase"] == "random",
                               extra_spec=extra_spec)  # fmt: skip
    trials = pd.concat(
        [grid_trials.assign(step="grid"), random_trials.assign(step="random")], ignore_index=True
    )
    return _finish_search(cfg, tracker, parent, name, trials, space, t0, split.digest, register=register,
                          dataset_digest=split.dataset_digest, model_dir=model_dir,
                          calibration=(prep, split.patients("val")))  # fmt: skip


def search_note(best_metric: float, best_params: dict, n_trials: int, n_failed: int) -> str:
    """The search's description in the MLflow UI: its headline (the best trial's validation Tversky and
    settings), then what the stage does."""

    def shown(v) -> str:  # a schedule by its kind; the whole of it is in the run's parameters
        if isinstance(v, dict):
            return str(v.get("kind", "…"))
        return f"{v:.2g}" if isinstance(v, float) else str(v)

    settings = ", ".join(f"{k} {shown(v)}" for k, v in best_params.items())
    failed = f"; {n_failed} failed" if n_failed else ""
    return (f"Best of {n_trials} trials: validation Tversky {best_metric:.3f} ({settings}){failed}.\n\n"
            f"{STAGE_DESCRIPTIONS['tune']}")  # fmt: skip


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
    model_dir: Path | None = None,
    calibration: tuple[Path, list[str]] | None = None,
) -> SearchOutcome:
    """Log the summary to the parent run, copy the best trial's model to results/, register it (after
    choosing its CTV thresholds on the validation patients, `calibration`, when it is the study's model)."""
    best = best_trial(trials)
    tracker.drain()  # the trials' writes first, and the model's registration below answered at once
    log = tracker.logger(parent)
    shown = trials.drop(columns=["path", "model_dir"])
    log.table(shown, "trials.csv", "search")
    best_params = {  # plain Python values: they are stamped and digested as JSON
        k: best[k].item() if hasattr(best[k], "item") else best[k]
        for k in TRIAL_PARAMS
        if k in best and best[k] is not None
    }
    for k in ("base_features", "batch_size"):  # float in a trial table that has empty cells
        if k in best_params:
            best_params[k] = int(best_params[k])
    log.params({"best": best_params})
    n_failed = int((trials["status"] == "ERROR").sum())
    log.metrics({BEST_SELECTION_METRIC: float(best[BEST_SELECTION_METRIC]), "n_trials": len(trials), "n_failed": n_failed,
                 "trial_epochs_total": int(trials["epochs_run"].sum())})  # fmt: skip
    log.tags({NOTE: search_note(float(best[BEST_SELECTION_METRIC]), best_params, len(trials), n_failed)})
    src = Path(best["model_dir"])
    dst, model_dir, model_uri = Path(model_dir or Path(cfg.results_dir, "model")).resolve(), None, None
    if src.exists():
        model_dir = dst
        with atomic_folder(model_dir) as staged:  # the old model stays until the new one is complete
            shutil.copytree(src, staged, dirs_exist_ok=True)
        if register and calibration is not None:
            from ctvlab.stages.calibrate import calibrate

            calibrate(model_dir, calibration[0], cfg, calibration[1])
        log_model(log, model_dir, "model")
        if register:
            spec = json.loads((model_dir / "model.json").read_text())
            spec.setdefault("split_digest", split_digest)
            spec.setdefault("dataset_digest", dataset_digest or "")
            version = register_model(tracker, cfg, parent, spec, extra_tags={"search": name})
            if version is not None:  # else kept with the spool: `evaluate` finds it by its tags once sent
                model_uri = f"models:/{cfg.unet.registered_model_name}/{version.version}"
    tracker.end_run(parent, "FINISHED")
    return SearchOutcome(
        name=name, parent_run_id=parent, trials=trials, best_params=best_params,
        best_metric=float(best[BEST_SELECTION_METRIC]), best_model_dir=model_dir, space=space.model_dump(mode="json"),
        n_failed=n_failed, elapsed_s=time.perf_counter() - t0, model_uri=model_uri,
    )  # fmt: skip


def print_search(outcome: SearchOutcome, console) -> None:
    from ctvlab.terminal import print_table

    t = outcome.trials.sort_values(BEST_SELECTION_METRIC, ascending=False)
    columns = (
        "step",
        "lr",
        "base_features",
        "batch_size",
        "loss",
        BEST_SELECTION_METRIC,
        "epochs_run",
        "status",
    )
    rows = [
        (str(r.get("step", "")), f"{r['lr']:.2e}" if r["lr"] is not None else "", str(r["base_features"]),
         str(r["batch_size"]), str(r["loss"]), f"{r[BEST_SELECTION_METRIC]:.4f}", str(r["epochs_run"]), r["status"])
        for r in t.head(15).to_dict("records")
    ]  # fmt: skip
    title = (
        f"search {outcome.name}: {len(t)} trials, {outcome.n_failed} failed, {outcome.elapsed_s / 60:.1f} min"
    )
    print_table(console, title, columns, rows, labels=0)
    console.print(f"best: {outcome.best_params} → validation Tversky {outcome.best_metric:.4f}")
    registered = f"registered as {outcome.model_uri}" if outcome.model_uri else "kept for the final model"
    console.print(f"model: {outcome.best_model_dir} {registered}; MLflow run {outcome.parent_run_id}")
