"""`ctvlab preprocess`: the cohort through a Ray Data pipeline, one patient per task.

1. Validate the cohort (`ctvlab.ingest.validate.validate_cohort`). A cohort-level problem (a missing
   folder, an unreadable or header-only manifest, no valid patient) raises `DataError` before the
   output folder is touched: a mistyped path or an unmounted share must never cost a prepared dataset.
   Invalid patients are reported with their problems.
2. Take the output folder's lock (`ctvlab.lock`: one writer at a time), remove temporary files of a
   killed run and invalidate `dataset.json`, so that no later stage reads
   a dataset that is being rewritten.
3. `ray.data.from_items` (one block per patient) → `map(process_or_skip)`: each task hashes its
   patient's inputs, skips it when its sidecar matches, else prepares it and writes its files itself.
   Tasks return a small status row, so no volume ever travels through the driver. A problem with a
   patient's own data is a "failed" row, so one bad patient never fails the dataset; an
   infrastructure error (a dead worker, out of memory, a full disk, an I/O error) is an "error" row
   and fails the stage (`PreprocessReport.errors`) with every patient's outputs kept.
4. Old outputs are never deleted unless asked: those of patients that are invalid, failed or no
   longer in the manifest stay on disk, marked stale (`stale/<id>.json`) and left out of the dataset,
   until a run with `prune=True` removes them. `patients.parquet` and `dataset.json` are written
   (atomically) over every complete patient, unless the stage failed.

The output folder must be reachable at the same path from every Ray node (a shared filesystem) when
`address` names a cluster. A second `preprocess` on the same output folder is refused while one runs.

About 500 lines: the cohort-level rules (validation gate, stale outputs, infrastructure errors, the Ray
Data pipeline, the report) share one state of the run, so they live in one module.
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
from ctvlab.config import InputLimits, PreprocessConfig
from ctvlab.data.layout import CATEGORY_CODES, MASKS, PrepPaths
from ctvlab.errors import (
    FULL,
    DataError,
    InfrastructureError,
    folder_bytes,
    space_needed,
    storage_error,
    writing,
)
from ctvlab.ingest.manifest import ManifestRow
from ctvlab.lock import exclusive
from ctvlab.preprocess.prepare import output_settings, process_or_skip, read_sidecar, settings_hash
from ctvlab.study import FEATURES

if TYPE_CHECKING:
    from rich.console import Console

    from ctvlab.ingest.validation_report import ValidationReport

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
    """What one `preprocess` run did.

    `failed` holds problems with a patient's own data; `errors` holds patients left unprocessed by an
    infrastructure error, which fails the stage. `stale` lists patients whose old outputs are kept but
    are not part of the dataset; `pruned` those whose old outputs this run removed (`prune=True`).
    """

    raw: str
    out: str
    processed: list[str]
    skipped_unchanged: list[str]
    invalid: list[InvalidPatient]
    failed: list[FailedPatient]
    errors: list[FailedPatient] = []
    # When the errors are a folder that cannot be written (a full disk, permissions): the one line that says
    # so, with the space the dataset still needs for a full disk (`ctvlab.errors.storage_error`).
    storage_error: str | None = None
    stale: list[str] = []
    pruned: list[str] = []
    nodes: dict[str, str] = {}  # patient -> the Ray node that processed it (ray engine)
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
        return not (self.invalid or self.failed or self.errors or self.cohort_problems)

    def exit_code(self) -> int:
        """4 when an infrastructure error failed the stage, 1 when a patient was invalid or failed, else 0."""
        return InfrastructureError.exit_code if self.errors else 0 if self.ok else 1


def _problem_text(p: Any) -> str:
    where = " · ".join(str(x) for x in (p.column, p.path) if x)
    text = f"{where}: {p.message}" if where else p.message
    return f"{text} (fix: {p.fix})" if getattr(p, "fix", None) else text


def remove_temporary(out: Path) -> None:
    """Remove the temporary files and folders a killed run left in `out` (names start with ".tmp-")."""
    for p in Path(out).rglob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink(missing_ok=True)


def stale_marker(out: Path, patient_id: str) -> Path:
    return Path(out) / "stale" / f"{patient_id}.json"


def patients_on_disk(out: Path) -> set[str]:
    """Ids of every patient with any output file in `out` (volumes, sidecar or voxel partition)."""
    paths = PrepPaths(out)
    ids: set[str] = set()
    if paths.volumes.is_dir():
        for f in paths.volumes.iterdir():
            name = f.name
            if name.startswith(TMP_PREFIX) or not f.is_file():
                continue
            if name.endswith("_masks.npy"):
                ids.add(name[: -len("_masks.npy")])
            elif f.suffix in (".npy", ".json"):
                ids.add(f.stem)
    if paths.voxels.is_dir():
        ids.update(
            d.name.removeprefix("patient_id=")
            for d in paths.voxels.iterdir()
            if d.is_dir() and d.name.startswith("patient_id=")
        )
    return ids


def remove_patient_outputs(out: Path, patient_id: str) -> None:
    """Delete one patient's outputs and stale marker (only ever called for `--prune`)."""
    paths = PrepPaths(out)
    for f in (paths.sidecar(patient_id), paths.features(patient_id), paths.masks(patient_id)):
        f.unlink(missing_ok=True)
    shutil.rmtree(paths.voxel_partition(patient_id), ignore_errors=True)
    stale_marker(out, patient_id).unlink(missing_ok=True)


