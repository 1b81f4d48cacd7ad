"""The modality ablation of the study's Fig. 2: which inputs make the predicted CTV better?

For each input set (`anat`, `anat_diff`, `anat_mrsi`, `all`), a random search (15 trials by default, no
grid step, as in the paper) picks the best model by validation Tversky; each best model then predicts
the held-out test patients. Per patient: sensitivity, specificity and PCC of the thresholded prediction
against the composite target; between sets, Wilcoxon signed-rank tests paired by patient. On the
synthetic cohort, `all` should beat `anat`; on the `--null` cohort (diffusion and MRSI carry no hidden
information), it should not.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctvlab.atomic import write_csv_atomic
from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError

ABLATION_METRICS = ("sensitivity", "specificity", "pcc")


@dataclass
class AblationOutcome:
    run_id: str
    per_patient: pd.DataFrame  # patient_id, modality_set, metrics
    tests: pd.DataFrame  # metric, set_a, set_b, p_value, median_difference
    best: pd.DataFrame  # one row per set: best params and validation Tversky
    figure: Path
    out_dir: Path
    elapsed_s: float


def test_metrics(model_dir: Path, prep: Path, patient_ids: list[str], threshold: float = 0.5) -> pd.DataFrame:
    """Per-patient sensitivity, specificity and PCC of a model's thresholded prediction (Fig. 2b)."""
    from ctvlab.ctv import metrics as M
    from ctvlab.data.readers import load_patient
    from ctvlab.unet.inference import load_model, predict_probability

    model = load_model(model_dir)
    rows = []
    for pid in patient_ids:
        p = load_patient(prep, pid)
        pred = predict_probability(model, p) >= threshold
        target, brain = p.mask("target") > 0, p.mask("brain") > 0
        rows.append({"patient_id": pid, "sensitivity": M.sensitivity(pred, target, brain),
                     "specificity": M.specificity(pred, target, brain), "pcc": M.pcc(pred, target, brain)})  # fmt: skip
    return pd.DataFrame(rows)


def pairwise_wilcoxon(per_patient: pd.DataFrame, sets: list[str]) -> pd.DataFrame:
    """Wilcoxon signed-rank test for every pair of sets and metric, paired by patient; Holm over the table."""
    from ctvlab.statistics import holm, paired_wilcoxon

    rows = []
    for metric in ABLATION_METRICS:
        wide = per_patient.pivot(index="patient_id", columns="modality_set", values=metric)
        for a, b in itertools.combinations(sets, 2):
            t = paired_wilcoxon(wide[a].to_numpy(), wide[b].to_numpy())
            rows.append({"metric": metric, "set_a": a, "set_b": b, "n": t.n, "n_zero": t.n_zero,
                         "median_difference": t.median_difference, "p_value": t.p})  # fmt: skip
    table = pd.DataFrame(
        rows, columns=["metric", "set_a", "set_b", "n", "n_zero", "median_difference", "p_value"]
    )
    table["p_holm"] = holm(table["p_value"].to_numpy())
    return table


