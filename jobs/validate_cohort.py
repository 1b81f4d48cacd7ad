"""Validate the study's cohort folder (`ctvlab validate`); exit 1 when any patient is invalid.

Takes exactly the options of `ctvlab validate` (`python jobs/validate_cohort.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("validate")
