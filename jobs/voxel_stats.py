"""Per-patient medians per voxel category and stable-vs-progressed tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def main(cfg, args):
    from ctvlab.stages import stats_stage

    result, run_id = stats_stage(cfg, cfg.prep_dir)
    print(
        f"{int(result.summary()['n_significant'])} of {len(result.tests)} tests significant; MLflow run {run_id}"
    )


if __name__ == "__main__":
    run_job(main, __doc__)
