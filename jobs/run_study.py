"""The whole study from one config (`ctvlab run`): each stage skipped when its outputs are current.

Takes exactly the options of `ctvlab run` (`python jobs/run_study.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("run")
