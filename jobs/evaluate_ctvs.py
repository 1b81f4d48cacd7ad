"""Evaluate the model CTV against the RTOG and EORTC CTVs on the test split."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the package, without install

from ctvlab.jobkit import run_job


def add_args(p):
    p.add_argument("--model-uri", default=None, help="models:/name/version, runs:/id/model or a folder")
    p.add_argument("--split", default="test", choices=["test", "val"])


def main(cfg, args):
    from rich.console import Console

    from ctvlab.ctv.evaluate import evaluate_study, print_evaluation

    console = Console(highlight=False)
    print_evaluation(
        evaluate_study(cfg, cfg.prep_dir, model_uri=args.model_uri, split_name=args.split, console=console),
        console,
    )


if __name__ == "__main__":
    run_job(main, __doc__, add_args)
