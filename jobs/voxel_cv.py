"""Voxel-wise progression models with 5-fold patient-grouped CV (`ctvlab rf-cv`).

Takes exactly the options of `ctvlab rf-cv` (`python jobs/voxel_cv.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("rf-cv")
