"""The `ctvlab` command. Each subcommand parses its options and calls one library function.

Heavy libraries (torch, ray, mlflow) are imported inside the functions that need them, so that
`ctvlab --help` answers at once. A `CtvlabError` is printed as a message and exits non-zero; it never
shows a traceback.

About 600 lines in one module on purpose: typer declares each command's options in its signature, and one
file lets a reader compare every command's options at a glance (the job scripts run these same commands).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="ctvlab",
    help="Radiotherapy target definition for glioblastoma from diffusion and metabolic MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Opt = typer.Option


def _console(stderr: bool = False):
    from rich.console import Console

    # soft_wrap off a terminal: a job's log or a redirected file keeps each message on one searchable line
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=not stream.isatty())


@app.command()
def synth(
    out: Annotated[Path | None, Opt("--out", help="Folder to write the cohort into.")] = None,
    patients: Annotated[int | None, Opt("--patients", "-n", help="Number of patients (default 101).")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Random seed (default 0).")] = None,
    null: Annotated[
        bool, Opt("--null", help="Control cohort: diffusion/MRSI ignore hidden infiltration.")
    ] = False,
    preset: Annotated[
        str | None,
        Opt("--preset", help="Signal settings by name: today, mild, moderate, strong (a positive control)."),
    ] = None,
    report: Annotated[
        Path | None, Opt("--report", help="Print the statistics of an existing cohort.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    smoke_test: SmokeOpt = False,
) -> None:
    """Generate a synthetic cohort on the MNI152 anatomy (default --out: <workdir>/cohort), or report on
    one (--report DIR)."""
    from ctvlab.synth.table1 import cohort_report, print_report

    if report is not None:
        print_report(cohort_report(report), _console())
        return
    from ctvlab.synth.cohort import generate_cohort

    study = _settings(config, set_, workdir, smoke_test)
    out = out if out is not None else study.raw_dir
    from pydantic import ValidationError

    from ctvlab.config import SynthConfig, format_validation_error
    from ctvlab.errors import ConfigError

    # Validated again, so that a preset fills the settings the config leaves unset.
    data = study.synth.model_dump(mode="json", exclude_unset=True)
    data.update(
        {k: v for k, v in {"n_patients": patients, "seed": seed, "preset": preset}.items() if v is not None}
    )
    if null:
        data["null"] = True
    try:
        cfg = SynthConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "synth settings")) from None
    generate_cohort(out, cfg)
    print_report(cohort_report(out), _console())


@app.command()
def validate(
    cohort: Annotated[
        Path | None, typer.Argument(help="Cohort folder holding manifest.csv (default: the config's cohort).")
    ] = None,
    json_out: Annotated[bool, Opt("--json", help="Print the report as JSON.")] = False,
    config: Annotated[
        Path | None, Opt("--config", "-c", help="Study config (its cohort.limits cap file sizes).")
    ] = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    smoke_test: SmokeOpt = False,
    purpose: Annotated[
        str,
        Opt(
            "--for",
            help="study: what the study uses, each missing item named in a warning; predict: outcome "
            "columns and progression masks are expected empty.",
        ),
    ] = "study",
) -> None:
    """Check a cohort before any compute: every file loads, grids agree, masks are binary, values sane."""
    from ctvlab.ingest.manifest import PURPOSES
    from ctvlab.ingest.validate import validate_cohort
    from ctvlab.ingest.validation_report import print_validation

    if purpose not in PURPOSES:
        raise typer.BadParameter(f"--for must be one of: {', '.join(PURPOSES)}")
    cfg = _settings(config, set_, workdir, smoke_test)
    report = validate_cohort(cohort if cohort is not None else cfg.raw_dir, purpose=purpose,
                             limits=cfg.cohort.limits, voxel_mm=cfg.preprocess.voxel_mm,
                             progress=sys.stderr.isatty())  # fmt: skip
    if json_out:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        print_validation(report, _console())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def register(
    cohort: Annotated[
        Path | None, typer.Argument(help="Cohort folder holding manifest.csv (default: the config's cohort).")
    ] = None,
    min_nmi: Annotated[
        float | None,
        Opt(
            "--min-nmi",
            help="Refuse a registration whose NMI inside the brain stays below this (default 1.12).",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    smoke_test: SmokeOpt = False,
) -> None:
    """Register each patient's follow-up (<patient>/followup/) to its pre-RT T1c and write its progression
    masks on the pre-RT grid, the manifest pointing at them; QC figures and register_report.json in
    <cohort>/registration/.

    Exit 0 when every declared follow-up registered (or none is declared), 1 when some patient was refused
    or failed (nothing written for it; the others go on), 2 for a cohort-level problem."""
    from ctvlab.ingest.followup import MIN_NMI, Settings, not_registered, register_cohort

    cfg = _settings(config, set_, workdir, smoke_test)
    console = _console()
    # --smoke-test: a few iterations per stage, enough to check the files flow, not the accuracy
    settings = Settings.for_run(cfg.smoke_test)
    results = register_cohort(cohort if cohort is not None else cfg.raw_dir, settings,
                              MIN_NMI if min_nmi is None else min_nmi,
                              say=lambda m: console.print(m, markup=False))  # fmt: skip
    if not results:
        console.print("no patient declares a follow-up (<patient>/followup/): nothing to register")
    bad = not_registered(results)
    if bad:
        console.print(f"not registered: {', '.join(bad)}", markup=False)
    raise typer.Exit(1 if bad else 0)


@app.command()
def schemas(
    out: Annotated[Path, Opt("--out", help="Folder for the JSON Schema files.")] = Path("schemas"),
) -> None:
    """Write the JSON Schemas of the manifest, the configs and the prepared data."""
    from ctvlab.schemas import write_schemas

    for path in write_schemas(out):
        _console().print(f"wrote {path}")


# --- options shared by the commands -----------------------------------------------------------------
# Every job script under jobs/ runs one of these commands with the same options (`ctvlab.jobkit`).

ConfigOpt = Annotated[
    Path | None, Opt("--config", "-c", help="Study config (YAML); default: the study's settings.")
]
SetOpt = Annotated[
    list[str] | None,
    Opt("--set", help="Override one config setting, e.g. --set unet.train.epochs=2 (repeatable)."),
]
WorkdirOpt = Annotated[
    Path | None, Opt("--workdir", help="The study's working directory (default: the config's workdir).")
]
SmokeOpt = Annotated[bool, Opt("--smoke-test", help="Tiny CPU-only settings, results under <workdir>/smoke.")]
# Paths are made absolute: Ray workers (local or on a cluster) do not share the shell's working directory.
DataOpt = Annotated[
    Path | None,
    Opt(
        "--data",
        help="Prepared dataset folder (default: <workdir>/prep); results go beside it, in ../results.",
        resolve_path=True,
    ),
]
TrackingOpt = Annotated[
    str | None,
    Opt("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)."),
]
AddressOpt = Annotated[
    str | None, Opt("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
]


def _with_ci(estimate: float, intervals, which: int) -> str:
    """`0.812 [0.78, 0.85]`: an AUC with its patient-level bootstrap interval, when there is one."""
    if intervals is None:
        return f"{estimate:.3f}" if estimate == estimate else "-"
    iv = intervals[which]
    return f"{iv.estimate:.3f} [{iv.low:.2f}, {iv.high:.2f}]"


def _settings(
    config: Path | None,
    sets: list[str] | None = None,
    workdir: Path | None = None,
    smoke_test: bool = False,
    data: Path | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    out: Path | None = None,
):
    """The study config with the command line's overrides, in this order: the file (or the defaults),
    `--set`, `--workdir`, `--smoke-test` (results under <workdir>/smoke), `--data` (the working directory
    is its parent, as `ctvlab run` lays it out), `--tracking-uri`, `--address`. `out`: the one output folder
    of a command that writes nowhere else (`predict`).

    Inside a submitted Ray job the results must go to absolute paths (`ctvlab.jobkit.settle_job_paths`),
    and the job says where they are when it starts and when it ends."""
    import os

    from ctvlab.config import apply_smoke_test, check_folder, load_config, parse_overrides
    from ctvlab.jobkit import in_submitted_job, settle_job_paths, where_line

    cfg = load_config(config, parse_overrides(sets or []))
    if workdir is not None:
        cfg.workdir = workdir
    if smoke_test or cfg.smoke_test:
        cfg = apply_smoke_test(cfg)
    if data is not None and workdir is None:
        cfg.workdir = Path(data).resolve().parent
    # A file where a folder goes is a message here, not a traceback from the first mkdir of some stage.
    check_folder(
        cfg.workdir, "--workdir" if workdir is not None else f"workdir (from {config or 'the defaults'})"
    )
    for path, option in ((data, "--data"), (out, "--out")):
        if path is not None:
            check_folder(path, option)
    from ctvlab.errors import remember_given

    for given in (cfg.workdir, data, out):  # messages name the folders below them as the user gave them
        if given is not None:
            remember_given(given)
    if tracking_uri:
        cfg.tracking.tracking_uri = tracking_uri
    cfg.ray.address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if in_submitted_job() and out is not None:  # a command whose results all go to --out
        from ctvlab.jobkit import check_job_output

        check_job_output(out, cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        _JOB_WHERE.append(f"results: {Path(out).resolve()}")
        _console(stderr=True).print(_JOB_WHERE[-1])
    elif in_submitted_job():
        settle_job_paths(cfg, os.environ.get("MLFLOW_TRACKING_URI"))
        _JOB_WHERE.append(where_line(cfg))
        _console(stderr=True).print(_JOB_WHERE[-1])
    return cfg


_JOB_WHERE: list[str] = []


def _one_writer(cfg, command: str):
    """The working directory's lock for one stage's command (the one `ctvlab run` takes): a second
    command writing the same results and pointer files is refused (exit 5), naming the holder."""
    from ctvlab.lock import exclusive

    return exclusive(Path(cfg.workdir).resolve(), f"ctvlab {command}")


def _recorded(cfg):
    """The command's MLflow record through tracking-server outages (`ctvlab.tracking.recording`): said once
    on stderr, kept in the study's spool, sent when the server answers; exit 4 naming what is unrecorded
    when it does not answer by the end."""
    from ctvlab.outages import recording

    return recording(cfg, say=lambda m: _console(stderr=True).print(m, markup=False))


def _data(cfg, data: Path | None) -> Path:
    return Path(data) if data is not None else Path(cfg.prep_dir).resolve()


# The options every stage command shares, declared once (`stage_command`), in the order --help lists them:
# --data first, the command's own options, then these.
_SHARED = (
    ("config", ConfigOpt, None), ("set_", SetOpt, None), ("workdir", WorkdirOpt, None),
    ("smoke_test", SmokeOpt, False), ("tracking_uri", TrackingOpt, None), ("address", AddressOpt, None),
)  # fmt: skip


def stage_command(name: str):
    """Register `ctvlab NAME` for one stage of the study, with the options every stage command shares
    (`--data` and those of `_SHARED`). The function takes the study's settings with those options applied
    (`cfg`) and its prepared data folder (`data`), then its own options.

    A decorator rather than a Typer callback: a callback's options come before the command's name
    (`ctvlab --config X tune`), and every command and its job script take `--config` after it."""
    import functools
    import inspect

    def register(fn):
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[2:]  # after (cfg, data)
        kw = inspect.Parameter.KEYWORD_ONLY
        shared = [inspect.Parameter(n, kw, default=d, annotation=a) for n, a, d in _SHARED]
        data = inspect.Parameter("data", kw, default=None, annotation=DataOpt)

        @functools.wraps(fn)
        def command(**options):
            given = {n: options.pop(n) for n, _, _ in _SHARED}
            cfg = _settings(given["config"], given["set_"], given["workdir"], given["smoke_test"], options["data"],
                            given["tracking_uri"], given["address"])  # fmt: skip
            return fn(cfg, _data(cfg, options.pop("data")), **options)

        command.__annotations__ = {}  # Typer reads the signature below, whose annotations are objects
        command.__signature__ = inspect.Signature([data, *(p.replace(kind=kw) for p in own), *shared])  # type: ignore[attr-defined]
        return app.command(name)(command)

    return register


def _run_stage(cfg, data: Path, name: str, alone, **options):
    """Stage `name` under the working directory's lock and the MLflow outage guard: on the study's own
    prepared data as `ctvlab run` runs it (`pipeline.run_stage`, stamped), on other data `alone()` (the
    stage's driver by itself, unstamped). Returns the stage's own outcome."""
    from ctvlab.pipeline import run_stage

    with _one_writer(cfg, name), _recorded(cfg):
        return run_stage(cfg, name, **options)[1] if _studys_own(cfg, data) else alone()


def _studys_own(cfg, data: Path) -> bool:
    """The command runs on the study's own prepared data (`<workdir>/prep`): it is then the stage of
    `ctvlab run` (`ctvlab.pipeline.run_stage`), stamped; on other data it runs the stage's driver alone."""
    return Path(data).resolve() == Path(cfg.prep_dir).resolve()


@app.command()
def preprocess(
    raw: Annotated[
        Path | None,
        Opt(
            "--raw",
            help="Cohort folder (manifest.csv + NIfTI files); default: the config's cohort.",
            resolve_path=True,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        Opt("--out", help="Prepared dataset folder to write (default: <workdir>/prep).", resolve_path=True),
    ] = None,
    voxel_mm: Annotated[float | None, Opt("--voxel-mm", help="Output voxel size in mm (default 3).")] = None,
    ring_mm: Annotated[
        float | None, Opt("--ring-mm", help="Analysis ring around the T2L in mm (default 40).")
    ] = None,
    prune: Annotated[
        bool,
        Opt(
            "--prune",
            help="Delete old outputs of patients that are invalid, failed or no longer in the manifest.",
        ),
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    smoke_test: SmokeOpt = False,
    tracking_uri: TrackingOpt = None,
    address: AddressOpt = None,
) -> None:
    """Resample to 3 mm, normalise to the NAV mode, derive regions; write volumes and voxel tables (Ray Data).

    Exit 0 when every patient is complete, 1 when some are invalid or failed (their old outputs are kept,
    marked stale), 2 for a cohort-level problem (nothing touched), 4 for an infrastructure error."""
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort, print_preprocess_report

    cfg = _settings(config, set_, workdir, smoke_test, None, tracking_uri, address)
    raw = raw if raw is not None else Path(cfg.raw_dir).resolve()
    out = out if out is not None else Path(cfg.prep_dir).resolve()
    pcfg = cfg.preprocess.model_copy(
        update={k: v for k, v in {"voxel_mm": voxel_mm, "ring_mm": ring_mm}.items() if v is not None}
    )
    console = _console()
    report = preprocess_cohort(raw, out, pcfg, address=cfg.ray.address, console=console, prune=prune,
                               limits=cfg.cohort.limits)  # fmt: skip
    print_preprocess_report(report, console)
    raise typer.Exit(report.exit_code())


@stage_command("split")
def split(
    cfg,
    data: Path,
    seed: Annotated[int | None, Opt("--seed", help="Random seed (default 0).")] = None,
) -> None:
    """Draw the patient splits: train/val/test for the U-Net and 5 CV folds for the voxel models."""
    from ctvlab.stages.analysis import split_stage

    if seed is not None:
        cfg.split.seed = seed
    result, run_id = _run_stage(cfg, data, "split", lambda: split_stage(cfg, data))
    counts = result.table["dl_role"].value_counts()
    _console().print(
        f"split {result.digest[:12]}: train {counts.get('train', 0)}, val {counts.get('val', 0)}, "
        f"test {counts.get('test', 0)}; {cfg.split.n_folds} CV folds. Written to {data / 'splits.parquet'}; "
        f"MLflow run {run_id}"
    )


@stage_command("voxel-models")
def voxel_models(
    cfg,
    data: Path,
    model: Annotated[str | None, Opt("--model", help="rf or xgboost (default: the config's).")] = None,
    target: Annotated[
        str | None, Opt("--target", help="nel, cel or any (default: the config's targets).")
    ] = None,
    subgroup: Annotated[
        str | None, Opt("--subgroup", help="all, early or late (PFS below/above the median).")
    ] = None,
    all_: Annotated[bool, Opt("--all", help="The study's grid: {nel, cel} × {all, early, late}.")] = False,
    serial: Annotated[
        bool, Opt("--serial", help="Run the folds one after another instead of as Ray tasks.")
    ] = False,
) -> None:
    """Voxel-wise progression models with 5-fold patient-grouped CV (ROC AUC, importances, ROC curves)."""
    from ctvlab.stages.analysis import voxel_models_stage

    if model:
        cfg.voxel_models.model = model
    # The grid's options are settings like any other: the stamp records what ran.
    if all_ or target:
        cfg.voxel_models.targets = ["nel", "cel"] if all_ else [target]
    if all_ or subgroup:
        cfg.voxel_models.subgroups = ["all", "early", "late"] if all_ else [subgroup]
    results = _run_stage(cfg, data, "voxel-models", lambda: voxel_models_stage(cfg, data, parallel=not serial),
                         parallel=not serial)  # fmt: skip
    from ctvlab.terminal import print_table

    columns = ("target", "subgroup", "patients", "AUC mean ± SD", "distance-to-T2L AUC", "pooled AUC [95% CI]",
               "per-patient AUC [95% CI]", "top features (permutation)")  # fmt: skip
    rows = [
        (tg, sg, str(r.n_patients), f"{r.auc_mean:.3f} ± {r.auc_std:.3f}", f"{r.auc_distance:.3f}",
         _with_ci(r.pooled_roc()[2], r.auc_intervals(0), 0), _with_ci(math.nan, r.auc_intervals(0), 1),
         ", ".join(r.importance_table().index[:3]))
        for (tg, sg), r in results.items()
    ]  # fmt: skip
    console = _console()
    print_table(
        console, f"{cfg.voxel_models.model} voxel models, 5-fold patient-grouped CV", columns, rows, labels=2
    )
    console.print(f"tables and figures: {Path(cfg.results_dir, 'voxel_models')}")


@stage_command("stats")
def stats(
    cfg,
    data: Path,
) -> None:
    """Per-patient medians per voxel category; Wilcoxon and Mann-Whitney tests vs stable NAV."""
    from ctvlab.stages.analysis import stats_stage

    result, run_id = _run_stage(cfg, data, "stats", lambda: stats_stage(cfg, data))
    from ctvlab.terminal import print_table

    columns = ("feature", "category", "pairs (zero diff.)", "median diff", "Wilcoxon p", "Holm p",
               "Mann-Whitney p", "Holm p")  # fmt: skip
    rows = [
        (r.feature, r.category, f"{r.n_pairs} ({r.n_zero})", f"{r.median_difference:+.3f}", f"{r.wilcoxon_p:.2g}",
         f"{r.wilcoxon_p_holm:.2g}", f"{r.mannwhitney_p:.2g}", f"{r.mannwhitney_p_holm:.2g}")
        for r in result.tests.sort_values("wilcoxon_p").head(20).itertuples()
    ]  # fmt: skip
    console = _console()
    print_table(console, "Stable NAV vs progressed voxels (per-patient medians)", columns, rows, labels=2)
    console.print(f"tables and box plots: {Path(cfg.results_dir, 'stats')}; MLflow run {run_id}")


@stage_command("train")
def train(
    cfg,
    data: Path,
    num_workers: Annotated[int | None, Opt("--num-workers", help="Ray Train workers (DDP ranks).")] = None,
    use_gpu: Annotated[bool, Opt("--use-gpu", help="One GPU per worker (NCCL, bf16 autocast).")] = False,
    resume: Annotated[
        bool, Opt("--resume", help="Continue the last interrupted run from its checkpoint.")
    ] = False,
) -> None:
    """Train the 3D U-Net on Ray Train; log curves and register the best model in MLflow."""
    from ctvlab.stages.train import train_unet

    if num_workers is not None:
        cfg.unet.train.num_workers = num_workers
    if use_gpu:
        cfg.unet.train.use_gpu = True
    outcome = _run_stage(
        cfg, data, "train", lambda: train_unet(cfg, data, resume=resume), resume=resume or None
    )
    best = ", ".join(f"{k} {v:.3f}" for k, v in sorted(outcome.best_metrics.items()) if k.startswith("val_"))
    _console().print(
        f"best epoch {outcome.best_epoch}: {best}\nmodel: {outcome.model_dir}\nregistered: "
        f"{outcome.model_uri or 'with the tracking spool, once the server answers'} "
        f"(MLflow run {outcome.run_id})"
    )
    if outcome.metrics_replayed:
        _console().print(
            f"the tracking server missed {outcome.metrics_replayed} epoch value(s) during training; they were "
            "logged from the checkpoint's history, so the run's curves are complete"
        )


@stage_command("tune")
def tune(
    cfg,
    data: Path,
    resume: Annotated[
        bool, Opt("--resume", help="Restore the last interrupted search (finished trials are kept).")
    ] = False,
) -> None:
    """Hyperparameter search on Ray Tune (grid, then random search)."""
    from ctvlab.stages.tune import print_search, tune_study

    outcome = _run_stage(
        cfg, data, "tune", lambda: tune_study(cfg, data, resume=resume), resume=resume or None
    )
    print_search(outcome, _console())
    if outcome.model_uri is None and cfg.unet.final_loss is not None:
        _console().print(
            f"the best configuration is trained again with {cfg.unet.final_loss} by [bold]ctvlab final[/] "
            "(unet.final_loss), which registers the study's model"
        )


@stage_command("final")
def final(
    cfg,
    data: Path,
) -> None:
    """The final model: the current search's best configuration trained again with unet.final_loss (the
    study: PCC) for unet.train.epochs with early stopping; registered as the study's model."""
    from ctvlab.errors import CtvlabError
    from ctvlab.pipeline import current_search_best, run_stage

    if not _studys_own(cfg, data):
        raise CtvlabError(f"ctvlab final trains on the study's prepared data ({cfg.prep_dir}), not {data}")
    if cfg.unet.final_loss is None:
        raise CtvlabError("unet.final_loss is not set: the search's best model is the study's model")
    if not current_search_best(cfg):
        raise CtvlabError("no current search for these settings and data: run ctvlab tune first")
    with _one_writer(cfg, "final"), _recorded(cfg):
        record, outcome = run_stage(cfg, "final")
    _console().print(f"{record.detail}\nmodel: {outcome.model_dir} (MLflow run {outcome.run_id})")


@stage_command("loss-study")
def loss_study(
    cfg,
    data: Path,
) -> None:
    """Loss study (Supp. Figs. 2, 3): the last search's best configuration (else the unet settings) trained
    per loss and per Tversky β, scored on the test patients."""
    from ctvlab.pipeline import current_search_best
    from ctvlab.splits import load_split
    from ctvlab.stages.loss_study import print_loss_study, run_loss_study
    from ctvlab.stages.tune import last_best_params

    console = _console()
    best = current_search_best(cfg) if _studys_own(cfg, data) else last_best_params(cfg, load_split(data))
    console.print(f"loss study from {'the search: ' + str(best) if best else 'the unet settings'}")
    print_loss_study(
        _run_stage(cfg, data, "loss-study", lambda: run_loss_study(cfg, data, best=best)), console
    )


@stage_command("ablation")
def ablation(
    cfg,
    data: Path,
) -> None:
    """Modality ablation (Fig. 2): a random search per input set."""
    from ctvlab.stages.ablation import print_ablation, run_ablation

    print_ablation(_run_stage(cfg, data, "ablation", lambda: run_ablation(cfg, data)), _console())


@stage_command("evaluate")
def evaluate(
    cfg,
    data: Path,
    model_uri: Annotated[
        str | None,
        Opt(
            "--model-uri",
            help="models:/name/version, runs:/id/model or a folder (default: latest registered).",
        ),
    ] = None,
    split_name: Annotated[str, Opt("--split", help="Patients to evaluate: test (default) or val.")] = "test",
) -> None:
    """Model CTV vs RTOG and EORTC CTVs: metrics, Wilcoxon tests, figures, NIfTI CTVs, one MLflow run.

    On the study's own data, test patients and model, this is the evaluate stage of `ctvlab run`: the
    results are stamped current for `ctvlab report` and the model is crowned @champion."""
    from ctvlab.stages.evaluate import evaluate_study, print_evaluation

    console = _console()
    own = [why for why, off in (("--data is not the study's prepared data", Path(data).resolve() != Path(cfg.prep_dir).resolve()),
                                ("--split val", split_name != "test"), ("--model-uri", model_uri is not None)) if off]  # fmt: skip
    with _one_writer(cfg, "evaluate"), _recorded(cfg):
        if not own:
            from ctvlab.pipeline import Stamps, evaluate_stage, study_inputs

            inputs, study_model = study_inputs(cfg)
            evaluate_stage(cfg, Stamps(Path(cfg.workdir).resolve()), inputs, study_model, console, force=True)
            return
        outcome = evaluate_study(cfg, data, model_uri=model_uri, split_name=split_name, console=console)
    print_evaluation(outcome, console)
    console.print(
        f"not the study's evaluation ({', '.join(own)}): not stamped for `ctvlab report`, no @champion"
    )


@app.command()
def predict(
    raw: Annotated[
        Path, typer.Argument(help="Cohort folder (manifest.csv); outcomes may be empty.", resolve_path=True)
    ],
    out: Annotated[Path, Opt("--out", help="Output folder: one sub-folder per patient.", resolve_path=True)],
    patient: Annotated[
        list[str] | None, Opt("--patient", help="Predict only this patient (repeat for several).")
    ] = None,
    model: Annotated[
        str,
        Opt("--model", help="models:/name@alias, models:/name/version, runs:/id/model or a model folder."),
    ] = "models:/ctvlab-unet@champion",
    threshold: Annotated[
        float | None, Opt("--threshold", help="Model CTV threshold (default: the model's, else 0.5).")
    ] = None,
    device: Annotated[str | None, Opt("--device", help="cpu or cuda (default: cuda when present).")] = None,
    rtstruct: Annotated[
        bool, Opt("--rtstruct", help="Also write the CTVs as one DICOM RTSTRUCT (needs --dicom-ref).")
    ] = False,
    dicom_ref: Annotated[
        Path | None,
        Opt(
            "--dicom-ref",
            help="The planning series: its folder, or a folder of <patient_id>/ series folders.",
            resolve_path=True,
        ),
    ] = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    address: AddressOpt = None,
) -> None:
    """Apply a trained model to new patients: probability and CTVs on the native T1c grid, overlay, report."""
    from ctvlab.stages.predict import predict_cohort, print_prediction

    if rtstruct != (dicom_ref is not None):
        raise typer.BadParameter("--rtstruct and --dicom-ref go together")
    cfg = _settings(config, tracking_uri=tracking_uri, address=address, out=out)
    console = _console()
    outcome = predict_cohort(raw, out, cfg, model_uri=model, patients=patient, threshold=threshold,
                             device=device, console=console, dicom_ref=dicom_ref)  # fmt: skip
    print_prediction(outcome, console)
    raise typer.Exit(1 if outcome.failed else 0)


@app.command("export-dicom")
def export_dicom_(
    raw: Annotated[Path, typer.Argument(help="Cohort folder (manifest.csv).")],
    out: Annotated[Path, Opt("--out", help="The new DICOM folder (must not exist).", resolve_path=True)],
    patient: Annotated[
        list[str] | None, Opt("--patient", help="Export only this patient (repeat for several).")
    ] = None,
) -> None:
    """Write a cohort's images as DICOM MR series and its masks as one RTSTRUCT per patient."""
    from ctvlab.dicom.export import export_cohort

    console = _console()
    done = export_cohort(raw, out, patient, progress=lambda pid: console.print(f"exported patient {pid}"))
    console.print(
        f"wrote {out} ({len(done)} patient(s)): <patient>/<column>/ series, <patient>/masks/rtstruct.dcm"
    )


@app.command("import-dicom")
def import_dicom_(
    dicom_dir: Annotated[
        Path, typer.Argument(help="Folder of DICOM files (any nesting, one or many patients).")
    ],
    out: Annotated[Path, Opt("--out", help="The new cohort folder (must not exist).", resolve_path=True)],
    series: Annotated[
        Path, Opt("--series", help="Series map (YAML): which series and ROIs fill which manifest column.")
    ],
    patient: Annotated[
        list[str] | None, Opt("--patient", help="Import only this PatientID (repeat for several).")
    ] = None,
    clinical: Annotated[
        Path | None,
        Opt("--clinical", help="CSV of clinical columns by patient_id (default: the series map's)."),
    ] = None,
) -> None:
    """Convert DICOM series (dcm2niix) and RTSTRUCT masks into a cohort folder in ctvlab's layout."""
    from ctvlab.dicom.importer import import_dicom

    console = _console()
    outcome = import_dicom(dicom_dir, out, series, patient, clinical=clinical,
                           progress=lambda pid: console.print(f"imported patient {pid}"))  # fmt: skip
    filled = ", ".join(f"{c} ({len(v)})" for c, v in outcome.columns.items() if c != "patient_id")
    console.print(f"wrote {outcome.out} ({len(outcome.patients)} patient(s)); columns filled: {filled}")
    console.print(f"next: ctvlab validate {outcome.out} --for predict")


@app.command("import-layout")
def import_layout_(
    layout: Annotated[
        str,
        typer.Argument(
            help="The collection's layout: brats2021, brats2023-glioma, upenn-gbm, "
            "rhuh-gbm, lumiere-deepbratumia, lumiere-hd-glio-auto."
        ),
    ],
    src: Annotated[Path, typer.Argument(help="The collection's folder, as downloaded.")],
    out: Annotated[Path, Opt("--out", help="The new cohort folder (must not exist).", resolve_path=True)],
    labels: Annotated[
        Path | None, Opt("--labels", help="YAML file overriding the layout's labels, files or time points.")
    ] = None,
    patient: Annotated[
        list[str] | None, Opt("--patient", help="Import only this patient folder (repeat for several).")
    ] = None,
    timepoint: Annotated[
        str | None, Opt("--timepoint", help="The pre-RT time point's folder name (default: the layout's).")
    ] = None,
) -> None:
    """Convert a public collection (BraTS, UPenn-GBM, RHUH-GBM, LUMIERE) into a cohort folder in ctvlab's layout.

    Exit 0 when every patient was imported, 1 when some were skipped (each named, with why), 2 when none
    could be (nothing is written)."""
    from ctvlab.ingest.import_layout import REPORT_NAME, import_layout
    from ctvlab.ingest.layouts import preset

    console = _console()
    chosen = preset(layout, labels)
    outcome = import_layout(chosen, src, out, patient, timepoint,
                            progress=lambda pid: console.print(f"imported patient {pid}", markup=False))  # fmt: skip
    for pid, why in outcome.skipped.items():
        _console(stderr=True).print(f"skipped {pid}: {why}", markup=False)
    console.print(f"{chosen.title}; what it lacks stays empty in the manifest:", markup=False)
    for note in outcome.lacks:
        console.print(f"  - {note}", markup=False)
    console.print(f"wrote {outcome.out} ({len(outcome.rows)} patient(s), {len(outcome.skipped)} skipped); "
                  f"per-patient notes in {REPORT_NAME}", markup=False)  # fmt: skip
    console.print(f"next: ctvlab validate {outcome.out}", markup=False)
    raise typer.Exit(1 if outcome.skipped else 0)


@app.command()
def run(
    config: Annotated[
        Path | None, Opt("--config", "-c", help="Study config, e.g. jobs/configs/demo.yaml.")
    ] = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    smoke_test: SmokeOpt = False,
    force: Annotated[bool, Opt("--force", help="Run every stage even when its outputs are current.")] = False,
    keep_going: Annotated[
        bool, Opt("--keep-going", help="After a failed stage, still run the stages that do not need it.")
    ] = False,
    tracking_uri: TrackingOpt = None,
    address: AddressOpt = None,
    dry_run: Annotated[
        bool,
        Opt(
            "--dry-run", help="Print what would run and why (the setting or input that changed); run nothing."
        ),
    ] = False,
) -> None:
    """The whole study: cohort → validate → preprocess → split → voxel models, stats → search → evaluate.

    Stops at the first failed stage (exit code of its error) unless --keep-going."""
    from ctvlab.pipeline import plan_study, print_plan, run_study

    cfg = _settings(config, set_, workdir, smoke_test, None, tracking_uri, address)
    if dry_run:
        print_plan(plan_study(cfg, force=force), _console())
        return
    run_study(cfg, _console(), force=force, keep_going=keep_going)


@app.command()
def sync(
    spool: Annotated[
        Path | None,
        typer.Argument(
            help="The spool folder an outage left (default: <workdir>/tracking-spool of the config)."
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    smoke_test: SmokeOpt = False,
    tracking_uri: Annotated[
        str | None,
        Opt(
            "--tracking-uri",
            help="Send to this tracking server instead of the one the writes were meant for.",
        ),
    ] = None,
) -> None:
    """Send to MLflow what a tracking-server outage left unrecorded (runs, metrics, artifacts, models).

    Exit 0 when everything was sent, 4 when the server still does not answer (nothing is lost: run it
    again later)."""
    from ctvlab.errors import shown
    from ctvlab.spool import Spool
    from ctvlab.tracking import spool_dir, sync_spool

    if spool is None:
        spool = spool_dir(_settings(config, set_, workdir, smoke_test))
    kept = Spool(spool)
    if not kept.has_pending():
        _console().print(f"nothing to send: {shown(spool)} holds no unrecorded write", markup=False)
        return
    what = kept.summary()
    sent = sync_spool(spool, tracking_uri)
    _console().print(f"sent {sent} write(s) to MLflow: {what}", markup=False)


@app.command()
def report(
    config: Annotated[
        Path | None, Opt("--config", "-c", help="Study config, e.g. jobs/configs/demo.yaml.")
    ] = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    smoke_test: SmokeOpt = False,
    out: Annotated[
        Path | None, Opt("--out", help="HTML file (default <workdir>/results/report.html).")
    ] = None,
    log: Annotated[bool, Opt("--log/--no-log", help="Also log it to the study's MLflow experiment.")] = True,
    tracking_uri: TrackingOpt = None,
) -> None:
    """The study's results in one self-contained HTML file, each beside the paper's value (the last stage of
    `ctvlab run`); outputs that are not current for the config are marked stale."""
    from ctvlab.errors import CtvlabError
    from ctvlab.pipeline import current_stages
    from ctvlab.stages.report import build_report, report_stage

    if out is not None and Path(out).is_dir():
        raise CtvlabError(f"--out {out} is a folder: give the HTML file to write")
    cfg = _settings(config, set_, workdir, smoke_test, None, tracking_uri, None)
    if not Path(cfg.workdir).is_dir():
        raise CtvlabError(f"{cfg.workdir} does not exist: nothing to report; run `ctvlab run` first")
    current = current_stages(cfg)
    if log and out is None:
        with _recorded(cfg):
            path, run_id = report_stage(cfg, current)
        _console().print(f"wrote {path}; logged to MLflow run {run_id}")
    else:
        _console().print(f"wrote {build_report(cfg, current, out)}")


@app.command()
def ui(
    port: Annotated[int, Opt("--port", help="Port on 127.0.0.1.")] = 5000,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Open the MLflow UI over the local store (bound to 127.0.0.1 only)."""
    import os
    import subprocess

    from ctvlab.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("http"):
        _console().print(f"{uri} is a tracking server: open it in a browser.")
        return
    _console().print(f"MLflow UI over {uri} at http://127.0.0.1:{port} (Ctrl-C to stop)")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    raise typer.Exit(subprocess.call(cmd, env=os.environ.copy()))


def main(args: list[str] | None = None, prog_name: str | None = None, command: str | None = None) -> None:
    """Console-script entry point (and the job scripts'): user errors become one message and a non-zero
    exit code. With `command`, `args` are that command's alone. Inside a submitted job, the last line says again where the results are."""
    from ctvlab.errors import CtvlabError

    code: int | str | None = 0
    try:
        if command is None:
            app(args=args, prog_name=prog_name)
        else:  # one command on its own, as a job script runs it
            typer.main.get_command(app).commands[command].main(args=args, prog_name=prog_name)
    except SystemExit as e:
        code = e.code
    except CtvlabError as e:
        _error_line(e)
        code = e.exit_code
    except OSError as e:  # a writer outside the atomic ones (Ray's files, a lock): the same one line
        from ctvlab.errors import storage_error

        err = storage_error(e)
        if err is None:
            raise
        _error_line(err)
        code = err.exit_code
    except KeyboardInterrupt:
        _console(stderr=True).print("[yellow]interrupted[/]")
        code = 130
    for line in _JOB_WHERE:
        _console(stderr=True).print(line)
    sys.exit(code)


def _error_line(e: Exception) -> None:
    from rich.markup import escape

    _console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}")


def run_job(command: str) -> None:
    """A job script's whole body: run `ctvlab COMMAND` with the script's arguments, exactly as the command
    line would (the same options, defaults and exit codes), and exit."""
    from pathlib import Path

    main(sys.argv[1:], prog_name=f"python jobs/{Path(sys.argv[0]).name}", command=command)


if __name__ == "__main__":
    main()