def plot_ablation(per_patient: pd.DataFrame, sets: list[str], tests: pd.DataFrame, out: Path) -> Path:
    """Fig. 2b: box plots of sensitivity, specificity and PCC per input set, stars vs `all`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ctvlab.atomic import atomic_path
    from ctvlab.statistics import stars

    fig = Figure(figsize=(4 * len(ABLATION_METRICS), 4))
    for i, metric in enumerate(ABLATION_METRICS):
        ax = fig.add_subplot(1, len(ABLATION_METRICS), i + 1)
        data = [per_patient.loc[per_patient["modality_set"] == s, metric].dropna().to_numpy() for s in sets]
        ax.boxplot(data, tick_labels=sets, showfliers=False)
        for j, d in enumerate(data):
            ax.scatter(np.full(len(d), j + 1) + np.linspace(-0.1, 0.1, len(d)), d, s=8, alpha=0.6)
        ax.set_title(metric)
        if "all" in sets:
            top = max((np.nanmax(d) for d in data if len(d)), default=1.0)
            for j, s in enumerate(sets):
                if s == "all":
                    continue
                row = tests[
                    (tests["metric"] == metric)
                    & (tests["set_a"].isin([s, "all"]))
                    & (tests["set_b"].isin([s, "all"]))
                ]
                if len(row):
                    ax.text(j + 1, top * 1.02, stars(float(row["p_holm"].iloc[0])), ha="center")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def run_ablation(cfg: StudyConfig, prep: Path | None = None) -> AblationOutcome:
    """A random search per modality set, the best model of each on the test split, tests between sets."""
    from ctvlab.runtime import init_ray
    from ctvlab.splits import load_split
    from ctvlab.stages import pseudonymised, tracker_for
    from ctvlab.study import BEST_SELECTION_METRIC
    from ctvlab.tracking import base_tags
    from ctvlab.unet.train import provenance_spec
    from ctvlab.unet.tune import best_trial, random_param_space, run_search

    t0 = time.perf_counter()
    prep = Path(prep or cfg.prep_dir).resolve()
    split = load_split(prep)
    test_ids = split.patients("test")
    if not test_ids:
        raise CtvlabError(f"the split of {prep} has no test patients")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    from ctvlab.resources import check_study_fits

    check_study_fits(cfg, search=True)
    tracker = tracker_for(cfg)
    sets = list(cfg.tune.ablation_sets)
    out = Path(cfg.results_dir, "ablation").resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    extra = provenance_spec(prep, split)
    with tracker.run("ablation", base_tags("ablation", split.dataset_digest, split.digest)) as run:
        run.params({"ablation": {"sets": sets, "samples_per_set": cfg.tune.ablation_samples,
                                 "epochs_per_trial": cfg.tune.epochs_per_trial}})  # fmt: skip
        per_patient, best_rows = [], []
        for s in sets:
            set_run = tracker.start_run(
                f"tune-{s}", base_tags("tune", split.dataset_digest, split.digest), run.run_id
            )
            trials = run_search(cfg, prep, random_param_space(cfg.tune.space, s), name=f"ablation-{stamp}-{s}",
                                num_samples=cfg.tune.ablation_samples, parent_run_id=set_run, extra_spec=extra)  # fmt: skip
            best = best_trial(trials)
            tracker.logger(set_run).table(trials.drop(columns=["path", "model_dir"]), "trials.csv", "search")
            tracker.logger(set_run).metrics({BEST_SELECTION_METRIC: float(best[BEST_SELECTION_METRIC])})
            tracker.end_run(set_run)
            model_dir = Path(best["model_dir"])
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
        summary = table.groupby("modality_set")[list(ABLATION_METRICS)].mean()
        run.metrics({f"{s}_{m}_mean": float(summary.loc[s, m]) for s in sets for m in ABLATION_METRICS})
        run.table(pseudonymised(prep, table), "per_patient.csv")
        run.table(tests, "wilcoxon.csv")
        run.table(best_df, "best_per_set.csv")
        run.artifact(fig, "figures")
        run_id = run.run_id
    return AblationOutcome(run_id, table, tests, best_df, fig, out, time.perf_counter() - t0)


def print_ablation(outcome: AblationOutcome, console) -> None:
    from rich.table import Table

    summary = outcome.per_patient.groupby("modality_set")[list(ABLATION_METRICS)].agg(["mean", "std"])
    t = Table(title="Modality ablation on the test split (Fig. 2b)")
    t.add_column("inputs")
    for m in ABLATION_METRICS:
        t.add_column(m, justify="right")
    for s in outcome.best["modality_set"]:
        t.add_row(
            s,
            *[
                f"{summary.loc[s, (m, 'mean')]:.3f} ± {summary.loc[s, (m, 'std')]:.3f}"
                for m in ABLATION_METRICS
            ],
        )
    console.print(t)
    if "all" in set(outcome.best["modality_set"]):
        w = outcome.tests[(outcome.tests["set_b"] == "all") | (outcome.tests["set_a"] == "all")]
        for r in w[w["metric"] == "pcc"].itertuples():
            console.print(
                f"PCC {r.set_a} vs {r.set_b}: median difference {r.median_difference:+.3f}, p = {r.p_value:.3g}"
            )
    console.print(f"figure {outcome.figure}; MLflow run {outcome.run_id}")
