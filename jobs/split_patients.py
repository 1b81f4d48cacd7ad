"""Draw the patient splits of the prepared dataset and log them to MLflow (`ctvlab split`).

Takes exactly the options of `ctvlab split` (`python jobs/split_patients.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("split")
