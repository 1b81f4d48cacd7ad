"""The study as published, on a 101-patient synthetic cohort: every row ctvlab reports beside the paper's.

    .venv/bin/python benchmarks/reproduce.py [--workdir runs/reproduce] [--patients 101] [--epochs 30]
                                             [--trials 6] [--base-features 16] [--final-epochs 40]
                                             [--patience 8] [--loss-study-epochs 0] [--null] [--voxel-only]

Runs the whole study (`ctvlab run`) with the study's settings scaled to CPU: 101 synthetic patients, the
study's preprocessing, voxel models over {cel, nel} × {all, early, late} with both missing-MRSI policies,
statistics (all patients and per cohort), a random search of `--trials` U-Nets of `--base-features`
features for `--epochs` epochs, the final model (the best configuration retrained with PCC for up to
`--final-epochs`, early stopping after `--patience`; the study: 30 trials of 48 features, final model
converged at epoch 123, on a GPU), the loss study when `--loss-study-epochs` > 0, the evaluation on the test
patients and the report. Then prints, beside the study's values: Supp. Table 1 (mean ± SD per CTV,
including the iso-volume margin and the bare lesion), the Wilcoxon tests, the per-patient comparisons, the
voxel models' AUCs with the distance baseline, the missing-MRSI policies, the voxel statistics, the final
model and the loss study. `--voxel-only` stops after the voxel models and statistics (for the `--null`
control: there diffusion and MRSI must add nothing).

The numbers will not match the private cohort; the shape should: RTOG the most sensitive and least
specific, EORTC the least sensitive. Stages already done in `--workdir` are skipped, so an interrupted run
continues.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/reproduce"))
    ap.add_argument("--patients", type=int, default=101)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--base-features", type=int, default=16)
    ap.add_argument("--final-epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--loss-study-epochs", type=int, default=0, help="0: no loss study")
    ap.add_argument("--null", action="store_true", help="the --null control cohort")
    ap.add_argument("--voxel-only", action="store_true", help="voxel models and statistics only")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--cohort", type=Path, default=None,
                    help="an existing cohort (e.g. benchmarks/synth.py's) instead of generating one")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="the synthetic cohort's seed")
    ap.add_argument(
        "--record", action="store_true", help="also write the output to docs/results/reproduce.md"
    )
    args = ap.parse_args()
    from record import recorded

    name = "reproduce" + ("-null" if args.null else "") + (f"-seed{args.seed}" if args.seed else "")
    with recorded(name, args.record):
        run(args)


def run(args) -> None:
    import pandas as pd

    from ctvlab.config import CohortConfig, SearchSpace, StudyConfig
    from ctvlab.pipeline import run_study
    from ctvlab.stages.loss_study import run_label
    from ctvlab.study import STUDY_AUC, STUDY_CTV_P
    from ctvlab.study import STUDY_CTV as STUDY

    cfg = StudyConfig(name="ctvlab-reproduce" + ("-null" if args.null else ""), workdir=args.workdir)
    cfg.tracking.tracking_uri = args.tracking_uri
    cfg.synth.n_patients, cfg.synth.seed, cfg.synth.null = args.patients, args.seed, args.null
    if args.cohort is not None:
        cfg.cohort = CohortConfig(source="raw", raw_dir=args.cohort.resolve())
    cfg.voxel_models.subgroups = ["all", "early", "late"]
    cfg.voxel_models.rf.n_estimators = 50
    cfg.unet.model.base_features = args.base_features
    cfg.unet.optim.lr = 1e-3
    cfg.tune.run_grid = False
    cfg.tune.space = SearchSpace(
        base_features=[args.base_features], batch_size=[1], loss=["pcc", "pcc+0.5bce"]
    )
    cfg.tune.space.lr.low, cfg.tune.space.lr.high = 3e-4, 3e-3
    cfg.tune.num_samples = args.trials
    cfg.tune.epochs_per_trial = args.epochs
    cfg.tune.asha.grace_period = max(1, args.epochs // 3)
    cfg.unet.train.epochs, cfg.unet.train.patience = args.final_epochs, args.patience
    cfg.pipeline.loss_study = args.loss_study_epochs > 0
    cfg.tune.loss_study.epochs = args.loss_study_epochs or None
    t0 = time.perf_counter()
    outcome = run_study(cfg) if not args.voxel_only else _voxel_only(cfg)
    minutes = (time.perf_counter() - t0) / 60
    results = Path(cfg.results_dir)
    print(f"\n{cfg.name}: {args.patients} patients, {minutes:.0f} min; study values in brackets")
    _voxel_rows(results, STUDY_AUC)
    if args.voxel_only:
        return
    _model_rows(outcome)

    per_patient = pd.read_csv(results / "evaluate" / "per_patient.csv")
    print(f"\nSupp. Table 1: CTVs on {per_patient['patient_id'].nunique()} test patients, mean ± SD")
    metrics = ("sensitivity", "specificity", "pcc", "ppv", "dice", "volume_cm3")
    print(f"{'CTV':10}" + "".join(f"{m:>26}" for m in metrics))
    for ctv in ("model", "rtog", "eortc", "isovolume", "lesion"):
        rows = per_patient[per_patient["ctv"] == ctv]
        cells = []
        for m in metrics:
            text = f"{rows[m].mean():.2f} ± {rows[m].std():.2f}"
            if m in STUDY.get(ctv, {}):
                mu, sd = STUDY[ctv][m]
                text += f" [{mu:.2f} ± {sd:.2f}]"
            cells.append(text)
        print(f"{ctv:10}" + "".join(f"{c:>26}" for c in cells))
    wil = pd.read_csv(results / "evaluate" / "wilcoxon.csv")
    wil = wil[wil["metric"].isin(["sensitivity", "specificity", "pcc"])]
    print("\nWilcoxon signed-rank, model vs each CTV (p, Holm-adjusted p, n) [study p]:")
    for r in wil.itertuples():
        study_p = STUDY_CTV_P.get((r.metric, r.other))
        ref = f" [{study_p:g}]" if study_p is not None else ""
        print(f"  {r.metric:12} vs {r.other:10} p = {r.p_value:.3g}, Holm {r.p_holm:.3g}, n = {r.n}{ref}")
    comp = pd.read_csv(results / "evaluate" / "comparisons.csv")
    print("\nPer-patient comparisons [study]:")
    for r in comp.itertuples():
        ref = "" if pd.isna(r.study) else f" [{r.study:g}]"
        print(f"  {r.comparison}: {r.value:.3g} (n = {r.n}){ref}")
    losses = results / "loss_study" / "summary.csv"
    if losses.exists():
        s = pd.read_csv(losses)
        print("\nLoss study on the test patients (Supp. Figs. 2, 3): sensitivity / specificity / PCC")
        for r in s.itertuples():
            label = run_label(r.loss, r.study, r.beta)
            print(f"  {label:18} {r.sensitivity_mean:.3f} / {r.specificity_mean:.3f} / {r.pcc_mean:.3f}")
    print(f"\nreport: {results / 'report.html'}")


def _voxel_only(cfg):
    """Cohort, preprocessing, split, voxel models and statistics only: the stages `ctvlab run` starts with."""
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort
    from ctvlab.stages.analysis import split_stage, stats_stage, voxel_models_stage
    from ctvlab.synth.cohort import generate_cohort

    if cfg.cohort.source == "synth" and not (cfg.raw_dir / "manifest.csv").exists():
        generate_cohort(cfg.raw_dir, cfg.synth)
    preprocess_cohort(cfg.raw_dir, cfg.prep_dir, cfg.preprocess, progress=True)
    split_stage(cfg, cfg.prep_dir)
    voxel_models_stage(cfg, cfg.prep_dir)
    stats_stage(cfg, cfg.prep_dir)


def _voxel_rows(results: Path, study_auc) -> None:
    import pandas as pd

    print("\nVoxel models (5-fold patient-grouped CV), ROC AUC mean ± SD | distance to T2L | [study]")
    for (target, sub), auc in study_auc.items():
        roc = results / "voxel_models" / f"rf-{target}-{sub}" / "roc.json"
        if roc.exists():
            r = json.loads(roc.read_text())
            print(
                f"  {target}/{sub:5}: {r['auc_mean']:.3f} ± {r['auc_std']:.3f} | {r['auc_distance']:.3f} | [{auc:.2f}]"
            )
    policies = results / "voxel_models" / "missing_policies.csv"
    if policies.exists():
        print("Missing MRSI: AUC all features / anatomical features / gain (all patients)")
        for r in pd.read_csv(policies).itertuples():
            chosen = " (chosen)" if r.chosen else ""
            print(f"  {r.target}/{r.policy:12}: {r.auc_all:.3f} / {r.auc_anat:.3f} / {r.gain:+.3f}{chosen}")
    tests = results / "stats" / "tests.csv"
    if tests.exists():
        t = pd.read_csv(tests)
        print(f"Voxel statistics: {int(t['significant'].sum())} of {len(t)} tests significant after Holm")
        by = results / "stats" / "tests_by_cohort.csv"
        if by.exists():
            b = pd.read_csv(by)
            print("  by cohort: " + ", ".join(f"{c} {int(g['significant'].sum())}/{len(g)}"
                                              for c, g in b.groupby("cohort")))  # fmt: skip


def _model_rows(outcome) -> None:
    for r in outcome.stages:
        if r.name in ("search", "final model", "loss study"):
            print(f"{r.name}: {r.status}, {r.seconds / 60:.1f} min; {r.detail}")


if __name__ == "__main__":
    main()
