"""A tiny synthetic cohort: the manifest layout, the geometry rules, determinism, the null control, the
imaging strength and the hidden truth beside the inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctvlab.config import SynthConfig
from ctvlab.ingest.manifest import MASK_COLUMNS, MRSI_COLUMNS, PATH_COLUMNS, read_manifest
from ctvlab.synth.cohort import generate_cohort
from ctvlab.synth.patient import PRESS_TILT_DEG, TRUTH_DIR, truth_path
from ctvlab.synth.table1 import cohort_report

ANATOMY = ("t1c", "t1", "flair")
DIFFUSION = ("adc", "fa")


def tiny(**kw) -> SynthConfig:
    """Coarse grids and 3 patients (one without MRSI): a few seconds."""
    base = {
        "n_patients": 3, "seed": 7, "anatomy_mm": (4.0, 4.0, 4.0), "diffusion_mm": (4.0, 4.0, 5.0),
        "growth_mm": 4.0, "num_workers": 1, "mrsi_missing_fraction": 0.34,
    }  # fmt: skip
    return SynthConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for name, cfg in {
        "a": tiny(), "a_again": tiny(), "other_seed": tiny(seed=8), "null": tiny(null=True),
        "half": tiny(imaging_strength=0.5), "strong": tiny(preset="strong"),
    }.items():  # fmt: skip
        generate_cohort(root / name, cfg, progress=False)
        out[name] = root / name
    return out


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(root: Path, rel: str) -> nib.Nifti1Image:
    return nib.load(root / rel)


def test_manifest_layout(cohorts):
    root = cohorts["a"]
    rows, problems, ids = read_manifest(root)
    assert problems == [] and ids == ["SYN001", "SYN002", "SYN003"]
    assert sum(r.has_mrsi for r in rows) == 2  # 34% of 3 rounds to one patient without MRSI
    for r in rows:
        for col in PATH_COLUMNS:
            rel = getattr(r, col)
            if col in MRSI_COLUMNS and not r.has_mrsi:
                assert rel is None
                assert not (root / r.patient_id / f"{col}.nii.gz").exists()
            else:
                assert rel == f"{r.patient_id}/{col}.nii.gz" and (root / rel).is_file()
    assert not list(root.rglob(".tmp-*"))


def test_geometry_rules(cohorts):
    root = cohorts["a"]
    tilts = []
    rows, _, _ = read_manifest(root)
    for r in rows:
        ref = load(root, r.t1c)
        assert ref.header.get_xyzt_units()[0] == "mm"
        assert not np.allclose(ref.affine[:3, :3], np.diag(np.diag(ref.affine[:3, :3])))  # oblique grid
        masks = {}
        for col in (*ANATOMY, *MASK_COLUMNS):
            img = load(root, getattr(r, col))
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine), (r.patient_id, col)
            if col in MASK_COLUMNS:
                assert img.get_data_dtype() == np.uint8
                data = np.asarray(img.dataobj)
                assert set(np.unique(data)) <= {0, 1}
                masks[col] = data.astype(bool)
        brain = masks["brain_mask"]
        assert brain.any() and masks["t2l_mask"].any()
        assert not (masks["cel_mask"] & ~masks["t2l_mask"]).any()  # T2L ⊇ CEL
        assert not (masks["cavity_mask"] & (masks["t2l_mask"] | masks["cel_mask"])).any()
        for col, m in masks.items():
            assert not (m & ~brain).any(), col
        for col in ANATOMY:
            assert np.isfinite(load(root, getattr(r, col)).get_fdata()[brain]).all()

        brain_world = _world(ref.affine, np.argwhere(brain))
        for col in DIFFUSION:
            img = load(root, getattr(r, col))
            assert img.header.get_zooms() == pytest.approx((4.0, 4.0, 5.0))
            ijk = np.rint(_world(np.linalg.inv(img.affine), brain_world)).astype(int)
            inside = ((ijk >= 0) & (ijk < img.shape)).all(1)
            assert inside.mean() > 0.95  # the diffusion field of view covers the brain
            data = img.get_fdata()
            assert np.isfinite(data[tuple(ijk[inside].T)]).all()
        if r.has_mrsi:
            img = load(root, r.cni)
            assert img.shape == (8, 8, 4) and img.header.get_zooms() == pytest.approx((10.0, 10.0, 10.0))
            # the PRESS box is tilted from the T1c's axes by at most PRESS_TILT_DEG
            relative = (ref.affine[:3, :3] / 4.0).T @ (img.affine[:3, :3] / 10.0)
            angle = np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1)))
            assert angle <= PRESS_TILT_DEG + 1e-3
            tilts.append(angle)
            corners = (
                np.array(np.meshgrid([-0.5, 7.5], [-0.5, 7.5], [-0.5, 3.5], indexing="ij")).reshape(3, -1).T
            )
            ijk = _world(np.linalg.inv(ref.affine), _world(img.affine, corners))
            assert ((ijk >= -0.5) & (ijk <= np.asarray(ref.shape) - 0.5)).all()  # inside the T1c's FOV
            assert np.isfinite(img.get_fdata()).mean() > 0.8
    assert max(tilts) > 0.5  # a spectroscopist's box is not locked to the slices


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("name", ["a", "strong"])
def test_passes_validation(cohorts, name):
    from ctvlab.ingest.validate import validate_cohort

    report = validate_cohort(cohorts[name])
    assert report.ok, report


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(cohorts):
    a, again, other = digests(cohorts["a"]), digests(cohorts["a_again"]), digests(cohorts["other_seed"])
    assert a == again
    assert a["SYN001/t1c.nii.gz"] != other["SYN001/t1c.nii.gz"]
    assert a["manifest.csv"] != other["manifest.csv"]


def test_null_cohort_differs_only_in_diffusion_and_mrsi(cohorts):
    a, null = digests(cohorts["a"]), digests(cohorts["null"])
    assert a.keys() == null.keys()
    differing = {k for k in a if a[k] != null[k]}
    allowed = {f"SYN00{i}/{c}.nii.gz" for i in (1, 2, 3) for c in (*DIFFUSION, *MRSI_COLUMNS)}
    assert differing - {"synth_params.json"} <= allowed
    assert any(k.endswith("adc.nii.gz") for k in differing)
    assert any(k.endswith("cni.nii.gz") for k in differing)


def test_imaging_strength_changes_only_diffusion_and_mrsi(cohorts):
    """Anatomy (T1c, T1, FLAIR, every mask) and the truth do not depend on what diffusion and MRSI see."""
    a, half, null = digests(cohorts["a"]), digests(cohorts["half"]), digests(cohorts["null"])
    assert a.keys() == half.keys()
    differing = {k for k in a if a[k] != half[k]}
    allowed = {f"SYN00{i}/{c}.nii.gz" for i in (1, 2, 3) for c in (*DIFFUSION, *MRSI_COLUMNS)}
    assert differing - {"synth_params.json"} <= allowed
    assert any(k.endswith("adc.nii.gz") for k in differing)
    assert any(half[k] != null[k] for k in differing)  # neither today's maps nor the null's


def test_the_truth_lies_beside_the_inputs_on_the_t1c_grid(cohorts):
    for name in ("a", "strong"):
        root = cohorts[name]
        rows, problems, _ = read_manifest(root)
        assert problems == []
        manifest = (root / "manifest.csv").read_text()
        assert TRUTH_DIR not in manifest and "density_pre" not in manifest  # never an input
        assert sorted(p.name for p in (root / TRUTH_DIR).iterdir()) == [
            f"{r.patient_id}_density_pre.nii.gz" for r in rows
        ]
        for r in rows:
            truth, t1c = nib.load(truth_path(root, r.patient_id)), load(root, r.t1c)
            assert truth.shape == t1c.shape and np.allclose(truth.affine, t1c.affine)
            assert truth.get_data_dtype() == np.float32
            u = truth.get_fdata()
            brain, t2l, cavity = (load(root, getattr(r, c)).get_fdata() > 0 for c in
                                  ("brain_mask", "t2l_mask", "cavity_mask"))  # fmt: skip
            assert u.min() >= 0.0 and u.max() <= 1.0
            assert not u[~brain].any() and not u[cavity].any()  # no cells outside the brain or in the cavity
            assert np.median(u[t2l]) > np.median(u[brain & ~t2l & ~cavity])  # the visible lesion is densest
    assert not list(cohorts["a"].rglob(".tmp-*"))


def test_the_default_cohort_is_what_it_was(cohorts):
    """Every array of the default tiny cohort against statistics recorded from main (aaf07b0) before the
    signal settings existed: at their defaults none of the new code runs."""
    recorded = json.loads((Path(__file__).parent / "data" / "tiny_cohort_aaf07b0.json").read_text())
    root = cohorts["a"]
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.nii.gz") if p.parent.name != TRUTH_DIR)
    assert found == sorted(recorded)
    for rel, (shape, dtype, total, total_sq, nonzero, finite) in recorded.items():
        img = nib.load(root / rel)
        a = np.asarray(img.dataobj).astype(np.float64)
        ok = np.isfinite(a)
        assert list(a.shape) == shape and str(img.get_data_dtype()) == dtype, rel
        assert int(ok.sum()) == finite, rel
        # exact on this machine; the tolerance only absorbs another CPU's last-bit rounding
        assert a[ok].sum() == pytest.approx(total, rel=1e-5, abs=2.0), rel
        assert (a[ok] ** 2).sum() == pytest.approx(total_sq, rel=1e-5, abs=2.0), rel
        assert abs(int(np.count_nonzero(a[ok])) - nonzero) <= max(2, nonzero // 10_000), rel


def test_report_on_generated_cohort(cohorts):
    report = cohort_report(cohorts["a"])
    assert report.problems == [] and report.groups["all"].n == 3
    for p in report.patients:
        assert p.lesion_cm3 > 0 and p.pattern is not None


@pytest.mark.slow
def test_parallel_generation_equals_serial(cohorts, tmp_path):
    generate_cohort(tmp_path / "par", tiny(num_workers=2), progress=False)
    assert digests(tmp_path / "par") == digests(cohorts["a"])


def test_the_synth_command_takes_a_preset(tmp_path):
    """`ctvlab synth --preset strong` fills the signal settings the config leaves unset; an unknown name is a
    ConfigError (one message and exit 2 from the command) and writes nothing."""
    import json

    from typer.testing import CliRunner

    from ctvlab.cli import app

    runner = CliRunner()
    out = tmp_path / "cohort"
    result = runner.invoke(
        app, ["synth", "--out", str(out), "-n", "1", "--preset", "strong", "--workdir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output[-2000:]
    recorded = json.loads((out / "synth_params.json").read_text())["config"]
    assert recorded["preset"] == "strong" and recorded["channelling"] == recorded["seeding"] == 1.0
    from ctvlab.errors import ConfigError

    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "-n", "1", "--preset", "bogus"])
    assert isinstance(bad.exception, ConfigError) and "preset: Input should be 'today'" in str(bad.exception)
    assert not (tmp_path / "x").exists()


def test_a_full_disk_names_the_cohort_folder_and_the_space_it_still_needs(tmp_path, monkeypatch):
    """The disk fills after two patients: one line that says so, names the folder and estimates what the
    cohort still needs from the two written."""
    import errno

    import ctvlab.synth.cohort as cohort_module
    from ctvlab.errors import StorageError, folder_bytes, space_needed

    cfg = tiny(n_patients=4, num_workers=1)
    real = cohort_module._run_one

    def disk_fills(plan, cfg, out):
        if plan.index >= 2:
            raise OSError(
                errno.ENOSPC, "No space left on device", str(Path(out) / f"P{plan.index}" / "t1c.nii.gz")
            )
        return real(plan, cfg, out)

    monkeypatch.setattr(cohort_module, "_run_one", disk_fills)
    with pytest.raises(StorageError) as e:
        generate_cohort(tmp_path / "cohort", cfg, progress=False)
    written = sum(folder_bytes(p) for p in (tmp_path / "cohort").iterdir() if p.is_dir())
    expected = space_needed("the cohort", written, 2, 2)
    assert str(e.value).startswith(f"cannot write to {tmp_path / 'cohort'}: the disk is full; {expected}.")
    assert not (tmp_path / "cohort" / "manifest.csv").exists()  # not a complete cohort
