"""Validate the study's cohort folder; exit 1 when any patient is invalid."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def main(cfg, args):
    from rich.console import Console

    from ctvlab.ingest.validate import print_validation, validate_cohort

    report = validate_cohort(cfg.raw_dir, progress=False)
    print_validation(report, Console(highlight=False))
    return 0 if report.ok else 1


if __name__ == "__main__":
    run_job(main, __doc__)
