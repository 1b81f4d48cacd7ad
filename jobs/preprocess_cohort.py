"""Preprocess the study's cohort (`ctvlab preprocess`): 3 mm volumes and voxel tables with Ray Data.

Takes exactly the options of `ctvlab preprocess` (`python jobs/preprocess_cohort.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("preprocess")
