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
from pathlib import Path

import numpy as np
import pandas as pd

ABLATION_METRICS = ("sensitivity", "specificity", "pcc")


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


def pairwise_wilcoxon(
    per_patient: pd.DataFrame, sets: list[str], by: str = "modality_set", reference: str | None = None
) -> pd.DataFrame:
    """Wilcoxon signed-rank test for every pair of sets (or each set against `reference`) and metric, paired
    by patient; Holm over the table. `by`: the column naming the set (an input set, a loss)."""
    from ctvlab.statistics import holm, paired_wilcoxon

    rows = []
    pairs = (
        [(reference, s) for s in sets if s != reference]
        if reference
        else list(itertools.combinations(sets, 2))
    )
    for metric in ABLATION_METRICS:
        wide = per_patient.pivot(index="patient_id", columns=by, values=metric)
        for a, b in pairs:
            t = paired_wilcoxon(wide[a].to_numpy(), wide[b].to_numpy())
            rows.append({"metric": metric, "set_a": a, "set_b": b, "n": t.n, "n_zero": t.n_zero,
                         "median_difference": t.median_difference, "p_value": t.p})  # fmt: skip
    table = pd.DataFrame(
        rows, columns=["metric", "set_a", "set_b", "n", "n_zero", "median_difference", "p_value"]
    )
    table["p_holm"] = holm(table["p_value"].to_numpy())
    return table


def validation_curves(tracker, run_ids: dict[str, str], metric: str = "val_pcc") -> pd.DataFrame:
    """Per-epoch `metric` of each set's best trial (its MLflow run): modality_set, epoch, value."""
    rows = [
        {"modality_set": s, "epoch": step, "value": value}
        for s, run_id in run_ids.items()
        for step, value in tracker.metric_history(run_id, metric)
    ]
    return pd.DataFrame(rows, columns=["modality_set", "epoch", "value"]).sort_values(
        ["modality_set", "epoch"]
    )


def plot_curves(curves: pd.DataFrame, sets: list[str], out: Path) -> Path:
    """Fig. 2a: the validation PCC of each input set's best trial against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ctvlab.atomic import atomic_path

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for s in sets:
        c = curves[curves["modality_set"] == s]
        ax.plot(c["epoch"], c["value"], marker="o", markersize=3, label=s)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation PCC")
    ax.set_title("Best trial per input set (Fig. 2a)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def plot_ablation(
    per_patient: pd.DataFrame,
    sets: list[str],
    tests: pd.DataFrame,
    out: Path,
    by: str = "modality_set",
    reference: str = "all",
    title: str | None = None,
) -> Path:
    """Fig. 2b: box plots of sensitivity, specificity and PCC per input set (`by`: or per loss), stars vs
    `reference` (Holm-adjusted Wilcoxon p from `tests`)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ctvlab.atomic import atomic_path
    from ctvlab.statistics import stars

    fig = Figure(figsize=(4 * len(ABLATION_METRICS), 4))
    for i, metric in enumerate(ABLATION_METRICS):
        ax = fig.add_subplot(1, len(ABLATION_METRICS), i + 1)
        data = [per_patient.loc[per_patient[by] == s, metric].dropna().to_numpy() for s in sets]
        ax.boxplot(data, tick_labels=sets, showfliers=False)
        for j, d in enumerate(data):
            ax.scatter(np.full(len(d), j + 1) + np.linspace(-0.1, 0.1, len(d)), d, s=8, alpha=0.6)
        ax.set_title(metric)
        if reference in sets:
            top = max((np.nanmax(d) for d in data if len(d)), default=1.0)
            for j, s in enumerate(sets):
                if s == reference:
                    continue
                row = tests[
                    (tests["metric"] == metric)
                    & (tests["set_a"].isin([s, reference]))
                    & (tests["set_b"].isin([s, reference]))
                ]
                if len(row):
                    ax.text(j + 1, top * 1.02, stars(float(row["p_holm"].iloc[0])), ha="center")
        ax.tick_params(axis="x", rotation=30)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out
