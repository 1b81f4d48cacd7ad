"""`ctvlab validate`: every bad input gives its own message, the damaged patient only is invalid."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

from ctvlab.ingest.manifest import MRSI_COLUMNS, read_manifest
from ctvlab.ingest.validate import validate_cohort, validate_patient
from ctvlab.ingest.validation_report import format_problem, print_validation
from ctvlab.ingest.volume import describe_affine_difference, inside_grid, read_volume, resample_nearest
from tests.phantoms import grid_affine

IDS = ["P000", "P001", "P002", "P003"]
ROOT = Path(__file__).resolve().parents[2]


# --- damage functions: each spoils one file or field of patient P001 (P000 for the duplicate id) ---------


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    edit(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def _rewrite(path: Path, fn) -> None:
    """Rewrite a NIfTI with `fn(data, affine) -> (data, affine)`."""
    img = nib.load(path)
    data, affine = fn(np.asanyarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _brain(root: Path, pid: str = "P001") -> np.ndarray:
    return np.asanyarray(nib.load(root / pid / "brain_mask.nii.gz").dataobj) == 1


def truncate(root):
    p = root / "P001" / "flair.nii.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def not_gzip(root):
    (root / "P001" / "t1.nii.gz").write_bytes(b"this is not an image\n" * 100)


def wrong_shape(root):
    _rewrite(root / "P001" / "cel_mask.nii.gz", lambda d, a: (d[:, :, :-1], a))


def shifted_affine(root):
    def shift(d, a):
        a[0, 3] += 5.0
        return d, a

    _rewrite(root / "P001" / "t2l_mask.nii.gz", shift)


def nan_in_flair(root):
    def nan(d, a):
        d[22:24, 26:28, 22:24] = np.nan  # 8 voxels at the centre of the brain
        return d, a

    _rewrite(root / "P001" / "flair.nii.gz", nan)


def non_binary(root):
    def two(d, a):
        d[24, 28, 24] = 2
        return d, a

    _rewrite(root / "P001" / "ventricles_mask.nii.gz", two)


def missing_file(root):
    (root / "P001" / "adc.nii.gz").unlink()


def duplicate_id(root):
    _edit_manifest(root, lambda rows: rows[2].update(patient_id=rows[0]["patient_id"]))


def unknown_cohort(root):
    _edit_manifest(root, lambda rows: rows[1].update(cohort="XYZ"))


def negative_pfs(root):
    _edit_manifest(root, lambda rows: rows[1].update(pfs_months="-2"))


def empty_brain(root):
    _rewrite(root / "P001" / "brain_mask.nii.gz", lambda d, a: (np.zeros_like(d), a))


# (damage, column, file named in the output, stable message fragment, invalid ids, valid ids)
P001_BAD = (["P001"], ["P000", "P002", "P003"])
CASES = [
    (truncate, "flair", "P001/flair.nii.gz", "cannot be read: truncated", *P001_BAD),
    (not_gzip, "t1", "P001/t1.nii.gz", "cannot be read: not a gzip file", *P001_BAD),
    (wrong_shape, "cel_mask", "P001/cel_mask.nii.gz", "shape (48, 56, 47) differs from the T1c's (48, 56, 48)",
     *P001_BAD),
    (shifted_affine, "t2l_mask", "P001/t2l_mask.nii.gz",
     "affine differs from the T1c's: origin shifted by (5, 0, 0) mm", *P001_BAD),
    (nan_in_flair, "flair", "P001/flair.nii.gz", "NaN or Inf in 8 voxels inside the brain", *P001_BAD),
    (non_binary, "ventricles_mask", "P001/ventricles_mask.nii.gz",
     "is not binary: 1 voxel neither 0 nor 1 (e.g. 2)", *P001_BAD),
    (missing_file, "adc", "P001/adc.nii.gz", "file not found", *P001_BAD),
    # both rows named P000 are invalid (which one is the real patient is unknown); P002 no longer exists
    (duplicate_id, "patient_id", "manifest.csv", "duplicate patient_id (first on line 2)", ["P000", "P000"],
     ["P001", "P003"]),
    (unknown_cohort, "cohort", "manifest.csv", "cohort: Input should be 'SOC', 'ATT' or 'ENZA'", *P001_BAD),
    (negative_pfs, "pfs_months", "manifest.csv", "pfs_months: Input should be greater than or equal to 0",
     *P001_BAD),
    (empty_brain, "brain_mask", "P001/brain_mask.nii.gz", "is empty (no voxel is 1)", *P001_BAD),
]  # fmt: skip


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctvlab.cli", "validate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _printed(report) -> list[str]:
    """What `ctvlab validate` prints for `report` (the CLI calls the same function), without colour."""
    console = Console(record=True, width=60, color_system=None)
    print_validation(report, console)
    return console.export_text().splitlines()


def _check_output(lines: list[str], column, path, fragment, invalid, valid) -> None:
    """One line `severity patient · file · what · fix` names the damaged patient and file; then the summary."""
    [line] = [ln for ln in lines if fragment in ln]
    assert line.split(" · ")[:2] == [
        f"error   {invalid[0]}",
        path if path == "manifest.csv" else f"{path} ({column})",
    ]
    assert lines[-1].startswith(f"{len(valid)} valid, {len(invalid)} invalid")


@pytest.mark.parametrize(
    ("damage", "column", "path", "fragment", "invalid", "valid"), CASES, ids=[c[0].__name__ for c in CASES]
)
def test_each_bad_input_is_reported_for_its_patient_only(
    phantom_cohort, damage, column, path, fragment, invalid, valid
):
    damage(phantom_cohort)
    report = validate_cohort(phantom_cohort, progress=False)

    assert not report.ok
    assert [p.patient_id for p in report.patients if not p.valid] == invalid
    assert report.valid_ids() == valid
    assert report.n_invalid == len(invalid)
    errors = [p for p in report.problems() if p.severity == "error"]
    hits = [p for p in errors if fragment in p.message]
    assert hits, [p.message for p in errors]
    assert all(p.patient_id == invalid[0] and p.column == column and p.path == path for p in hits)
    assert all(p.fix for p in errors)
    _check_output(_printed(report), column, path, fragment, invalid, valid)


# The console script itself, in a subprocess, for a file, a grid and a manifest problem (each costs ~1 s).
CLI_CASES = [c for c in CASES if c[0] in (truncate, shifted_affine, duplicate_id)]


@pytest.mark.parametrize(
    ("damage", "column", "path", "fragment", "invalid", "valid"),
    CLI_CASES,
    ids=[c[0].__name__ for c in CLI_CASES],
)
def test_cli_exits_nonzero_without_traceback(phantom_cohort, damage, column, path, fragment, invalid, valid):
    damage(phantom_cohort)
    proc = _run_cli(str(phantom_cohort))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    _check_output(proc.stdout.splitlines(), column, path, fragment, invalid, valid)


def test_valid_cohort_exits_zero_and_json_reports_four_valid(phantom_cohort):
    proc = _run_cli(str(phantom_cohort))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "4 valid, 0 invalid"

    proc = _run_cli(str(phantom_cohort), "--json")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert (data["n_valid"], data["n_invalid"], data["ok"]) == (4, 0, True)
    assert [p["patient_id"] for p in data["patients"] if p["valid"]] == IDS
    assert all(p["has_mrsi"] for p in data["patients"])


def test_json_carries_the_same_problems(phantom_cohort):
    nan_in_flair(phantom_cohort)
    proc = _run_cli(str(phantom_cohort), "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert (data["n_valid"], data["n_invalid"], data["ok"]) == (3, 1, False)
    [p001] = [p for p in data["patients"] if p["patient_id"] == "P001"]
    assert [(q["column"], q["severity"]) for q in p001["problems"]] == [("flair", "error")]


def test_folder_without_manifest_is_a_cohort_error(tmp_path):
    (tmp_path / "P000").mkdir()
    report = validate_cohort(tmp_path, progress=False)
    assert not report.ok and report.patients == []
    [problem] = report.cohort_problems
    assert "manifest.csv not found" in problem.message and "manifest.schema.json" in problem.fix

    proc = _run_cli(str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "manifest.csv not found" in proc.stdout and "cohort-level error" in proc.stdout


def test_missing_column_is_a_cohort_error(phantom_cohort):
    def drop(rows):
        for r in rows:
            del r["flair"]

    _edit_manifest(phantom_cohort, drop)
    report = validate_cohort(phantom_cohort, progress=False)
    assert not report.ok and report.patients == []
    assert "missing columns: flair" in report.cohort_problems[0].message


def test_patient_without_mrsi_is_valid(phantom_cohort):
    _edit_manifest(phantom_cohort, lambda rows: rows[2].update({c: "" for c in MRSI_COLUMNS}))
    report = validate_cohort(phantom_cohort, progress=False)
    assert report.ok and report.valid_ids() == IDS
    assert [p.has_mrsi for p in report.patients] == [True, True, False, True]


def test_half_set_mrsi_columns_are_an_error(phantom_cohort):
    _edit_manifest(phantom_cohort, lambda rows: rows[1].update(lac="", lip=""))
    report = validate_cohort(phantom_cohort, progress=False)
    assert report.valid_ids() == ["P000", "P002", "P003"]
    [problem] = report.patients[1].problems
    assert "MRSI columns half set: lac, lip empty" in problem.message
    assert "all eight" in problem.fix and not report.patients[1].has_mrsi


# --- further checks, library only ------------------------------------------------------------------------


def _translate(path: Path, mm: float):
    def shift(d, a):
        a[:3, 3] += mm
        return d, a

    _rewrite(path, shift)


def _set_voxels(path: Path, value: float, where=(slice(0, 2), slice(0, 2), slice(0, 2))):
    def put(d, a):
        d[where] = value
        return d, a

    _rewrite(path, put)


def _swap_for_outside_of_brain(path: Path, brain: np.ndarray, fraction_inside: float):
    """A lesion mask of 100 voxels of which `fraction_inside` lie in the brain."""
    inside, outside = np.argwhere(brain), np.argwhere(~brain)
    n_in = int(100 * fraction_inside)
    mask = np.zeros(brain.shape, dtype=np.uint8)
    for ijk in [*inside[:n_in], *outside[: 100 - n_in]]:
        mask[tuple(ijk)] = 1
    _rewrite(path, lambda d, a: (mask, a))


# (damage(root), column, fragment, severity); the damaged patient is P001
MORE = [
    ("adc moved 200 mm away", lambda r: _translate(r / "P001" / "adc.nii.gz", 200.0), "adc",
     "grid lies elsewhere in world space: it covers 0% of the brain", "error"),
    ("cho moved 200 mm away", lambda r: _translate(r / "P001" / "cho.nii.gz", 200.0), "cho",
     "grid lies elsewhere in world space: 0% of its voxels", "error"),
    ("NaN in ADC inside brain",
     lambda r: _set_voxels(r / "P001" / "adc.nii.gz", np.nan, (slice(19, 20), slice(22, 23), slice(16, 17))),
     "adc", "NaN or Inf in 1 voxel inside the brain", "error"),
    ("Inf in FA inside brain",
     lambda r: _set_voxels(r / "P001" / "fa.nii.gz", np.inf, (slice(19, 21), slice(22, 23), slice(16, 17))),
     "fa", "NaN or Inf in 2 voxels inside the brain", "error"),
    ("Inf in a metabolite map", lambda r: _set_voxels(r / "P001" / "lac.nii.gz", np.inf), "lac",
     "Inf in 8 voxels", "error"),
    ("corrupted gzip stream", lambda r: _flip_byte(r / "P001" / "fa.nii.gz"), "fa",
     "cannot be read: corrupt compressed data", "error"),
    ("lesion mostly outside the brain",
     lambda r: _swap_for_outside_of_brain(r / "P001" / "t2l_mask.nii.gz", _brain(r), 0.3), "t2l_mask",
     "70 voxels (70%) outside the brain mask", "error"),
    ("lesion a little outside the brain",
     lambda r: _swap_for_outside_of_brain(r / "P001" / "cel_progression_mask.nii.gz", _brain(r), 0.97),
     "cel_progression_mask", "3 voxels (3%) outside the brain mask", "warning"),
    ("empty T2 lesion", lambda r: _rewrite(r / "P001" / "t2l_mask.nii.gz", lambda d, a: (0 * d, a)), "t2l_mask",
     "is empty", "error"),
    ("empty CEL after subtotal resection",
     lambda r: _rewrite(r / "P001" / "cel_mask.nii.gz", lambda d, a: (0 * d, a)), "cel_mask", "is empty", "warning"),
    ("PFS after OS", lambda r: _edit_manifest(r, lambda rows: rows[1].update(pfs_months="20")), "pfs_months",
     "pfs_months 20 exceeds os_months 15", "warning"),
    ("same file for two maps", lambda r: _edit_manifest(r, lambda rows: rows[1].update(t1=rows[1]["flair"])),
     "flair", "names the same file as t1", "error"),
    ("blank FLAIR", lambda r: _rewrite(r / "P001" / "flair.nii.gz", lambda d, a: (0 * d, a)), "flair",
     "is constant (0) inside the brain", "error"),
    ("5-D image", lambda r: _rewrite(r / "P001" / "t1.nii.gz", lambda d, a: (d[..., None, None], a)), "t1",
     "is 5-D with shape (48, 56, 48, 1, 1)", "error"),
    # Misregistered inside the field of view: the grids and placements are right, the content is not.
    ("FLAIR's registration slipped 1 cm", lambda r: _rewrite(r / "P001" / "flair.nii.gz",
     lambda d, a: (np.roll(d, 5, axis=1), a)), "flair", "may be misregistered to the T1c", "warning"),
    ("T1 flipped left-right, header unchanged", lambda r: _rewrite(r / "P001" / "t1.nii.gz",
     lambda d, a: (d[::-1].copy(), a)), "t1", "mirrored left-right", "warning"),
    ("ADC placed 12 mm off", lambda r: _translate_axis(r / "P001" / "adc.nii.gz", 2, 12.0), "adc",
     "may be misregistered to the T1c", "warning"),
    ("FA flipped left-right, header unchanged", lambda r: _rewrite(r / "P001" / "fa.nii.gz",
     lambda d, a: (d[::-1].copy(), a)), "fa", "mirrored left-right", "warning"),
]  # fmt: skip


def _translate_axis(path: Path, axis: int, mm: float):
    def shift(d, a):
        a[axis, 3] += mm
        return d, a

    _rewrite(path, shift)


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "column", "fragment", "severity"), [m[1:] for m in MORE], ids=[m[0] for m in MORE]
)
def test_further_checks(phantom_cohort, damage, column, fragment, severity):
    damage(phantom_cohort)
    report = validate_cohort(phantom_cohort, progress=False)
    [p001] = [p for p in report.patients if p.patient_id == "P001"]
    assert [(p.column, p.severity) for p in p001.problems if fragment in p.message] == [(column, severity)], [
        p.message for p in p001.problems
    ]
    assert p001.valid == (severity == "warning") == report.ok
    assert [p.patient_id for p in report.patients if p.valid and p.patient_id != "P001"] == [
        "P000",
        "P002",
        "P003",
    ]


ACCEPTABLE = {
    "NaN in FLAIR outside the brain": lambda r: _set_voxels(r / "P001" / "flair.nii.gz", np.nan),
    "NaN in MRSI (no usable spectrum)": lambda r: _set_voxels(r / "P001" / "cni.nii.gz", np.nan),
    "trailing singleton 4th axis": lambda r: _rewrite(r / "P001" / "t1.nii.gz", lambda d, a: (d[..., None], a)),
    "float mask holding 0.0 and 1.0":
        lambda r: _rewrite(r / "P001" / "cel_mask.nii.gz", lambda d, a: (d.astype(np.float32), a)),
    "uncompressed .nii": lambda r: _to_plain_nii(r, "P001", "fa"),
}  # fmt: skip


@pytest.mark.parametrize("damage", ACCEPTABLE.values(), ids=ACCEPTABLE.keys())
def test_acceptable_variations_stay_valid(phantom_cohort, damage):
    damage(phantom_cohort)
    report = validate_cohort(phantom_cohort, progress=False)
    assert report.ok and report.valid_ids() == IDS, [format_problem(p) for p in report.problems()]
    assert report.n_warnings == 0


def _to_plain_nii(root: Path, pid: str, col: str) -> None:
    gz = root / pid / f"{col}.nii.gz"
    (root / pid / f"{col}.nii").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    _edit_manifest(root, lambda rows: rows[int(pid[1:])].update({col: f"{pid}/{col}.nii"}))


def test_a_bad_manifest_row_still_has_its_files_checked(phantom_cohort):
    unknown_cohort(phantom_cohort)
    nan_in_flair(phantom_cohort)
    report = validate_cohort(phantom_cohort, progress=False)
    assert [p.column for p in report.patients[1].problems] == ["cohort", "flair"]


def test_row_without_id_is_reported_by_its_line(phantom_cohort):
    _edit_manifest(phantom_cohort, lambda rows: rows[1].update(patient_id=""))
    report = validate_cohort(phantom_cohort, progress=False)
    assert [p.patient_id for p in report.patients] == ["P000", "line 3", "P002", "P003"]
    assert [(p.patient_id, p.column) for p in report.patients[1].problems] == [("line 3", "patient_id")]
    assert report.valid_ids() == ["P000", "P002", "P003"]


def test_order_and_content_do_not_depend_on_the_workers(phantom_cohort):
    missing_file(phantom_cohort)
    _set_voxels(phantom_cohort / "P003" / "cho.nii.gz", np.inf)
    one = validate_cohort(phantom_cohort, progress=False, num_workers=1)
    four = validate_cohort(phantom_cohort, progress=False, num_workers=4)
    assert one.model_dump() == four.model_dump()
    assert [p.patient_id for p in four.patients] == IDS and four.valid_ids() == ["P000", "P002"]


def test_validate_patient_checks_one_row(phantom_cohort):
    rows, _, _ = read_manifest(phantom_cohort)
    assert validate_patient(rows[0], phantom_cohort).valid
    non_binary(phantom_cohort)
    result = validate_patient(rows[1], phantom_cohort)
    assert not result.valid and result.problems[0].column == "ventricles_mask"


def test_printed_report_has_one_line_per_problem(phantom_cohort):
    missing_file(phantom_cohort)
    negative_pfs(phantom_cohort)  # P001 again: two problems, one patient
    lines = _printed(validate_cohort(phantom_cohort, progress=False))
    assert len(lines) == 3  # long lines do not wrap, even at 60 columns
    assert lines[0].startswith("error   P001 · manifest.csv · pfs_months: ")
    assert lines[1] == (
        "error   P001 · P001/adc.nii.gz (adc) · file not found · "
        "check the path in manifest.csv (relative to the cohort folder) or restore the file"
    )
    assert lines[2] == "3 valid, 1 invalid"


@pytest.mark.slow
def test_synthetic_cohort_validates(tmp_path):
    from ctvlab.config import SynthConfig
    from ctvlab.synth.cohort import generate_cohort

    generate_cohort(tmp_path, SynthConfig(n_patients=2, seed=0, num_workers=1))
    report = validate_cohort(tmp_path, progress=False)
    assert report.ok, [format_problem(p) for p in report.problems()]
    assert report.n_valid == 2


# --- pure geometry helpers, hand-computed answers -----------------------------------------------------------


def _affine(m3, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = m3, origin
    return aff


ROT90_Z = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    ("affine", "expected"),
    [
        (_affine(np.diag([2.0, 2.0, 2.0]), (1.5, 0.0, -2.0)), "origin shifted by (1.5, 0, -2) mm"),
        (_affine(np.diag([2.0, 2.0, 2.5])), "voxel size (2, 2, 2.5) mm, not (2, 2, 2) mm"),
        (_affine(np.diag([-2.0, 2.0, 2.0])), "axes flipped (opposite handedness)"),
        (_affine(2.0 * ROT90_Z), "axes rotated by 90.0°"),
        (_affine(np.diag([1.0, 1.0, 1.0]), (0.0, 3.0, 0.0)),
         "voxel size (1, 1, 1) mm, not (2, 2, 2) mm; origin shifted by (0, 3, 0) mm"),
    ],
)  # fmt: skip
def test_describe_affine_difference(affine, expected):
    assert describe_affine_difference(affine, _affine(np.diag([2.0, 2.0, 2.0]))) == expected


def test_resample_nearest_follows_the_affines():
    # A 1 mm mask with one bright voxel at world (5, 6, 7) lands on the 2 mm grid voxel holding that point.
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[5, 6, 7] = True
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = [1.0, 0.0, 1.0]  # voxel (2, 3, 3) has its centre at world (5, 6, 7)
    out = resample_nearest(mask, np.eye(4), (5, 5, 5), coarse)
    assert np.argwhere(out).tolist() == [[2, 3, 3]]


def test_inside_grid_uses_voxel_edges():
    aff = grid_affine((2.0, 2.0, 2.0), (10, 10, 10))  # centres -9 .. 9 mm, edges -10 .. 10 mm
    pts = np.array([[0, 0, 0], [9.9, 0, 0], [10.1, 0, 0], [0, -10.1, 0]], dtype=float)
    assert inside_grid(pts, aff, (10, 10, 10)).tolist() == [True, True, False, False]


def test_read_volume_reads_every_voxel(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "x.nii.gz")
    vol = read_volume(tmp_path / "x.nii.gz")
    assert np.array_equal(vol.data, data) and vol.oriented
    assert np.allclose(vol.affine, np.diag([1.0, 2.0, 3.0, 1.0]))


def test_validate_for_predict_needs_no_outcomes(phantom_cohort):
    """`ctvlab validate --for predict`: outcome columns and progression masks may be empty; what the
    network and the CTVs need is still required. For the study they are valid too, with a warning naming
    what is missing (the stages that need it refuse the patient by name: `prepare.require_study_inputs`)."""
    from typer.testing import CliRunner

    from ctvlab.cli import app
    from ctvlab.ingest.manifest import OUTCOME_COLUMNS, PROGRESSION_MASK_COLUMNS

    path = phantom_cohort / "manifest.csv"
    with open(path, newline="") as fh:
        records = list(csv.DictReader(fh))
    for r in records:
        for column in OUTCOME_COLUMNS + PROGRESSION_MASK_COLUMNS:
            r[column] = ""
    records[0]["t2l_mask"] = ""  # the CTVs are built around the T2L: still required for prediction
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    predict = validate_cohort(phantom_cohort, progress=False, purpose="predict")
    assert [p.patient_id for p in predict.patients if not p.valid] == [records[0]["patient_id"]]
    study = validate_cohort(phantom_cohort, progress=False)
    assert [p.patient_id for p in study.patients if not p.valid] == [records[0]["patient_id"]]
    warned = [q.message for p in study.patients[1:] for q in p.problems if q.severity == "warning"]
    assert warned and all("not available: progression_type, pfs_months, os_months" in m for m in warned)
    assert not any("not available" in q.message for p in predict.patients for q in p.problems)
    result = CliRunner().invoke(app, ["validate", str(phantom_cohort), "--for", "predict"])
    assert result.exit_code == 1 and "t2l_mask" in result.output
    assert CliRunner().invoke(app, ["validate", str(phantom_cohort), "--for", "nonsense"]).exit_code != 0