def write_dataset_tables(out: Path, patient_ids: list[str], cfg: PreprocessConfig) -> str | None:
    """Write patients.parquet and dataset.json over the complete patients; return the digest.

    `digest` = sha256 over the sorted (patient id, input hash, output file sha256s) and the settings
    that shape the outputs: content-based, so a rerun that changes nothing keeps it. With no patient,
    both files are removed and None is returned.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctvlab.data.prepared_schemas import patients_table_schema

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
    import ray

    row = ManifestRow.model_validate_json(item["row"])
    result = process_or_skip(row, Path(raw), Path(out), PreprocessConfig.model_validate_json(cfg))
    return {**result, "node": ray.get_runtime_context().get_node_id()}


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
    except Exception as e:
        # Tasks never raise (`process_or_skip`), so this is the pipeline itself: a worker that died
        # (killed for memory, a lost node). That is no fault of the patients still waiting: they are
        # "error" rows, which fail the stage and keep their old outputs.
        reason = f"the Ray pipeline stopped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        for r in rows:
            if r.patient_id not in seen:
                on_result({"patient_id": r.patient_id, "status": "error", "reason": reason})
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
    prune: bool = False,
    limits: InputLimits | None = None,
    validation: ValidationReport | None = None,
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
        prune: delete the old outputs of patients that are not complete after this run (invalid,
            failed, or no longer in the manifest). Without it they are kept and marked stale. Never
            applied when the run had an infrastructure error.
        limits: the size caps of the validation (`cohort.limits`; default `InputLimits()`).
        validation: the cohort's validation report when it was just made (`ctvlab run`'s validate stage,
            with the same limits and voxel size): used as is, so every file is read once.

    Returns:
        The report (`.ok` is False when a patient was invalid, failed or hit an infrastructure error;
        `.errors` non-empty means the stage failed). It is also written to `out/preprocess_report.json`.

    Raises:
        DataError: a cohort-level problem (no such folder, no or an unreadable manifest, a manifest
            without patients, no valid patient); nothing in `out` is touched.
    """
    from ctvlab.ingest.validate import validate_cohort

    t0 = time.perf_counter()
    raw, out = Path(raw).resolve(), Path(out).resolve()
    # Cohort-level checks come before anything touches `out`.
    if not raw.is_dir():
        raise DataError(
            f"cohort folder {raw} not found (mistyped or unmounted?); nothing in {out} was changed"
        )
    if validation is None:
        validation = validate_cohort(raw, progress=progress, limits=limits, voxel_mm=cfg.voxel_mm)
    cohort_problems = [
        _problem_text(q)
        for q in getattr(validation, "cohort_problems", [])
        if getattr(q, "severity", "error") == "error"
    ]
    if cohort_problems:
        raise DataError(f"cohort {raw}: {'; '.join(cohort_problems)}; nothing in {out} was changed")
    valid = set(validation.valid_ids())
    invalid = [
        InvalidPatient(
            patient_id=p.patient_id,
            problems=[_problem_text(q) for q in p.problems if getattr(q, "severity", "error") == "error"],
        )
        for p in validation.patients
        if not p.valid
    ]
    # The rows validation parsed and accepted: the manifest is not read a second time, so what is prepared
    # is exactly what was checked.
    manifest_ids = validation.manifest_ids
    rows = [r for r in validation.rows if r.patient_id in valid]
    if not rows:
        first = "; ".join(f"{p.patient_id}: {(p.problems or ['invalid'])[0]}" for p in invalid[:3])
        raise DataError(
            f"cohort {raw}: no valid patient in manifest.csv ({len(invalid)} invalid; {first}); "
            f"nothing in {out} was changed. Run `ctvlab validate {raw}` for every problem"
        )
    t_validated = time.perf_counter()
    with exclusive(out, "ctvlab preprocess"):
        return _prepare(raw, out, cfg, address, progress, console, engine, prune, rows, manifest_ids,
                        invalid, cohort_problems, t0, t_validated)  # fmt: skip


