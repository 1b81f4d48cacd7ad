"""Hyperparameter search on Ray Tune (grid, then random search), or the modality ablation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def add_args(p):
    p.add_argument("--resume", action="store_true", help="restore the last interrupted search")
    p.add_argument("--ablation", action="store_true", help="one random search per modality set (Fig. 2)")


def main(cfg, args):
    from rich.console import Console

    console = Console(highlight=False)
    if args.ablation:
        from ctvlab.unet.ablation import print_ablation, run_ablation

        print_ablation(run_ablation(cfg, cfg.prep_dir), console)
        return
    from ctvlab.unet.tune import print_search, tune_study

    print_search(tune_study(cfg, cfg.prep_dir, resume=args.resume), console)


if __name__ == "__main__":
    run_job(main, __doc__, add_args)
