"""Model CTV vs the RTOG and EORTC CTVs on the test patients (`ctvlab evaluate`).

Takes exactly the options of `ctvlab evaluate` (`python jobs/evaluate_ctvs.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("evaluate")