def _prepare(
    raw: Path,
    out: Path,
    cfg: PreprocessConfig,
    address: str | None,
    progress: bool,
    console: Console | None,
    engine: Engine,
    prune: bool,
    rows: list[ManifestRow],
    manifest_ids: list[str],
    invalid: list[InvalidPatient],
    cohort_problems: list[str],
    t0: float,
    t_validated: float,
) -> PreprocessReport:
    """The writing half of `preprocess_cohort`, run while holding the output folder's lock."""
    paths = PrepPaths(out)
    paths.volumes.mkdir(parents=True, exist_ok=True)
    paths.voxels.mkdir(parents=True, exist_ok=True)
    remove_temporary(out)
    # The dataset is being rewritten: no stage may read the old index meanwhile (it is rewritten below
    # when the stage succeeds).
    paths.dataset_json.unlink(missing_ok=True)

    results: dict[str, dict[str, str]] = {}
    bar = _progress(len(rows), console) if progress and rows else None

    def on_result(result: dict[str, str]) -> None:
        results[result["patient_id"]] = result
        if bar is not None:
            bar[0].advance(bar[1])
            style = {"processed": "green", "skipped": "dim", "failed": "bold red", "error": "bold red"}
            bar[0].console.print(
                f"[{style[result['status']]}]{result['status']:>9}[/] {result['patient_id']}", highlight=False
            )

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

    def with_status(status: str) -> list[str]:
        return sorted(pid for pid, r in results.items() if r["status"] == status)

    done = sorted(with_status("processed") + with_status("skipped"))
    errors = [FailedPatient(patient_id=p, reason=results[p]["reason"]) for p in with_status("error")]
    storage = _storage_error(out, results, done)
    # The disk may be full for the small files below too: the error then still says what the dataset needs.
    with writing(out, needs=lambda: storage.needs if storage else None):
        # Outputs of patients that are not complete now: invalid, failed, or gone from the manifest. Those of
        # patients an infrastructure error left unprocessed are neither: they stay as they are.
        leftover = patients_on_disk(out) - set(done) - {e.patient_id for e in errors}
        pruned: list[str] = []
        stale: list[str] = []
        for pid in done:
            stale_marker(out, pid).unlink(missing_ok=True)
        if prune and not errors:
            for pid in sorted(leftover):
                remove_patient_outputs(out, pid)
            pruned = sorted(leftover)
        else:
            in_manifest = set(manifest_ids)
            why = {p.patient_id: "invalid: " + "; ".join(p.problems) for p in invalid}
            why.update({p: "failed: " + results[p]["reason"] for p in with_status("failed")})
            for pid in sorted(leftover):
                reason = why.get(pid) or ("not in the manifest" if pid not in in_manifest else "incomplete")
                write_json_atomic(stale_marker(out, pid), {"patient_id": pid, "reason": reason})
            stale = sorted(leftover)
        dataset_digest = None if errors else write_dataset_tables(out, done, cfg)
        report = PreprocessReport(
            raw=str(raw),
            out=str(out),
            processed=with_status("processed"),
            skipped_unchanged=with_status("skipped"),
            invalid=invalid,
            failed=[FailedPatient(patient_id=p, reason=results[p]["reason"]) for p in with_status("failed")],
            errors=errors,
            storage_error=str(storage) if storage else None,
            stale=stale,
            pruned=pruned,
            nodes={pid: r["node"] for pid, r in results.items() if r.get("node")},
            cohort_problems=cohort_problems,
            digest=dataset_digest,
            n_prepared=len(done),
            validate_s=t_validated - t0,
            process_s=t_processed - t_validated,
            elapsed_s=time.perf_counter() - t0,
        )
        write_json_atomic(paths.report, report.model_dump(mode="json"))
        return report


