"""`ctvlab run`: the whole study from one config.

synth (or a given cohort) → register (follow-ups, when declared) → validate → preprocess → split →
voxel-models and stats → tune (or one training run, train) → final → loss-study, ablation → evaluate →
report: the stages of `ctvlab.stage_table`, named as it names them. Each stage is skipped when its outputs exist and are
current: every stage writes a stamp (`<workdir>/stamps/<stage, with underscores>.json`) holding `stage_key`, the digest of its own settings, of
every input it reads (the dataset digest, the split digest, the model digest) and of the ctvlab version,
and runs again only when that digest changes. The split digest alone is not enough: it covers (patient,
role, fold), which stay the same when preprocessing settings change the data under them. Preprocessing
skips unchanged patients on its own.

A stage that fails stops the run (after the summary); with `keep_going` the stages that do not need its
outputs still run, and the run fails at the end.

About 770 lines, kept in one module so that the run reads top to bottom in the order the study runs: one
function per stage and the stamp logic they share, then `plan_study`, which says the same without running
anything (`ctvlab run --dry-run`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctvlab import __version__
from ctvlab.atomic import digest, sha256_file, write_json_atomic
from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError, InfrastructureError, LeakageError
from ctvlab.stage_table import STAMPED, model_stage, read_stamp, settings_of, stamp_file
from ctvlab.stage_table import stage as stage_named

# What each stamped stage reads besides its own settings (`ctvlab.stage_table`).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {s.name: s.inputs for s in STAMPED}


def stage_settings(stage: str, cfg: StudyConfig) -> dict[str, Any]:
    """The settings that shape a stage's results, as the stage table declares them (execution settings such
    as Ray's are left out)."""
    return settings_of(stage, cfg.model_dump(mode="json"))


def final_model_on(cfg: StudyConfig) -> bool:
    """A final model is trained after the search (the study's PCC retrain), and it is the evaluated one."""
    return cfg.pipeline.search and cfg.unet.final_loss is not None


def stage_key(stage: str, cfg: StudyConfig, inputs: dict[str, str | None]) -> str:
    """A stage's stamp: the digest of its own settings, of every input it reads and of the ctvlab
    version, and nothing else.

    Raises:
        KeyError: an input the stage reads is not in `inputs` (a bug: the stage would be stamped blind).
    """
    return digest(stage_parts(stage, cfg, inputs))


def stage_parts(stage: str, cfg: StudyConfig, inputs: dict[str, str | None]) -> dict[str, Any]:
    """What a stage's stamp is the digest of; kept in the stamp, so that `ctvlab run --dry-run` can say
    which setting or input changed."""
    return {
        "stage": stage,
        "settings": stage_settings(stage, cfg),
        "inputs": {name: inputs[name] for name in STAGE_INPUTS[stage]},
        "ctvlab_version": __version__,
    }


def model_digest(model_dir: Path) -> str | None:
    """Digest of a model folder's files (spec and weights), or None when it holds no model."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.json").exists():
        return None
    return digest({f.name: sha256_file(f) for f in sorted(model_dir.iterdir()) if f.is_file()})


@dataclass
class StageRecord:
    name: str
    status: str  # "ran", "skipped (current)", "off", "nothing to do", "cohort given"
    seconds: float = 0.0
    detail: str = ""
    run_ids: list[str] = field(default_factory=list)


@dataclass
class StudyOutcome:
    workdir: Path
    experiment: str
    experiment_id: str
    tracking_uri: str
    stages: list[StageRecord]
    evaluation: Any = None


@dataclass
class RunState:
    """What the stages of one run hand on to the next: the digests later stages are keyed on (`inputs`),
    the study's model, the search's best configuration; `result` is the last stage's own outcome, for its
    command to print (`run_stage`)."""

    inputs: dict[str, str | None] = field(default_factory=dict)
    model_uri: str | None = None
    best_params: dict[str, Any] | None = None
    validation: Any = None
    evaluation: Any = None
    result: Any = None


class Stamps:
    """Digests of each stage's inputs, so that a stage whose inputs did not change is skipped."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)

    def read(self, stage: str) -> dict[str, Any] | None:
        return read_stamp(self.workdir, stage)

    def current(self, stage: str, key: str) -> dict[str, Any] | None:
        data = self.read(stage)
        return data if data and data.get("key") == key else None

    def write(self, stage: str, key: str, parts: dict[str, Any] | None = None, **info: Any) -> None:
        """Stamp a stage; `parts` (`stage_parts`) are kept beside the key for `--dry-run`'s reasons."""
        write_json_atomic(
            stamp_file(self.workdir, stage),
            {"key": key, **info, **({"parts": parts} if parts else {})},
        )


def current_stamp(cfg: StudyConfig, stamps: Stamps, stage: str, key: str) -> dict[str, Any] | None:
    """The stage's stamp when it matches `key` and the outputs it records are still there
    (`outputs_current`), else None: the one test of "current", for `ctvlab run` and its `--dry-run`."""
    stamp = stamps.current(stage, key)
    return stamp if outputs_current(cfg, stage, stamp) else None


