"""Per-patient medians per voxel category and the paired tests (`ctvlab stats`).

Takes exactly the options of `ctvlab stats` (`python jobs/voxel_stats.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("stats")
