"""`ctvlab preprocess`: the cohort through a Ray Data pipeline, one patient per task.

1. Validate the cohort (`ctvlab.ingest.validate.validate_cohort`); invalid patients are reported with
   their problems and never touched.
2. Clean the output folder: temporary files of a killed run, and the outputs of patients that are no
   longer valid members of the manifest.
3. `ray.data.from_items` (one block per patient) → `map(process_or_skip)`: each task hashes its
   patient's inputs, skips it when its sidecar matches, else prepares it and writes its files itself.
   Tasks return a small status row, so no volume ever travels through the driver; a failure is a row
   with its reason, so one bad patient never fails the dataset.
4. Outputs of failed patients are removed; `patients.parquet` and `dataset.json` are written
   (atomically) over every complete patient.

The output folder must be reachable at the same path from every Ray node (a shared filesystem) when
`address` names a cluster. Run one `preprocess` per output folder at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, computed_field

from ctvlab import __version__
from ctvlab.atomic import TMP_PREFIX, atomic_path, digest, write_json_atomic
from ctvlab.config import FEATURES, PreprocessConfig
from ctvlab.data.layout import CATEGORY_CODES, MASKS, PrepPaths
from ctvlab.ingest.manifest import ManifestRow, read_manifest
from ctvlab.preprocess.patient import output_settings, process_or_skip, read_sidecar, settings_hash

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "FailedPatient",
    "InvalidPatient",
    "PreprocessReport",
    "preprocess_cohort",
    "print_preprocess_report",
    "write_dataset_tables",
]

Engine = Literal["ray", "serial"]


class InvalidPatient(BaseModel):
    """A patient that failed validation: left out, with the validation problems."""

    patient_id: str
    problems: list[str]


class FailedPatient(BaseModel):
    """A valid patient whose preprocessing failed, with the reason."""

    patient_id: str
    reason: str


class PreprocessReport(BaseModel):
    """What one `preprocess` run did."""

    raw: str
    out: str
    processed: list[str]
    skipped_unchanged: list[str]
    invalid: list[InvalidPatient]
    failed: list[FailedPatient]
    cohort_problems: list[str]
    digest: str | None
    n_prepared: int
    validate_s: float
    process_s: float
    elapsed_s: float

    @computed_field
    @property
    def ok(self) -> bool:
        """False when any patient was invalid or failed, or the cohort itself had a problem."""
        return not (self.invalid or self.failed or self.cohort_problems)


def _problem_text(p: Any) -> str:
    where = " · ".join(str(x) for x in (p.column, p.path) if x)
    text = f"{where}: {p.message}" if where else p.message
    return f"{text} (fix: {p.fix})" if getattr(p, "fix", None) else text


def clean_outputs(out: Path, keep_ids: set[str]) -> None:
    """Remove temporary files and folders, and the outputs of every patient not in `keep_ids`."""
    paths = PrepPaths(out)
    if not paths.root.exists():
        return
    for p in paths.root.rglob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink(missing_ok=True)
    keep_files = {f for pid in keep_ids for f in (paths.features(pid), paths.masks(pid), paths.sidecar(pid))}
    if paths.volumes.is_dir():
        for f in paths.volumes.iterdir():
            if f.is_file() and f.suffix in (".npy", ".json") and f not in keep_files:
                f.unlink(missing_ok=True)
    if paths.voxels.is_dir():
        keep_parts = {paths.voxel_partition(pid) for pid in keep_ids}
        for d in paths.voxels.iterdir():
            if d.is_dir() and d.name.startswith("patient_id=") and d not in keep_parts:
                shutil.rmtree(d, ignore_errors=True)


def write_dataset_tables(out: Path, patient_ids: list[str], cfg: PreprocessConfig) -> str | None:
    """Write patients.parquet and dataset.json over the complete patients; return the digest.

    `digest` = sha256 over the sorted (patient id, input hash, output file sha256s) and the settings
    that shape the outputs: content-based, so a rerun that changes nothing keeps it. With no patient,
    both files are removed and None is returned.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctvlab.data.schemas import patients_table_schema

    paths = PrepPaths(out)
    sidecars = [sc for pid in sorted(patient_ids) if (sc := read_sidecar(out, pid)) is not None]
    if not sidecars:
        paths.patients.unlink(missing_ok=True)
        paths.dataset_json.unlink(missing_ok=True)
        return None
    table = pa.Table.from_pylist([sc["summary"] for sc in sidecars], schema=patients_table_schema())
    with atomic_path(paths.patients) as tmp:
        pq.write_table(table, tmp)
    patients = [
        {
            "patient_id": sc["patient_id"],
            "input_hash": sc["input_hash"],
            "outputs": {k: o["sha256"] for k, o in sorted(sc["outputs"].items())},
        }
        for sc in sidecars
    ]
    settings = output_settings(cfg)
    dataset_digest = digest({"patients": patients, "settings": settings})
    meta = {
        "ctvlab_version": __version__,
        "settings": settings,
        "settings_hash": settings_hash(cfg),
        "digest": dataset_digest,
        "patients": patients,
        "features": list(FEATURES),
        "masks": list(MASKS),
        "category_codes": {str(k): v for k, v in CATEGORY_CODES.items()},
        "max_shape": [max(sc["shape"][d] for sc in sidecars) for d in range(3)],
        "voxel_mm": cfg.voxel_mm,
    }
    write_json_atomic(paths.dataset_json, meta)
    return dataset_digest


