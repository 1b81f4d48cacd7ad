"""Preprocess the study's cohort into <workdir>/prep with Ray Data (on the cluster of RAY_ADDRESS)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def main(cfg, args):
    from rich.console import Console

    from ctvlab.preprocess.pipeline import preprocess_cohort, print_preprocess_report

    console = Console(highlight=False)
    report = preprocess_cohort(
        cfg.raw_dir, cfg.prep_dir, cfg.preprocess, address=cfg.ray.address, console=console
    )
    print_preprocess_report(report, console)
    return report.exit_code()


if __name__ == "__main__":
    run_job(main, __doc__)
