"""The study's comparison on a 101-patient synthetic cohort: model CTV vs RTOG vs EORTC.

    .venv/bin/python benchmarks/reproduce.py [--workdir runs/reproduce] [--patients 101] [--epochs 30]
                                             [--trials 6] [--base-features 16] [--null]

Runs the whole study (`ctvlab run`) with the study's settings scaled to CPU: 101 synthetic patients, the
study's preprocessing, voxel models over {cel, nel} × {all, early, late}, statistics, a random search of
`--trials` U-Nets of `--base-features` features for `--epochs` epochs (the study: 30 trials of 48 features,
up to 150 epochs, on a GPU), and the evaluation on the test patients. Then prints the SPEC's table (mean ±
SD of sensitivity, specificity and PCC per CTV) beside the study's values, the Wilcoxon tests, and the voxel
models' AUCs beside the study's.

The numbers will not match the private cohort; the shape should: RTOG the most sensitive and least
specific, EORTC the least sensitive, the model in between on sensitivity and better than RTOG on
specificity. Stages already done in `--workdir` are skipped, so an interrupted run continues.
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
    ap.add_argument("--null", action="store_true", help="the --null control cohort")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--cohort", type=Path, default=None,
                    help="an existing cohort (e.g. benchmarks/synth.py's) instead of generating one")  # fmt: skip
    args = ap.parse_args()

    import pandas as pd

    from ctvlab.config import CohortConfig, SearchSpace, StudyConfig
    from ctvlab.pipeline import run_study
    from ctvlab.study import STUDY_AUC
    from ctvlab.study import STUDY_CTV as STUDY

    cfg = StudyConfig(name="ctvlab-reproduce" + ("-null" if args.null else ""), workdir=args.workdir)
    cfg.tracking.tracking_uri = args.tracking_uri
    cfg.synth.n_patients, cfg.synth.seed, cfg.synth.null = args.patients, 0, args.null
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
    t0 = time.perf_counter()
    run_study(cfg)
    minutes = (time.perf_counter() - t0) / 60

    summary = pd.read_csv(Path(cfg.results_dir, "evaluate", "per_patient.csv"))
    print(
        f"\nCTVs on {summary['patient_id'].nunique()} test patients ({minutes:.0f} min) — mean ± SD; study in brackets"
    )
    print(f"{'CTV':8} {'sensitivity':>24} {'specificity':>24} {'PCC':>24}")
    for ctv in ("model", "rtog", "eortc"):
        rows = summary[summary["ctv"] == ctv]
        cells = []
        for m in ("sensitivity", "specificity", "pcc"):
            mu, sd = STUDY[ctv][m]
            cells.append(f"{rows[m].mean():.2f} ± {rows[m].std():.2f} [{mu:.2f} ± {sd:.2f}]")
        print(f"{ctv:8} " + " ".join(f"{c:>24}" for c in cells))
    wil = pd.read_csv(Path(cfg.results_dir, "evaluate", "wilcoxon.csv"))
    if len(wil):
        print("\nWilcoxon signed-rank, model vs each standard CTV:")
        print(wil.to_string(index=False))
    print("\nVoxel models (5-fold patient-grouped CV), ROC AUC mean ± SD; study in brackets")
    for (target, sub), auc in STUDY_AUC.items():
        roc = Path(cfg.results_dir, "rf_cv", f"rf-{target}-{sub}", "roc.json")
        if roc.exists():
            r = json.loads(roc.read_text())
            print(f"  {target}/{sub:5}: {r['auc_mean']:.2f} ± {r['auc_std']:.2f} [{auc:.2f}]")


if __name__ == "__main__":
    main()
