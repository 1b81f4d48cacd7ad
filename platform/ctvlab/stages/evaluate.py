"""`ctvlab evaluate`: the model CTV against the RTOG and EORTC CTVs on held-out patients.

For each patient of the chosen split: the network's probability on the full 3 mm grid
(`ctvlab.unet.inference`, the same input as training), the three CTVs and their metrics
(`ctvlab.ctv.scoring`), the CTVs as NIfTI masks on the 3 mm grid and on the patient's original T1c grid.
Tables follow the study's Supplementary Tables 1 (mean ± SD per CTV) and 2 (per patient), with Wilcoxon
signed-rank tests of the model against each standard CTV; figures follow Figs. 1, 3 and 4. Everything is
written under `results/evaluate/` and logged to one MLflow run.

The leakage guard: the model's spec lists the pseudonyms of its training and validation patients; none
may be among the evaluated patients.

About 430 lines: the evaluation is one pass over the test patients whose tables, figures and MLflow run
share their data; the CTV construction and metrics themselves live in `ctvlab.ctv`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.atomic import atomic_folder, check_writable, write_csv_atomic
from ctvlab.config import StudyConfig
from ctvlab.ctv.scoring import (
    PATIENT_FIGURE_PREFIX,
    comparison_table,
    evaluate_patient,
    native_allowed,
    patient_masks,
    summary_table,
    wilcoxon_table,
    write_ctv_nifti,
)
from ctvlab.ctv.viewer import OVERLAYS as VIEWER_OVERLAYS
from ctvlab.ctv.viewer import VIEWER_FOLDER, write_viewer_volumes
from ctvlab.data.readers import load_patient, read_patients
from ctvlab.errors import CtvlabError, DataError, folder_bytes, space_needed, writing
from ctvlab.study import REFERENCE_ONLY_CTVS
from ctvlab.unet.inference import load_model, predict_probability

CURVE_MARGINS_MM = tuple(range(0, 42, 2))  # the uniform margin's widths on the coverage-volume curve


def cohort_rows(cfg: StudyConfig) -> dict[str, Any]:
    """The manifest rows of the study's cohort folder, by patient; empty when it cannot be read (the
    evaluation then resamples its 3 mm CTVs to the T1c grid)."""
    from ctvlab.ingest.manifest import read_manifest

    try:
        rows, _, _ = read_manifest(
            Path(cfg.raw_dir), "predict"
        )  # a missing manifest is a problem, not a raise
    except OSError:
        return {}
    return {r.patient_id: r for r in rows}


def native_from_cohort(prob, p, row, cfg: StudyConfig, threshold: float, calibration: dict[str, Any]):
    """The patient's CTVs on its T1c grid built as `ctvlab predict` builds them (`predict.native_ctvs`),
    from the cohort's own files when they are still those the prepared patient was made from (its input
    hash); None otherwise."""
    from ctvlab.preprocess.prepare import input_hash
    from ctvlab.stages.predict import native_ctvs

    if row is None:
        return None
    try:
        if input_hash(row, Path(cfg.raw_dir)) != p.sidecar.get("input_hash"):
            return None
    except CtvlabError:
        return None
    return native_ctvs(prob, p.affine, row, Path(cfg.raw_dir), threshold, calibration, cfg)


def resolve_model(
    cfg: StudyConfig,
    tracker,
    model_uri: str | None,
    workdir: Path,
    split_digest: str | None = None,
    dataset_digest: str | None = None,
) -> tuple[Path, str]:
    """A local model folder for `model_uri` (models:/name/version, runs:/id/model, a folder).

    Without a URI: the latest registered version of the study's model that was trained on this split of
    this prepared dataset (its `split_digest` and `dataset_digest` tags: the split digest alone stays the
    same when the data under it is prepared again), so that a shared registry holding other studies'
    versions never hands over a model of other data; then the study's own `results/model`.
    """
    if model_uri is None:
        name = cfg.unet.registered_model_name
        versions = tracker.search_versions(name)
        ours = [
            v
            for v in versions
            if (split_digest is None or v.tags.get("split_digest") == split_digest)
            and (dataset_digest is None or v.tags.get("dataset_digest") == dataset_digest)
        ]
        if ours:
            model_uri = f"models:/{name}/{max(int(v.version) for v in ours)}"
        elif Path(cfg.results_dir, "model").exists():
            model_uri = str(Path(cfg.results_dir, "model").resolve())
        else:
            raise CtvlabError(
                f"no model to evaluate: no version of {name!r} in {tracker.tracking_uri} was trained on this "
                f"split, and there is no {Path(cfg.results_dir, 'model')}; train one (`ctvlab train` or "
                "`ctvlab tune`) or pass --model-uri"
            )
    local = Path(model_uri)
    if local.exists():
        return local, model_uri
    try:
        return tracker.download_model(model_uri, workdir), model_uri
    except Exception as e:
        raise CtvlabError(f"cannot load model {model_uri}: {e}") from None


@dataclass
class EvaluationOutcome:
    run_id: str
    model_uri: str
    threshold: float
    per_patient: pd.DataFrame
    summary: pd.DataFrame
    wilcoxon: pd.DataFrame
    out_dir: Path
    figures: list[Path]
    seconds_inference: float
    seconds_ctv_metrics: float
    comparisons: pd.DataFrame | None = None
    coverage: pd.DataFrame | None = None
    model_spec: dict[str, Any] | None = None  # the evaluated model's spec (its provenance, its card)


def evaluate_study(
    cfg: StudyConfig,
    prep: Path | None = None,
    *,
    model_uri: str | None = None,
    split_name: str = "test",
    progress: bool = True,
    console=None,
) -> EvaluationOutcome:
    """Evaluate the model CTV and the standard CTVs on one split; write tables, figures, NIfTI; log all."""
    from ctvlab.ctv.figures import plot_contours, plot_metric_boxes, plot_roc_curves
    from ctvlab.splits import check_disjoint, load_split, pseudonymise, pseudonymised
    from ctvlab.tracking import NOTE, base_tags, tracker_for

    prep = Path(prep or cfg.prep_dir).resolve()
    split = load_split(prep)
    ids = split.patients(split_name)
    if not ids:
        raise DataError(f"the {split_name} split of {prep} has no patients")
    out = Path(cfg.results_dir, "evaluate").resolve()
    check_writable(out.parent)  # a results folder that refuses the tables fails before any work
    tracker = tracker_for(cfg)
    with tempfile.TemporaryDirectory() as dl:
        model_dir, model_uri = resolve_model(
            cfg, tracker, model_uri, Path(dl), split.digest, split.dataset_digest
        )
        model = load_model(model_dir)
    check_provenance(model.spec, model_uri, prep, split)
    names = pseudonymise(prep, set(ids) | set(split.patients("val")))
    trained_on = set(model.spec.get("train_patients", [])) | set(model.spec.get("val_patients", []))
    if not trained_on:
        raise CtvlabError(
            f"{model_uri} does not record its training patients; the leakage guard cannot check it"
        )
    check_disjoint(
        **{"model training patients": trained_on, f"{split_name} patients": {names[i] for i in ids}}
    )

    from ctvlab.stages.calibrate import calibration_for
    from ctvlab.stages.coverage_outputs import CoverageOutputs

    calibration = calibration_for(model, prep, cfg, split.patients("val"))  # the model's own, when current
    if cfg.ctv.threshold == "validation":
        threshold = calibration["threshold"]
        threshold_table = {float(t): v for t, v in calibration["threshold_table"].items()}
    else:
        threshold, threshold_table = float(cfg.ctv.threshold), {}

    # Built beside the previous evaluation and swapped in: the old results stay until the new ones exist.
    final_out = out
    with atomic_folder(final_out) as out:
        (out / "ctv_3mm").mkdir()
        (out / "ctv_native").mkdir()
        extra = CoverageOutputs(cfg, model, calibration, out)
        rows, t_inf, t_ctv, eortc_sources = [], 0.0, 0.0, {}
        overlay_cases: list[tuple[str, float]] = []
        done: list[str] = []
        raw_rows = cohort_rows(cfg) if cfg.ctv.write_native_grid else {}
        native_sources: dict[str, str] = {}

        def needs() -> str:  # for a full disk: the CTV files of the patients left, at the rate so far
            return space_needed("the evaluation", folder_bytes(out), len(done), len(ids) - len(done))

        with writing(out.parent, needs=needs):
            for pid in _progress(ids, progress, console, "evaluating"):
                p = load_patient(prep, pid)
                t0 = time.perf_counter()
                prob = predict_probability(model, p)
                t1 = time.perf_counter()
                ctvs, prows, source = evaluate_patient(prob, threshold, p, cfg)
                t2 = time.perf_counter()
                t_inf += t1 - t0
                t_ctv += t2 - t1
                rows.extend(prows)
                eortc_sources[pid] = source
                m = patient_masks(p)
                overlay_cases.append(
                    (pid, float(((m["cel_prog"] | m["t2l_prog"]) & ~(m["cel"] | m["t2l"])).sum()))
                )
                cov_ctvs = extra.add(p, prob, ctvs)
                delivered, allowed = None, None
                if (
                    cfg.ctv.write_native_grid
                ):  # as `ctvlab predict` delivers them, from the cohort's own files
                    delivered = native_from_cohort(prob, p, raw_rows.get(pid), cfg, threshold, calibration)
                    allowed = native_allowed(p) if delivered is None else None
                    native_sources[pid] = "cohort" if delivered is not None else "resampled"
                for name, ctv in {**_drawn(ctvs), **cov_ctvs}.items():
                    native = (
                        out / "ctv_native" / f"{pid}_{name}.nii.gz" if cfg.ctv.write_native_grid else None
                    )
                    write_ctv_nifti(ctv, p, out / "ctv_3mm" / f"{pid}_{name}.nii.gz", native, allowed,
                                    delivered.ctvs.get(name) if delivered is not None else None)  # fmt: skip
                done.append(pid)
        per_patient = pd.DataFrame(rows)
        summary = summary_table(per_patient)
        wilcoxon = wilcoxon_table(per_patient)
        comparisons = comparison_table(
            per_patient, read_patients(prep)[["patient_id", "cohort", "pfs_months"]]
        )
        tables = (("per_patient", per_patient), ("summary", summary), ("wilcoxon", wilcoxon),
                  ("comparisons", comparisons))  # fmt: skip
        for name, df in tables:
            write_csv_atomic(out / f"{name}.csv", df)

        drawn = per_patient[~per_patient["ctv"].isin(REFERENCE_ONLY_CTVS)]
        figures = [plot_metric_boxes(drawn.rename(columns={"patient_id": "patient"}), out / "fig3_metric_boxes.png",
                                     {(r.metric, r.reference, r.other): r.p_holm for r in wilcoxon.itertuples()})]  # fmt: skip
        figures.append(plot_by_cohort(per_patient, read_patients(prep), out / "supp_fig4_by_cohort.png"))
        figures.extend(extra.finish())
        chosen = [pid for pid, _ in sorted(overlay_cases, key=lambda kv: -kv[1])[: cfg.ctv.overlay_patients]]
        for pid in chosen:
            p = load_patient(prep, pid)
            m = patient_masks(p)
            prob = predict_probability(model, p)
            ctvs, _, _ = evaluate_patient(prob, threshold, p, cfg)
            figures.append(plot_contours(
                p.feature("nT1c"), _drawn(ctvs), (m["cel_prog"] | m["t2l_prog"]) & m["brain"],
                out / f"{PATIENT_FIGURE_PREFIX}{names[pid]}.png", f"patient {names[pid]}",
                second_background=p.feature("nFLAIR"), spacing=p.spacing, lesion=m["cel"] | m["t2l"],
            ))  # fmt: skip
            write_viewer_volumes(
                out / VIEWER_FOLDER / names[pid], p.affine, {"t1c": p.feature("nT1c"), "flair": p.feature("nFLAIR")},
                m["brain"], {"progression": (m["cel_prog"] | m["t2l_prog"]) & m["brain"],
                             **{k: ctvs[k] for k, *_ in VIEWER_OVERLAYS if k in ctvs}},
            )  # fmt: skip
        roc = _rf_roc_curves(cfg)
        if roc:
            figures.append(
                plot_roc_curves(roc, out / "fig1_rf_roc.png", "Voxel-wise progression models (5-fold CV)")
            )
    out = final_out
    figures = [out / Path(f).name for f in figures]  # every figure lies at the folder's top level

    with tracker.run("evaluate", base_tags("evaluate", split.dataset_digest, split.digest)) as run:
        run.params({"evaluate": {"split": split_name, "model_uri": model_uri, "threshold": threshold,
                                 "n_patients": len(ids)}, "ctv": cfg.ctv.model_dump(mode="json")})  # fmt: skip
        run.tags(
            {"ctvlab.model_uri": model_uri, NOTE: evaluation_note(summary, wilcoxon, len(ids), threshold)}
        )
        run.dataset("prepared", split.dataset_digest, str(prep), context="evaluation")
        flat = {}
        for r in summary.to_dict("records"):
            for k, v in r.items():
                if k not in ("ctv", "n"):
                    flat[f"{r['ctv']}_{k}"] = v
        flat.update({f"p_{r.metric}_model_vs_{r.other}": r.p_value for r in wilcoxon.itertuples()})
        flat.update({f"p_holm_{r.metric}_model_vs_{r.other}": r.p_holm for r in wilcoxon.itertuples()})
        flat["threshold"] = threshold
        flat.update(extra.metrics())
        flat["seconds_inference_per_patient"] = t_inf / len(ids)
        flat["seconds_ctv_metrics_per_patient"] = t_ctv / len(ids)
        run.metrics(flat)
        run.table(pseudonymised(prep, per_patient), "per_patient.csv")
        run.table(summary, "summary.csv")
        run.table(wilcoxon, "wilcoxon.csv")
        run.table(comparisons, "comparisons.csv")
        extra.log(run, prep)
        if threshold_table:
            run.table(pd.DataFrame({"threshold": list(threshold_table), "mean_val_tversky": list(threshold_table.values())}),
                      "threshold_choice.csv")  # fmt: skip
        run.json({names[k]: v for k, v in eortc_sources.items()}, "eortc_gtv_source.json", "tables")
        if native_sources:  # built from the cohort's files as `ctvlab predict` builds them, or resampled
            run.json({names[k]: v for k, v in native_sources.items()}, "ctv_native_source.json", "tables")
        # Native-grid CTVs and MRI-slice figures show a patient's anatomy at full resolution: they stay in
        # the results folder unless the study opts in (tracking.log_patient_images).
        share_images = cfg.tracking.log_patient_images
        for f in figures:
            if share_images or not Path(f).name.startswith(PATIENT_FIGURE_PREFIX):
                run.artifact(f, "figures")
        with tempfile.TemporaryDirectory() as d:  # CTV files under pseudonyms: ids never reach MLflow
            for sub in ("ctv_3mm", "ctv_native") if share_images else ("ctv_3mm",):
                (Path(d) / sub).mkdir()
                for f in sorted((out / sub).glob("*.nii.gz")):
                    pid, _, rest = f.name.rpartition("_")
                    shutil.copy2(f, Path(d) / sub / f"{names[pid]}_{rest}")
                run.artifact(Path(d) / sub, sub)
        run_id = run.run_id
    return EvaluationOutcome(run_id, model_uri, threshold, per_patient, summary, wilcoxon, out, figures,
                             t_inf / len(ids), t_ctv / len(ids), comparisons, extra.coverage,
                             dict(model.spec))  # fmt: skip


def plot_by_cohort(per_patient: pd.DataFrame, patients: pd.DataFrame, out: Path) -> Path:
    """Supp. Fig. 4: the model CTV's sensitivity, specificity and PCC per treatment cohort (test patients).
    The cohorts are independent groups of a few patients each: no paired test, no stars."""
    from ctvlab.unet.modality_ablation import plot_ablation

    model = per_patient[per_patient["ctv"] == "model"].merge(
        patients[["patient_id", "cohort"]], on="patient_id"
    )
    cohorts = sorted(model["cohort"].dropna().unique())
    no_tests = pd.DataFrame(columns=["metric", "set_a", "set_b", "p_holm"])
    return plot_ablation(model, cohorts, no_tests, out, by="cohort", reference="",
                         title="Model CTV per treatment cohort, test patients (Supp. Fig. 4)")  # fmt: skip


def _drawn(ctvs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CTVs that are drawn and written as NIfTI: not the table-only rows (the bare pre-RT lesion is
    an input mask already)."""
    return {k: v for k, v in ctvs.items() if k not in REFERENCE_ONLY_CTVS}


