"""Benchmark of `ctvlab synth`: seconds and megabytes per patient, and the cohort's report.

    python benchmarks/synth.py --patients 101 --out /tmp/synth101 [--workers 2]

Prints wall time, CPU time of this process and its workers, seconds per patient, MB per patient on disk,
the machine's load average before and after (other jobs sharing the cores slow the wall time), and the
report beside the study's Table 1. Budget: 101 patients in under 10 minutes on 2 cores, ≤ 30 MB each.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path


def folder_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=101)
    p.add_argument("--out", type=Path, default=Path("/tmp/ctvlab-synth-bench"))
    p.add_argument("--workers", type=int, default=None, help="default: the number of CPU cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--null", action="store_true")
    args = p.parse_args()

    from rich.console import Console

    from ctvlab.config import SynthConfig
    from ctvlab.synth.cohort import generate_cohort
    from ctvlab.synth.table1 import cohort_report, compare_to_study, print_report

    console = Console(highlight=False)
    if args.out.exists():
        shutil.rmtree(args.out)
    cfg = SynthConfig(n_patients=args.patients, seed=args.seed, null=args.null, num_workers=args.workers)
    load_before = os.getloadavg()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    generate_cohort(args.out, cfg)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    load_after = os.getloadavg()
    t1 = time.perf_counter()
    report = cohort_report(args.out)
    report_s = time.perf_counter() - t1
    mb = folder_mb(args.out)
    n = args.patients
    workers = cfg.num_workers or os.cpu_count()
    console.print(
        f"patients {n}, workers {workers}, cores {os.cpu_count()}\n"
        f"generation: {wall:.1f} s wall ({wall / n:.2f} s per patient), {cpu:.1f} s CPU "
        f"({cpu / n:.2f} CPU s per patient)\n"
        f"disk: {mb:.1f} MB ({mb / n:.2f} MB per patient)\n"
        f"report: {report_s:.1f} s\n"
        f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
        f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}"
    )
    print_report(report, console)
    off = compare_to_study(report, groups=("all", "SOC", "ATT", "ENZA"))
    console.print("within tolerance of Table 1" if not off else "outside tolerance:\n  " + "\n  ".join(off))


if __name__ == "__main__":
    main()
