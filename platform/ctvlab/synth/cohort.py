"""Generate a synthetic cohort in the manifest layout, patients in parallel.

`out/<patient_id>/<column>.nii.gz` for every path column, `out/synth_params.json` (the generative
parameters of every patient: seed, rates, pose, ...), `out/truth/<patient_id>_density_pre.nii.gz` (the true
pre-RT tumour density on the T1c grid: ground truth for benchmarks, never an input, in no manifest
column), and `out/manifest.csv` last, so that a folder with a manifest is a complete cohort. Every file is
written atomically.

Patients are independent: patient i draws from its own random streams (seed, i) and the clinical
table is drawn once before any image, so the files do not depend on the number of workers or on the
order in which they finish. Workers are processes started with `spawn` (no state inherited from the
parent; each loads the template once).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from ctvlab.atomic import remove_stale_tmp, write_json_atomic
from ctvlab.config import SynthConfig
from ctvlab.errors import DataError, folder_bytes, space_needed, writing
from ctvlab.ingest.manifest import ManifestRow, write_manifest
from ctvlab.synth.clinical import PatientPlan, draw_cohort

PARAMS_NAME = "synth_params.json"
# Settings added after the first cohorts were published: left out of synth_params.json while they hold
# their defaults, so that a default cohort's files stay byte for byte what they were.
SIGNAL_SETTINGS = ("preset", "imaging_strength", "channelling", "seeding", "determinism")


def recorded_config(cfg: SynthConfig) -> dict:
    """The settings written to synth_params.json: all but `num_workers` (it changes nothing in the data)
    and the signal settings that hold their defaults."""
    at_default = {k for k in SIGNAL_SETTINGS if getattr(cfg, k) == SynthConfig.model_fields[k].default}
    return cfg.model_dump(mode="json", exclude={"num_workers", *at_default})


def _run_one(plan: PatientPlan, cfg: SynthConfig, out: str) -> tuple[int, ManifestRow, dict]:
    from ctvlab.synth.patient import generate_patient

    row, params = generate_patient(plan, cfg, out)
    return plan.index, row, params


def _warm_up(growth_mm: float) -> None:
    """Load the template in a fresh worker before its first patient."""
    from ctvlab.synth.anatomy import growth_grid

    growth_grid(growth_mm)


def generate_cohort(out: str | Path, cfg: SynthConfig, progress: bool = True) -> list[ManifestRow]:
    """Write a synthetic cohort of `cfg.n_patients` patients into `out`.

    Args:
        out: cohort folder (created; existing patient files are overwritten).
        cfg: the synthetic-cohort settings; `cfg.num_workers` processes (default: CPU count).
        progress: show a rich progress bar.

    Returns:
        the manifest rows, in patient order.

    Raises:
        DataError: `out` exists and is not a folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out for the cohort.")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    plans = draw_cohort(cfg)
    workers = min(cfg.num_workers or os.cpu_count() or 1, len(plans))
    results: dict[int, tuple[ManifestRow, dict]] = {}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def needs() -> str:  # for a full disk: the patients left, at the size of those written so far
        written = sum(folder_bytes(out / row.patient_id) for row, _ in results.values()) + sum(
            f.stat().st_size
            for row, _ in results.values()
            for f in (out / "truth").glob(f"{row.patient_id}_*")
        )
        return space_needed("the cohort", written, len(results), len(plans) - len(results))

    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with writing(out, needs=needs), Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("patients", total=len(plans))
        if workers <= 1:
            for plan in plans:
                i, row, params = _run_one(plan, cfg, str(out))
                results[i] = (row, params)
                bar.advance(task)
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_warm_up, initargs=(cfg.growth_mm,)
            ) as pool:
                futures = [pool.submit(_run_one, plan, cfg, str(out)) for plan in plans]
                for fut in as_completed(futures):
                    i, row, params = fut.result()
                    results[i] = (row, params)
                    bar.advance(task)

    rows = [results[i][0] for i in range(len(plans))]
    write_json_atomic(
        out / PARAMS_NAME,
        {
            "config": recorded_config(cfg),
            "patients": [results[i][1] for i in range(len(plans))],
        },
    )
    write_manifest(out, rows)
    return rows
