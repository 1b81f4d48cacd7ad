"""Hostile and degenerate inputs: each gets one clear problem for its patient and file, the others stay
valid, and nothing outside the cohort folder is read."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctvlab.config import InputLimits
from ctvlab.ingest.validate import validate_cohort
from ctvlab.ingest.validation_report import format_problem
from tests.ingest.test_validate import IDS, _edit_manifest, _rewrite

ROOT = Path(__file__).resolve().parents[2]


def _set_path(col: str, value: str, pid: int = 1):
    return lambda r: _edit_manifest(r, lambda rows: rows[pid].update({col: value}))


def _symlink(target_of, col: str = "flair"):
    def damage(root: Path):
        link = root / "P001" / f"{col}.nii.gz"
        target = target_of(root)
        link.unlink()
        os.symlink(target, link)

    return damage


def _outside_copy(root: Path) -> Path:
    outside = root.parent / "elsewhere.nii.gz"
    shutil.copy(root / "P001" / "flair.nii.gz", outside)
    return outside


def _fifo(root: Path):
    path = root / "P001" / "flair.nii.gz"
    path.unlink()
    os.mkfifo(path)


def _unreadable(root: Path):
    (root / "P001" / "flair.nii.gz").chmod(0)


def _append(data: bytes):
    def damage(root: Path):
        path = root / "P001" / "flair.nii.gz"
        path.write_bytes(path.read_bytes() + data)

    return damage


def _gzip_in_plain_name(root: Path):
    (root / "P001" / "flair.nii.gz").rename(root / "P001" / "flair.nii")
    _edit_manifest(root, lambda rows: rows[1].update(flair="P001/flair.nii"))


def _header(edit):
    def damage(root: Path):
        path = root / "P001" / "flair.nii.gz"
        img = nib.load(path)
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
        edit(img)
        nib.save(img, path)

    return damage


def _raw_slope(slope, inter):
    """Write scl_slope / scl_inter into the stored header bytes (nibabel would recompute them on save)."""

    def damage(root: Path):
        path = root / "P001" / "flair.nii.gz"
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[112:120] = np.array([slope, inter], dtype="<f4").tobytes()  # NIfTI-1 offsets of the two fields
        path.write_bytes(gzip.compress(bytes(raw)))

    return damage


def _move_qform(img):
    q = img.affine.copy()
    q[:3, 3] += 25.0
    img.set_qform(q, code=1)
    img.set_sform(img.affine, code=1)


def _saturate(d, a):
    d[d > np.percentile(d[d > 0], 30)] = d.max()
    return d, a


def _rgb(d):
    rgb = np.zeros(d.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.clip(d, 0, 255)
    return rgb


def _same_bytes(root: Path):
    shutil.copy(root / "P000" / "adc.nii.gz", root / "P001" / "adc.nii.gz")


# (id, damage(root), column of P001 that is reported, message fragment)
HOSTILE = [
    ("absolute path", lambda r: _set_path("flair", str(r / "P001" / "flair.nii.gz"))(r), "flair", "is an absolute path"),
    ("dot-dot", _set_path("flair", "P001/../P001/flair.nii.gz"), "flair", "with '..'"),
    ("symlink out", _symlink(_outside_copy), "flair", "outside the cohort folder"),
    ("dangling symlink", _symlink(lambda r: r / "P001" / "gone.nii.gz"), "flair", "which does not exist"),
    ("looping symlink", _symlink(lambda r: r / "P001" / "flair.nii.gz"), "flair", "loops"),
    ("folder", _set_path("flair", "P001"), "flair", "is a folder"),
    ("fifo", _fifo, "flair", "is a FIFO"),
    ("trailing garbage", _append(b"garbage after the stream"), "flair", "bytes of trailing data"),
    ("two gzip members", _append(gzip.compress(b"a second member")), "flair", "several gzip members"),
    ("gzip named .nii", _gzip_in_plain_name, "flair", "holds gzip-compressed data although its name ends in .nii"),
    ("infinite slope", _raw_slope(np.inf, 0.0), "flair", "header scaling is infinite"),
    ("NaN intercept", _raw_slope(2.0, np.nan), "flair", "intercept"),
    ("sform vs qform", _header(_move_qform), "flair", "sform and qform place the image 43.3 mm apart"),
    ("complex data", lambda r: _rewrite(r / "P001" / "flair.nii.gz", lambda d, a: (d.astype(np.complex64), a)),
     "flair", "holds complex64 values"),
        ("RGB data", lambda r: _rewrite(r / "P001" / "flair.nii.gz", lambda d, a: (_rgb(d), a)), "flair",
     "holds RGB colour values"),
("4-D image", lambda r: _rewrite(r / "P001" / "t1.nii.gz", lambda d, a: (np.stack([d, d], -1), a)), "t1",
     "is 4-D"),
    ("saturated", lambda r: _rewrite(r / "P001" / "t1c.nii.gz", _saturate), "t1c", "is saturated"),
    ("voxel size", lambda r: _rewrite(r / "P001" / "t1.nii.gz", lambda d, a: (d, np.diag([30.0, 2, 2, 1]) @ a)),
     "t1", "is outside 0.1–20"),
    ("byte-identical image", _same_bytes, "adc", "is byte-identical to P000's adc"),
    ("shared file", _set_path("fa", "P000/fa.nii.gz"), "fa", "names the same file as P000's fa"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "column", "fragment"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_input_is_one_error_of_its_patient(phantom_cohort, damage, column, fragment):
    if fragment == "is a FIFO" and not hasattr(os, "mkfifo"):
        pytest.skip("this platform has no FIFOs")
    damage(phantom_cohort)
    report = validate_cohort(phantom_cohort, progress=False)
    [p001] = [p for p in report.patients if p.patient_id == "P001"]
    hits = [(p.column, p.severity) for p in p001.problems if fragment in p.message]
    assert hits == [(column, "error")], [format_problem(p) for p in report.problems()]
    others = [p.patient_id for p in report.patients if p.valid]
    expected = [i for i in IDS if i != "P001" and not (i == "P000" and "P000's" in fragment)]
    assert others == expected


def test_unreadable_file_is_reported(phantom_cohort):
    if os.geteuid() == 0:
        # root reads any file whatever its mode; check the message through a path that os.access refuses
        pytest.skip("running as root, which may read a file of mode 000: no permission error to provoke")
    _unreadable(phantom_cohort)
    report = validate_cohort(phantom_cohort, progress=False)
    [p001] = [p for p in report.patients if p.patient_id == "P001"]
    assert any("permission denied" in p.message for p in p001.problems)


def test_a_symlink_inside_the_cohort_is_followed(phantom_cohort):
    shared = phantom_cohort / "store" / "flair-P001.nii.gz"
    shared.parent.mkdir()
    (phantom_cohort / "P001" / "flair.nii.gz").rename(shared)
    os.symlink(shared, phantom_cohort / "P001" / "flair.nii.gz")
    report = validate_cohort(phantom_cohort, progress=False)
    assert report.ok and report.valid_ids() == IDS, [format_problem(p) for p in report.problems()]


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        (InputLimits(max_file_mb=0.01), "over the 0.01 MB limit"),
        (InputLimits(max_decompressed_mb=0.05), "decompresses to more than 0.05 MB"),
        (InputLimits(max_image_mb=0.1), "announces a 48×56×48 array"),
        (InputLimits(max_output_voxels=1000), "3 mm grid, over the 1e+03 limit"),
    ],
    ids=["file size", "decompressed size", "header size", "output grid"],
)
def test_size_caps_stop_before_allocating(phantom_cohort, limits, fragment):
    report = validate_cohort(phantom_cohort, progress=False, limits=limits)
    assert not report.ok
    for patient in report.patients:
        assert any(fragment in p.message for p in patient.problems), [p.message for p in patient.problems]


def test_gzip_bomb_stops_at_the_cap(tmp_path):
    from ctvlab.ingest.safety import UnsafeInputError, read_capped

    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        block = b"\0" * (1 << 20)
        for _ in range(64):  # 64 MB of zeros, ~64 kB on disk
            fh.write(block)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UnsafeInputError, match="decompresses to more than 8 MB"):
        read_capped(bomb, InputLimits(max_decompressed_mb=8))


def test_cli_reports_hostile_input_without_traceback(phantom_cohort):
    _set_path("flair", "/etc/passwd")(phantom_cohort)
    out = subprocess.run(
        [sys.executable, "-m", "ctvlab.cli", "validate", str(phantom_cohort)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "platform"), "COLUMNS": "300"},
    )  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert "P001 · /etc/passwd (flair) · is an absolute path" in out.stdout


# --- manifest text -------------------------------------------------------------------------------------


def _manifest_text(root: Path) -> str:
    return (root / "manifest.csv").read_text()


def _write_manifest_text(root: Path, text: str, encoding: str = "utf-8") -> None:
    (root / "manifest.csv").write_bytes(text.encode(encoding))


def _replace_in_row(root: Path, pid: str, old: str, new: str) -> None:
    lines = _manifest_text(root).splitlines(keepends=True)
    lines = [ln.replace(old, new, 1) if ln.startswith(pid + ",") else ln for ln in lines]
    _write_manifest_text(root, "".join(lines))


def _field_of(root: Path, pid: str, col: str) -> str:
    import csv

    with open(root / "manifest.csv", newline="") as fh:
        return next(r for r in csv.DictReader(fh) if r["patient_id"] == pid)[col]


# (id, edit(root), fragment of P001's problem)
MANIFEST_TEXT = [
    ("decimal comma", lambda r: _replace_in_row(r, "P001", f",{_field_of(r, 'P001', 'age')},",
                                                 f',"{_field_of(r, "P001", "age").split(".")[0]},5",'),
     "decimal comma"),
    ("inf", lambda r: _replace_in_row(r, "P001", f",{_field_of(r, 'P001', 'os_months')},", ",inf,"), "finite number"),
    ("1e309", lambda r: _replace_in_row(r, "P001", f",{_field_of(r, 'P001', 'os_months')},", ",1e309,"),
     "finite number"),
    ("extra field", lambda r: _replace_in_row(r, "P001", "P001,", "P001,surplus,"), "a stray comma?"),
    ("missing field", lambda r: _write_manifest_text(r, "".join(
        ln.rsplit(",", 1)[0] + "\n" if ln.startswith("P001,") else ln
        for ln in _manifest_text(r).splitlines(keepends=True))), "values, the header has"),
    ("embedded newline", lambda r: _replace_in_row(r, "P001", f",{_field_of(r, 'P001', 'sex')},",
                                                    f',"{_field_of(r, "P001", "sex")}\nnote",'),
     "holds a line break"),
    ("reserved id", lambda r: _write_manifest_text(r, _manifest_text(r).replace("P001,", "P001_masks,", 1)),
     "may not end in '_masks'"),
    ("case-only id", lambda r: _write_manifest_text(r, _manifest_text(r).replace("P001,", "p000,", 1)),
     "only in letter case"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "fragment"), [m[1:] for m in MANIFEST_TEXT], ids=[m[0] for m in MANIFEST_TEXT]
)
def test_manifest_text_problem_is_reported_for_its_row(phantom_cohort, edit, fragment):
    edit(phantom_cohort)
    report = validate_cohort(phantom_cohort, progress=False)
    invalid = [p for p in report.patients if not p.valid]
    assert len(invalid) == 1, [format_problem(p) for p in report.problems()]
    assert any(fragment in p.message for p in invalid[0].problems), [p.message for p in invalid[0].problems]
    assert invalid[0].line == 3  # P001's line, also after a quoted line break
    assert [p.patient_id for p in report.patients if p.valid] == ["P000", "P002", "P003"]


def test_bom_and_crlf_are_read_as_plain_utf8(phantom_cohort):
    text = _manifest_text(phantom_cohort)
    _write_manifest_text(phantom_cohort, "\ufeff" + text.replace("\r\n", "\n").replace("\n", "\r\n"))
    report = validate_cohort(phantom_cohort, progress=False)
    assert report.ok and report.valid_ids() == IDS


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (lambda t: t.replace("P001", "Pé01").encode("latin-1"), "is not UTF-8 text: byte 0xe9 on line 3"),
        (
            lambda t: t.replace("patient_id,cohort", "patient_id,cohort,cohort", 1).encode(),
            "repeated columns: cohort",
        ),
    ],
    ids=["latin-1", "duplicate header"],
)
def test_manifest_that_cannot_be_parsed_is_a_cohort_error(phantom_cohort, content, fragment):
    (phantom_cohort / "manifest.csv").write_bytes(content(_manifest_text(phantom_cohort)))
    report = validate_cohort(phantom_cohort, progress=False)
    assert not report.ok and not report.patients
    assert any(fragment in p.message for p in report.cohort_problems), [
        p.message for p in report.cohort_problems
    ]
