"""The analysis stages: the patient split, the voxel models' cross-validation and the voxel statistics, each
run on a prepared dataset and recorded in MLflow. Patient ids never reach MLflow: tables are pseudonymised
first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctvlab.config import StudyConfig
from ctvlab.errors import DataError
from ctvlab.splits import Split, load_split, pseudonymised, write_split
from ctvlab.tracking import NOTE, STAGE_DESCRIPTIONS, base_tags, tracker_for


def split_stage(cfg: StudyConfig, prep: Path) -> tuple[Split, str]:
    """Draw and write the patient splits; log the (pseudonymised) table and its digests. Returns the split
    and the MLflow run id."""
    from ctvlab.data.readers import read_patients

    prep = Path(prep)
    split = write_split(prep, cfg.split)
    patients = read_patients(prep)[["patient_id", "cohort", "progression_type"]]
    table = split.table.merge(patients, on="patient_id")
    tracker = tracker_for(cfg)
    with tracker.run("split", base_tags("split", split.dataset_digest, split.digest)) as run:
        run.params({"split": cfg.split.model_dump(mode="json")})
        run.dataset("prepared", split.dataset_digest, str(prep.resolve()), context="split")
        counts: dict[str, Any] = {
            f"n_{role}": int((table["dl_role"] == role).sum()) for role in ("train", "val", "test")
        }
        for (role, cohort), n in table.groupby(["dl_role", "cohort"]).size().items():
            counts[f"n_{role}_{cohort}"] = int(n)
        counts.update(
            {f"n_fold_{k}": int(n) for k, n in table["rf_fold"].value_counts().sort_index().items()}
        )
        run.metrics(counts)
        run.table(pseudonymised(prep, table), "splits.csv", "split")
        run_id = run.run_id
    return split, run_id


def current_split(prep: Path) -> Split:
    return load_split(prep)


def _require_features(prep: Path, patient_ids: list[str], features: list[str]) -> None:
    """Refuse voxel models over a map some patients lack (a public collection without FA), naming both;
    imputing a whole map at its normal-appearing level would make it a constant, not the study's feature."""
    from ctvlab.preprocess.prepare import describe_missing, missing_channels

    lacking = missing_channels(prep, patient_ids, features)
    if lacking:
        kept = [f for f in features if f not in lacking]
        raise DataError(
            f"the voxel models use {', '.join(lacking)}, which the cohort does not have ({describe_missing(lacking)}); "
            f"leave them out (voxel_models.features: {kept}) or give those maps in the manifest and run "
            "`ctvlab preprocess` again"
        )


def voxel_models_note(
    target: str, subgroup: str, auc: float, sd: float, distance: float, patients: int
) -> str:
    """A voxel model's description in the MLflow UI: its headline (the CV AUC beside the distance-only
    baseline, or that no fold could score it), then what the stage does."""
    import math

    if math.isnan(auc):
        result = "ROC AUC undefined: no test fold held both classes"
    else:
        result = f"ROC AUC {auc:.2f} ± {sd:.2f} over the folds, distance to the T2L alone {distance:.2f}"
    return f"{target.upper()} progression ({subgroup}): {result}; {patients} patients.\n\n{STAGE_DESCRIPTIONS['voxel-models']}"


