"""Does the coverage guarantee hold? Conformal risk control checked as a statistician would.

    .venv/bin/python benchmarks/coverage_check.py --prep WORK/prep --model WORK/results/model
        [--splits 2000] [--calibration 20] [--targets 0.8 0.9 0.95] [--record]

On the patients a model never trained on (the split's validation and test patients, exchangeable draws of
one synthetic cohort), the model CTV's miss fraction of the new progression is computed once per patient and
threshold (`ctvlab.stages.calibrate.COVERAGE_GRID`). Then, over `--splits` random partitions into
`--calibration` calibration patients and the rest as test patients, the threshold for each target is chosen
on the calibration part (`ctvlab.ctv.conformal.crc_threshold`) and the test part's mean miss is recorded.

Printed per target: the mean test miss over splits with its Monte Carlo standard error against α = 1 − target
(the guarantee: mean ≤ α), the share of splits where no threshold was reachable, the mean threshold and the
CTV's mean volume, beside the RTOG and EORTC CTVs' mean miss and volume on the same patients (what the
guarantee costs in volume against the standard of care).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def patient_table(prep: Path, model_dir: Path, ids: list[str], cfg):
    """(miss fractions (patients, thresholds), volumes cm³ (patients, thresholds), RTOG/EORTC miss and volume)."""
    from ctvlab.ctv.construct import build_ctvs, model_ctv
    from ctvlab.ctv.coverage import new_progression
    from ctvlab.ctv.scoring import patient_masks
    from ctvlab.data.readers import load_patient
    from ctvlab.stages.calibrate import COVERAGE_GRID
    from ctvlab.unet.inference import load_model, predict_probability

    model = load_model(model_dir, device="cpu")
    miss, vol, soc = [], [], []
    for pid in ids:
        p = load_patient(prep, pid)
        m = {**patient_masks(p), "ventricles": p.mask("ventricles") > 0}
        prob = predict_probability(model, p)
        new = new_progression(m)
        n, cm3 = int(new.sum()), float(np.prod(p.spacing)) / 1000.0
        row_m, row_v = [], []
        for t in COVERAGE_GRID:
            ctv = model_ctv(prob, t, m["cel"] | m["t2l"], m["brain"], m["critical"])
            row_m.append(float((new & ~ctv).sum()) / n if n else 0.0)
            row_v.append(float(ctv.sum()) * cm3)
        miss.append(row_m)
        vol.append(row_v)
        std = build_ctvs(None, 0.5, m, p.spacing, cfg.ctv)
        soc.append(
            {k: ((float((new & ~c).sum()) / n if n else 0.0), float(c.sum()) * cm3) for k, c in std.items()}
        )
    return np.array(miss), np.array(vol), soc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prep", type=Path, required=True, help="prepared dataset with a split")
    ap.add_argument("--model", type=Path, required=True, help="a model folder trained on that split")
    ap.add_argument("--splits", type=int, default=2000)
    ap.add_argument("--calibration", type=int, default=20, help="calibration patients per split")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--record", action="store_true", help="also write the output to docs/results/coverage_check.md"
    )
    args = ap.parse_args()
    from record import recorded

    with recorded("coverage_check", args.record):
        run(args)


def run(args) -> None:
    from ctvlab.config import StudyConfig
    from ctvlab.ctv.conformal import crc_threshold
    from ctvlab.splits import load_split
    from ctvlab.stages.calibrate import COVERAGE_GRID

    split = load_split(args.prep)
    ids = split.patients("val") + split.patients("test")
    t0 = time.perf_counter()
    miss, vol, soc = patient_table(args.prep, args.model, ids, StudyConfig())
    n = len(ids)
    print(f"{n} held-out patients (validation + test) of {args.prep}; {miss.shape[1]} thresholds; maps and CTVs in "
          f"{time.perf_counter() - t0:.0f} s; {args.splits} random splits into {args.calibration} calibration and "
          f"{n - args.calibration} test patients")  # fmt: skip
    if args.calibration >= n:
        raise SystemExit(f"--calibration {args.calibration} leaves no test patient of {n}")
    rng = np.random.default_rng(args.seed)
    grid = np.array(COVERAGE_GRID)
    print(f"\n{'target':>7} {'α':>6} {'mean test miss':>15} {'± MC SE':>8} {'≤ α?':>5} {'unreachable':>11} "
          f"{'threshold':>9} {'volume cm³':>10}")  # fmt: skip
    for target in args.targets:
        alpha = 1.0 - target
        test_miss, volumes, thresholds, unreachable = [], [], [], 0
        for _ in range(args.splits):
            order = rng.permutation(n)
            cal, test = order[: args.calibration], order[args.calibration :]
            rule = crc_threshold(miss[cal], COVERAGE_GRID, target)
            if rule.threshold is None:
                unreachable += 1
                continue
            j = int(np.argmin(np.abs(grid - rule.threshold)))
            test_miss.append(miss[test, j].mean())
            volumes.append(vol[test, j].mean())
            thresholds.append(rule.threshold)
        if not test_miss:
            print(f"{target:7.2f} {alpha:6.3f} {'—':>15} {'':>8} {'':>5} {unreachable / args.splits:11.0%}")
            continue
        mean, se = float(np.mean(test_miss)), float(np.std(test_miss) / np.sqrt(len(test_miss)))
        ok = "yes" if mean <= alpha + 2 * se else "NO"
        print(f"{target:7.2f} {alpha:6.3f} {mean:15.4f} {se:8.4f} {ok:>5} {unreachable / args.splits:11.0%} "
              f"{np.mean(thresholds):9.3f} {np.mean(volumes):10.1f}")  # fmt: skip
    for name in ("rtog", "eortc"):
        m = np.mean([s[name][0] for s in soc])
        v = np.mean([s[name][1] for s in soc])
        print(
            f"{name.upper():>7}: mean miss {m:.4f} (coverage {1 - m:.3f}), mean volume {v:.1f} cm³ on the same patients"
        )


if __name__ == "__main__":
    main()
