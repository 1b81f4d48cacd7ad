"""`ctvlab report`: the study's results in one self-contained HTML file, each beside the paper's value.

Reads what the stages wrote under `<workdir>/results` (and the cohort folder), never recomputes a result:
Table 1 and the between-cohort tests, the split, the voxel statistics (Supp. Fig. 1, also by therapy
group), the voxel models (Fig. 1) with the distance baseline and both missing-MRSI policies, the search and
the final model, the CTV evaluation (Supp. Table 1, Fig. 3, per-patient comparisons, Supp. Fig. 4), the loss
study (Supp. Figs. 2 and 3) and the modality ablation (Fig. 2). Every section says whether its outputs are
current for the study's settings and data (`pipeline.current_stages`); stale or unstamped outputs are
marked as such, not shown as the study's results. Figures are embedded as PNG (base64), so the file opens
anywhere, including MLflow's artifact viewer.

About 430 lines: one function per section of the report, in the paper's order, and the small HTML writer
they share; splitting them apart would scatter one document over several files.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ctvlab import __version__
from ctvlab.atomic import atomic_path
from ctvlab.config import StudyConfig
from ctvlab.ctv.scoring import PATIENT_FIGURE_PREFIX
from ctvlab.ctv.viewer import VIEWER_FOLDER, viewer_html
from ctvlab.study import STUDY_AUC, STUDY_CTV, STUDY_CTV_P

REPORT_FILE = "report.html"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.study{color:#666}.note{color:#555;font-size:.92em}.stale{background:#fff3cd;border:1px solid #e0c36c;padding:.5em .8em}
.missing{color:#888;font-style:italic}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
code{background:#f4f4f4;padding:0 .25em}
"""


class Report:
    """An HTML document built section by section."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def h(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str, cls: str = "note") -> None:
        self.parts.append(f'<p class="{cls}">{text}</p>')

    def table(self, df: pd.DataFrame, digits: int = 3) -> None:
        def fmt(v):
            if isinstance(v, float | np.floating):
                if np.isnan(v):
                    return "–"
                return f"{v:.2g}" if 0 < abs(v) < 10**-digits else f"{v:.{digits}f}"
            return html.escape(str(v))

        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
        rows = "".join(
            "<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False)
        )
        self.parts.append(f"<table><tr>{head}</tr>{rows}</table>")

    def figure(self, path: Path, caption: str = "") -> None:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        cap = f'<p class="note">{html.escape(caption)}</p>' if caption else ""
        self.parts.append(
            f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">{cap}'
        )

    def html(self, title: str) -> str:
        body = "\n".join(self.parts)
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{CSS}</style></head><body>{body}</body></html>\n")  # fmt: skip


def build_report(
    cfg: StudyConfig,
    current: dict[str, bool],
    out: Path | None = None,
    patient_images: bool = True,
    local_paths: bool = True,
) -> Path:
    """Write the study's report; returns its path (default `<results>/report.html`).

    Args:
        patient_images: include the contour figures that show test patients' anatomy (off for the copy sent
            to a shared tracking server unless `tracking.log_patient_images`).
        current: stage → whether its outputs are current for `cfg` (`ctvlab.pipeline.current_stages`).
        local_paths: name the working directory (off for the copy sent to the tracking server).
    """
    results = Path(cfg.results_dir)
    out = Path(out or results / REPORT_FILE)
    r = Report()
    r.h(f"ctvlab report · study {cfg.name}", 1)
    where = (
        f" · working directory <code>{html.escape(str(Path(cfg.workdir).resolve()))}</code>"
        if local_paths
        else ""
    )
    r.p(f"ctvlab {html.escape(__version__)} · generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}{where}. Values in "
        "brackets are the study's (Tran et al., npj Digital Medicine 2025).")  # fmt: skip
    sections = [
        lambda: _cohort(r, cfg),
        lambda: _split(r, cfg),
        lambda: _stats(r, results, current.get("stats", False)),
        lambda: _voxel_models(r, results, current.get("voxel-models", False)),
        lambda: _model(r, cfg, current),
        lambda: _evaluation(r, results, current.get("evaluate", False), patient_images),
        lambda: _coverage(r, results, current.get("evaluate", False)),
        lambda: _losses(r, results, current.get("loss-study", False)),
        lambda: _ablation(r, results, current.get("ablation", False)),
        lambda: _provenance(r, cfg, current),
    ]
    for section in sections:
        try:
            section()
        except (
            OSError,
            KeyError,
            ValueError,
            pd.errors.ParserError,
        ) as e:  # one unreadable output, not the report
            r.p(
                f"This section could not be read: {html.escape(type(e).__name__)}: {html.escape(str(e))}",
                "stale",
            )
    with atomic_path(out) as tmp:
        Path(tmp).write_text(r.html(f"ctvlab · {cfg.name}"), encoding="utf-8")
    return out


def _state(r: Report, folder: Path, is_current: bool, enable: str) -> bool:
    """Say whether a section's outputs exist and are current; True when there is something to show."""
    if not folder.exists():
        r.p(f"Not run: enable <code>{enable}</code> and run <code>ctvlab run</code>.", "missing")
        return False
    if not is_current:
        r.p("These outputs are <b>not current</b> for the study's settings and data (another configuration, "
            "other data, or made outside <code>ctvlab run</code>): they are shown for reference only. Run "
            "<code>ctvlab run</code> to bring them up to date.", "stale")  # fmt: skip
    return True


