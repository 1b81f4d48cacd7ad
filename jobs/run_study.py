"""The whole study from one config: cohort, validation, preprocessing, split, voxel models, statistics,
search, evaluation (each stage skipped when its outputs are current)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def add_args(p):
    p.add_argument("--force", action="store_true", help="run every stage even when current")
    p.add_argument(
        "--keep-going", action="store_true", help="after a failed stage, run those that do not need it"
    )


def main(cfg, args):
    from rich.console import Console

    from ctvlab.pipeline import run_study

    # soft_wrap: paths in a job's log stay whole lines
    run_study(cfg, Console(highlight=False, soft_wrap=True), force=args.force, keep_going=args.keep_going)


if __name__ == "__main__":
    run_job(main, __doc__, add_args)