def voxel_models_stage(
    cfg: StudyConfig,
    prep: Path,
    *,
    targets: list[str] | None = None,
    subgroups: list[str] | None = None,
    parallel: bool = True,
) -> dict[tuple[str, str], Any]:
    """Voxel-model cross-validation for each (target, subgroup); one MLflow parent run each, a child per fold.

    Writes results/voxel_models/<model>-<target>-<subgroup>/ (fold, importance and ROC tables, roc.json, figures).
    """
    from ctvlab.atomic import write_csv_atomic, write_json_atomic
    from ctvlab.ctv.figures import plot_roc_curves
    from ctvlab.progress import StepProgress
    from ctvlab.runtime import init_ray
    from ctvlab.voxel_models.cv import missing_policy_check, run_grid
    from ctvlab.voxel_models.plots import plot_importances

    prep = Path(prep)
    split = load_split(prep)
    vcfg = cfg.voxel_models
    _require_features(prep, sorted(split.table["patient_id"]), list(vcfg.features))
    targets = targets or list(vcfg.targets)
    subgroups = subgroups or list(vcfg.subgroups)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, log_dir=Path(cfg.workdir) / "logs")
    folds = split.folds()
    check = vcfg.model == "rf" and vcfg.missing_check and "all" in subgroups
    n_folds = len(set(folds.values()))
    steps = len(targets) * (len(subgroups) + (3 if check else 0)) * n_folds
    with StepProgress(f"{vcfg.model} CV", steps) as progress:

        def step(t, s, r):
            progress.step(f"{t}/{s} fold {r.fold}: AUC {r.auc:.3f}")

        results = run_grid(prep, folds, vcfg, targets, subgroups, parallel=parallel, on_fold=step)
        policies = (
            missing_policy_check(prep, folds, vcfg, targets, done=results, parallel=parallel, on_fold=step)
            if check
            else None
        )
    tracker = tracker_for(cfg)
    if policies is not None:
        out = Path(cfg.results_dir, "voxel_models")
        out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(out / "missing_policies.csv", policies)
        with tracker.run(
            "voxel-models missing MRSI policies",
            base_tags("voxel-models", split.dataset_digest, split.digest),
        ) as run:
            run.params({"voxel_models": vcfg.model_dump(mode="json")})
            for r in policies.itertuples():
                run.metrics(
                    {f"{k}.{r.target}.{r.policy}": getattr(r, k) for k in ("auc_all", "auc_anat", "gain")}
                )
            run.table(policies, "missing_policies.csv")
    for (target, subgroup), res in results.items():
        res.auc_intervals(vcfg.bootstrap_resamples, seed=cfg.split.seed)
        out = Path(cfg.results_dir, "voxel_models", f"{vcfg.model}-{target}-{subgroup}")
        out.mkdir(parents=True, exist_ok=True)
        frames = res.to_frames()
        for name, df in frames.items():
            write_csv_atomic(out / f"{name}.csv", df)
        fpr, tpr, auc = res.pooled_roc()
        write_json_atomic(out / "roc.json", {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc,
                                             "auc_mean": res.auc_mean, "auc_std": res.auc_std,
                                             "auc_distance": res.auc_distance})  # fmt: skip
        title = f"{vcfg.model.upper()} {target.upper()} progression, {subgroup} patients"
        figs = [
            plot_roc_curves(
                res.roc_curves(),
                out / "roc.png",
                f"{title}: AUC {res.auc_mean:.2f} ± {res.auc_std:.2f} (distance to T2L {res.auc_distance:.2f})",
            ),
            plot_importances(res.importance_table(), out / "importances.png", f"{title}: feature importance"),
        ]
        tags = {**base_tags("voxel-models", split.dataset_digest, split.digest), "ctvlab.target": target,
                "ctvlab.subgroup": subgroup}  # fmt: skip
        with tracker.run(f"voxel-models {vcfg.model} {target}/{subgroup}", tags) as run:
            run.params({"voxel_models": vcfg.model_dump(mode="json"), **res.params()})
            run.dataset("voxels", split.dataset_digest, str((prep / "voxels").resolve()), context="training")
            run.metrics(res.summary())
            run.tags({NOTE: voxel_models_note(target, subgroup, res.auc_mean, res.auc_std, res.auc_distance,
                                              res.n_patients)})  # fmt: skip
            for name, df in frames.items():
                run.table(df, f"{name}.csv")
            for f in figs:
                run.artifact(f, "figures")
            for fold in res.folds:
                with tracker.run(f"fold {fold.fold}", tags, parent_run_id=run.run_id) as child:
                    child.params(
                        {"fold": fold.fold, "target": target, "subgroup": subgroup, "model": vcfg.model}
                    )
                    child.metrics({"auc": fold.auc, "n_train": fold.n_train, "n_test": fold.n_test,
                                   "n_train_patients": fold.n_train_patients, "n_test_patients": fold.n_test_patients,
                                   "test_pos": fold.test_pos, "test_neg": fold.test_neg, "fit_s": fold.fit_s})  # fmt: skip
                    child.metrics({f"importance_impurity.{k}": v for k, v in fold.impurity.items()})
                    child.metrics({f"importance_permutation.{k}": v for k, v in fold.permutation.items()})
                    if fold.reason:
                        child.tags({"ctvlab.skipped_reason": fold.reason})
            write_json_atomic(out / "mlflow_run.json", {"run_id": run.run_id})
    return results


def stats_stage(cfg: StudyConfig, prep: Path):
    """Voxel statistics over every prepared patient; tables and box plots to results/stats and MLflow."""
    from ctvlab.atomic import write_csv_atomic
    from ctvlab.data.readers import read_patients
    from ctvlab.voxel_models.plots import plot_category_boxes
    from ctvlab.voxel_models.stats import statistics_by_cohort, voxel_statistics

    prep = Path(prep)
    split = load_split(prep)
    result = voxel_statistics(prep, None, cfg.stats)
    out = Path(cfg.results_dir, "stats")
    out.mkdir(parents=True, exist_ok=True)
    frames = result.to_frames()
    frames["medians"] = pseudonymised(prep, result.medians)
    for name, df in frames.items():
        write_csv_atomic(out / f"{name}.csv", df)
    fig = plot_category_boxes(
        result.medians, out / "category_boxes.png", result.tests, test=cfg.stats.primary_test
    )
    # Supplementary Fig. 1 by therapy group: each treatment cohort's medians and tests.
    patients = read_patients(prep)
    cohorts = dict(zip(patients["patient_id"].astype(str), patients["cohort"].astype(str), strict=True))
    by_cohort, cohort_tests = statistics_by_cohort(prep, {p: c for p, c in cohorts.items()
                                                          if p in set(result.medians["patient_id"])}, cfg.stats)  # fmt: skip
    write_csv_atomic(out / "tests_by_cohort.csv", cohort_tests)
    figs = [fig] + [
        plot_category_boxes(
            r.medians,
            out / f"category_boxes_{c}.png",
            r.tests,
            test=cfg.stats.primary_test,
            title=f"{c} cohort ({r.medians['patient_id'].nunique()} patients)",
        )
        for c, r in by_cohort.items()
        if not r.medians.empty
    ]
    tracker = tracker_for(cfg)
    with tracker.run("stats", base_tags("stats", split.dataset_digest, split.digest)) as run:
        run.params({"stats": cfg.stats.model_dump(mode="json")})
        run.dataset("voxels", split.dataset_digest, str((prep / "voxels").resolve()), context="analysis")
        run.metrics(result.summary())
        tests = result.tests
        for r in tests.itertuples():
            key = f"{r.feature}.{r.category.replace('->', '_to_')}"
            run.metrics({f"p_wilcoxon.{key}": r.wilcoxon_p, f"p_wilcoxon_holm.{key}": r.wilcoxon_p_holm})
        for name, df in frames.items():
            run.table(df, f"{name}.csv")
        run.table(cohort_tests, "tests_by_cohort.csv")
        for f in figs:
            run.artifact(f, "figures")
        run_id = run.run_id
    return result, run_id
