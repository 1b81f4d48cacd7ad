"""`ctvlab register`: follow-up scans registered to the pre-RT T1c, their masks carried over, failures refused.

The synthetic follow-ups (`ctvlab.synth.followup`) move the pre-RT anatomy by a known rigid transform and
a smooth deformation, so the truth is known: the progression masks on the pre-RT grid and landmark pairs.
Grids of 3 mm and few iterations keep each registration within seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("SimpleITK")

from ctvlab.ingest import followup as F
from ctvlab.ingest.manifest import read_manifest, write_manifest
from ctvlab.synth.followup import FollowupSpec, write_followup, write_pre_rt

FAST = F.Settings(rigid_iterations=40, affine_iterations=40, bspline_iterations=20)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 2.0),  # one determines the other
        ([0, 0, 1, 1], [0, 1, 0, 1], 1.0),  # independent
    ],
)
def test_nmi_on_hand_computed_cases(a, b, expected):
    assert F.nmi(np.array(a), np.array(b), bins=2) == pytest.approx(expected)


def test_dice_on_a_hand_computed_case():
    a = np.zeros(10, bool)
    b = np.zeros(10, bool)
    a[:4], b[2:6] = True, True  # 2 shared of 4 + 4
    assert F.dice(a, b) == pytest.approx(0.5)
    assert F.dice(a & False, b & False) == 1.0


def test_points_are_mapped_in_ras_millimetres():
    import SimpleITK as sitk

    # SimpleITK's world is LPS: a shift of (+1, +2, +3) mm in LPS is (-1, -2, +3) in RAS
    t = sitk.TranslationTransform(3, (1.0, 2.0, 3.0))
    out = F.map_points_ras(t, np.array([[10.0, 0.0, -5.0]]))
    np.testing.assert_allclose(out, [[9.0, -2.0, -2.0]])


def test_a_followup_folder_without_masks_is_named(tmp_path):
    (tmp_path / "P1" / "followup").mkdir(parents=True)
    (tmp_path / "P1" / "followup" / "t1c.nii.gz").write_bytes(b"x")
    assert F.find_followup(tmp_path, "P2/t1c.nii.gz") is None
    with pytest.raises(ValueError, match=r"P1/followup/ holds no cel_progression_mask"):
        F.find_followup(tmp_path, "P1/t1c.nii.gz")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    truth = tmp_path_factory.mktemp("truth")
    row = write_pre_rt(root, "P0", truth, spacing_mm=3.0)
    landmarks = write_followup(root, row, truth, FollowupSpec(spacing_mm=3.0, seed=1))
    return root, truth, row, landmarks


def test_a_synthetic_followup_is_registered_back_within_the_goals(pair):
    root, truth, row, lm = pair
    before = np.median(np.linalg.norm(lm["pre_rt"] - lm["followup"], axis=1))
    assert before > 5.0  # the follow-up really moved: several mm and a few degrees
    exclude = [root / row.t2l_mask, root / row.cel_mask, root / row.cavity_mask]
    fu = F.find_followup(root, row.t1c)
    transform, masks, scores = F.register_patient(root / row.t1c, root / row.brain_mask, exclude, fu, FAST)
    assert scores["nmi_after"] > scores["nmi_before"] and scores["nmi_after"] >= F.MIN_NMI
    for column in F.MASK_NAMES:
        want = np.asarray(nib.load(truth / "P0" / f"{column}.nii.gz").dataobj)
        assert masks[column].shape == want.shape
        assert F.dice(masks[column], want) >= 0.9, column
    error = np.linalg.norm(F.map_points_ras(transform, lm["pre_rt"]) - lm["followup"], axis=1)
    assert np.median(error) <= 2.0


def _three_patients(src: Path, row, root: Path) -> list:
    """P0, P1 and P2: copies of the synthetic patient and its follow-up, with their manifest rows."""
    import shutil

    rows = []
    for pid in ("P0", "P1", "P2"):
        shutil.copytree(src / "P0", root / pid)
        paths = ("t1c", "t1", "flair", "brain_mask", "cel_mask", "t2l_mask", "cavity_mask")
        moved = {c: getattr(row, c).replace("P0/", f"{pid}/") for c in paths}
        rows.append(row.model_copy(update={"patient_id": pid, **moved}))
    return rows


def test_the_command_refuses_a_failed_registration_and_goes_on(pair, tmp_path, capsys):
    """Three patients: one good follow-up, one whose follow-up was turned 90 degrees with its header left as
    it was (registration cannot find it), one whose follow-up image is not an image. Only the first is
    written; the others are named, nothing of theirs is written, and the command exits 1."""

    from ctvlab.cli import main

    src, _, row, _ = pair
    root = tmp_path / "cohort"
    rows = _three_patients(src, row, root)
    write_manifest(root, rows)
    turned = root / "P1" / "followup" / "t1c.nii.gz"
    img = nib.load(turned)
    nib.save(nib.Nifti1Image(np.rot90(np.asarray(img.dataobj), axes=(0, 2)).copy(), img.affine), turned)
    (root / "P2" / "followup" / "t1c.nii.gz").write_bytes(b"not a nifti")

    with pytest.raises(SystemExit) as e:
        main(["register", str(root), "--smoke-test", "--workdir", str(tmp_path / "wd")])
    out = capsys.readouterr()
    assert e.value.code == 1, out
    assert "Traceback" not in out.out + out.err
    assert "P1: refused" in out.out and "check that P1/followup/t1c.nii.gz is this patient's" in out.out
    assert "P2: error: P2/followup/t1c.nii.gz: cannot be read as a NIfTI image" in out.out
    assert str(root) not in out.out  # files named as the cohort names them
    got, problems, _ = read_manifest(root)
    assert not problems
    by_id = {r.patient_id: r for r in got}
    assert by_id["P0"].cel_progression_mask == "P0/cel_progression_mask.nii.gz"
    assert by_id["P1"].cel_progression_mask is None and by_id["P2"].t2l_progression_mask is None
    assert not (root / "P1" / "cel_progression_mask.nii.gz").exists()
    assert not (root / "P2" / "t2l_progression_mask.nii.gz").exists()
    report = json.loads((root / "registration" / "register_report.json").read_text())
    status = {p["patient_id"]: p["status"] for p in report["patients"]}
    assert status == {"P0": "registered", "P1": "refused", "P2": "error"}
    assert (root / "registration" / "P0.png").stat().st_size > 1000
    assert not (root / "registration" / "P1.png").exists()
    assert not list(Path(root).rglob(".tmp-*"))


def test_a_cohort_without_followups_is_left_alone(tmp_path, capsys):
    from ctvlab.cli import main

    row = write_pre_rt(tmp_path / "c", "P0", tmp_path / "truth", spacing_mm=6.0)
    write_manifest(tmp_path / "c", [row])
    before = (tmp_path / "c" / "manifest.csv").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["register", str(tmp_path / "c"), "--workdir", str(tmp_path / "wd")])
    assert e.value.code == 0
    assert "nothing to register" in capsys.readouterr().out
    assert (tmp_path / "c" / "manifest.csv").read_bytes() == before
    assert not (tmp_path / "c" / "registration").exists()


def test_the_run_stage_registers_declared_followups_and_skips_a_cohort_without(pair, tmp_path):
    import io
    import shutil

    from rich.console import Console

    from ctvlab.config import StudyConfig
    from ctvlab.pipeline import _register

    src, _, row, _ = pair
    root = tmp_path / "cohort"
    shutil.copytree(src / "P0", root / "P0")
    write_manifest(root, [row])
    cfg = StudyConfig(
        name="t", workdir=tmp_path / "wd", cohort={"source": "raw", "raw_dir": root}, smoke_test=True
    )
    console = Console(file=io.StringIO())
    assert F.declares_followups(root)
    rec = _register(cfg, console)
    assert rec.status == "ran" and rec.detail == "1 follow-up(s) registered"
    shutil.rmtree(root / "P0" / "followup")
    assert not F.declares_followups(root)
    rec = _register(cfg, console)
    assert rec.status == "nothing to do" and "no patient declares a follow-up" in rec.detail


def test_a_folder_without_a_manifest_is_refused_whole(tmp_path, capsys):
    from ctvlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["register", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "manifest.csv not found" in err and "Traceback" not in err
    assert not (tmp_path / "nowhere").exists()


def test_register_replaces_only_the_masks_it_wrote(pair, tmp_path, capsys):
    """A second `ctvlab register` leaves a patient whose inputs and settings did not change as it is
    (current), and with another setting replaces the masks the first one wrote; a progression mask it did not
    write (one the manifest names elsewhere, or a file at the path it writes to) is never replaced: that
    patient is refused by name and keeps its files and its manifest row. The manifest as it was before the
    first rewrite is kept."""
    import shutil

    from ctvlab.cli import main

    src, _, row, _ = pair
    root = tmp_path / "cohort"
    rows = _three_patients(src, row, root)
    own = root / "P1" / "own_cel.nii.gz"  # P1's own progression mask, drawn on the pre-RT grid
    shutil.copy(root / "P1" / "cel_mask.nii.gz", own)
    rows[1] = rows[1].model_copy(update={"cel_progression_mask": "P1/own_cel.nii.gz"})
    squatter = root / "P2" / "t2l_progression_mask.nii.gz"  # a file of the team's at the path register writes
    shutil.copy(root / "P2" / "t2l_mask.nii.gz", squatter)
    write_manifest(root, rows)
    original = (root / "manifest.csv").read_bytes()
    squatted = squatter.read_bytes()

    def register(*extra: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["register", str(root), "--smoke-test", "--workdir", str(tmp_path / "wd"), *extra])
        assert e.value.code == 1
        return capsys.readouterr().out

    out = register()
    assert "P1: refused: the manifest already names P1/own_cel.nii.gz as its cel_progression_mask" in out
    assert "P2: refused: P2/t2l_progression_mask.nii.gz exists and was not written by ctvlab register" in out
    assert squatter.read_bytes() == squatted and own.is_file()
    got = {r.patient_id: r for r in read_manifest(root)[0]}
    assert got["P0"].cel_progression_mask == "P0/cel_progression_mask.nii.gz"
    assert got["P1"].cel_progression_mask == "P1/own_cel.nii.gz" and got["P2"].t2l_progression_mask is None
    assert (root / "registration" / "manifest.before-register.csv").read_bytes() == original

    first = (root / "P0" / "cel_progression_mask.nii.gz").stat().st_mtime_ns
    out = register()  # again, nothing changed: P0 is current and not registered again
    assert "P0: current" in out and "P1: refused" in out and "P2: refused" in out
    assert (root / "P0" / "cel_progression_mask.nii.gz").stat().st_mtime_ns == first
    out = register("--min-nmi", "1.1")  # another setting: P0 again, its own masks replaced
    assert "P0: registered" in out and "P1: refused" in out and "P2: refused" in out
    assert (root / "P0" / "cel_progression_mask.nii.gz").stat().st_mtime_ns != first
    assert (root / "registration" / "manifest.before-register.csv").read_bytes() == original
