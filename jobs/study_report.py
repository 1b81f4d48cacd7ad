"""The study's report: every table and figure in one HTML file, beside the study's values (`ctvlab report`).

Takes exactly the options of `ctvlab report` (`python jobs/study_report.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("report")
