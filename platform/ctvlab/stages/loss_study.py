"""The loss study (`ctvlab loss-study`, Supplementary Figs. 2 and 3): the search's best configuration
trained once per loss and once per Tversky β, every other setting fixed, each model scored on the test
patients; paired tests of each loss against PCC (the study's final loss); one MLflow run.

The paper's Supp. Fig. 2 plots sensitivity and specificity against the Tversky β (optimum near β = 0.98,
α = 0.02, "a sharp drop off in specificity above β = 0.98"); Supp. Fig. 3 compares the losses on the test
set (PCC + BCE: higher sensitivity at a small cost in specificity). The Tversky run at β = 0.98 is shared by
both: the sweep includes it and the comparison reads it from there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.atomic import write_csv_atomic
from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError
from ctvlab.study import TVERSKY_BETA
from ctvlab.unet.modality_ablation import ABLATION_METRICS, pairwise_wilcoxon, plot_ablation, test_metrics

REFERENCE_LOSS = "pcc"  # the study's final loss: every other loss is tested against it


@dataclass
class LossStudyOutcome:
    run_id: str
    per_patient: pd.DataFrame  # patient_id, study ("loss" | "beta"), loss, beta, metrics
    summary: pd.DataFrame  # study, loss, beta, n, mean and sd of each metric
    tests: pd.DataFrame  # each loss vs PCC per metric, Holm-adjusted
    figures: list[Path]
    out_dir: Path
    elapsed_s: float


def loss_study_config(cfg: StudyConfig, best: dict[str, Any] | None) -> StudyConfig:
    """The study config every run of the loss study trains from: the search's best configuration (the
    `unet` settings when there was no search), `tune.loss_study.epochs` epochs per run, no early stopping."""
    from ctvlab.unet.spaces import final_unet_config

    unet = final_unet_config(cfg.unet, best or {})
    epochs = cfg.tune.loss_study.epochs or cfg.tune.epochs_per_trial
    return cfg.model_copy(
        update={"unet": unet, "tune": cfg.tune.model_copy(update={"epochs_per_trial": epochs})}
    )


def sweep_betas(cfg: StudyConfig) -> list[float]:
    """The β of the sweep, with the study's 0.98 (the comparison's Tversky run) always among them."""
    return sorted({float(b) for b in cfg.tune.loss_study.betas} | {TVERSKY_BETA})


def run_loss_study(
    cfg: StudyConfig, prep: Path | None = None, best: dict[str, Any] | None = None
) -> LossStudyOutcome:
    """Train the best configuration with each loss and each Tversky β; score every model on the test split."""
    from ray import tune

    from ctvlab.splits import pseudonymised
    from ctvlab.stages.tune import scored_on_test_patients
    from ctvlab.tracking import base_tags, tracker_for
    from ctvlab.unet.search import run_search
    from ctvlab.unet.trainer import provenance_spec

    t0 = time.perf_counter()
    prep, split, test_ids = scored_on_test_patients(cfg, prep)
    scfg = loss_study_config(cfg, best)
    u = scfg.unet
    fixed = {"lr": u.optim.lr, "base_features": u.model.base_features, "batch_size": u.train.batch_size,
             "modality_set": u.model.modality_set}  # fmt: skip
    losses = [x for x in cfg.tune.loss_study.losses if x != "tversky"]
    betas = sweep_betas(cfg)

    def constant(beta: float) -> dict[str, Any]:
        return {"kind": "constant", "start": beta, "end": beta}

    searches = {
        "loss": {**fixed, "loss": tune.grid_search(losses), "beta_schedule": constant(TVERSKY_BETA)},
        "beta": {**fixed, "loss": "tversky", "beta_schedule": tune.grid_search([constant(b) for b in betas])},
    }
    tracker = tracker_for(cfg)
    out = Path(cfg.results_dir, "loss_study").resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    extra = provenance_spec(prep, split)
    tags = base_tags("loss-study", split.dataset_digest, split.digest)
    rows = []
    with tracker.run("loss study", tags) as run:
        run.params({"loss_study": {**cfg.tune.loss_study.model_dump(mode="json"), "betas": betas,
                                   "epochs": scfg.tune.epochs_per_trial, **fixed}})  # fmt: skip
        for kind, space in searches.items():
            if kind == "loss" and not losses:
                continue
            with tracker.run(f"loss study: {kind}", tags, run.run_id) as child:
                trials = run_search(scfg, prep, space, name=f"losses-{stamp}-{kind}", num_samples=1,
                                    parent_run_id=child.run_id, use_asha=False, extra_spec=extra)  # fmt: skip
                child.table(trials.drop(columns=["path", "model_dir"]), "trials.csv", "search")
            for trial in trials.to_dict("records"):
                model_dir = Path(trial["model_dir"])
                if trial["status"] == "ERROR" or not model_dir.exists():
                    raise CtvlabError(f"loss study: the {trial['loss']} run failed: {trial.get('error')}")
                beta = json.loads(trial["beta_schedule"])["start"] if trial["loss"] == "tversky" else np.nan
                m = test_metrics(model_dir, prep, test_ids, cfg.unet.train.threshold)
                rows.append(m.assign(study=kind, loss=trial["loss"], beta=beta))
        table = pd.concat(rows, ignore_index=True)
        # The comparison's Tversky entry is the sweep's run at the study's β.
        if "tversky" in cfg.tune.loss_study.losses:
            shared = table[(table["study"] == "beta") & np.isclose(table["beta"], TVERSKY_BETA)]
            table = pd.concat([table, shared.assign(study="loss")], ignore_index=True)
        summary = summarise(table)
        compared = table[table["study"] == "loss"]
        order = [x for x in cfg.tune.loss_study.losses if x in set(compared["loss"])]
        reference = REFERENCE_LOSS if REFERENCE_LOSS in order else order[0]
        tests = pairwise_wilcoxon(compared, order, by="loss", reference=reference)
        figures = [
            plot_beta_sweep(summary[summary["study"] == "beta"], out / "supp_fig2_beta_sweep.png"),
            plot_ablation(compared, order, tests, out / "supp_fig3_losses.png", by="loss", reference=reference,
                          title=f"Losses on the test patients (stars: Holm-adjusted Wilcoxon vs {reference})"),
        ]  # fmt: skip
        for name, df in (("per_patient", table), ("summary", summary), ("wilcoxon", tests)):
            write_csv_atomic(out / f"{name}.csv", df)
        run.table(pseudonymised(prep, table), "per_patient.csv")
        run.table(summary, "summary.csv")
        run.table(tests, "wilcoxon.csv")
        for r in summary.itertuples():
            label = r.loss.replace("+", "_plus_") if r.study == "loss" else f"tversky_beta_{r.beta:g}"
            run.metrics({f"{label}_{m}_mean": getattr(r, f"{m}_mean") for m in ABLATION_METRICS})
        for f in figures:
            run.artifact(f, "figures")
        run_id = run.run_id
    return LossStudyOutcome(run_id, table, summary, tests, figures, out, time.perf_counter() - t0)


def run_label(loss: str, study: str, beta: float) -> str:
    """A row's name: the loss, with β for Tversky (the comparison's Tversky row is the sweep's β = 0.98 run)."""
    if loss != "tversky":
        return loss
    return f"tversky β={beta:g}" + (" (comparison)" if study == "loss" else "")


