"""The modality-ablation stage (`ctvlab ablation`, Fig. 2): one random search per input set, each best
model scored on the test patients, paired tests between the sets, one MLflow run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ctvlab.atomic import write_csv_atomic
from ctvlab.config import StudyConfig
from ctvlab.unet.modality_ablation import (
    ABLATION_METRICS,
    pairwise_wilcoxon,
    plot_ablation,
    plot_curves,
    test_metrics,
    validation_curves,
)


@dataclass
class AblationOutcome:
    run_id: str
    per_patient: pd.DataFrame  # patient_id, modality_set, metrics
    tests: pd.DataFrame  # metric, set_a, set_b, p_value, median_difference
    best: pd.DataFrame  # one row per set: best params and validation Tversky
    figure: Path
    out_dir: Path
    elapsed_s: float
    curves: pd.DataFrame | None = None  # Fig. 2a: modality_set, epoch, validation PCC of the best trial
    curves_figure: Path | None = None


def run_ablation(cfg: StudyConfig, prep: Path | None = None) -> AblationOutcome:
    """A random search per modality set, the best model of each on the test split, tests between sets."""
    from ctvlab.splits import pseudonymised
    from ctvlab.stages.tune import scored_on_test_patients
    from ctvlab.study import BEST_SELECTION_METRIC
    from ctvlab.tracking import base_tags, tracker_for
    from ctvlab.unet.search import best_trial, run_search
    from ctvlab.unet.spaces import random_param_space
    from ctvlab.unet.trainer import provenance_spec

    t0 = time.perf_counter()
    prep, split, test_ids = scored_on_test_patients(cfg, prep)
    tracker = tracker_for(cfg)
    sets = list(cfg.tune.ablation_sets)
    from ctvlab.unet.inputs import require_channels

    for s in sets:  # before any search: a set the cohort cannot feed is refused, naming it
        require_channels(prep, sorted(split.table["patient_id"]), s)
    out = Path(cfg.results_dir, "ablation").resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    extra = provenance_spec(prep, split)
    # One loss for every set (the study's PCC + BCE): the sets differ in their inputs alone.
    space = cfg.tune.space.model_copy(update={"loss": [cfg.tune.ablation_loss]})
    best_runs: dict[str, str] = {}
    with tracker.run("ablation", base_tags("ablation", split.dataset_digest, split.digest)) as run:
        run.params({"ablation": {"sets": sets, "samples_per_set": cfg.tune.ablation_samples,
                                 "epochs_per_trial": cfg.tune.epochs_per_trial, "loss": cfg.tune.ablation_loss}})  # fmt: skip
        per_patient, best_rows = [], []
        for s in sets:
            with tracker.run(
                f"tune-{s}", base_tags("tune", split.dataset_digest, split.digest), run.run_id
            ) as set_log:  # a search that fails ends its run FAILED, and so does the ablation's
                trials = run_search(cfg, prep, random_param_space(space, s), name=f"ablation-{stamp}-{s}",
                                    num_samples=cfg.tune.ablation_samples, parent_run_id=set_log.run_id,
                                    extra_spec=extra)  # fmt: skip
                best = best_trial(trials)
                set_log.table(trials.drop(columns=["path", "model_dir"]), "trials.csv", "search")
                set_log.metrics({BEST_SELECTION_METRIC: float(best[BEST_SELECTION_METRIC])})
            model_dir = Path(best["model_dir"])
            best_runs[s] = json.loads((model_dir / "model.json").read_text())["mlflow_run_id"]
            m = test_metrics(model_dir, prep, test_ids, cfg.unet.train.threshold)
            per_patient.append(m.assign(modality_set=s))
            best_rows.append({"modality_set": s, BEST_SELECTION_METRIC: float(best[BEST_SELECTION_METRIC]), "lr": best["lr"],
                              "base_features": best["base_features"], "batch_size": best["batch_size"],
                              "loss": best["loss"]})  # fmt: skip
        table = pd.concat(per_patient, ignore_index=True)
        tests = pairwise_wilcoxon(table, sets)
        best_df = pd.DataFrame(best_rows)
        write_csv_atomic(out / "per_patient.csv", table)
        write_csv_atomic(out / "wilcoxon.csv", tests)
        write_csv_atomic(out / "best_per_set.csv", best_df)
        fig = plot_ablation(table, sets, tests, out / "fig2b_modalities.png")
        curves = validation_curves(tracker, best_runs)
        write_csv_atomic(out / "validation_curves.csv", curves)
        curves_fig = plot_curves(curves, sets, out / "fig2a_validation_pcc.png")
        summary = table.groupby("modality_set")[list(ABLATION_METRICS)].mean()
        run.metrics({f"{s}_{m}_mean": float(summary.loc[s, m]) for s in sets for m in ABLATION_METRICS})
        run.table(pseudonymised(prep, table), "per_patient.csv")
        run.table(tests, "wilcoxon.csv")
        run.table(best_df, "best_per_set.csv")
        run.artifact(fig, "figures")
        run.artifact(curves_fig, "figures")
        run.table(curves, "validation_curves.csv")
        run_id = run.run_id
    return AblationOutcome(
        run_id, table, tests, best_df, fig, out, time.perf_counter() - t0, curves, curves_fig
    )


def print_ablation(outcome: AblationOutcome, console) -> None:
    from ctvlab.terminal import print_table

    summary = outcome.per_patient.groupby("modality_set")[list(ABLATION_METRICS)].agg(["mean", "std"])
    rows = [
        (
            s,
            *[
                f"{summary.loc[s, (m, 'mean')]:.3f} ± {summary.loc[s, (m, 'std')]:.3f}"
                for m in ABLATION_METRICS
            ],
        )
        for s in outcome.best["modality_set"]
    ]
    print_table(console, "Modality ablation on the test split (Fig. 2b)", ("inputs", *ABLATION_METRICS), rows)
    if "all" in set(outcome.best["modality_set"]):
        w = outcome.tests[(outcome.tests["set_b"] == "all") | (outcome.tests["set_a"] == "all")]
        for r in w[w["metric"] == "pcc"].itertuples():
            console.print(
                f"PCC {r.set_a} vs {r.set_b}: median difference {r.median_difference:+.3f}, p = {r.p_value:.3g}"
            )
    console.print(f"figures {outcome.figure}, {outcome.curves_figure}; MLflow run {outcome.run_id}")
