"""Hyperparameter search or modality ablation with Ray Tune (`ctvlab tune`).

Takes exactly the options of `ctvlab tune` (`python jobs/tune_unet.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("tune")
