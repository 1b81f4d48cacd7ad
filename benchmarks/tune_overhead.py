"""Ray Tune's overhead on U-Net trials, and what ASHA saves.

    .venv/bin/python benchmarks/tune_overhead.py [--data runs/demo/prep] [--trials 4] [--epochs 4]
                                                 [--base-features 8] [--concurrency 2] [--workers 1] [--no-asha]

Runs, on a prepared dataset's split (default: the demo's), `--trials` random-search trials of
`--epochs` epochs each, `--concurrency` at a time, exactly as `ctvlab tune` runs them (a one-worker trial
trains inside its Tune function trainable, logging to MLflow; `--workers 2` makes each trial a Ray Train
run of two workers, the path multi-worker trials take):

1. without early stopping: the search's wall time against the ideal, the sum of the trials' own training
   time (every epoch's `epoch_seconds`, reported by the training loop) divided by the concurrency.
   Overhead = wall / ideal − 1: Tune's scheduling, each trial's start-up (reading its examples, or a Ray
   Train worker group), checkpointing and MLflow logging. Goal: under 10% for one-worker trials of 4 epochs.
2. with ASHA (grace period a third of the epochs, reduction factor 2): epochs trained and wall time
   against run 1, and whether the best trial is the same.

Trials need a few minutes of work each for the ratio to mean anything: a worker group's start-up costs
seconds on any machine, so very short trials are all overhead.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def search(cfg, prep: Path, name: str, trials: int, asha: bool):
    from ctvlab.unet.search import run_search
    from ctvlab.unet.spaces import random_param_space

    t0 = time.perf_counter()
    table = run_search(cfg, prep, random_param_space(cfg.tune.space, "all"), name=name, num_samples=trials,
                       parent_run_id=None, use_asha=asha)  # fmt: skip
    return time.perf_counter() - t0, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/demo/prep"))
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--base-features", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument(
        "--workers", type=int, default=1, help="training workers per trial (2+: Ray Train trials)"
    )
    ap.add_argument("--no-asha", action="store_true", help="skip the ASHA run")
    ap.add_argument(
        "--record", action="store_true", help="also write the output to docs/results/tune_overhead.md"
    )
    ap.add_argument(
        "--record-as", default="tune_overhead", choices=["tune_overhead", "tune_overhead_study", "tune_overhead_30"],
        help="the results page to write: tune_overhead_study for a study-sized --data, tune_overhead_30 for "
        "--trials 30",
    )  # fmt: skip
    args = ap.parse_args()
    from record import recorded

    with recorded(args.record_as, args.record):
        run(args)


def run(args) -> None:

    from ctvlab.config import SearchSpace, StudyConfig
    from ctvlab.runtime import init_ray
    from ctvlab.study import BEST_SELECTION_METRIC

    prep = args.data.resolve()
    if not (prep / "splits.json").exists():
        raise SystemExit(f"{prep}: no prepared dataset with a split; run `make demo` or pass --data PREP")
    work = Path(tempfile.mkdtemp(prefix="ctvlab-tune-bench-"))
    cfg = StudyConfig(name="tune-overhead", workdir=work)
    cfg.tracking.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg.unet.model.base_features = args.base_features
    cfg.unet.optim.lr = 1e-3
    cfg.tune.space = SearchSpace(base_features=[args.base_features], batch_size=[1], loss=["pcc"])
    cfg.tune.space.lr.low, cfg.tune.space.lr.high = 5e-4, 3e-3
    cfg.tune.epochs_per_trial = args.epochs
    cfg.unet.train.num_workers = args.workers
    if args.workers > 1:
        cfg.tune.cpus_per_trial = 0.5
    cfg.tune.max_concurrent_trials = args.concurrency
    cfg.tune.asha.grace_period = max(1, args.epochs // 3)
    cfg.tune.asha.reduction_factor = 2
    init_ray()
    print(f"{args.trials} trials × {args.epochs} epochs, {args.concurrency} at a time, base features "
          f"{args.base_features}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip

    wall, table = search(cfg, prep, "overhead-fifo", args.trials, asha=False)
    work_s = float(table["train_seconds"].sum())
    ideal = work_s / args.concurrency
    print(f"FIFO: wall {wall:.1f} s · trials' own training time {work_s:.1f} s → ideal {ideal:.1f} s · "
          f"overhead {wall / ideal - 1:+.1%} (goal < 10%)")  # fmt: skip
    print(
        f"      {wall - ideal:.1f} s beyond the ideal, {(wall - ideal) / args.trials * args.concurrency:.1f} s per trial slot"
    )
    best_fifo = table.loc[table[BEST_SELECTION_METRIC].idxmax()]
    if not args.no_asha:
        wall_a, table_a = search(cfg, prep, "overhead-asha", args.trials, asha=True)
        epochs, epochs_a = int(table["epochs_run"].sum()), int(table_a["epochs_run"].sum())
        best_a = table_a.loc[table_a[BEST_SELECTION_METRIC].idxmax()]
        print(f"ASHA: wall {wall_a:.1f} s ({wall_a / wall:.2f}× FIFO) · epochs {epochs_a} of {epochs} "
              f"({1 - epochs_a / epochs:.0%} saved) · best val Tversky {best_a[BEST_SELECTION_METRIC]:.3f} "
              f"(FIFO {best_fifo[BEST_SELECTION_METRIC]:.3f})")  # fmt: skip
        print("      (the two searches draw the same configurations: Tune's random generator is seeded)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
