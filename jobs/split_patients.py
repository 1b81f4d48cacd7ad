"""Draw the patient splits of the prepared dataset and log them to MLflow."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def main(cfg, args):
    from ctvlab.stages import split_stage

    split, run_id = split_stage(cfg, cfg.prep_dir)
    print(f"split {split.digest[:12]} written; MLflow run {run_id}")


if __name__ == "__main__":
    run_job(main, __doc__)
