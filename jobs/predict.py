"""Predict the CTVs of new patients with a registered model (`ctvlab predict`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def add_args(p):
    p.add_argument("raw", type=Path, help="cohort folder (manifest.csv); outcomes may be empty")
    p.add_argument("--out", type=Path, required=True, help="output folder, one sub-folder per patient")
    p.add_argument("--patient", action="append", default=None, help="only this patient (repeatable)")
    p.add_argument("--model", default="models:/ctvlab-unet@champion", help="model URI or folder")
    p.add_argument("--threshold", type=float, default=None, help="model CTV threshold")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def main(cfg, args):
    from rich.console import Console

    from ctvlab.ctv.predict import predict_cohort, print_prediction

    console = Console(highlight=False)
    outcome = predict_cohort(args.raw.resolve(), args.out.resolve(), cfg, model_uri=args.model,
                             patients=args.patient, threshold=args.threshold, device=args.device,
                             console=console)  # fmt: skip
    print_prediction(outcome, console)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    run_job(main, __doc__, add_args)
