"""Predict the CTVs of new patients with a registered model (`ctvlab predict`).

Takes exactly the options of `ctvlab predict` (`python jobs/predict.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("predict")