def summarise(per_patient: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD of each metric per run (study, loss, beta), with its patient count."""
    keys = ["study", "loss", "beta"]
    g = per_patient.fillna({"beta": -1.0}).groupby(keys, sort=False)
    table = g[list(ABLATION_METRICS)].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table.insert(0, "n", g.size())
    table = table.reset_index()
    table["beta"] = table["beta"].where(table["beta"] >= 0)
    return table


def plot_beta_sweep(sweep: pd.DataFrame, out: Path) -> Path:
    """Supp. Fig. 2: mean test sensitivity and specificity (± SE) against the Tversky β; the study's β marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ctvlab.atomic import atomic_path

    s = sweep.sort_values("beta")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for metric, colour in (("sensitivity", "#d62728"), ("specificity", "#1f77b4")):
        se = s[f"{metric}_std"] / np.sqrt(s["n"])
        ax.errorbar(
            s["beta"], s[f"{metric}_mean"], yerr=se, marker="o", capsize=3, color=colour, label=metric
        )
    ax.axvline(TVERSKY_BETA, color="grey", linestyle="--", linewidth=1, label=f"β = {TVERSKY_BETA} (study)")
    ax.set_xlabel("Tversky β (α = 1 − β)")
    ax.set_ylabel("test patients, mean ± SE")
    ax.set_title("Tversky β sweep (Supp. Fig. 2)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def print_loss_study(outcome: LossStudyOutcome, console) -> None:
    from ctvlab.terminal import print_table

    rows = [
        (run_label(r["loss"], r["study"], r["beta"]), str(r["n"]),
         *[f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in ABLATION_METRICS])
        for r in outcome.summary.to_dict("records")
    ]  # fmt: skip
    print_table(
        console, "Loss study on the test split (Supp. Figs. 2 and 3)", ("run", "n", *ABLATION_METRICS), rows
    )
    console.print(f"figures {', '.join(str(f) for f in outcome.figures)}; MLflow run {outcome.run_id}")