def _pm(mean: float, sd: float) -> str:
    return "–" if np.isnan(mean) else f"{mean:.2f} ± {sd:.2f}"


# --- sections -------------------------------------------------------------------------------------------


def _cohort(r: Report, cfg: StudyConfig) -> None:
    from ctvlab.errors import CtvlabError
    from ctvlab.synth.table1 import GROUPS, TABLE1_ROWS, between_cohorts, cohort_report, study_groups

    r.h("Cohort (Table 1)")
    try:
        rep = cohort_report(cfg.raw_dir)
    except (CtvlabError, OSError) as e:
        r.p(f"No cohort report: {html.escape(str(e))}", "missing")
        return
    study = study_groups()
    rows = [
        {"": label, **{g: f"{fmt(rep.groups[g])} [{fmt(study[g])}]" for g in GROUPS}}
        for label, fmt in TABLE1_ROWS
    ]
    r.table(pd.DataFrame(rows))
    tests = pd.DataFrame(between_cohorts(rep.patients)).rename(columns={"study_p": "study p"})
    r.p("Between cohorts (the paper does not name its tests; rank tests without censoring):")
    r.table(tests)


def _split(r: Report, cfg: StudyConfig) -> None:
    from ctvlab.data.readers import read_patients
    from ctvlab.errors import CtvlabError
    from ctvlab.splits import load_split

    r.h("Patient split")
    try:
        split = load_split(cfg.prep_dir)
        patients = read_patients(cfg.prep_dir)[["patient_id", "cohort"]]
    except (CtvlabError, OSError) as e:
        r.p(f"No split: {html.escape(str(e))}", "missing")
        return
    table = split.table.merge(patients, on="patient_id")
    counts = table.pivot_table(
        index="dl_role", columns="cohort", values="patient_id", aggfunc="count", fill_value=0
    )
    counts["all"] = counts.sum(axis=1)
    counts = counts.reindex(["train", "val", "test"]).fillna(0).astype(int).reset_index()
    r.table(counts.rename(columns={"dl_role": "U-Net role"}))
    r.p(f"Study: 67 / 16 / 18 patients (train / val / test) at 101, stratified by treatment cohort. Voxel models: "
        f"{table['rf_fold'].nunique()}-fold CV grouped by patient. Split digest <code>{split.digest[:16]}</code>.")  # fmt: skip


def _stats(r: Report, results: Path, is_current: bool) -> None:
    r.h("Voxel statistics (Supplementary Fig. 1)")
    folder = results / "stats"
    if not _state(r, folder, is_current, "pipeline.stats"):
        return
    tests = pd.read_csv(folder / "tests.csv")
    cols = ["feature", "category", "n_pairs", "median_difference", "wilcoxon_p", "wilcoxon_p_holm",
            "mannwhitney_p_holm"]  # fmt: skip
    r.p(f"{int(tests['significant'].sum())} of {len(tests)} tests significant after Holm (per-patient medians of "
        "progressed vs stable NAV→NAV voxels within the 4 cm ring). The 12 smallest p:")  # fmt: skip
    r.table(tests.sort_values("wilcoxon_p")[[c for c in cols if c in tests]].head(12))
    if (folder / "category_boxes.png").exists():
        r.figure(folder / "category_boxes.png", "All patients.")
    by = folder / "tests_by_cohort.csv"
    if by.exists():
        t = pd.read_csv(by)
        if len(t):
            n_sig = t.groupby("cohort").agg(patients=("n_patients", "first"), tests=("significant", "size"),
                                            significant=("significant", "sum")).reset_index()  # fmt: skip
            r.p("By therapy group (Holm within each cohort):")
            r.table(n_sig)
    for f in sorted(folder.glob("category_boxes_*.png")):
        r.figure(f, f"{f.stem.removeprefix('category_boxes_')} cohort.")


