"""Generate the synthetic cohort of the study config (`ctvlab synth`; default: into <workdir>/cohort).

Takes exactly the options of `ctvlab synth` (`python jobs/synthesize.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("synth")
