"""Generate the synthetic cohort of the study config into <workdir>/cohort."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def main(cfg, args):
    from ctvlab.synth.cohort import generate_cohort

    generate_cohort(cfg.raw_dir, cfg.synth)


if __name__ == "__main__":
    run_job(main, __doc__)