def _voxel_models(r: Report, results: Path, is_current: bool) -> None:
    r.h("Voxel-wise progression models (Fig. 1)")
    folder = results / "voxel_models"
    if not _state(r, folder, is_current, "pipeline.voxel_models"):
        return
    rows = []
    for roc in sorted(folder.glob("*/roc.json")):
        model, target, subgroup = roc.parent.name.split("-", 2)
        d = json.loads(roc.read_text())
        study = STUDY_AUC.get((target, subgroup), float("nan")) if model == "rf" else float("nan")
        rows.append({"model": model, "target": target.upper(), "patients": subgroup,
                     "AUC mean ± SD": _pm(d["auc_mean"], d["auc_std"]), "pooled AUC": d["auc"],
                     "distance to T2L AUC": d.get("auc_distance", float("nan")), "study AUC": study})  # fmt: skip
    if rows:
        r.table(pd.DataFrame(rows))
        r.p("The distance baseline scores each voxel by its distance to the pre-RT T2L alone, on the same folds: a "
            "model that does not beat it has learnt nothing the lesion's outline does not already say.")  # fmt: skip
    policies = folder / "missing_policies.csv"
    if policies.exists():
        r.p("Missing MRSI, both policies (all patients): gain = AUC(all features) − AUC(anatomical features) on the "
            "same voxels. On a <code>--null</code> cohort the gain should be ≈ 0.")  # fmt: skip
        r.table(pd.read_csv(policies))
    for png in sorted(folder.glob("*/roc.png")):
        r.figure(png)


def _model(r: Report, cfg: StudyConfig, current: dict[str, bool]) -> None:
    r.h("U-Net: search and final model")
    from ctvlab.stage_table import model_stage, read_stamp

    trained = model_stage(cfg)  # tune, or one training run
    search, final = read_stamp(cfg.workdir, trained), read_stamp(cfg.workdir, "final")
    spec_path = Path(cfg.results_dir, "model", "model.json")
    if search is None and not spec_path.exists():
        r.p("No model trained yet.", "missing")
        return
    if search and search.get("best_params"):
        tag = "" if current.get(trained) else " (not current)"
        best = ", ".join(f"{k} {v}" for k, v in search["best_params"].items())
        r.p(
            f"Search{tag}: best configuration {html.escape(best)}. Study optimum: lr 5e-5, 48 base features, batch 1."
        )
    if spec_path.exists():
        spec = json.loads(spec_path.read_text())
        shown = {
            k: spec.get(k) for k in ("base_features", "in_channels", "modality_set", "epoch", "input_shape")
        }
        which = "final model" if final else "evaluated model"
        tag = "" if current.get("final" if final else trained) else " (not current)"
        r.p(f"The {which}{tag} ({html.escape(str((final or search or {}).get('model_uri', '')))}): "
            f"{html.escape(json.dumps(shown))}; loss {html.escape(str(cfg.unet.final_loss or cfg.unet.loss.name))}. "
            "The study's final model used the PCC loss and converged at epoch 123.")  # fmt: skip


