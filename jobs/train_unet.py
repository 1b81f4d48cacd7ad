"""Train the 3D U-Net with Ray Train (`ctvlab train`).

Takes exactly the options of `ctvlab train` (`python jobs/train_unet.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.cli import run_job

if __name__ == "__main__":
    run_job("train")