def _process_item(item: dict[str, Any], raw: str, out: str, cfg: str) -> dict[str, str]:
    """Ray Data map function: one manifest row (as JSON) in, one status row out."""
    row = ManifestRow.model_validate_json(item["row"])
    return process_or_skip(row, Path(raw), Path(out), PreprocessConfig.model_validate_json(cfg))


def local_concurrency(cfg: PreprocessConfig) -> int:
    """Patients at once on a local Ray: at most the cores (`ray.num_cpus` may give a local Ray more logical
    CPUs than cores, and more patients than cores only adds memory)."""
    return max(1, int((os.cpu_count() or 1) // cfg.cpus_per_patient))


def _run_ray(
    rows: list[ManifestRow],
    raw: Path,
    out: Path,
    cfg: PreprocessConfig,
    address: str | None,
    on_result: Callable[[dict[str, str]], None],
) -> None:
    import ray.data

    from ctvlab.runtime import init_ray

    local = address is None and not os.environ.get("RAY_ADDRESS")
    init_ray(address)
    concurrency = cfg.max_concurrent_patients or (local_concurrency(cfg) if local else None)
    items = [{"patient_id": r.patient_id, "row": r.model_dump_json()} for r in rows]
    # One block per patient: a block is the unit of a task, so this is one patient per task.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(
        _process_item,
        fn_kwargs={"raw": str(raw), "out": str(out), "cfg": cfg.model_dump_json()},
        num_cpus=cfg.cpus_per_patient,
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
    )
    seen: set[str] = set()
    # Ray Data logs each execution at INFO level; the progress bar already says what happens.
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(max(level, logging.WARNING))
    try:
        for result in ds.iter_rows():
            seen.add(result["patient_id"])
            on_result(result)
    except Exception as e:  # a worker that died (e.g. killed for memory) ends the dataset
        reason = f"the Ray pipeline stopped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        for r in rows:
            if r.patient_id not in seen:
                on_result({"patient_id": r.patient_id, "status": "failed", "reason": reason})
    finally:
        data_logger.setLevel(level)


def _run_serial(
    rows: list[ManifestRow],
    raw: Path,
    out: Path,
    cfg: PreprocessConfig,
    on_result: Callable[[dict[str, str]], None],
) -> None:
    for row in rows:
        on_result(process_or_skip(row, raw, out, cfg))


def preprocess_cohort(
    raw: Path,
    out: Path,
    cfg: PreprocessConfig,
    address: str | None = None,
    progress: bool = True,
    console: Console | None = None,
    engine: Engine = "ray",
) -> PreprocessReport:
    """Validate a cohort and prepare every valid patient whose outputs are not current.

    Args:
        raw: cohort folder with manifest.csv.
        out: the prepared dataset folder (created when missing).
        cfg: preprocessing settings.
        address: Ray cluster to join; None starts (or reuses) a local Ray.
        progress: show a progress bar with one line per finished patient.
        console: where progress goes (default: stderr).
        engine: "ray" (the pipeline) or "serial" (a plain loop in this process: the benchmark's
            baseline, and handy for debugging; same outputs).

    Returns:
        The report (`.ok` is False when a patient was invalid or failed). It is also written to
        `out/preprocess_report.json`.
    """
    from ctvlab.ingest.validate import validate_cohort

    t0 = time.perf_counter()
    raw, out = Path(raw).resolve(), Path(out).resolve()
    validation = validate_cohort(raw, progress=progress)
    valid = set(validation.valid_ids())
    invalid = [
        InvalidPatient(
            patient_id=p.patient_id,
            problems=[_problem_text(q) for q in p.problems if getattr(q, "severity", "error") == "error"],
        )
        for p in validation.patients
        if not p.valid
    ]
    cohort_problems = [
        _problem_text(q)
        for q in getattr(validation, "cohort_problems", [])
        if getattr(q, "severity", "error") == "error"
    ]
    manifest_rows, _, _ = read_manifest(raw) if raw.is_dir() else ([], [], [])
    rows = [r for r in manifest_rows if r.patient_id in valid]
    t_validated = time.perf_counter()

    PrepPaths(out).volumes.mkdir(parents=True, exist_ok=True)
    PrepPaths(out).voxels.mkdir(parents=True, exist_ok=True)
    clean_outputs(out, {r.patient_id for r in rows})

    results: dict[str, dict[str, str]] = {}
    bar = _progress(len(rows), console) if progress and rows else None

    def on_result(result: dict[str, str]) -> None:
        results[result["patient_id"]] = result
        if bar is not None:
            bar[0].advance(bar[1])
            style = {"processed": "green", "skipped": "dim", "failed": "bold red"}[result["status"]]
            bar[0].console.print(f"[{style}]{result['status']:>9}[/] {result['patient_id']}", highlight=False)

    if rows:
        try:
            if bar is not None:
                bar[0].start()
            if engine == "ray":
                _run_ray(rows, raw, out, cfg, address, on_result)
            else:
                _run_serial(rows, raw, out, cfg, on_result)
        finally:
            if bar is not None:
                bar[0].stop()
    t_processed = time.perf_counter()

    done = sorted(pid for pid, r in results.items() if r["status"] in ("processed", "skipped"))
    clean_outputs(out, set(done))
    dataset_digest = write_dataset_tables(out, done, cfg)
    report = PreprocessReport(
        raw=str(raw),
        out=str(out),
        processed=sorted(p for p, r in results.items() if r["status"] == "processed"),
        skipped_unchanged=sorted(p for p, r in results.items() if r["status"] == "skipped"),
        invalid=invalid,
        failed=[
            FailedPatient(patient_id=p, reason=r["reason"])
            for p, r in sorted(results.items())
            if r["status"] == "failed"
        ],
        cohort_problems=cohort_problems,
        digest=dataset_digest,
        n_prepared=len(done),
        validate_s=t_validated - t0,
        process_s=t_processed - t_validated,
        elapsed_s=time.perf_counter() - t0,
    )
    write_json_atomic(PrepPaths(out).report, report.model_dump(mode="json"))
    return report


def _progress(total: int, console: Console | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("preprocessing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        transient=True,
    )
    return bar, bar.add_task("preprocess", total=total)


def print_preprocess_report(report: PreprocessReport, console: Console) -> None:
    """Invalid and failed patients with their reasons, then one summary line."""
    from rich.text import Text

    for problem in report.cohort_problems:
        console.print(Text.assemble(("cohort   ", "bold red"), problem), soft_wrap=True)
    for p in report.invalid:
        for problem in p.problems or ["invalid"]:
            console.print(
                Text.assemble(("invalid  ", "bold red"), f"{p.patient_id} · {problem}"), soft_wrap=True
            )
    for f in report.failed:
        console.print(
            Text.assemble(("failed   ", "bold red"), f"{f.patient_id} · {f.reason}"), soft_wrap=True
        )
    summary = (
        f"{len(report.processed)} processed, {len(report.skipped_unchanged)} unchanged, "
        f"{len(report.invalid)} invalid, {len(report.failed)} failed; "
        f"{report.n_prepared} patients in {report.out}"
    )
    if report.digest:
        summary += f" (digest {report.digest[:12]})"
    summary += f" in {report.elapsed_s:.1f} s"
    console.print(Text(summary, style="bold green" if report.ok else "bold red"), soft_wrap=True)