def _evaluation(r: Report, results: Path, is_current: bool, patient_images: bool) -> None:
    r.h("CTV evaluation on the test patients (Supplementary Table 1, Fig. 3)")
    folder = results / "evaluate"
    if not _state(r, folder, is_current, "pipeline.evaluate"):
        return
    summary = pd.read_csv(folder / "summary.csv")
    metrics = ["sensitivity", "specificity", "specificity_ring", "ppv", "dice", "hd95_mm", "tversky", "pcc",
               "volume_cm3"]  # fmt: skip
    rows = []
    for s in summary.to_dict("records"):
        row = {"CTV": s["ctv"], "n": s["n"]}
        for m in metrics:
            if f"{m}_mean" in s:
                text = _pm(s[f"{m}_mean"], s[f"{m}_sd"])
                ref = STUDY_CTV.get(s["ctv"], {}).get(m)
                row[m] = text + (f" [{ref[0]:.2f} ± {ref[1]:.2f}]" if ref else "")
        rows.append(row)
    r.table(pd.DataFrame(rows))
    r.p("isovolume: a uniform margin around the lesion grown to the model CTV's volume (the fair test of whether "
        "the model puts its volume in the right place); lesion: the pre-RT lesion with no margin; specificity_ring: "
        "within 4 cm of the lesion.")  # fmt: skip
    w = folder / "wilcoxon.csv"
    if w.exists():
        t = pd.read_csv(w)
        t["study p"] = [
            STUDY_CTV_P.get((a, b), float("nan")) for a, b in zip(t["metric"], t["other"], strict=True)
        ]
        r.p("Wilcoxon signed-rank tests, model vs each CTV (Holm over the table; n: patients used):")
        r.table(t)
    c = folder / "comparisons.csv"
    if c.exists():
        r.p("Per-patient comparisons (Results; Supplementary Fig. 4 by cohort):")
        r.table(pd.read_csv(c).rename(columns={"study": "study value"}))
    for name, caption in (("fig3_metric_boxes.png", "Fig. 3: per-patient metrics per CTV."),
                          ("supp_fig4_by_cohort.png", "Supp. Fig. 4: the model CTV per treatment cohort."),
                          ("fig1_rf_roc.png", "Fig. 1: voxel-model ROC curves.")):  # fmt: skip
        if (folder / name).exists():
            r.figure(folder / name, caption)
    viewers = sorted(p for p in (folder / VIEWER_FOLDER).glob("*") if p.is_dir())
    if viewers and patient_images:
        r.h("The test patients in 3D", 3)
        r.p("The patients of the contour figures below on the grid the CTVs were scored on: each CTV, the pre-RT "
            "lesion and the follow-up progression can be switched on and off; scroll through the slices in any "
            "plane (NiiVue, in this file: it needs no network).")  # fmt: skip
        r.parts.append(viewer_html(viewers))
    contours = sorted(folder.glob(f"{PATIENT_FIGURE_PREFIX}*.png"))
    if contours and patient_images:
        for f in contours:
            r.figure(f, "Fig. 4: CTV contours (red: model, yellow: RTOG, green: EORTC) over the progression.")
    elif contours:
        r.p(f"{len(contours)} contour figure(s) of test patients and their 3D viewer are left out of this copy (they show "
            "patient anatomy; set <code>tracking.log_patient_images</code> to include them); see the results folder.")  # fmt: skip


def _coverage(r: Report, results: Path, is_current: bool) -> None:
    r.h("Coverage: guaranteed CTVs, the curve behind every volume, calibration")
    folder = results / "evaluate"
    if not (folder / "coverage.csv").exists():
        r.p("No coverage outputs: run the evaluation (ctvlab evaluate) with this version.", "missing")
        return
    if not is_current:
        r.p("These outputs are not current for this config.", "stale")
    r.p("Coverage CTVs: the model's threshold for each target was chosen on its validation patients by conformal "
        "risk control, so that on a new patient like them the CTV misses on average at most 1 − target of the new "
        "progression (a guarantee on the mean over patients, not for each patient, and not for another population). "
        "miss: the test patients' achieved mean with its 95% interval; below_target: the share of test patients "
        "covered below the target; RTOG and EORTC beside, at their own volumes.")  # fmt: skip
    r.table(pd.read_csv(folder / "coverage.csv"))
    if (folder / "coverage_volume.png").exists():
        r.figure(folder / "coverage_volume.png", "The share of the new progression covered against CTV volume: the "
                 "model with its threshold swept, the uniform margin with its width swept (mean ± SE over test "
                 "patients); the title gives the area between them per unit volume with its 95% interval.")  # fmt: skip
    control = folder / "control.csv"
    if control.exists():
        r.p("Positive control (a synthetic cohort with its ground truth): coverage of the new progression by the "
            "model against the uniform margin of the same volume, as drawn and as PREDICT-GBM scores it (the "
            "model's top k voxels at a CTV's volume), beside the ceiling: the gain of the generator's true pre-RT "
            "density at that volume, the most any map made from it could gain.")  # fmt: skip
        r.table(pd.read_csv(control))
    if (folder / "reliability.png").exists():
        r.figure(folder / "reliability.png", "Reliability of the voxel probability (brain within the analysis ring "
                 "of the test patients): a calibrated map lies on the diagonal.")  # fmt: skip


