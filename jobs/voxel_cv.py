"""Voxel-wise progression models (random forest or XGBoost) with 5-fold patient-grouped CV."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def add_args(p):
    p.add_argument("--model", choices=["rf", "xgboost"], default=None)
    p.add_argument("--target", choices=["nel", "cel", "any"], default=None)
    p.add_argument("--subgroup", choices=["all", "early", "late"], default=None)
    p.add_argument("--all", action="store_true", help="{nel, cel} x {all, early, late}")


def main(cfg, args):
    from ctvlab.stages import rf_cv_stage

    if args.model:
        cfg.voxel_models.model = args.model
    targets = ["nel", "cel"] if args.all else ([args.target] if args.target else None)
    subgroups = ["all", "early", "late"] if args.all else ([args.subgroup] if args.subgroup else None)
    for (t, s), r in rf_cv_stage(cfg, cfg.prep_dir, targets=targets, subgroups=subgroups).items():
        print(f"{cfg.voxel_models.model} {t}/{s}: AUC {r.auc_mean:.3f} ± {r.auc_std:.3f}")


if __name__ == "__main__":
    run_job(main, __doc__, add_args)