class StageFailed(CtvlabError):
    """A stage of `ctvlab run` failed; carries the exit code of the first failure."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_study(cfg: StudyConfig, console=None, force: bool = False, keep_going: bool = False) -> StudyOutcome:
    """Run every stage of the study that is not current; return what ran and where the results are.

    Raises:
        CtvlabError: a stage failed (the first failure's own error, after the summary); with
            `keep_going`, the stages that do not depend on it run first, then `StageFailed` is raised.
        LockedError: another `ctvlab run` is using the working directory.
    """
    from ctvlab.lock import exclusive

    workdir = Path(cfg.workdir).resolve()
    with exclusive(workdir, "ctvlab run"):
        return _run_stages(cfg, workdir, console, force, keep_going)


def _run_stages(cfg: StudyConfig, workdir: Path, console, force: bool, keep_going: bool) -> StudyOutcome:
    from rich.console import Console

    from ctvlab.tracking import tracker_for

    console = console or Console(highlight=False)
    from ctvlab.resources import check_study_fits
    from ctvlab.runtime import init_ray

    # Before any stage: a U-Net stage that can never fit on this cluster fails now, not after the others.
    init_ray(cfg.ray.address, cfg.ray.num_cpus, log_dir=Path(cfg.workdir) / "logs")
    check_study_fits(cfg, search=cfg.pipeline.search)
    if cfg.pipeline.search and cfg.unet.final_loss is not None:
        check_study_fits(cfg, search=False)  # the final model trains on unet.train's resources
    if cfg.pipeline.ablation:
        check_study_fits(cfg, search=True)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"workdir": workdir})  # absolute: Ray workers do not share our cwd
    stamps = Stamps(workdir)
    tracker = tracker_for(cfg)
    state = RunState()
    model_name = model_stage(cfg)
    # (name, enabled, the stages it needs, the stage)
    plan: list[tuple[str, bool, tuple[str, ...], Callable[[], StageRecord]]] = [
        ("synth", True, (), lambda: _synth(cfg, stamps, force)),
        ("register", True, ("synth",), lambda: _register(cfg, console)),
        ("validate", True, ("synth",), lambda: _validate(cfg, console, state)),
        ("preprocess", True, ("validate",), lambda: _preprocess(cfg, console, state)),
        ("split", True, ("preprocess",), lambda: _split(cfg, stamps, state, force)),
        (
            "voxel-models",
            cfg.pipeline.voxel_models,
            ("split",),
            lambda: _voxel_models(cfg, stamps, state, force),
        ),
        ("stats", cfg.pipeline.stats, ("split",), lambda: _stats(cfg, stamps, state, force)),
        (model_name, True, ("split",), lambda: _model(cfg, stamps, state, force)),
        ("final", final_model_on(cfg), (model_name,), lambda: _final(cfg, stamps, state, force)),
        ("loss-study", cfg.pipeline.loss_study, (model_name,), lambda: _losses(cfg, stamps, state, force)),
        ("ablation", cfg.pipeline.ablation, ("split",), lambda: _ablation(cfg, stamps, state, force)),
        (
            "evaluate",
            cfg.pipeline.evaluate,
            (model_name, "final"),
            lambda: _evaluate(cfg, stamps, state, console, force),
        ),
        ("report", True, (), lambda: _report(cfg)),
    ]
    console.rule(f"[bold]ctvlab run[/] · study {cfg.name} · {workdir}")
    from ctvlab.outages import OutageWatch
    from ctvlab.spool import outage_notice
    from ctvlab.tracking import spool_dir

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    with outage_notice(say), OutageWatch(spool_dir(cfg), tracker.tracking_uri):
        records, failures = _each_stage(cfg, plan, console, keep_going, say)
    outcome = StudyOutcome(workdir, tracker.experiment_name, tracker.experiment_id, tracker.tracking_uri,
                           records, state.evaluation)  # fmt: skip
    print_study_summary(outcome, console)
    if failures:
        _name, first = failures[0]
        if len(failures) == 1 and not keep_going:
            raise first
        raise StageFailed(
            f"{len(failures)} stage(s) failed: " + "; ".join(f"{n}: {e}" for n, e in failures),
            first.exit_code,
        )
    return outcome


def _each_stage(cfg: StudyConfig, plan, console, keep_going: bool, say):
    """Run the plan's stages in order; after each, what the tracking store missed during it is sent (or the
    run stops when the store does not answer by `tracking.outage_wait_s`). Returns (records, failures)."""
    from rich.markup import escape

    from ctvlab.errors import shown
    from ctvlab.outages import settle
    from ctvlab.tracking import TrackingError, spool_dir, sync_spool

    spool = spool_dir(cfg)
    with contextlib.suppress(TrackingError):  # what an earlier run could not send goes first
        if sent := sync_spool(spool):
            say(f"sent {sent} MLflow write(s) that an earlier run kept in {shown(spool)}")
    records: list[StageRecord] = []
    unusable: set[str] = set()  # stages that failed or could not run: their outputs are not there
    failures: list[tuple[str, CtvlabError]] = []
    for i, (name, enabled, needs, fn) in enumerate(plan, start=1):
        if not enabled:
            records.append(StageRecord(name, "off"))
            continue
        if unusable & set(needs):
            unusable.add(name)
            records.append(StageRecord(name, "not run (an input stage failed)"))
            continue
        console.print(f"[bold cyan]▶ {i}/{len(plan)} {name}[/]")
        t0 = time.perf_counter()
        try:
            rec = fn()
        except CtvlabError as e:
            rec = StageRecord(name, "FAILED", detail=str(e))
            failures.append((name, e))
            unusable.add(name)
        rec.seconds = time.perf_counter() - t0
        records.append(rec)
        if rec.status == "FAILED":
            console.print(f"  [bold red]✗ failed[/] after {rec.seconds:.0f} s  {rec.detail}")
            if not keep_going:
                break
            continue
        console.print(f"  [green]✓[/] {rec.status} in {rec.seconds:.0f} s  {rec.detail}")
        try:
            settle(spool, cfg.tracking.outage_wait_s, say)
        except TrackingError as e:  # the stage's outputs are complete; its MLflow record is not
            records.append(StageRecord("MLflow record", "FAILED", detail=str(e)))
            failures.append(("MLflow record", e))
            console.print("  [bold red]✗ MLflow record incomplete[/]  " + escape(str(e)), highlight=False)
            break  # every later stage writes to the same store
    return records, failures


# --- stages ------------------------------------------------------------------------------------------


def _synth(cfg: StudyConfig, stamps: Stamps, force: bool) -> StageRecord:
    if cfg.cohort.source == "raw":
        if not (Path(cfg.raw_dir) / "manifest.csv").exists():
            raise CtvlabError(f"cohort.raw_dir {cfg.raw_dir} has no manifest.csv")
        return StageRecord("synth", "cohort given", detail=str(cfg.raw_dir))
    from ctvlab.synth.cohort import generate_cohort

    key = stage_key("synth", cfg, {})
    if not force and current_stamp(cfg, stamps, "synth", key):
        return StageRecord("synth", "skipped (current)", detail=str(cfg.raw_dir))
    generate_cohort(cfg.raw_dir, cfg.synth)
    stamps.write("synth", key, stage_parts("synth", cfg, {}))
    return StageRecord("synth", "ran", detail=f"{cfg.synth.n_patients} synthetic patients in {cfg.raw_dir}")


def _register(cfg: StudyConfig, console) -> StageRecord:
    """Follow-ups declared in the cohort (`<patient>/followup/`) registered to the pre-RT T1c, their masks
    written where the manifest expects them. A refused patient is named and left without progression masks
    (validation then says so); the study goes on with the others."""
    from ctvlab.errors import DataError
    from ctvlab.ingest.followup import Settings, not_registered, register_cohort

    try:
        results = register_cohort(cfg.raw_dir, Settings.for_run(cfg.smoke_test),
                                  say=lambda m: console.print(f"  {m}", markup=False, highlight=False))  # fmt: skip
    except DataError as e:  # the manifest itself: validation names every problem next
        return StageRecord("register", "skipped", detail=f"the manifest cannot be read ({e})")
    if not results:
        return StageRecord(
            "register", "nothing to do", detail="no patient declares a follow-up (<patient>/followup/)"
        )
    bad = not_registered(results)
    current = sum(r.status == "current" for r in results)
    detail = f"{len(results) - len(bad) - current} follow-up(s) registered"
    if current:
        detail += f", {current} current"
    if bad:
        detail += f"; not registered, left without progression masks: {', '.join(bad)}"
    return StageRecord("register", "ran", detail=detail)


def _validate(cfg: StudyConfig, console, state: RunState) -> StageRecord:
    from ctvlab.ingest.validate import validate_cohort
    from ctvlab.ingest.validation_report import print_validation

    report = validate_cohort(
        cfg.raw_dir, progress=False, limits=cfg.cohort.limits, voxel_mm=cfg.preprocess.voxel_mm
    )
    state.validation = report  # preprocessing takes it as is: every file read once, with these limits
    if not report.ok:
        print_validation(report, console)
    if not report.valid_ids():
        raise CtvlabError(f"no valid patient in {cfg.raw_dir}; fix the problems above")
    return StageRecord("validate", "ran", detail=f"{report.n_valid} valid, {report.n_invalid} invalid")


def _preprocess(cfg: StudyConfig, console, state: RunState) -> StageRecord:
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort, print_preprocess_report

    report = preprocess_cohort(cfg.raw_dir, cfg.prep_dir, cfg.preprocess, address=cfg.ray.address,
                               progress=True, console=console, limits=cfg.cohort.limits,
                               validation=state.validation)  # fmt: skip
    state.validation = None
    if not report.ok:
        print_preprocess_report(report, console)
    if report.storage_error:  # a full disk or a folder that cannot be written: its own one line
        raise InfrastructureError(report.storage_error)
    if report.errors:
        raise InfrastructureError(
            f"preprocessing failed for {len(report.errors)} patient(s) on an infrastructure error "
            f"({report.errors[0].reason}); outputs are kept, run again to resume"
        )
    if report.digest is None:
        raise CtvlabError("preprocessing produced no patient; see the report above")
    state.inputs = {"dataset": report.digest}
    n_done = len(report.processed)
    status = "ran" if n_done else "skipped (current)"
    return StageRecord("preprocess", status, detail=f"{n_done} processed, {len(report.skipped_unchanged)} current, "
                                                    f"{len(report.invalid)} invalid, {len(report.failed)} failed")  # fmt: skip


def _split(cfg: StudyConfig, stamps: Stamps, state: RunState, force: bool) -> StageRecord:
    from ctvlab.splits import load_split
    from ctvlab.stages.analysis import split_stage

    key = stage_key("split", cfg, state.inputs)
    if not force and current_stamp(cfg, stamps, "split", key):
        try:
            split = load_split(cfg.prep_dir)
        except LeakageError:
            raise  # never draw a new split to get past the leakage guard
        except CtvlabError:  # no split on disk (removed): draw it again from the same settings
            split = None
        if split is not None:
            state.inputs["split"] = split.digest
            return StageRecord("split", "skipped (current)", detail=f"split {split.digest[:12]}")
    split, run_id = split_stage(cfg, cfg.prep_dir)
    state.result = (split, run_id)
    state.inputs["split"] = split.digest
    stamps.write("split", key, stage_parts("split", cfg, state.inputs), split_digest=split.digest)
    counts = split.table["dl_role"].value_counts().to_dict()
    return StageRecord("split", "ran", detail=f"train/val/test {counts.get('train', 0)}/{counts.get('val', 0)}/"
                                              f"{counts.get('test', 0)}", run_ids=[run_id])  # fmt: skip


def _voxel_models(
    cfg: StudyConfig, stamps: Stamps, state: RunState, force: bool, parallel: bool = True
) -> StageRecord:
    from ctvlab.stages.analysis import voxel_models_stage

    key = stage_key("voxel-models", cfg, state.inputs)
    if not force and current_stamp(cfg, stamps, "voxel-models", key):
        return StageRecord("voxel-models", "skipped (current)")
    results = state.result = voxel_models_stage(cfg, cfg.prep_dir, parallel=parallel)
    stamps.write("voxel-models", key, stage_parts("voxel-models", cfg, state.inputs))
    detail = "; ".join(f"{t}/{s} AUC {r.auc_mean:.2f}±{r.auc_std:.2f}" for (t, s), r in results.items())
    return StageRecord("voxel-models", "ran", detail=detail)


def _stats(cfg: StudyConfig, stamps: Stamps, state: RunState, force: bool) -> StageRecord:
    from ctvlab.stages.analysis import stats_stage

    key = stage_key("stats", cfg, state.inputs)
    if not force and current_stamp(cfg, stamps, "stats", key):
        return StageRecord("stats", "skipped (current)")
    result, run_id = state.result = stats_stage(cfg, cfg.prep_dir)
    stamps.write("stats", key, stage_parts("stats", cfg, state.inputs))
    return StageRecord("stats", "ran", detail=f"{int(result.summary()['n_significant'])} of "
                                                   f"{len(result.tests)} tests significant", run_ids=[run_id])  # fmt: skip


def _model(
    cfg: StudyConfig, stamps: Stamps, state: RunState, force: bool, resume: bool | None = None
) -> StageRecord:
    """The search (`tune`) or one training run (`train`). `resume`: None continues an interrupted run of
    these very settings and data; True continues the last interrupted run whatever its settings."""
    name = model_stage(cfg)
    key = stage_key(name, cfg, state.inputs)
    # With a final model after it, the search's best trial is kept apart from the evaluated model.
    model_dir = Path(cfg.results_dir, "search_model" if final_model_on(cfg) else "model")
    stamp = current_stamp(cfg, stamps, name, key)  # the folder still holds the very model it recorded
    if not force and stamp:
        state.model_uri = stamp.get("model_uri")
        state.inputs["model"] = stamp["model_digest"]
        state.best_params = stamp.get("best_params")
        state.inputs["search"] = digest(state.best_params)
        return StageRecord(name, "skipped (current)", detail=str(stamp.get("model_uri") or model_dir))
    from ctvlab.stages.train import TRAIN_POINTER, interrupted_run
    from ctvlab.stages.tune import SEARCH_POINTER

    # A search or training run of these very settings and data that was interrupted is continued.
    pointer = Path(cfg.workdir, SEARCH_POINTER if cfg.pipeline.search else TRAIN_POINTER)
    resume = interrupted_run(pointer, key) if resume is None else resume
    again = "continued the interrupted run: " if resume else ""
    if cfg.pipeline.search:
        from ctvlab.stages.tune import tune_study

        final = final_model_on(cfg)
        out = state.result = tune_study(cfg, cfg.prep_dir, resume=resume, settings_key=key,
                                        model_dir=model_dir, register=not final)  # fmt: skip
        state.model_uri = out.model_uri
        state.best_params = out.best_params
        b = out.best_params
        best = f"lr {b.get('lr', float('nan')):.1e}, {b.get('base_features')} features, batch {b.get('batch_size')}, {b.get('loss')}"
        detail = (f"{again}{len(out.trials)} trials, best val Tversky {out.best_metric:.3f} ({best})"
                  + ("" if final else f" → {out.model_uri}"))  # fmt: skip
        run_ids = [out.parent_run_id]
    else:
        from ctvlab.stages.train import train_unet

        out = state.result = train_unet(cfg, cfg.prep_dir, resume=resume, settings_key=key)
        state.model_uri = out.model_uri
        detail = f"{again}best val Tversky {out.best_metrics.get('val_tversky', float('nan')):.3f} → {out.model_uri}"
        run_ids = [out.run_id]
    state.inputs["model"] = model_digest(model_dir)
    state.inputs["search"] = digest(state.best_params)
    stamps.write(name, key, stage_parts(name, cfg, state.inputs), model_uri=state.model_uri, model_digest=state.inputs["model"],
                 best_params=state.best_params)  # fmt: skip
    return StageRecord(name, "ran", detail=detail, run_ids=[r for r in run_ids if r])


def _final(cfg: StudyConfig, stamps: Stamps, state: RunState, force: bool) -> StageRecord:
    """The study's final model: the search's best configuration trained again with `unet.final_loss` for
    `unet.train.epochs` (early stopping by `unet.train.patience`). An interrupted final training is
    continued; the search it starts from is never run again for it."""
    from ctvlab.stages.train import TRAIN_POINTER, interrupted_run, train_unet
    from ctvlab.unet.spaces import final_unet_config

    best = state.best_params
    if not best:
        raise CtvlabError("the search recorded no best configuration; run it again with --force")
    key = stage_key("final", cfg, state.inputs)
    model_dir = Path(cfg.results_dir, "model")
    stamp = current_stamp(cfg, stamps, "final", key)
    if not force and stamp:
        state.model_uri = stamp.get("model_uri")
        state.inputs["model"] = stamp["model_digest"]
        return StageRecord("final", "skipped (current)", detail=str(stamp.get("model_uri")))
    final_cfg = cfg.model_copy(update={"unet": final_unet_config(cfg.unet, best)})
    resume = interrupted_run(Path(cfg.workdir, TRAIN_POINTER), key)
    out = state.result = train_unet(
        final_cfg, cfg.prep_dir, resume=resume, settings_key=key, run_label="final"
    )
    state.model_uri = out.model_uri
    state.inputs["model"] = model_digest(model_dir)
    stamps.write(
        "final",
        key,
        stage_parts("final", cfg, state.inputs),
        model_uri=out.model_uri,
        model_digest=state.inputs["model"],
    )
    again = "continued the interrupted run: " if resume else ""
    stopped = (
        f", stopped early at epoch {out.epochs_run}" if out.epochs_run < final_cfg.unet.train.epochs else ""
    )
    detail = (f"{again}{final_cfg.unet.loss.name} loss, best val Tversky "
              f"{out.best_metrics.get('val_tversky', float('nan')):.3f} at epoch {out.best_epoch + 1}{stopped} → "
              f"{out.model_uri}")  # fmt: skip
    return StageRecord("final", "ran", detail=detail, run_ids=[r for r in [out.run_id] if r])


def _losses(cfg: StudyConfig, stamps: Stamps, state: RunState, force: bool) -> StageRecord:
    from ctvlab.stages.loss_study import run_loss_study

    key = stage_key("loss-study", cfg, state.inputs)
    if not force and current_stamp(cfg, stamps, "loss-study", key):
        return StageRecord("loss-study", "skipped (current)", detail=str(Path(cfg.results_dir, "loss_study")))
    out = state.result = run_loss_study(cfg, cfg.prep_dir, best=state.best_params)
    stamps.write("loss-study", key, stage_parts("loss-study", cfg, state.inputs))
    n = len(out.per_patient[["loss", "beta"]].fillna(-1.0).drop_duplicates())  # the shared Tversky run once
    return StageRecord("loss-study", "ran", detail=f"{n} models on the test patients → {out.out_dir}",
                       run_ids=[out.run_id])  # fmt: skip


def _ablation(cfg: StudyConfig, stamps: Stamps, state: RunState, force: bool) -> StageRecord:
    from ctvlab.stages.ablation import run_ablation

    key = stage_key("ablation", cfg, state.inputs)
    if not force and current_stamp(cfg, stamps, "ablation", key):
        return StageRecord("ablation", "skipped (current)")
    out = state.result = run_ablation(cfg, cfg.prep_dir)
    stamps.write("ablation", key, stage_parts("ablation", cfg, state.inputs))
    return StageRecord("ablation", "ran", detail=str(out.figure), run_ids=[out.run_id])


def _evaluate(cfg: StudyConfig, stamps: Stamps, state: RunState, console, force: bool) -> StageRecord:
    record, outcome = evaluate_stage(cfg, stamps, state.inputs, state.model_uri, console, force)
    if outcome is not None:
        state.evaluation = outcome
    return record


def evaluate_stage(
    cfg: StudyConfig,
    stamps: Stamps,
    inputs: dict[str, str | None],
    model_uri: str | None,
    console,
    force: bool,
):
    """The study's evaluation, for `ctvlab run` and `ctvlab evaluate` alike: skipped when current, else run,
    printed, its model crowned `@champion` and the stage stamped. Returns (record, outcome or None)."""
    from ctvlab.stages.evaluate import evaluate_study, print_evaluation
    from ctvlab.stages.registry import crown
    from ctvlab.tracking import tracker_for

    key = stage_key("evaluate", cfg, inputs)
    if not force and current_stamp(cfg, stamps, "evaluate", key):
        return StageRecord(
            "evaluate", "skipped (current)", detail=str(Path(cfg.results_dir, "evaluate"))
        ), None
    out = evaluate_study(cfg, cfg.prep_dir, model_uri=model_uri, console=console)
    print_evaluation(out, console)
    # The study's evaluated model is its champion: `ctvlab predict` uses models:/<name>@champion by default.
    version = crown(tracker_for(cfg), cfg, out.model_uri, out)
    if version is not None:
        console.print(f"models:/{cfg.unet.registered_model_name}@champion is now version {version}")
    stamps.write("evaluate", key, stage_parts("evaluate", cfg, inputs))
    return StageRecord("evaluate", "ran", detail=str(out.out_dir), run_ids=[out.run_id]), out


def run_stage(cfg: StudyConfig, name: str, **options: Any) -> tuple[StageRecord, Any]:
    """`ctvlab <name>` for a stamped stage between split and evaluate: the very function `ctvlab run` runs
    for it, on the study's prepared data, always run (as `--force` would) and stamped, so that `ctvlab run`
    and `ctvlab report` see its outputs as current. Returns the stage's record and its own outcome (what
    its command prints). `options`: `parallel` (voxel-models), `resume` (tune, train).

    Raises:
        CtvlabError: the inputs the stage reads are not there yet (no split, no search for `final`).
    """
    workdir = Path(cfg.workdir).resolve()
    cfg = cfg.model_copy(update={"workdir": workdir})
    if name in ("tune", "train"):  # the command names which of the two trains the study's model
        cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"search": name == "tune"})})
    stamps, state = Stamps(workdir), RunState()
    if name == "split":
        meta = Path(cfg.prep_dir) / "dataset.json"
        if not meta.exists():
            raise CtvlabError(
                f"{cfg.prep_dir} holds no prepared data (dataset.json); run ctvlab preprocess first"
            )
        state.inputs = {"dataset": json.loads(meta.read_text())["digest"]}
    else:
        state.inputs, state.model_uri = study_inputs(cfg)
        state.best_params = current_search_best(cfg, state.inputs)
    stage = {"split": _split, "voxel-models": _voxel_models, "stats": _stats, "tune": _model, "train": _model,
             "final": _final, "loss-study": _losses, "ablation": _ablation}[name]  # fmt: skip
    record = stage(cfg, stamps, state, True, **options)
    return record, state.result


def current_search_best(
    cfg: StudyConfig, inputs: dict[str, str | None] | None = None
) -> dict[str, Any] | None:
    """The best configuration of the study's search when that search is current (its stamp matches these
    settings and data), else None: what the final model and the loss study start from."""
    if not cfg.pipeline.search:
        return None
    inputs = inputs if inputs is not None else study_inputs(cfg)[0]
    search = Stamps(cfg.workdir).current("tune", stage_key("tune", cfg, inputs))
    return search.get("best_params") if search else None


def study_inputs(cfg: StudyConfig) -> tuple[dict[str, str | None], str | None]:
    """What the stamped stages read, as the working directory holds it now (the prepared data's and the
    split's digests, the search's best configuration, the study's model), and the model URI the model
    stages recorded: the inputs `ctvlab run` would pass its evaluation.

    Raises:
        CtvlabError: the prepared data has no split.
    """
    from ctvlab.splits import load_split

    stamps = Stamps(cfg.workdir)
    split = load_split(cfg.prep_dir)
    first = {"dataset": split.dataset_digest, "split": split.digest}
    trained = model_stage(cfg)
    search = stamps.current(trained, stage_key(trained, cfg, first))
    inputs = {
        **first,
        "search": digest(search.get("best_params")) if search else None,
        "model": model_digest(Path(cfg.results_dir, "model")),
    }
    model_uri = search.get("model_uri") if search and not final_model_on(cfg) else None
    if final_model_on(cfg):
        final = stamps.current("final", stage_key("final", cfg, inputs))
        model_uri = final.get("model_uri") if final else None
    return inputs, model_uri


@dataclass
class PlannedStage:
    name: str  # as `ctvlab run` prints it
    status: str  # "will run", "current", "cohort given", "checks each patient", "off"
    why: str = ""


# Which stamped stage makes each input, by the inputs' names in STAGE_INPUTS.
_PRODUCERS = {"dataset": "preprocess", "split": "split", "search": "tune"}


def _changes(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted names of the settings that differ between two settings dumps."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changes(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [path or "(all)"]


def _stale_reason(stamp: dict[str, Any] | None, now: dict[str, Any]) -> str:
    if stamp is None:
        return "never ran here"
    parts = stamp.get("parts")
    if not parts:
        return "its settings or inputs changed (stamped before ctvlab kept the reasons)"
    reasons = []
    settings = _changes(parts.get("settings"), now["settings"])
    if settings:
        shown = ", ".join(settings[:4]) + (f" and {len(settings) - 4} more" if len(settings) > 4 else "")
        reasons.append(f"settings changed: {shown}")
    inputs = [k for k in now["inputs"] if parts.get("inputs", {}).get(k) != now["inputs"][k]]
    if inputs:
        reasons.append("input changed: " + ", ".join(inputs))
    if parts.get("ctvlab_version") != now["ctvlab_version"]:
        reasons.append(f"ctvlab {parts.get('ctvlab_version')} → {now['ctvlab_version']}")
    return "; ".join(reasons) or "its outputs are missing"


def plan_study(cfg: StudyConfig, force: bool = False) -> list[PlannedStage]:
    """What `ctvlab run` would do now, without doing any of it: each stage, whether it will run or is
    current, and for one that will run, why (the setting or input that changed, the stage before it that
    runs again). Reads the stamps, the prepared data's `dataset.json` and split, and nothing else."""
    from ctvlab.preprocess.prepare import output_settings

    stamps = Stamps(cfg.workdir)
    plan: list[PlannedStage] = []
    running: set[str] = set()

    def add(name: str, stamp_name: str | None, status: str, why: str = "") -> None:
        if force and status == "current":
            status, why = "will run", "--force"
        plan.append(PlannedStage(name, status, why))
        if status == "will run" and stamp_name:
            running.add(stamp_name)

    # the cohort, its validation, preprocessing
    if cfg.cohort.source == "raw":
        add("synth", None, "cohort given", str(cfg.raw_dir))
    else:
        key = stage_key("synth", cfg, {})
        current = current_stamp(cfg, stamps, "synth", key) is not None
        add("synth", "synth", "current" if current else "will run",
            "" if current else _stale_reason(stamps.read("synth"), stage_parts("synth", cfg, {})))  # fmt: skip
    from ctvlab.ingest.followup import declares_followups

    if "synth" in running or declares_followups(cfg.raw_dir):
        plan.append(
            PlannedStage("register", "will run", "when the cohort declares follow-ups (<patient>/followup/)")
        )
    else:
        plan.append(
            PlannedStage("register", "nothing to do", "no patient declares a follow-up (<patient>/followup/)")
        )
    plan.append(PlannedStage("validate", "will run", "every time: it reads every file"))
    meta_path = Path(cfg.prep_dir) / "dataset.json"
    if "synth" in running or not meta_path.exists():
        add(
            "preprocess",
            "preprocess",
            "will run",
            "after synth" if "synth" in running else "no prepared data",
        )
    else:
        recorded = json.loads(meta_path.read_text()).get("settings")
        changed = _changes(recorded, output_settings(cfg.preprocess))
        if changed:
            add(
                "preprocess",
                "preprocess",
                "will run",
                "settings changed: " + ", ".join(f"preprocess.{c}" for c in changed),
            )
        else:
            add("preprocess", None, "checks each patient", "reruns only patients whose files changed")
    # the stamped stages after it
    try:
        inputs, _ = study_inputs(cfg)
    except CtvlabError:
        inputs = None
    model_name = model_stage(cfg)
    stamped = [
        ("split", True),
        ("voxel-models", cfg.pipeline.voxel_models),
        ("stats", cfg.pipeline.stats),
        ("tune", cfg.pipeline.search),
        ("train", not cfg.pipeline.search),
        ("final", final_model_on(cfg)),
        ("loss-study", cfg.pipeline.loss_study),
        ("ablation", cfg.pipeline.ablation),
        ("evaluate", cfg.pipeline.evaluate),
    ]
    producers = {**_PRODUCERS, "model": "final" if final_model_on(cfg) else model_name}
    for stage, on in stamped:
        if not on:
            if stage not in ("tune", "train"):  # of those two, the other one trains the study's model
                plan.append(PlannedStage(stage, "off"))
            continue
        before = [producers[i] for i in STAGE_INPUTS[stage] if producers[i] in running]
        if before:
            add(stage, stage, "will run", "after " + ", ".join(dict.fromkeys(before)))
        elif inputs is None:
            add(stage, stage, "will run", "no split yet")
        else:
            now = stage_parts(stage, cfg, inputs)
            current = current_stamp(cfg, stamps, stage, digest(now)) is not None
            add(stage, stage, "current" if current else "will run",
                "" if current else _stale_reason(stamps.read(stage), now))  # fmt: skip
    plan.append(PlannedStage("report", "will run", "every time"))
    return plan


def outputs_current(cfg: StudyConfig, stage: str, stamp: dict[str, Any] | None) -> bool:
    """The outputs a stage's stamp stands for are still there: the model folder holds the very model the
    stamp recorded, the summary table or the results folder exists, the generated cohort's manifest
    exists (`current_stamp` applies it)."""
    if not stamp:
        return False
    results = Path(cfg.results_dir)
    model_folder = {
        "tune": "search_model" if final_model_on(cfg) else "model",
        "train": "model",
        "final": "model",
    }
    if stage in model_folder:  # the folder still holds the very model the stamp recorded
        return bool(stamp.get("model_digest")) and stamp["model_digest"] == model_digest(
            results / model_folder[stage]
        )
    if stage == "synth":
        return (Path(cfg.raw_dir) / "manifest.csv").exists()
    if stage in ("evaluate", "loss-study"):  # its summary table is there
        return (results / stage_named(stage).ident / "summary.csv").exists()
    return (results / stage_named(stage).ident).is_dir() if stage_named(stage).folder else True


def print_plan(plan: list[PlannedStage], console) -> None:
    from ctvlab.terminal import print_table

    colour = {"will run": "yellow", "current": "green"}
    rows = [
        (p.name, f"[{colour[p.status]}]{p.status}[/]" if p.status in colour else p.status, p.why)
        for p in plan
    ]
    print_table(console, "ctvlab run --dry-run: nothing was run", ("stage", "plan", "why"), rows, labels=3)


def current_stages(cfg: StudyConfig) -> dict[str, bool]:
    """Which stamped stages' outputs in the working directory are current for `cfg`: the stamp a stage
    wrote matches the key it would have now (settings, the inputs on disk, ctvlab's version). Outputs that
    carry no stamp (a stage command run on part of the study, such as `ctvlab voxel-models --target nel`)
    are reported as not current."""
    stamps = Stamps(cfg.workdir)
    try:
        inputs, _ = study_inputs(cfg)
    except CtvlabError:
        return dict.fromkeys(STAGE_INPUTS, False)
    return {stage: stamps.current(stage, stage_key(stage, cfg, inputs)) is not None for stage in STAGE_INPUTS}


def _report(cfg: StudyConfig) -> StageRecord:
    """The study's HTML report, written again after every run (it reads the other stages' outputs and marks
    any that are not current)."""
    from ctvlab.stages.report import report_stage

    path, run_id = report_stage(cfg, current_stages(cfg))
    return StageRecord("report", "ran", detail=str(path), run_ids=[run_id])


# --- summary -------------------------------------------------------------------------------------------


def print_study_summary(outcome: StudyOutcome, console) -> None:
    from ctvlab.terminal import print_table

    rows = [(r.name, r.status, f"{r.seconds:.0f}" if r.seconds else "", r.detail) for r in outcome.stages]
    print_table(console, "ctvlab run: summary", ("stage", "status", "seconds", "detail"), rows, labels=2)
    console.print(f"results: {outcome.workdir}/results  ·  prepared data: {outcome.workdir}/prep")
    console.print(
        f"MLflow: experiment [bold]{outcome.experiment}[/] (id {outcome.experiment_id}) in {outcome.tracking_uri}"
    )
    from ctvlab.tracking import DEFAULT_DB, REVIEW_VIEW_ID, ui_url

    # The runs table in the model-training view, on the saved view "CTV review" (docs/guides/mlflow-ui.md).
    route, view = f"experiments/{outcome.experiment_id}/runs", f"viewStateShareKey={REVIEW_VIEW_ID}"
    local = ui_url("http://127.0.0.1:5000", route, view)
    if outcome.tracking_uri == f"sqlite:///{Path.cwd() / DEFAULT_DB}":  # the store `make ui` opens
        console.print(f"open the MLflow UI with [bold]make ui[/] (or `ctvlab ui`) and browse to {local}")
    elif outcome.tracking_uri.startswith("sqlite"):
        console.print(
            f"open the MLflow UI with `ctvlab ui --tracking-uri {outcome.tracking_uri}` and browse to {local}"
        )
    else:
        console.print(f"open {ui_url(outcome.tracking_uri, route, view)} in a browser")
