"""`ctvlab import-layout`: public collections in, the same masks and geometry out, valid for what they have."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctvlab import cli
from ctvlab.errors import ConfigError
from ctvlab.ingest.conventions import adc_from_trace, masks_from_labels, volume_mismatches
from ctvlab.ingest.import_layout import import_layout
from ctvlab.ingest.layouts import PRESETS, Labels, preset
from ctvlab.ingest.manifest import read_manifest
from ctvlab.ingest.validate import validate_cohort
from tests.ingest.public_layouts import PATIENT_NAMES, write_layout
from tests.phantoms import PhantomSpec, make_phantom_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list]:
    """Two phantom patients without MRSI (no public collection has it)."""
    root = tmp_path_factory.mktemp("ctvlab_cohort")
    return root, make_phantom_cohort(root, n=2, spec=PhantomSpec(mrsi=False))


def _run(capsys, *args: str) -> tuple[int, str]:
    """`ctvlab ARGS` through its entry point (errors become a message and an exit code): (code, stdout+stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err


def _array(root: Path, rel: str | None) -> np.ndarray:
    return np.asarray(nib.load(str(root / rel)).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip_gives_the_same_masks_and_geometry(cohort, tmp_path, name):
    root, rows = cohort
    src = tmp_path / "collection"
    names = write_layout(root, rows, PRESETS[name], src)
    outcome = import_layout(PRESETS[name], src, tmp_path / "raw")
    assert not outcome.skipped and len(outcome.rows) == len(rows)
    imported = {r.patient_id: r for r in read_manifest(tmp_path / "raw")[0]}
    for row in rows:
        new = imported[names[row.patient_id]]
        for column in ("cel_mask", "t2l_mask", "brain_mask"):
            assert (
                _dice(_array(root, getattr(row, column)), _array(tmp_path / "raw", getattr(new, column)))
                == 1.0
            )
        for column in ("t1c", "cel_mask"):
            before, after = (
                nib.load(str(root / row.t1c)),
                nib.load(str(tmp_path / "raw" / getattr(new, column))),
            )
            assert np.allclose(before.affine, after.affine) and before.shape == after.shape
        assert new.cohort is None and new.fa == (None if name != "upenn-gbm" else new.fa)
    report = validate_cohort(tmp_path / "raw", progress=False)
    assert report.ok, [p.message for p in report.problems() if p.severity == "error"]
    assert all("not available" in " ".join(p.message for p in r.problems) for r in report.patients)


def test_upenn_adc_is_the_trace_over_three_in_mm2_per_s(cohort, tmp_path):
    root, rows = cohort
    src = tmp_path / "upenn"
    names = write_layout(root, rows, PRESETS["upenn-gbm"], src)
    outcome = import_layout(PRESETS["upenn-gbm"], src, tmp_path / "raw")
    new = next(r for r in outcome.rows if r.patient_id == names[rows[0].patient_id])
    assert np.allclose(_array(tmp_path / "raw", new.adc), _array(root, rows[0].adc), rtol=1e-5, atol=1e-9)
    assert any("10⁻³ mm²/s" in n for n in outcome.notes[new.patient_id])
    assert new.fa is not None


@pytest.mark.parametrize(
    ("trace", "scale"), [(2.4e-3, 1.0), (2.4, 1e-3), (2400.0, 1e-6)]
)  # brain MD 0.8e-3 mm²/s written in mm²/s, 10⁻³ mm²/s and 10⁻⁶ mm²/s
def test_trace_units(trace, scale):
    adc, _ = adc_from_trace(np.full((4, 4, 4), trace))
    assert np.allclose(adc, 0.8e-3)
    with pytest.raises(ValueError, match="no known unit"):
        adc_from_trace(np.full((4, 4, 4), 50.0))


def test_label_table_on_a_hand_written_case():
    """BraTS 2021 and 2023 number the same compartments differently; ctvlab's T2L holds all three."""
    seg21 = np.array([0, 1, 2, 4, 4, 0])  # NCR, ED, ET, ET
    seg23 = np.array([0, 1, 2, 3, 3, 0])  # NETC, SNFH, ET, ET
    for name, seg in (("brats2021", seg21), ("brats2023-glioma", seg23), ("upenn-gbm", seg21)):
        masks = masks_from_labels(seg, PRESETS[name].labels)
        assert masks["cel_mask"].tolist() == [0, 0, 0, 1, 1, 0]
        assert masks["t2l_mask"].tolist() == [0, 1, 1, 1, 1, 0]
        assert "cavity_mask" not in masks
    # LUMIERE's two segmentations: DeepBraTumIA 1 enhancing, 2 necrotic, 3 oedema; HD-GLIO 1 T2/FLAIR, 2 CE
    dbt = masks_from_labels(np.array([0, 1, 2, 3]), PRESETS["lumiere-deepbratumia"].labels)
    assert dbt["cel_mask"].tolist() == [0, 1, 0, 0] and dbt["t2l_mask"].tolist() == [0, 1, 1, 1]
    hd = masks_from_labels(np.array([0, 1, 2]), PRESETS["lumiere-hd-glio-auto"].labels)
    assert hd["cel_mask"].tolist() == [0, 0, 1] and hd["t2l_mask"].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"label\(s\) \[4\]"):  # a 2021 file read as 2023
        masks_from_labels(seg21, PRESETS["brats2023-glioma"].labels)
    with pytest.raises(ValueError, match="in both"):
        Labels(cel=(1,), oedema=(1,))


def test_every_preset_cites_its_sources():
    for p in PRESETS.values():
        assert p.sources and all(("doi:" in s or "http" in s) for s in p.sources), p.name


def test_lumiere_volume_file_refuses_a_swapped_mapping(cohort, tmp_path, capsys):
    root, rows = cohort
    src = tmp_path / "lumiere"
    write_layout(root, rows, PRESETS["lumiere-deepbratumia"], src)
    # The pure check: the file's volumes against the label counts.
    seg = np.array([1, 1, 2, 3, 3, 3])
    keys = PRESETS["lumiere-deepbratumia"].labels
    assert not volume_mismatches(
        seg, 1.0, {"Enhancing_Core": 2, "Necrotic_NonEnhancing": 1, "Edema_Compartment": 3}, keys
    )
    assert volume_mismatches(
        seg, 1.0, {"Enhancing_Core": 1, "Necrotic_NonEnhancing": 2, "Edema_Compartment": 3}, keys
    )
    # A copy whose labels are numbered the BraTS 2023 way (3 enhancing): one patient refused, the other kept.
    first = sorted(src.glob("Patient-*"))[0]
    vol_file = next(first.rglob("measured_volumes_in_mm3.json"))
    volumes = json.loads(vol_file.read_text())
    volumes["Enhancing_Core"], volumes["Edema_Compartment"] = (
        volumes["Edema_Compartment"],
        volumes["Enhancing_Core"],
    )
    vol_file.write_text(json.dumps(volumes))
    code, output = _run(
        capsys, "import-layout", "lumiere-deepbratumia", str(src), "--out", str(tmp_path / "raw")
    )
    assert code == 1, output
    assert f"skipped {first.name}" in output and "measured_volumes_in_mm3.json" in output
    kept = read_manifest(tmp_path / "raw")[0]
    assert [r.patient_id for r in kept] == ["Patient-002"] and not (tmp_path / "raw" / first.name).exists()


def test_rhuh_progression_only_on_the_pre_rt_grid(cohort, tmp_path):
    root, rows = cohort
    on = import_layout(
        PRESETS["rhuh-gbm"], _written(cohort, tmp_path / "on", "rhuh-gbm", 0.0), tmp_path / "raw_on"
    )
    for row, new in zip(rows, on.rows, strict=True):
        assert (
            _dice(
                _array(root, row.cel_progression_mask), _array(tmp_path / "raw_on", new.cel_progression_mask)
            )
            == 1.0
        )
        assert (
            _dice(
                _array(root, row.t2l_progression_mask), _array(tmp_path / "raw_on", new.t2l_progression_mask)
            )
            == 1.0
        )
    off = import_layout(
        PRESETS["rhuh-gbm"], _written(cohort, tmp_path / "off", "rhuh-gbm", 4.0), tmp_path / "raw_off"
    )
    assert all(r.cel_progression_mask is None and r.t2l_progression_mask is None for r in off.rows)
    assert all(any("declared as a follow-up" in n for n in notes) for notes in off.notes.values())
    assert validate_cohort(tmp_path / "raw_off", progress=False).ok
    # Declared for `ctvlab register`: the follow-up T1c and its masks, in the follow-up's own space.
    from ctvlab.ingest.followup import find_followup

    for row, new in zip(rows, off.rows, strict=True):
        fu = find_followup(tmp_path / "raw_off", new.t1c)
        assert fu is not None and set(fu.masks) == {"cel_progression_mask", "t2l_progression_mask"}
        moved = nib.load(fu.masks["cel_progression_mask"])
        assert np.allclose(moved.affine[:3, 3], nib.load(tmp_path / "raw_off" / new.t1c).affine[:3, 3] + 4.0)
        assert _dice(np.asarray(moved.dataobj), _array(root, row.cel_progression_mask)) == 1.0


def _written(cohort, dst: Path, name: str, shift: float | None) -> Path:
    root, rows = cohort
    write_layout(root, rows, PRESETS[name], dst, followup_shift_mm=shift)
    return dst


def test_yaml_override(cohort, tmp_path, capsys):
    """A copy labelled otherwise (enhancing 9) imports with a two-line YAML; an unknown key is refused."""
    root, rows = cohort
    src = _written(cohort, tmp_path / "brats", "brats2021", None)
    for seg in src.rglob("*_seg.nii.gz"):
        img = nib.load(str(seg))
        data = np.asarray(img.dataobj).copy()
        data[data == 4] = 9
        nib.save(nib.Nifti1Image(data, img.affine), str(seg))
    brats = ("import-layout", "brats2021", str(src))
    code, output = _run(capsys, *brats, "--out", str(tmp_path / "no"))
    assert code == 2 and "label(s) [9]" in output and "--labels FILE" in output
    assert not (tmp_path / "no").exists()
    override = tmp_path / "labels.yaml"
    override.write_text("labels:\n  cel: [9]\n")
    code, output = _run(capsys, *brats, "--out", str(tmp_path / "raw"), "--labels", str(override))
    assert code == 0, output
    new = read_manifest(tmp_path / "raw")[0][0]
    assert _dice(_array(root, rows[0].cel_mask), _array(tmp_path / "raw", new.cel_mask)) == 1.0
    override.write_text("labels:\n  cel: [9]\n  enhancing: [4]\n")
    with pytest.raises(ConfigError, match="enhancing"):
        preset("brats2021", override)
    code, output = _run(capsys, *brats, "--out", str(tmp_path / "x"), "--labels", str(override))
    assert code == 2 and "enhancing" in output and not (tmp_path / "x").exists()


def test_bad_input_names_the_patient_and_file_and_writes_nothing(cohort, tmp_path, capsys):
    src = _written(cohort, tmp_path / "brats", "brats2021", None)
    name = PATIENT_NAMES["brats2021"].format(i=1)
    for f in (src / name).glob("*_flair.nii.gz"):
        f.unlink()
    code, output = _run(capsys, "import-layout", "brats2021", str(src), "--out", str(tmp_path / "raw"))
    assert code == 1 and f"patient {name}: no flair file" in output
    assert str(src / name / f"{name}_flair.nii.gz") in output  # as the user named the folder
    assert [r.patient_id for r in read_manifest(tmp_path / "raw")[0]] == [
        PATIENT_NAMES["brats2021"].format(i=2)
    ]
    shutil.rmtree(src / PATIENT_NAMES["brats2021"].format(i=2))
    code, output = _run(capsys, "import-layout", "brats2021", str(src), "--out", str(tmp_path / "raw2"))
    assert code == 2 and not (tmp_path / "raw2").exists() and "no flair file" in output
    code, output = _run(capsys, "import-layout", "brats2021", str(src), "--out", str(tmp_path / "raw"))
    assert code == 2 and "exists" in output
    assert _run(capsys, "import-layout", "nope", str(src), "--out", str(tmp_path / "n"))[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats", "raw"]  # nothing beside --out


def test_upenn_leaves_later_scans_of_the_same_subject_out(cohort, tmp_path):
    root, rows = cohort
    src = tmp_path / "upenn"
    write_layout(root, rows[:1], PRESETS["upenn-gbm"], src)
    scans = src / "images_structural"
    shutil.copytree(scans / "UPENN-GBM-00001_11", scans / "UPENN-GBM-00001_21")
    outcome = import_layout(PRESETS["upenn-gbm"], src, tmp_path / "raw")
    assert [r.patient_id for r in outcome.rows] == ["UPENN-GBM-00001_11"] and not outcome.skipped


def test_the_command_help_names_every_layout():
    from typer.testing import CliRunner

    output = CliRunner().invoke(cli.app, ["import-layout", "--help"], env={"COLUMNS": "300"}).output
    assert all(name in output for name in PRESETS), output


def test_lumiere_baseline_is_the_first_week_unless_chosen(cohort, tmp_path, capsys):
    src = _written(cohort, tmp_path / "lumiere", "lumiere-hd-glio-auto", None)
    for patient in src.glob("Patient-*"):
        shutil.copytree(patient / "week-000-1", patient / "week-044")
    first = import_layout(PRESETS["lumiere-hd-glio-auto"], src, tmp_path / "raw")
    assert all(notes[0] == "pre-RT time point: week-000-1" for notes in first.notes.values())
    chosen = import_layout(PRESETS["lumiere-hd-glio-auto"], src, tmp_path / "raw44", timepoint="week-044")
    assert all(notes[0] == "pre-RT time point: week-044" for notes in chosen.notes.values())
    shutil.rmtree(src / "Patient-002" / "week-044")
    code, output = _run(capsys, "import-layout", "lumiere-hd-glio-auto", str(src), "--out", str(tmp_path / "r"),
                        "--timepoint", "week-044")  # fmt: skip
    assert code == 1 and "patient Patient-002: no time point week-044" in output and "week-000-1" in output
