"""Voxel-model cost on a prepared cohort: the forest's settings, rf vs XGBoost, fold-parallel vs serial.

    .venv/bin/python benchmarks/voxel_models.py --data PREP [--json out.json] [--skip-full]
    .venv/bin/python benchmarks/voxel_models.py --data /tmp/fab --fabricate 101   # no imaging needed

On a 101-patient cohort (~20k ring voxels of 3 mm per patient, ~2M rows), in one run:
1. reading: the fold map's rows through Ray Data (`load_fold_data`) against a direct pyarrow read;
2. one fold (fold 0, CEL target): the default forest (`VoxelModelConfig().rf`, a bounded bootstrap
   sample per tree) against a forest that sees every training voxel with the same trees and depth,
   and XGBoost; the default must stay within 0.01 AUC of the full-data forest;
3. the study's grid {nel, cel} × {all, early, late} × 5 folds with the default forest, folds in
   parallel as Ray tasks; it must finish in under 10 minutes on 2 cores;
4. CEL/all with the forest and with XGBoost, each with the folds in parallel and serially, back to back:
   time and AUC (serial and parallel must give identical fold AUCs).
Folds come from `PREP/splits.parquet` when it exists, else `ctvlab.splits.draw_rf_folds` (seed 0).
Times are wall-clock seconds, with the CPU seconds of the fold tasks beside them: on a shared machine
other processes stretch wall times, not CPU times. The "estimate" of a run is its wall time on idle
cores, max(total CPU / cores, the slowest fold's CPU) for parallel folds and total CPU for serial ones;
the 10-minute check uses the grid's estimate plus the measured read. The load average is printed too.

`--fabricate N` first writes a fabricated N-patient voxel table into `--data` (tests/voxel_models/
fabricate.py: no images, known signal); use it to check the settings before a prepared cohort exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO)]

GRID_LIMIT_S = 600.0
AUC_TOLERANCE = 0.01


def _folds(prep: Path) -> dict[str, int]:
    from ctvlab.data.readers import read_patients
    from ctvlab.errors import CtvlabError
    from ctvlab.splits import draw_rf_folds, load_split

    try:
        return load_split(prep).folds()
    except CtvlabError:
        patients = read_patients(prep)
        folds = draw_rf_folds(patients, 5, 0)
        return dict(zip(patients["patient_id"].astype(str), folds.astype(int), strict=True))


def _pyarrow_read_s(prep: Path, ids: list[str], columns: list[str]) -> float:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    t0 = time.perf_counter()
    ds = pads.dataset(prep / "voxels", partitioning="hive", format="parquet")
    ds.to_table(columns=columns, filter=pc.field("patient_id").isin(ids)).to_pandas()
    return time.perf_counter() - t0


def _one_fold(data, cfg, fold: int = 0, target: str = "cel"):
    import pandas as pd

    from ctvlab.voxel_models.fold import fit_predict_fold, fold_seed

    train = pd.concat([df for k, df in data.frames.items() if k != fold], ignore_index=True)
    t0 = time.perf_counter()
    r = fit_predict_fold(
        train, data.frames[fold], data.features, target, cfg, fold_seed(cfg.seed, fold), fold
    )
    return r, time.perf_counter() - t0


def _ideal_s(result, cores: int) -> float:
    """Wall time on idle cores: folds in parallel share the cores, and none finishes before its own work."""
    cpu = [f.cpu_s for f in result.folds]
    return max(sum(cpu) / cores, max(cpu)) if result.parallel else sum(cpu)


def _row(name: str, seconds: float, auc: float, extra: str = "") -> None:
    print(f"  {name:<44} {seconds:8.1f} s   AUC {auc:.4f}  {extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--fabricate", type=int, default=0, help="write a fabricated N-patient table first")
    p.add_argument("--skip-full", action="store_true", help="skip the full-data forest (minutes)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--address", help="Ray address (default: a local Ray)")
    args = p.parse_args(argv)

    if args.fabricate:
        from tests.voxel_models.fabricate import FabricSpec, write_prepared

        write_prepared(args.data, FabricSpec(n_patients=args.fabricate, voxels=20_000, seed=1))

    from ctvlab.config import VoxelModelConfig
    from ctvlab.runtime import init_ray
    from ctvlab.voxel_models.cv import run_cv
    from ctvlab.voxel_models.folddata import load_fold_data

    out: dict = {"cores": os.cpu_count(), "load_before": os.getloadavg()}
    print(f"cores {out['cores']}, load average {out['load_before'][0]:.1f}")
    init_ray(args.address)
    folds = _folds(args.data)
    cfg = VoxelModelConfig()
    print(f"{len(folds)} patients, {len(set(folds.values()))} folds; forest {cfg.rf.model_dump()}")

    print("1. reading")
    data = load_fold_data(args.data, folds, cfg.features)
    n_rows = sum(len(df) for df in data.frames.values())
    pa_s = _pyarrow_read_s(args.data, sorted(folds), ["patient_id", "category", *cfg.features])
    out["read"] = {"rows": n_rows, "ray_data_s": data.read_s, "pyarrow_s": pa_s}
    print(f"  {n_rows} labelled rows; Ray Data {data.read_s:.1f} s, pyarrow directly {pa_s:.1f} s")
    t0 = time.perf_counter()
    data.refs()
    out["read"]["ray_put_s"] = time.perf_counter() - t0
    print(f"  ray.put of the fold frames {out['read']['ray_put_s']:.1f} s")

    print("2. one fold (fold 0, CEL, all)")
    default, default_s = _one_fold(data, cfg)
    _row(
        "forest, default settings",
        default_s,
        default.auc,
        f"fit {default.fit_s:.1f} s, CPU {default.cpu_s:.0f} s",
    )
    xgb_cfg = cfg.model_copy(update={"model": "xgboost"})
    xgb, xgb_s = _one_fold(data, xgb_cfg)
    _row("xgboost", xgb_s, xgb.auc, f"fit {xgb.fit_s:.1f} s, CPU {xgb.cpu_s:.0f} s")
    out["one_fold"] = {
        "default": [default_s, default.cpu_s, default.auc],
        "xgboost": [xgb_s, xgb.cpu_s, xgb.auc],
    }
    if not args.skip_full:
        full_cfg = cfg.model_copy(
            update={"rf": cfg.rf.model_copy(update={"max_samples": None, "n_jobs": os.cpu_count() or 1})}
        )
        full, full_s = _one_fold(data, full_cfg)
        ok = abs(full.auc - default.auc) <= AUC_TOLERANCE
        _row(
            "forest, every training voxel per tree",
            full_s,
            full.auc,
            f"fit {full.fit_s:.1f} s ({full_cfg.rf.n_jobs} threads)",
        )
        print(f"  |ΔAUC| = {abs(full.auc - default.auc):.4f} ({'PASS' if ok else 'FAIL'}: ≤ {AUC_TOLERANCE})")
        out["one_fold"]["full"] = [full_s, full.cpu_s, full.auc]

    cores = os.cpu_count() or 1
    print(
        f"3. the study's grid, default forest, folds in parallel (estimate: CPU seconds on {cores} idle cores)"
    )
    t0 = time.perf_counter()
    grid = {}
    for target in ("nel", "cel"):
        for subgroup in ("all", "early", "late"):
            r = run_cv(args.data, folds, cfg, target, subgroup, data=data)
            grid[(target, subgroup)] = r
            extra = (
                f"± {r.auc_std:.3f}, pooled {r.pooled_roc()[2]:.4f}, {r.n_patients} patients; "
                f"CPU {r.cpu_s:.0f} s, estimate {_ideal_s(r, cores):.0f} s"
            )
            _row(f"{target}/{subgroup}", r.cv_s, r.auc_mean, extra)
    grid_s = time.perf_counter() - t0 + data.read_s
    estimate_s = data.read_s + sum(_ideal_s(r, cores) for r in grid.values())
    ok = estimate_s < GRID_LIMIT_S
    print(
        f"  grid wall {grid_s:.0f} s including the read (load average now {os.getloadavg()[0]:.1f}); "
        f"estimate on {cores} idle cores {estimate_s:.0f} s ({'PASS' if ok else 'FAIL'}: < {GRID_LIMIT_S:.0f} s)"
    )
    out["grid"] = {f"{t}/{s}": [r.cv_s, r.cpu_s, r.auc_mean, r.auc_std] for (t, s), r in grid.items()}
    out["grid_s"], out["grid_estimate_s"] = grid_s, estimate_s

    print("4. CEL/all: forest vs xgboost, folds in parallel vs serially (back to back)")
    runs = {
        "forest, folds in parallel": run_cv(args.data, folds, cfg, "cel", data=data),
        "forest, folds serially": run_cv(args.data, folds, cfg, "cel", parallel=False, data=data),
        "xgboost, folds in parallel": run_cv(args.data, folds, xgb_cfg, "cel", data=data),
        "xgboost, folds serially": run_cv(args.data, folds, xgb_cfg, "cel", parallel=False, data=data),
    }
    for name, r in runs.items():
        _row(name, r.cv_s, r.auc_mean, f"CPU {r.cpu_s:.0f} s, estimate {_ideal_s(r, cores):.0f} s")
    rf_par, rf_ser = runs["forest, folds in parallel"], runs["forest, folds serially"]
    print(f"  serial / parallel wall: forest {rf_ser.cv_s / rf_par.cv_s:.2f}")
    same = list(rf_ser.aucs) == list(rf_par.aucs)
    print(f"  serial and parallel fold AUCs identical: {same}")
    out["cel_all"] = {name: [r.cv_s, r.cpu_s, r.auc_mean] for name, r in runs.items()}
    out["cel_all"]["identical"] = same
    out["load_after"] = os.getloadavg()
    print(f"load average {out['load_after'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
