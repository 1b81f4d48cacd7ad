"""Cohort validation: the gate before any compute (after nnU-Net's dataset-integrity check).

`validate_cohort` reads `manifest.csv` against its schema, then opens every file of every patient in full
and checks what later stages silently rely on:

- every file named in the manifest exists and decodes completely. A `.nii.gz` is decompressed in one
  pass with `gzip`, which verifies the length and CRC of the stream, so a truncated or corrupted file is
  found here and not halfway through preprocessing (nibabel alone reads lazily and skips the CRC);
- each image is 3-D (a trailing singleton 4th axis is accepted), numeric, with a finite non-singular
  affine and voxel sizes between 0.1 and 20 mm;
- T1, FLAIR and the eight masks lie on the T1c grid (same shape, affine equal within 1e-3), as the study
  co-registered every sequence to the post-contrast T1 (the study's Methods, Inputs);
- ADC/FA and the MRSI maps keep their own grids, but those grids must lie over this patient's brain in
  world space: the diffusion grid must cover most of the brain, and most MRSI voxel centres must fall
  within the brain's extent (the PRESS box is placed on the lesion, inside the brain);
- masks are binary (only 0 and 1, in any dtype), the brain and T2 lesion masks are not empty, lesion
  masks lie within the brain;
- no NaN or Inf inside the brain in T1c, T1, FLAIR, ADC and FA. ADC and FA are checked on their own grid
  against the brain mask carried there by nearest neighbour through the affines. MRSI maps may hold NaN
  where a voxel had no usable spectrum (no MRSI value there, as outside the PRESS box), but never Inf;
- manifest fields: unique ids, known categories, numbers in range (from `read_manifest`); PFS > OS is a
  warning;
- what a patient lacks (an empty optional column other than MRSI: FA, ADC, a mask a public collection does
  not draw, clinical fields) is a warning naming it: the patient is valid for what it has, and the stage that
  needs a missing item refuses it by name.

Each patient is checked independently, and within a patient each file, so one bad file never hides the
others. The result is a `ValidationReport`; `print_validation` prints one line per problem.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from enum import StrEnum
from functools import partial
from pathlib import Path

from ctvlab.config import InputLimits
from ctvlab.ingest.checks import PREP_VOXEL_MM, check_files
from ctvlab.ingest.manifest import (
    MANIFEST_NAME,
    MRSI_COLUMNS,
    OPTIONAL_COLUMNS,
    OUTCOME_COLUMNS,
    PATH_COLUMNS,
    PROGRESSION_MASK_COLUMNS,
    ManifestProblem,
    ManifestRow,
    read_manifest,
)
from ctvlab.ingest.validation_report import PatientResult, Problem, ValidationReport


def validate_patient(
    row: ManifestRow, root: Path, limits: InputLimits | None = None, voxel_mm: float = PREP_VOXEL_MM
) -> PatientResult:
    """Check one parsed manifest row: its clinical consistency and all of its files."""
    return _patient(root, row.patient_id, None, _row_paths(row), row.clinical(), [], limits, voxel_mm)


def _row_paths(row: ManifestRow) -> dict[str, str]:
    return {c: getattr(row, c) for c in PATH_COLUMNS if getattr(row, c)}


def _patient(
    root: Path,
    patient_id: str,
    line: int | None,
    paths: dict[str, str],
    clinical: dict,
    problems: list[Problem],
    limits: InputLimits | None = None,
    voxel_mm: float = PREP_VOXEL_MM,
) -> PatientResult:
    problems = list(problems)
    mrsi_set = [c for c in MRSI_COLUMNS if c in paths]
    if mrsi_set and len(mrsi_set) < len(MRSI_COLUMNS):
        empty = [c for c in MRSI_COLUMNS if c not in paths]
        problems.append(
            Problem(
                patient_id=patient_id,
                column=",".join(empty),
                path=MANIFEST_NAME,
                message=f"MRSI columns half set: {', '.join(empty)} empty while {', '.join(mrsi_set)} set",
                fix="give all eight MRSI maps, or leave all eight empty for a patient without MRSI",
            )
        )
    pfs, os_ = clinical.get("pfs_months"), clinical.get("os_months")
    if isinstance(pfs, float) and isinstance(os_, float) and pfs > os_:
        problems.append(
            Problem(
                patient_id=patient_id,
                column="pfs_months",
                path=MANIFEST_NAME,
                severity="warning",
                message=f"pfs_months {pfs:g} exceeds os_months {os_:g}",
                fix="progression cannot come after death: check both fields",
            )
        )
    digests: dict[str, str] = {}
    resolved: dict[str, str] = {}
    problems += check_files(root, patient_id, paths, clinical, limits, digests, resolved, voxel_mm)
    return PatientResult(
        patient_id=patient_id, line=line, has_mrsi=len(mrsi_set) == len(MRSI_COLUMNS), problems=problems,
        file_digests=digests, resolved_paths=resolved, manifest_paths=dict(paths),
    )  # fmt: skip


# --- manifest problems -------------------------------------------------------------------------------


# What `ctvlab predict` needs beyond the required columns, whatever its model (`stages.predict.prediction_needs`
# adds the diffusion maps the model reads): the masks its CTVs and the normalisation use.
PREDICTION_MASKS: tuple[str, ...] = ("cavity_mask", "ventricles_mask", "critical_mask")


def _missing_warning(row: ManifestRow, purpose: str) -> list[Problem]:
    """What this patient lacks: one warning listing it, and for prediction an error per mask it needs.

    MRSI is left out (a patient without MRSI is part of the study's own design), and so are the outcomes when
    predicting (prediction comes before follow-up)."""
    skip = set(MRSI_COLUMNS) | (
        set(OUTCOME_COLUMNS + PROGRESSION_MASK_COLUMNS) if purpose == "predict" else set()
    )
    missing = [c for c in row.missing(OPTIONAL_COLUMNS) if c not in skip]
    needed = [c for c in missing if purpose == "predict" and c in PREDICTION_MASKS]
    problems = [
        Problem(
            patient_id=row.patient_id,
            column=c,
            path=MANIFEST_NAME,
            message=f"{c} not available: prediction needs it (the CTVs and the normal-appearing brain)",
            fix=f"give the {c} file's path relative to the cohort folder (an empty mask where there is none)",
        )
        for c in needed
    ]
    rest = [c for c in missing if c not in needed]
    if rest:
        problems.append(
            Problem(
                patient_id=row.patient_id,
                column=",".join(rest),
                path=MANIFEST_NAME,
                severity="warning",
                message=f"not available: {', '.join(rest)}",
                fix="valid for what it has; a stage that needs one of these refuses this patient by name "
                "(fill the column in manifest.csv to use it)",
            )
        )
    return problems


def _field_type(column: str) -> type | None:
    """The type of a manifest field, `X` for an optional `X | None`."""
    info = ManifestRow.model_fields.get(column)
    if info is None:
        return None
    args = [a for a in getattr(info.annotation, "__args__", ()) if a is not type(None)]
    return args[0] if len(args) == 1 else info.annotation


def _bounds(column: str) -> tuple[float | None, float | None]:
    info = ManifestRow.model_fields.get(column)
    lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None) if info else None
    hi = next((m.le for m in info.metadata if hasattr(m, "le")), None) if info else None
    return lo, hi


def _manifest_fix(p: ManifestProblem) -> str:
    where = f"line {p.line} of {MANIFEST_NAME}"
    if p.line is None:
        return (
            "create manifest.csv in the cohort folder: one row per patient (see schemas/manifest.schema.json)"
        )
    if p.line == 1:
        return "correct the header of manifest.csv (see schemas/manifest.schema.json)"
    col = p.column or ""
    if col == "patient_id" and ("duplicate" in p.message or "more than once" in p.message):
        return "give every patient a unique patient_id, or remove the repeated row"
    if col == "patient_id":
        return f"on {where}, use letters, digits, '_', '.' or '-' (at most 64 characters)"
    annotation = _field_type(col)
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return f"on {where}, set {col} to one of {', '.join(m.value for m in annotation)}"
    if col in PATH_COLUMNS:
        return f"on {where}, give the {col} file's path relative to the cohort folder"
    lo, hi = _bounds(col)
    if lo is not None and hi is not None:
        return f"on {where}, set {col} to a number from {lo:g} to {hi:g}"
    return f"correct {col or 'the row'} on {where}"


def _from_manifest(p: ManifestProblem, patient_id: str | None = None) -> Problem:
    message = f"{p.column}: {p.message}" if p.column and p.line not in (None, 1) else p.message
    return Problem(
        patient_id=patient_id or p.patient_id,
        column=p.column,
        path=MANIFEST_NAME,
        message=message,
        fix=_manifest_fix(p),
    )


def _cohort_problem(message: str, fix: str, path: str | None = MANIFEST_NAME) -> Problem:
    return Problem(patient_id=None, column=None, path=path, message=message, fix=fix)


def _raw_records(root: Path) -> list[dict[str, str]]:
    with open(root / MANIFEST_NAME, newline="", encoding="utf-8-sig") as fh:
        return [
            {k: (v if isinstance(v, str) else "").strip() for k, v in r.items() if k}
            for r in csv.DictReader(fh)
        ]


# --- cohort ------------------------------------------------------------------------------------------


def validate_cohort(
    root: str | Path,
    progress: bool = True,
    num_workers: int | None = None,
    limits: InputLimits | None = None,
    purpose: str = "study",
    voxel_mm: float = PREP_VOXEL_MM,
) -> ValidationReport:
    """Validate a cohort folder: its manifest, then every patient's files.

    Args:
        root: the cohort folder holding manifest.csv.
        purpose: "study" (everything the study needs) or "predict" (what `ctvlab predict` needs: outcome
            columns and progression masks may be empty; a file that is given is still checked).
        limits: size caps (`cohort.limits`; default `InputLimits()`).
        voxel_mm: the grid preprocessing will make (`preprocess.voxel_mm`), for the output-grid cap.
        progress: show a progress bar on stderr when it is a terminal.
        num_workers: patients checked in parallel (threads; decompression releases the GIL). Default:
            up to 4, bounded by the CPU count. Output order is the manifest's, whatever the schedule.

    Returns:
        The report; one `PatientResult` per manifest row, in file order. A row whose manifest fields are
        wrong is invalid, but its files are still checked so that every problem shows in one run.
    """
    root = Path(root)
    report = ValidationReport(root=str(root), patients=[], cohort_problems=[])
    if not root.is_dir():
        report.cohort_problems.append(
            _cohort_problem(
                f"{root} is not a folder", "give the cohort folder that holds manifest.csv", path=None
            )
        )
        return report
    try:
        rows, mproblems, ids = read_manifest(root, purpose)
        records = _raw_records(root) if ids else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        report.cohort_problems.append(
            _cohort_problem(f"cannot be read: {e}", "save manifest.csv as UTF-8 CSV with a header row")
        )
        return report
    cohort_level = [p for p in mproblems if p.line in (None, 1)]
    report.cohort_problems.extend(_from_manifest(p) for p in cohort_level)
    if cohort_level:
        return report
    if not ids:
        report.cohort_problems.append(
            _cohort_problem("the manifest lists no patient", "add one row per patient under the header")
        )
        return report

    report.rows, report.manifest_ids = list(rows), list(ids)
    parsed = {r.patient_id: r for r in rows}
    jobs: list[Callable[[], PatientResult]] = []
    for i, pid in enumerate(ids):
        line = i + 2
        label = pid or f"line {line}"  # a row without an id is still reported, by its line
        mp = [_from_manifest(p, label) for p in mproblems if p.line == line]
        row = parsed.get(pid) if not mp else None
        if row is not None:
            clinical, paths = row.clinical(), _row_paths(row)
            mp = _missing_warning(row, purpose)
        else:
            record = records[i] if i < len(records) else {}
            clinical = {k: record.get(k) for k in ("resection", "progression_type")}
            paths = {c: record[c] for c in PATH_COLUMNS if record.get(c)}
        jobs.append(partial(_patient, root, label, line, paths, clinical, mp, limits, voxel_mm))

    report.patients.extend(_run(jobs, progress, num_workers))
    _check_shared_files(report.patients)
    return report


def _check_shared_files(patients: list[PatientResult]) -> None:
    """Two patients naming one file, or byte-identical images under two names: a copy-paste error that
    would also put one patient's data on both sides of a split. Both patients are invalid."""
    by_path: dict[str, list[tuple[PatientResult, str]]] = {}
    by_digest: dict[str, list[tuple[PatientResult, str]]] = {}
    for p in patients:
        for col, path in p.resolved_paths.items():
            by_path.setdefault(path, []).append((p, col))
        for col, dg in p.file_digests.items():
            by_digest.setdefault(dg, []).append((p, col))
    for groups, what in ((by_path, "names the same file as"), (by_digest, "is byte-identical to")):
        for owners in groups.values():
            ids = {p.patient_id for p, _ in owners}
            if len(ids) < 2:
                continue  # within one patient: the per-patient check reports a repeated path
            for p, col in owners:
                others = ", ".join(f"{q.patient_id}'s {c}" for q, c in owners if q.patient_id != p.patient_id)
                message = f"{what} {others}"
                if any(x.column == col and x.message == message for x in p.problems):
                    continue
                p.problems.append(
                    Problem(
                        patient_id=p.patient_id,
                        column=col,
                        path=p.manifest_paths.get(col),
                        message=message,
                        fix="give each patient their own images; check the manifest for a copied row or path",
                    )
                )


def _run(
    jobs: list[Callable[[], PatientResult]], progress: bool, num_workers: int | None
) -> list[PatientResult]:
    """Run the patient checks on a small thread pool; results in job order."""
    workers = num_workers or min(4, os.cpu_count() or 1)
    bar = _progress_bar(len(jobs)) if progress else None
    results: list[PatientResult | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(job): i for i, job in enumerate(jobs)}
        try:
            if bar is not None:
                bar[0].start()
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                if bar is not None:
                    bar[0].advance(bar[1])
        finally:
            if bar is not None:
                bar[0].stop()
    return [r for r in results if r is not None]


def _progress_bar(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    bar = Progress(
        TextColumn("validating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    return bar, bar.add_task("validate", total=total)
