"""The Ray Data pipeline over phantom cohorts: outputs, schemas, reruns, failures and a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from ctvlab.config import FEATURES, PreprocessConfig
from ctvlab.data.layout import CATEGORY_CODES, MASKS, PrepPaths, voxel_table_schema
from ctvlab.data.prepared_schemas import dataset_json_schema, patients_table_schema, sidecar_json_schema
from ctvlab.data.readers import load_dataset_meta, load_patient, read_patients, read_volumes, read_voxels
from ctvlab.errors import DataError
from ctvlab.preprocess.ray_pipeline import preprocess_cohort, print_preprocess_report

pytestmark = pytest.mark.ray

IDS = ["P000", "P001", "P002", "P003"]
CFG = PreprocessConfig()


@pytest.fixture(scope="module")
def prepared(ray_local, _phantom_cohort_master, tmp_path_factory):
    """The 4-patient phantom cohort prepared once through the pipeline: (raw, prep, report)."""
    base = tmp_path_factory.mktemp("prepared")
    raw = base / "cohort"
    shutil.copytree(_phantom_cohort_master, raw)
    report = preprocess_cohort(raw, base / "prep", CFG, progress=False)
    return raw, base / "prep", report


def test_every_valid_patient_is_processed(prepared):
    _, prep, report = prepared
    assert report.ok and report.processed == IDS and not report.failed and not report.invalid
    assert read_patients(prep)["patient_id"].tolist() == IDS
    assert [p["patient_id"] for p in load_dataset_meta(prep)["patients"]] == IDS


@pytest.mark.parametrize("patient_id", IDS)
def test_parquet_rows_equal_the_volume_voxels_inside_the_ring(prepared, patient_id):
    _, prep, _ = prepared
    p = load_patient(prep, patient_id)
    table = pq.read_table(PrepPaths(prep).voxel_partition(patient_id))
    ring = np.flatnonzero(p.mask("ring").ravel())
    assert table.num_rows == ring.size
    order = np.argsort(table["voxel_index"].to_numpy())
    np.testing.assert_array_equal(table["voxel_index"].to_numpy()[order], ring)
    for c, name in enumerate(FEATURES):
        expected = p.features[c].ravel()[ring]
        column = table[name].combine_chunks()
        got = column.to_numpy(zero_copy_only=False)[order]
        null = np.asarray(column.is_null())[order]
        np.testing.assert_array_equal(null, np.isnan(expected), err_msg=name)
        np.testing.assert_array_equal(got[~null], expected[~null], err_msg=name)
    names = np.array(table["category"].to_pylist())[order]
    np.testing.assert_array_equal(names, [CATEGORY_CODES[k] for k in p.mask("category").ravel()[ring]])
    cohort = read_patients(prep).set_index("patient_id").cohort[patient_id]
    assert set(table["cohort"].to_pylist()) == {cohort}
    # MRSI nulls exactly where the "mrsi" mask is 0
    np.testing.assert_array_equal(
        np.asarray(table["nCho"].is_null())[order], p.mask("mrsi").ravel()[ring] == 0
    )


def test_summary_counts_match_the_masks(prepared):
    _, prep, _ = prepared
    df = read_patients(prep).set_index("patient_id")
    for pid in IDS:
        p = load_patient(prep, pid)
        row = df.loc[pid]
        brain = int(p.mask("brain").sum())
        lesion = int((p.mask("t2l") | p.mask("cel")).sum())
        ring = p.mask("ring").astype(bool)
        assert (row.brain_voxels, row.lesion_voxels, row.ring_voxels) == (brain, lesion, int(ring.sum()))
        assert row.lesion_volume_cm3 == pytest.approx(lesion * 27 / 1000)
        assert row.target_fraction == pytest.approx(p.mask("target").sum() / brain)
        cats = p.mask("category")
        assert row.n_NEL_CEL == int((cats == 4).sum()) and row.n_NAV_NAV == int((cats == 1).sum())
        assert row.mrsi_coverage == pytest.approx(p.mask("mrsi")[ring].mean())


def test_outputs_satisfy_their_schemas(prepared):
    _, prep, _ = prepared
    paths = PrepPaths(prep)
    jsonschema.validate(json.loads(paths.dataset_json.read_text()), dataset_json_schema())
    for pid in IDS:
        jsonschema.validate(json.loads(paths.sidecar(pid).read_text()), sidecar_json_schema())
        voxel_schema = pq.read_schema(paths.voxel_partition(pid) / "part-0.parquet").remove_metadata()
        assert voxel_schema.equals(voxel_table_schema(), check_metadata=False)
    assert pq.read_schema(paths.patients).remove_metadata().equals(patients_table_schema())


def test_read_volumes_streams_the_requested_patients(prepared):
    _, prep, _ = prepared
    rows = {r["patient_id"]: r for r in read_volumes(prep, ["P002", "P000"]).iter_rows()}
    assert sorted(rows) == ["P000", "P002"]
    for pid, row in rows.items():
        p = load_patient(prep, pid)
        assert row["features"].dtype == np.float32 and row["masks"].dtype == np.uint8
        assert row["features"].shape == (len(FEATURES), *p.sidecar["shape"])
        assert row["masks"].shape == (len(MASKS), *p.sidecar["shape"])
        np.testing.assert_array_equal(row["features"], p.features)
        np.testing.assert_array_equal(row["masks"], p.masks)
    with pytest.raises(DataError, match="P999"):
        read_volumes(prep, ["P000", "P999"])


@pytest.mark.slow  # Ray Data's parquet listing alone takes tens of seconds on a loaded 2-core machine
def test_read_voxels_gives_the_ring_rows_of_the_chosen_patients(prepared):
    _, prep, _ = prepared
    df = read_voxels(prep, ["P001", "P003"], columns=["voxel_index", "nFLAIR", "category"]).to_pandas()
    counts = df.groupby("patient_id").size().to_dict()
    assert counts == {pid: int(load_patient(prep, pid).mask("ring").sum()) for pid in ("P001", "P003")}
    assert set(df.columns) == {"patient_id", "voxel_index", "nFLAIR", "category"}


def test_rerun_skips_unchanged_patients_and_redoes_a_changed_one(prepared, tmp_path):
    raw0, prep0, report0 = prepared
    raw, prep = tmp_path / "cohort", tmp_path / "prep"
    shutil.copytree(raw0, raw)
    shutil.copytree(prep0, prep)
    same = preprocess_cohort(raw, prep, CFG, progress=False)
    assert same.processed == [] and same.skipped_unchanged == IDS
    assert same.digest == report0.digest  # content-based: unchanged by a rerun or a move

    flair = raw / "P001" / "flair.nii.gz"
    img = nib.load(flair)
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32) * 1.5, img.affine), flair)
    changed = preprocess_cohort(raw, prep, CFG, progress=False)
    assert changed.processed == ["P001"] and changed.skipped_unchanged == ["P000", "P002", "P003"]
    assert changed.digest != report0.digest
    assert load_patient(prep, "P001").sidecar["nav_modes"]["nFLAIR"] == pytest.approx(450.0, rel=1e-3)

    other = preprocess_cohort(raw, prep, CFG.model_copy(update={"ring_mm": 30.0}), progress=False)
    assert other.processed == IDS  # new settings: everything redone


def test_a_corrupt_and_a_failing_patient_leave_the_others(phantom_cohort, tmp_path, ray_local):
    # P001: truncated T1c (caught by validation). P002: a one-voxel T2L that vanishes on the 3 mm grid
    # (passes validation, fails in preprocessing).
    t1c = phantom_cohort / "P001" / "t1c.nii.gz"
    t1c.write_bytes(t1c.read_bytes()[:2000])
    t2l_path = phantom_cohort / "P002" / "t2l_mask.nii.gz"
    img = nib.load(t2l_path)
    one = np.zeros(img.shape, dtype=np.uint8)
    one[30, 28, 24] = 1
    nib.save(nib.Nifti1Image(one, img.affine), t2l_path)

    prep = tmp_path / "prep"
    report = preprocess_cohort(phantom_cohort, prep, CFG, progress=False)
    assert not report.ok
    assert report.processed == ["P000", "P003"]
    assert [p.patient_id for p in report.invalid] == ["P001"]
    assert "truncated" in " ".join(report.invalid[0].problems)
    assert [f.patient_id for f in report.failed] == ["P002"]
    assert "T2L" in report.failed[0].reason and "P002" in report.failed[0].reason
    assert read_patients(prep)["patient_id"].tolist() == ["P000", "P003"]
    leftovers = {p.name for p in (prep / "volumes").iterdir()} | {p.name for p in (prep / "voxels").iterdir()}
    assert not any("P001" in n or "P002" in n for n in leftovers)

    from rich.console import Console

    console = Console(record=True, width=200)
    print_preprocess_report(report, console)
    text = console.export_text()
    assert "P002" in text and "1 failed" in text and "1 invalid" in text and "0 errors" in text


def _all_complete_files_load(prep: Path) -> int:
    n = 0
    for f in prep.rglob("*"):
        if not f.is_file() or any(part.startswith(".tmp-") for part in f.relative_to(prep).parts):
            continue
        if f.suffix == ".npy":
            np.load(f)
        elif f.suffix == ".parquet":
            pq.read_table(f)
        elif f.suffix == ".json":
            json.loads(f.read_text())
        n += 1
    return n


KILLED_RUN = """
import sys
from pathlib import Path
from ctvlab.config import PreprocessConfig
from ctvlab.preprocess.ray_pipeline import preprocess_cohort
cfg = PreprocessConfig(max_concurrent_patients=1)
preprocess_cohort(Path(sys.argv[1]), Path(sys.argv[2]), cfg, address=sys.argv[3], progress=False)
"""


@pytest.mark.slow
def test_a_killed_run_leaves_complete_files_and_resumes(prepared, phantom_cohort, tmp_path):
    import ray

    _, _, reference = prepared
    prep = tmp_path / "prep"
    address = ray.get_runtime_context().gcs_address
    # The run joins this session's Ray, so that killing its driver also ends its tasks (Ray reaps the
    # workers of a dead job); one patient at a time makes "part-way" well defined.
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(phantom_cohort), str(prep), address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    deadline = time.monotonic() + 120
    try:
        while not list((prep / "volumes").glob("*.json")):
            assert proc.poll() is None, "the run ended before writing any patient"
            assert time.monotonic() < deadline, "no patient finished within 120 s"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.stem for p in (prep / "volumes").glob("*.json")}
    assert 1 <= len(finished) < len(IDS)
    assert _all_complete_files_load(prep) >= 4

    report = preprocess_cohort(phantom_cohort, prep, CFG, progress=False)
    assert report.ok
    assert finished <= set(report.skipped_unchanged)
    assert sorted(report.processed + report.skipped_unchanged) == IDS
    assert report.digest == reference.digest  # the same dataset as an uninterrupted run
    assert not list(prep.rglob(".tmp-*"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _header_only(raw: Path) -> Path:
    header = (raw / "manifest.csv").read_text().splitlines()[0]
    empty = raw.parent / "empty_cohort"
    empty.mkdir()
    (empty / "manifest.csv").write_text(header + "\n")
    return empty


@pytest.mark.parametrize(
    ("make_raw", "message"),
    [
        (lambda raw: raw.parent / "no_such_folder", "not found"),
        (_header_only, "lists no patient"),
    ],
    ids=["missing-raw-folder", "header-only-manifest"],
)
def test_a_cohort_level_problem_leaves_the_prepared_folder_byte_for_byte(
    prepared, tmp_path, make_raw, message
):
    raw0, prep0, _ = prepared
    raw, prep = tmp_path / "cohort", tmp_path / "prep"
    shutil.copytree(raw0, raw)
    shutil.copytree(prep0, prep)
    before = _snapshot(prep)
    assert sum(name.endswith(".npy") for name in before) == 2 * len(IDS)
    with pytest.raises(DataError, match=message) as err:
        preprocess_cohort(make_raw(raw), prep, CFG, progress=False, prune=True)
    assert err.value.exit_code == 2 and "nothing in" in str(err.value)
    assert _snapshot(prep) == before


def test_the_command_exits_2_on_a_missing_raw_folder_and_keeps_the_data(prepared, tmp_path):
    _, prep0, _ = prepared
    prep = tmp_path / "prep"
    shutil.copytree(prep0, prep)
    before = _snapshot(prep)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctvlab.cli",
            "preprocess",
            "--raw",
            str(tmp_path / "typo"),
            "--out",
            str(prep),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "typo" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(prep) == before


def test_old_outputs_of_invalid_and_removed_patients_stay_stale_until_pruned(prepared, tmp_path):
    raw0, prep0, _ = prepared
    raw, prep = tmp_path / "cohort", tmp_path / "prep"
    shutil.copytree(raw0, raw)
    shutil.copytree(prep0, prep)
    before = _snapshot(prep)
    # P001 becomes invalid (a truncated T1c); P003 leaves the manifest.
    t1c = raw / "P001" / "t1c.nii.gz"
    t1c.write_bytes(t1c.read_bytes()[:2000])
    lines = (raw / "manifest.csv").read_text().splitlines(keepends=True)
    (raw / "manifest.csv").write_text("".join(line for line in lines if not line.startswith("P003")))

    kept = preprocess_cohort(raw, prep, CFG, progress=False, engine="serial")
    assert kept.stale == ["P001", "P003"] and kept.pruned == [] and kept.exit_code() == 1
    assert kept.skipped_unchanged == ["P000", "P002"]
    after = _snapshot(prep)
    for name, data in before.items():
        if "P001" in name or "P003" in name:
            assert after[name] == data, name  # kept byte for byte
    assert "invalid" in json.loads((prep / "stale" / "P001.json").read_text())["reason"]
    assert "not in the manifest" in json.loads((prep / "stale" / "P003.json").read_text())["reason"]
    # ...but no longer part of the dataset
    assert read_patients(prep)["patient_id"].tolist() == ["P000", "P002"]
    assert [p["patient_id"] for p in load_dataset_meta(prep)["patients"]] == ["P000", "P002"]

    pruned = preprocess_cohort(raw, prep, CFG, progress=False, engine="serial", prune=True)
    assert pruned.pruned == ["P001", "P003"] and pruned.stale == []
    left = _snapshot(prep)
    assert not any("P001" in name or "P003" in name for name in left)
    assert all(left[n] == before[n] for n in left if "P000" in n or "P002" in n)


def test_an_infrastructure_error_fails_the_stage_and_keeps_every_output(prepared, tmp_path, monkeypatch):
    import errno

    import ctvlab.preprocess.prepare as patient_module

    raw0, prep0, _ = prepared
    raw, prep = tmp_path / "cohort", tmp_path / "prep"
    shutil.copytree(raw0, raw)
    shutil.copytree(prep0, prep)
    before = _snapshot(prep)
    # P002's input changes, so its task prepares it again and hits a full disk on its first write.
    flair = raw / "P002" / "flair.nii.gz"
    img = nib.load(flair)
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32) * 1.5, img.affine), flair)
    real_save = patient_module.save_npy_atomic

    def disk_full_for_p002(path, array):
        if Path(path).name.startswith("P002"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array)

    monkeypatch.setattr(patient_module, "save_npy_atomic", disk_full_for_p002)
    report = preprocess_cohort(raw, prep, CFG, progress=False, engine="serial", prune=True)

    assert [e.patient_id for e in report.errors] == ["P002"] and "the disk is full" in report.errors[0].reason
    assert report.failed == [] and report.invalid == []  # not a data problem
    assert report.skipped_unchanged == ["P000", "P001", "P003"]
    assert report.exit_code() == 4 and report.digest is None and report.pruned == []
    after = _snapshot(prep)
    assert not (prep / "dataset.json").exists()  # the stage failed: no stage may use the dataset
    for name, data in before.items():
        if name in ("dataset.json", "preprocess_report.json", "volumes/P002.json"):
            continue  # P002's sidecar goes first by design, so that its half-rewritten state is never current
        assert after[name] == data, name
    assert not (prep / "stale").exists()

    monkeypatch.setattr(patient_module, "save_npy_atomic", real_save)
    again = preprocess_cohort(raw, prep, CFG, progress=False, engine="serial")
    assert again.ok and again.processed == ["P002"] and again.digest is not None


def test_a_volume_changed_after_preprocessing_is_refused_on_load(prepared_phantom, tmp_path):
    """A prepared volume edited (or corrupted) after preprocessing no longer has the sha256 its sidecar
    recorded: the first load names the patient and the file instead of training on it."""
    pid = sorted(p.stem for p in (prepared_phantom / "volumes").glob("*.json"))[0]
    src, dst = PrepPaths(prepared_phantom), PrepPaths(tmp_path)
    dst.features(pid).parent.mkdir(parents=True)
    for f in (src.features(pid), src.masks(pid), src.sidecar(pid)):
        shutil.copy(f, dst.features(pid).parent / f.name)
    assert load_patient(tmp_path, pid).features.shape[0] == 13  # as written: accepted

    features = np.load(dst.features(pid))
    features[0, 0, 0, 0] += 1.0
    np.save(dst.features(pid), features)
    with pytest.raises(
        DataError, match=f"patient {pid}: prepared file .*{pid}.npy changed since preprocessing"
    ):
        load_patient(tmp_path, pid)


def test_a_full_disk_is_called_a_full_disk_with_the_folder_and_the_space_still_needed(
    phantom_cohort, tmp_path, monkeypatch
):
    """The disk fills while P002 is written (numpy's short write, which carries no errno): the stage says
    that the disk is full, names the folder, and estimates what the dataset still needs from the patients
    written so far; a rerun with space finishes the dataset."""
    from rich.console import Console

    import ctvlab.preprocess.prepare as patient_module

    prep = tmp_path / "prep"
    real_save = patient_module.save_npy_atomic

    def disk_full_from_p002(path, array):
        if Path(path).name[:4] in ("P002", "P003"):
            raise OSError(f"{array.nbytes} requested and {array.nbytes // 3} written")
        real_save(path, array)

    monkeypatch.setattr(patient_module, "save_npy_atomic", disk_full_from_p002)
    report = preprocess_cohort(phantom_cohort, prep, CFG, progress=False, engine="serial")

    assert report.exit_code() == 4 and [e.patient_id for e in report.errors] == ["P002", "P003"]
    assert all("the disk is full" in e.reason and "requested" not in e.reason for e in report.errors)
    from ctvlab.errors import space_needed

    written = sum(f.stat().st_size for f in prep.rglob("*")
                  if f.is_file() and ("P000" in str(f.relative_to(prep)) or "P001" in str(f.relative_to(prep))))  # fmt: skip
    needs = space_needed("the prepared dataset", written, 2, 2)
    assert (
        needs.startswith("the prepared dataset still needs about ") and "from the 2 written, 2 left" in needs
    )
    message = report.storage_error
    assert message.startswith(f"cannot write to {prep}: the disk is full; {needs}. Free space there")
    console = Console(record=True, width=400)
    print_preprocess_report(report, console)
    assert message in console.export_text()

    monkeypatch.setattr(patient_module, "save_npy_atomic", real_save)
    again = preprocess_cohort(phantom_cohort, prep, CFG, progress=False, engine="serial")
    assert again.ok and again.processed == ["P002", "P003"] and again.storage_error is None


def _grid_voxels(raw: Path, voxel_mm: float) -> float:
    from ctvlab.ingest.safety import output_grid_voxels

    t1c = nib.load(raw / IDS[0] / "t1c.nii.gz")
    return output_grid_voxels(t1c.affine, t1c.shape, voxel_mm)


def test_preprocessing_validates_with_the_configured_limits_and_voxel_size(phantom_cohort, tmp_path):
    """The limits a user set (`cohort.limits`) and the grid they asked for are the ones preprocessing checks
    against: a cap below the 3 mm grid refuses every patient, and the same cap above it admits them."""
    from ctvlab.config import InputLimits
    from ctvlab.ingest.validate import validate_cohort

    n3 = _grid_voxels(phantom_cohort, 3.0)
    tight = InputLimits(max_output_voxels=int(n3) - 1)
    with pytest.raises(DataError, match=r"no valid patient|over the"):
        preprocess_cohort(phantom_cohort, tmp_path / "prep", CFG, progress=False, limits=tight)
    assert not (tmp_path / "prep" / "dataset.json").exists()
    roomy = InputLimits(max_output_voxels=int(n3) + 1)
    assert validate_cohort(phantom_cohort, progress=False, limits=roomy, voxel_mm=3.0).ok
    finer = validate_cohort(phantom_cohort, progress=False, limits=roomy, voxel_mm=1.5)  # 8× the voxels
    assert not finer.valid_ids()
    assert "1.5 mm grid" in finer.patients[0].problems[0].message


def test_a_validation_just_made_is_used_as_is(phantom_cohort, tmp_path, monkeypatch):
    """`ctvlab run` validates once and passes the report on: preprocessing reads no file to validate again."""
    import ctvlab.ingest.validate as validate_module

    report = validate_module.validate_cohort(phantom_cohort, progress=False)

    def again(*args, **kwargs):
        raise AssertionError("validated twice")

    monkeypatch.setattr(validate_module, "validate_cohort", again)
    out = preprocess_cohort(phantom_cohort, tmp_path / "prep", CFG, progress=False, validation=report)
    assert out.ok and out.processed == IDS