def _rf_roc_curves(cfg: StudyConfig) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Pooled ROC curves saved by `ctvlab voxel-models` (results/voxel_models/*/roc.json), if any."""
    curves = {}
    for f in sorted(Path(cfg.results_dir, "voxel_models").glob("*/roc.json")):
        d = json.loads(f.read_text())
        curves[f.parent.name] = (np.asarray(d["fpr"]), np.asarray(d["tpr"]), float(d["auc"]))
    return curves


def _progress(items, enabled: bool, console, label: str):
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for it in items:
            yield it
            bar.advance(task)


def check_provenance(spec: dict[str, Any], model_uri: str, prep: Path, split) -> None:
    """Refuse a model trained on other data: another prepared dataset, another split, or pseudonyms made
    under another salt (then its recorded training patients cannot be compared with these at all).

    Raises:
        LeakageError: (exit 3) naming what differs.
    """
    from ctvlab.errors import LeakageError
    from ctvlab.splits import salt_fingerprint

    ours = {"dataset_digest": split.dataset_digest, "split_digest": split.digest,
            "salt_fingerprint": salt_fingerprint(prep)}  # fmt: skip
    differ = [
        f"{k} {str(spec[k])[:12]} (this data: {v[:12]})"
        for k, v in ours.items()
        if spec.get(k) not in (None, "", v)
    ]
    if differ:
        raise LeakageError(
            f"{model_uri} was trained on other data: {'; '.join(differ)}. Its training patients cannot be "
            f"checked against the patients of {prep}. Evaluate it on the data it was trained on, or train a "
            "model on this split (`ctvlab tune` or `ctvlab train`)."
        )


def evaluation_note(summary: pd.DataFrame, wilcoxon: pd.DataFrame, n_patients: int, threshold: float) -> str:
    """The evaluation run's description in the MLflow UI (Markdown): the CTV table beside the study's, and
    where the figures are, so that it is the first thing a reviewer reads on the run's page. Its first line,
    the headline the runs table's Description column shows, is the model CTV's PCC beside the others'."""
    pcc = {r["ctv"]: r["pcc_mean"] for r in summary.to_dict("records")}
    others = ", ".join(
        f"{HEADLINE_NAMES.get(c, c)} {pcc[c]:.2f}" for c in ("rtog", "eortc", "isovolume") if c in pcc
    )
    lines = [f"Model CTV PCC {pcc.get('model', float('nan')):.2f}" + (f" ({others})" if others else "")
             + f" on {n_patients} test {'patient' if n_patients == 1 else 'patients'}.", "",
             f"**CTVs on {n_patients} {'patient' if n_patients == 1 else 'patients'}** (threshold "
             f"{threshold:.2f}); mean ± SD, the study's value in brackets.", "",
             "| CTV | sensitivity | specificity | PCC | volume (cm³) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in summary.to_dict("records"):
        cells = []
        for m in ("sensitivity", "specificity", "pcc"):
            ref = STUDY_RESULTS.get(r["ctv"], {}).get(m)
            cells.append(f"{r[f'{m}_mean']:.2f} ± {r[f'{m}_sd']:.2f}" + (f" [{ref[0]:.2f}]" if ref else ""))
        lines.append(f"| {r['ctv']} | {' | '.join(cells)} | {r['volume_cm3_mean']:.0f} |")
    tests = [f"{r.metric} model vs {r.other}: p {r.p_value:.3g} (Holm {r.p_holm:.3g})"
             for r in wilcoxon.itertuples() if r.metric in ("sensitivity", "specificity", "pcc")]  # fmt: skip
    if tests:
        lines += ["", "Wilcoxon signed-rank: " + "; ".join(tests) + "."]
    lines += [
        "",
        "Figures: *Artifacts → figures* (Fig. 3 box plots, coverage, calibration); tables: *Artifacts → "
        "tables*; the study's report, once written (`ctvlab report`, the end of `ctvlab run`): *Artifacts → "
        "report.html*.",
    ]
    return "\n".join(lines)


HEADLINE_NAMES = {"rtog": "RTOG", "eortc": "EORTC", "isovolume": "same-volume margin"}


# The study's test-set results (the study's Methods: CTV evaluation; the paper's Supplementary Table 1), mean ± SD.
STUDY_RESULTS = {
    "model": {"sensitivity": (0.92, 0.11), "specificity": (0.89, 0.05), "pcc": (0.81, 0.09)},
    "rtog": {"sensitivity": (0.95, 0.08), "specificity": (0.79, 0.11), "pcc": (0.79, 0.09)},
    "eortc": {"sensitivity": (0.74, 0.21), "specificity": (0.92, 0.03), "pcc": (0.68, 0.19)},
}


def print_evaluation(outcome: EvaluationOutcome, console) -> None:
    """Supplementary Table 1 in the terminal, with the study's values beside ours."""
    from ctvlab.terminal import print_table

    metrics = (
        "sensitivity",
        "specificity",
        "specificity_ring",
        "dice",
        "hd95_mm",
        "tversky",
        "pcc",
        "volume_cm3",
    )
    rows = []
    for r in outcome.summary.to_dict("records"):
        cells = []
        for m in metrics:
            cell = f"{r[f'{m}_mean']:.2f} ± {r[f'{m}_sd']:.2f}"
            ref = STUDY_RESULTS.get(r["ctv"], {}).get(m)
            if ref:
                cell += f" [{ref[0]:.2f} ± {ref[1]:.2f}]"
            cells.append(cell)
        rows.append((r["ctv"], *cells))
    title = (f"CTVs on {len(outcome.per_patient['patient_id'].unique())} patients (threshold "
             f"{outcome.threshold:.2f}); study values in brackets")  # fmt: skip
    print_table(console, title, ("CTV", *metrics), rows)
    if outcome.coverage is not None and len(outcome.coverage):
        parts = []
        for r in outcome.coverage.itertuples():
            if r.ctv.startswith("cov") and (r.threshold is None or r.threshold != r.threshold):
                parts.append(f"{r.ctv}: not reachable ({r.reason})")
            elif r.ctv.startswith("cov"):
                parts.append(f"{r.ctv}: threshold {r.threshold:.2f}, misses {r.miss:.1%} on average "
                             f"(allowed {1 - r.target:.0%}), {r.volume_cm3:.0f} cm³")  # fmt: skip
            else:
                parts.append(f"{r.ctv}: misses {r.miss:.1%}, {r.volume_cm3:.0f} cm³")
        console.print("coverage CTVs (threshold chosen on the validation patients by conformal risk control; "
                      "miss = share of the new progression outside the CTV, over the test patients): "
                      + "; ".join(parts))  # fmt: skip
    if "isovolume" in set(outcome.summary["ctv"]):
        console.print("isovolume: a uniform margin around the lesion with the model CTV's volume (the fair "
                      "control: does the model put its volume in the right place?)")  # fmt: skip
    if "lesion" in set(outcome.summary["ctv"]):
        console.print("lesion: the pre-RT lesion with no margin (the paper's \"pre-RT lesion only\" row, which had "
                      "the study's best Dice and PPV yet misses every infiltrating cell that later progresses)")  # fmt: skip
    if len(outcome.wilcoxon):
        w = outcome.wilcoxon
        lines = [
            f"{r.metric}: model vs {r.other} p = {r.p_value:.3g} (Holm {r.p_holm:.3g}, n = {r.n})"
            for r in w.itertuples()
            if r.metric in ("sensitivity", "specificity", "pcc")
        ]
        console.print("Wilcoxon signed-rank: " + "; ".join(lines))
    if outcome.comparisons is not None and len(outcome.comparisons):
        parts = []
        for r in outcome.comparisons.itertuples():
            study = f" [study {r.study:g}]" if pd.notna(r.study) else ""
            parts.append(f"{r.comparison}: {r.value:.3g} (n = {r.n}){study}")
        console.print("Per patient: " + "; ".join(parts))
    console.print(f"tables, figures and CTV NIfTI files: {outcome.out_dir}")
    console.print(f"MLflow run {outcome.run_id}; model {outcome.model_uri}")
    console.print(
        f"per patient: inference {outcome.seconds_inference:.2f} s, CTVs + metrics {outcome.seconds_ctv_metrics:.2f} s"
    )
