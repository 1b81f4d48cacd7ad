"""Register the cohort's follow-up scans to the pre-RT T1c (`ctvlab register`); exit 1 when any patient was refused.

Takes exactly the options of `ctvlab register` (`python jobs/register.py --help`).
"""

import sys
from pathlib import Path

# The package, without install; the jobs folder itself leaves the import path, so no job's name can
# shadow a module.
sys.path[0] = str(Path(__file__).resolve().parents[1] / "platform")

from ctvlab.cli import run_job  # noqa: E402 (after the path is set)

if __name__ == "__main__":
    run_job("register")
