"""Train the 3D U-Net on Ray Train (CPU or GPU workers) and register the best model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def add_args(p):
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run")


def main(cfg, args):
    from ctvlab.unet.train import train_unet

    if args.num_workers:
        cfg.unet.train.num_workers = args.num_workers
    if args.use_gpu:
        cfg.unet.train.use_gpu = True
    out = train_unet(cfg, cfg.prep_dir, resume=args.resume)
    print(
        f"best epoch {out.best_epoch}, val Tversky {out.best_metrics.get('val_tversky', float('nan')):.3f}; "
        f"registered {out.model_uri}"
    )


if __name__ == "__main__":
    run_job(main, __doc__, add_args)