def _losses(r: Report, results: Path, is_current: bool) -> None:
    r.h("Losses and the Tversky β (Supplementary Figs. 2 and 3)")
    folder = results / "loss_study"
    if not _state(r, folder, is_current, "pipeline.loss_study"):
        return
    s = pd.read_csv(folder / "summary.csv")
    from ctvlab.stages.loss_study import run_label

    s["run"] = [run_label(lo, st, b) for lo, st, b in zip(s["loss"], s["study"], s["beta"], strict=True)]
    cols = ["run", "n"] + [f"{m}_{k}" for m in ("sensitivity", "specificity", "pcc") for k in ("mean", "std")]
    r.table(s[cols])
    r.p("Study: the optimum near β = 0.98 (α = 0.02), specificity dropping sharply above it; PCC + BCE had higher "
        "sensitivity at a small cost in specificity, PCC was chosen for contiguous CTVs.")  # fmt: skip
    if (folder / "wilcoxon.csv").exists():
        r.table(pd.read_csv(folder / "wilcoxon.csv"))
    for name in ("supp_fig2_beta_sweep.png", "supp_fig3_losses.png"):
        if (folder / name).exists():
            r.figure(folder / name)


def _ablation(r: Report, results: Path, is_current: bool) -> None:
    r.h("Input modalities (Fig. 2)")
    folder = results / "ablation"
    if not _state(r, folder, is_current, "pipeline.ablation"):
        return
    table = pd.read_csv(folder / "per_patient.csv")
    summary = table.groupby("modality_set")[["sensitivity", "specificity", "pcc"]].agg(["mean", "std"])
    summary.columns = [f"{m}_{k}" for m, k in summary.columns]
    r.table(summary.reset_index())
    if (folder / "wilcoxon.csv").exists():
        r.table(pd.read_csv(folder / "wilcoxon.csv"))
    for name in ("fig2a_validation_pcc.png", "fig2b_modalities.png"):
        if (folder / name).exists():
            r.figure(folder / name)


def _provenance(r: Report, cfg: StudyConfig, current: dict[str, bool]) -> None:
    r.h("Provenance")
    rows = []
    from ctvlab.stage_table import read_stamp

    for stage, ok in current.items():
        key = (read_stamp(cfg.workdir, stage) or {}).get("key", "")
        rows.append({"stage": stage, "stamp": key[:16] or "–", "current": "yes" if ok else "no"})
    r.table(pd.DataFrame(rows))
    r.p("A stage is current when the key it stamped (its settings, the digests of its inputs and the ctvlab version) "
        "equals the key it would have now.")  # fmt: skip


def report_stage(cfg: StudyConfig, current: dict[str, bool]) -> tuple[Path, str]:
    """Write the report and log it to the study's MLflow run "report" (MLflow renders HTML artifacts), and
    beside the figures of the evaluation run it reports when that evaluation is current, so that a reviewer
    on the evaluation's page finds it under Artifacts; the logged copy names no local folder and leaves out
    patient contour figures unless `tracking.log_patient_images`. Returns (path, run id)."""
    import tempfile

    from ctvlab.tracking import base_tags, tracker_for

    path = build_report(cfg, current)
    tracker = tracker_for(cfg)
    with tracker.run("report", base_tags("report")) as run, tempfile.TemporaryDirectory() as d:
        shared = build_report(
            cfg, current, Path(d) / REPORT_FILE, cfg.tracking.log_patient_images, local_paths=False
        )
        run.artifact(shared)
        run_id = run.run_id
        evaluation = current_evaluation_run(tracker) if current.get("evaluate") else None
        if evaluation is not None:
            tracker.logger(evaluation).artifact(shared)
    return path, run_id


def current_evaluation_run(tracker) -> str | None:
    """The experiment's latest finished evaluation run (the one whose tables the report shows when the
    evaluate stage is current); None when there is none or the tracking server does not answer now (the
    report then stays with its own run)."""
    if not tracker.reachable():
        return None
    runs = tracker.find_runs("tags.`ctvlab.stage` = 'evaluate' and attributes.status = 'FINISHED'", 1)
    return runs[0].info.run_id if runs else None