def _storage_error(out: Path, results: dict[str, dict[str, str]], done: list[str]):
    """The stage's `StorageError` when patients were left unwritten because `out` cannot be written; for a
    full disk, with the space the dataset still needs, estimated from the patients complete on disk."""
    codes = sorted(
        {int(r["storage"]) for r in results.values() if r["status"] == "error" and r.get("storage")}
    )
    if not codes:
        return None
    left = sum(1 for r in results.values() if r["status"] == "error")
    if not set(codes) & set(FULL):
        return storage_error(OSError(codes[0], os.strerror(codes[0])), out)
    paths = PrepPaths(out)
    written = sum(folder_bytes(f) for pid in done
                  for f in (paths.features(pid), paths.masks(pid), paths.sidecar(pid), paths.voxel_partition(pid)))  # fmt: skip
    needs = space_needed("the prepared dataset", written, len(done), left)
    return storage_error(OSError(FULL[0], os.strerror(FULL[0])), out, needs=needs)


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
    for f in report.errors:
        why = "" if report.storage_error else " (not a data problem: run again once the machine is fixed)"
        console.print(
            Text.assemble(("error    ", "bold red"), f"{f.patient_id} · {f.reason}{why}"), soft_wrap=True
        )
    if report.storage_error:
        console.print(Text.assemble(("error    ", "bold red"), report.storage_error), soft_wrap=True)
    if report.stale:
        console.print(
            Text.assemble(("stale    ", "yellow"), f"old outputs kept, not in the dataset: "
                          f"{', '.join(report.stale)} (see {report.out}/stale/; --prune removes them)"),
            soft_wrap=True,
        )  # fmt: skip
    if report.pruned:
        console.print(Text.assemble(("pruned   ", "yellow"), ", ".join(report.pruned)), soft_wrap=True)
    summary = (
        f"{len(report.processed)} processed, {len(report.skipped_unchanged)} unchanged, "
        f"{len(report.invalid)} invalid, {len(report.failed)} failed, {len(report.errors)} errors; "
        f"{report.n_prepared} patients in {report.out}"
    )
    if report.errors:
        summary += "; the stage FAILED (infrastructure error), dataset.json not written"
    if report.digest:
        summary += f" (digest {report.digest[:12]})"
    summary += f" in {report.elapsed_s:.1f} s"
    console.print(Text(summary, style="bold green" if report.ok else "bold red"), soft_wrap=True)
