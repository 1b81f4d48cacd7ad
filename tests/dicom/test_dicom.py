"""DICOM in and RT out, checked against tools that are not ctvlab's: dcm2niix reads the series ctvlab writes,
dicom3tools' `dciodvfy` validates the RTSTRUCT, and the contours are filled back by Pillow's polygon
rasteriser (not ctvlab's) and compared with the masks they came from."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from ctvlab.cli import app, main
from ctvlab.dicom.geometry import series_affine
from ctvlab.dicom.importer import convert_series, index_dicom
from ctvlab.dicom.rtstruct import write_rtstruct
from ctvlab.dicom.series import SeriesIds, stored_values, write_series
from ctvlab.ingest.validate import validate_cohort
from tests.phantoms import PhantomSpec, write_phantom_patient

REPO = Path(__file__).resolve().parents[2]


def oblique_affine(spacing=(0.9, 1.6, 2.5), degrees=(12.0, -7.0, 20.0), origin=(-60.0, -75.0, -40.0)):
    """A rotated, anisotropic RAS affine (square pixels would hide a swapped row/column spacing)."""
    from scipy.spatial.transform import Rotation

    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def ellipsoid(shape, centre, semi) -> np.ndarray:
    idx = np.indices(shape).astype(float)
    return sum(((idx[d] - centre[d]) / semi[d]) ** 2 for d in range(3)) <= 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _series_and_structures(rtstruct: Path, series_dir: Path):
    """(the series' RAS affine, its (column, row, slice) shape, the affine's inverse, the RTSTRUCT dataset,
    ROI number → name), read with pydicom alone."""
    slices = [pydicom.dcmread(p) for p in sorted(series_dir.iterdir())]
    ras, ordered = series_affine(slices)
    shape = (int(ordered[0].Columns), int(ordered[0].Rows), len(ordered))
    ds = pydicom.dcmread(rtstruct)
    return (
        ras,
        shape,
        np.linalg.inv(ras),
        ds,
        {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence},
    )


def pillow_read(rtstruct: Path, series_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
    """An independent reader: each ROI's contours (LPS) to voxel indices of the series read with pydicom,
    filled by Pillow per slice (outline included, inner contours as holes). Returns the masks on the series
    grid (column, row, slice), the series' RAS affine and the raw LPS points of every contour."""
    ras, shape, inv, ds, names = _series_and_structures(rtstruct, series_dir)
    masks, points = {}, []
    for roi in ds.ROIContourSequence:
        interior = np.zeros(shape, bool)
        outline = np.zeros(shape, bool)
        for contour in getattr(roi, "ContourSequence", []):
            lps = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            points.append(lps)
            ras_pts = lps * np.array([-1.0, -1.0, 1.0])  # DICOM patient (LPS) to NIfTI world (RAS)
            ijk = (np.c_[ras_pts, np.ones(len(lps))] @ inv.T)[:, :3]
            k = int(np.rint(ijk[:, 2]).mean())
            assert np.allclose(ijk[:, 2], k, atol=1e-3), "a contour off its slice"
            xy = [(round(float(i), 3), round(float(j), 3)) for i, j in ijk[:, :2]]  # Pillow truncates floats
            fill, line = Image.new("1", shape[:2]), Image.new("1", shape[:2])  # (width, height) = (i, j)
            if len(xy) >= 3:
                ImageDraw.Draw(fill).polygon(xy, fill=1)
            ImageDraw.Draw(line).line(xy + xy[:1], fill=1) if len(xy) > 1 else ImageDraw.Draw(line).point(
                xy, 1
            )
            interior[:, :, k] ^= np.asarray(fill).T
            outline[:, :, k] |= np.asarray(line).T
        masks[names[int(roi.ReferencedROINumber)]] = interior | outline
    return masks, ras, points


def crossings_inside(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon by counting edge crossings of a ray towards +x, in plain NumPy (no
    matplotlib, Pillow or ctvlab): for each edge that straddles a point's y (half-open, so a vertex counts
    once), does it cross to the right of the point?"""
    x, y = points[:, 0:1], points[:, 1:2]
    a, b = polygon, np.roll(polygon, -1, axis=0)
    straddles = (a[None, :, 1] > y) != (b[None, :, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross_x = a[None, :, 0] + (y - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / (
            b[None, :, 1] - a[None, :, 1]
        )
    return (straddles & (x < cross_x)).sum(axis=1) % 2 == 1


def centre_inside_read(rtstruct: Path, series_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """An independent reader that counts a voxel when its centre lies inside the contours of its slice
    (even-odd), as planning systems rasterise. Returns the masks on the series grid (column, row, slice)
    and each ROI's contours as voxel indices (i, j, k)."""
    _, shape, inv, ds, names = _series_and_structures(rtstruct, series_dir)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.c_[ii.ravel(), jj.ravel()].astype(float)
    masks, contours = {}, {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape, bool)
        name = names[int(roi.ReferencedROINumber)]
        contours[name] = []
        for contour in getattr(roi, "ContourSequence", []):
            lps = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            ijk = (np.c_[lps * np.array([-1.0, -1.0, 1.0]), np.ones(len(lps))] @ inv.T)[:, :3]
            contours[name].append(ijk)
            k = int(np.rint(ijk[:, 2]).mean())
            assert np.allclose(ijk[:, 2], k, atol=1e-3), "a contour off its slice"
            mask[:, :, k] ^= crossings_inside(ijk[:, :2], centres).reshape(shape[:2])
        masks[name] = mask
    return masks, contours


def ctvlab(capsys, *args: str) -> tuple[int, str]:
    """The console script in-process: its exit code and everything it printed (one line)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    printed = capsys.readouterr()
    return exit_.value.code, " ".join((printed.out + printed.err).split())


def validator_errors(dciodvfy: str, path: Path) -> list[str]:
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_series_geometry_and_values_survive_dcm2niix(tmp_path):
    affine = oblique_affine()
    rng = np.random.default_rng(0)
    images = {
        "int": nib.Nifti1Image(rng.integers(-200, 3000, (40, 36, 22)).astype(np.int16), affine),
        "adc": nib.Nifti1Image((rng.random((40, 36, 22)) * 3e-3).astype(np.float32), affine),
    }
    ids = SeriesIds("P1", generate_uid(), generate_uid())
    for n, (name, img) in enumerate(images.items()):
        files = write_series(img, tmp_path / "dcm" / name, ids, name, n + 1)
        ras, _ = series_affine([pydicom.dcmread(f) for f in files])
        assert np.allclose(ras, affine, atol=1e-4)
    series = {s.description: s for s in index_dicom(tmp_path / "dcm")["P1"].series.values()}
    for name, img in images.items():
        convert_series(series[name], tmp_path / f"{name}.nii.gz")  # dcm2niix
        back = nib.load(tmp_path / f"{name}.nii.gz")
        world = nib.affines.apply_affine(back.affine, np.indices(back.shape).reshape(3, -1).T)
        want = nib.affines.apply_affine(img.affine, np.indices(img.shape).reshape(3, -1).T)
        assert back.shape == img.shape and np.abs(world - want).max() < 0.01  # mm
        expected = stored_values(np.asarray(img.dataobj))
        assert np.allclose(back.get_fdata(), expected, rtol=1e-6, atol=0)
        if name == "int":
            assert np.array_equal(back.get_fdata(), np.asarray(img.dataobj, dtype=float))


def test_rtstruct_is_valid_and_its_contours_fill_back_to_the_masks(tmp_path, dciodvfy):
    affine = oblique_affine()
    shape = (64, 48, 30)
    ct = nib.Nifti1Image(np.zeros(shape, np.int16), affine)
    write_series(ct, tmp_path / "plan", SeriesIds("P1", generate_uid(), generate_uid()), "T1C", 1)
    big = ellipsoid(shape, (30, 24, 15), (22, 14, 9))
    shell = big & ~ellipsoid(shape, (30, 24, 15), (12, 8, 5))  # a hole in the middle slices
    masks = {"CTV_model": shell, "CTV_RTOG": big, "CTV_EORTC": np.zeros(shape, bool)}
    ref = write_rtstruct(tmp_path / "plan", masks, affine, tmp_path / "rt.dcm")

    assert validator_errors(dciodvfy, tmp_path / "rt.dcm") == []
    rs = pydicom.dcmread(tmp_path / "rt.dcm")
    assert rs.FrameOfReferenceUID == ref["frame_of_reference_uid"]
    assert [r.ROIName for r in rs.StructureSetROISequence] == list(masks)
    # Read as a planning system does (a voxel is in when its centre is inside): the masks, exactly.
    read, contours = centre_inside_read(tmp_path / "rt.dcm", tmp_path / "plan")
    for name, mask in masks.items():
        assert np.array_equal(read[name], mask), name
    # LPS, not RAS: each contour point, with x and y negated, lies half-way between a voxel of the masks
    # and one outside them (the half-voxel iso-line); RAS read as LPS would land elsewhere.
    for name, ijk in ((n, c) for n, cs in contours.items() for c in cs):
        frac = np.abs(ijk[:, :2] - np.floor(ijk[:, :2]) - 0.5) < 1e-3  # which coordinate is half-way
        assert (frac.sum(axis=1) == 1).all()
        lo = np.rint(ijk).astype(int)
        lo[:, :2] = np.where(frac, np.floor(ijk[:, :2]), np.rint(ijk[:, :2]))
        hi = lo.copy()
        hi[:, :2] += frac
        assert (masks[name][tuple(lo.T)] != masks[name][tuple(hi.T)]).all()


def test_rtstruct_refuses_a_series_that_does_not_cover_the_ctv(tmp_path):
    affine = oblique_affine()
    far = affine.copy()
    far[:3, 3] += 200.0
    write_series(nib.Nifti1Image(np.zeros((20, 20, 10), np.int16), far), tmp_path / "plan",
                 SeriesIds("P1", generate_uid(), generate_uid()), "T1C", 1)  # fmt: skip
    from ctvlab.errors import DataError

    with pytest.raises(DataError, match="does not cover the CTV"):
        write_rtstruct(tmp_path / "plan", {"CTV_model": ellipsoid((40, 36, 22), (20, 18, 11), (8, 8, 5))},
                       affine, tmp_path / "rt.dcm")  # fmt: skip
    assert not list(tmp_path.glob("*rt.dcm"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two phantom patients (in-plane pixels 1.5 x 2 mm) exported to DICOM with `ctvlab export-dicom`."""
    root = tmp_path_factory.mktemp("dicom")
    spec = PhantomSpec(anat_spacing=(1.5, 2.0, 2.5), anat_shape=(60, 56, 38), mrsi=False)
    rows = [write_phantom_patient(root / "cohort", pid, dataclasses.replace(spec, seed=n))
            for n, pid in enumerate(("P1", "P2"))]  # fmt: skip
    with open(root / "cohort" / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].model_dump()))
        w.writeheader()
        w.writerows(r.model_dump(mode="json") for r in rows)
    result = CliRunner().invoke(app, ["export-dicom", str(root / "cohort"), "--out", str(root / "dicom")])
    assert result.exit_code == 0, result.output
    return root


def test_import_dicom_round_trip(exported, tmp_path):
    out = tmp_path / "imported"
    result = CliRunner().invoke(app, [
        "import-dicom", str(exported / "dicom"), "--out", str(out), "--series", str(REPO / "jobs/series.yaml"),
        "--clinical", str(exported / "dicom" / "clinical.csv"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert validate_cohort(out, progress=False, purpose="predict").ok
    with open(out / "manifest.csv", newline="") as f:
        rows = {r["patient_id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["P1", "P2"] and rows["P1"]["cohort"] == "SOC"
    for pid in rows:
        for column in ("t1c", "t1", "flair", "adc", "fa"):
            src, back = (
                nib.load(exported / "cohort" / pid / f"{column}.nii.gz"),
                nib.load(out / rows[pid][column]),
            )
            vox = np.indices(src.shape).reshape(3, -1).T
            assert back.shape == src.shape
            assert np.abs(nib.affines.apply_affine(back.affine, vox)
                          - nib.affines.apply_affine(src.affine, vox)).max() < 0.01  # fmt: skip
            assert np.allclose(back.get_fdata(), stored_values(np.asarray(src.dataobj)), rtol=1e-6, atol=1e-9)
        for column in (
            "brain_mask",
            "cel_mask",
            "t2l_mask",
            "cavity_mask",
            "ventricles_mask",
            "critical_mask",
        ):
            src = np.asarray(nib.load(exported / "cohort" / pid / f"{column}.nii.gz").dataobj) > 0
            back = np.asarray(nib.load(out / rows[pid][column]).dataobj) > 0
            assert dice(src, back) >= 0.95 if src.any() else not back.any(), (pid, column)


def test_import_dicom_errors_name_the_patient_and_write_nothing(exported, tmp_path, capsys):
    bad_map = tmp_path / "series.yaml"
    bad_map.write_text("series:\n  t1c: ['T1C']\n  flair: ['no such series']\n")
    out = tmp_path / "imported"
    code, text = ctvlab(
        capsys, "import-dicom", str(exported / "dicom"), "--out", str(out), "--series", str(bad_map)
    )
    assert code == 2 and "patient P1: flair: no series matches" in text and "Traceback" not in text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    series_map = str(REPO / "jobs/series.yaml")
    code, text = ctvlab(
        capsys, "import-dicom", str(exported / "dicom"), "--out", str(out), "--series", series_map
    )
    assert code == 2 and "exists" in text
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    bad_map.write_text("series:\n  t1: ['T1']\n")
    code, text = ctvlab(capsys, "import-dicom", str(exported / "dicom"), "--out", str(tmp_path / "x"),
                        "--series", str(bad_map))  # fmt: skip
    assert code == 2 and "t1c is required" in text


def test_the_probability_map_as_a_valid_parametric_map_on_the_planning_series(tmp_path, dciodvfy):
    """The map on the series' own grid: each frame is its slice of the NIfTI array (column, row swapped),
    float, with its real-world value mapping (no units, 0–1); the object passes dciodvfy and names the
    series' frame of reference. A series of another patient is refused before anything is written."""
    from ctvlab.dicom.identity import Identity
    from ctvlab.dicom.parametric import write_parametric_map
    from ctvlab.errors import DataError

    affine = oblique_affine()
    shape = (32, 24, 12)
    write_series(nib.Nifti1Image(np.zeros(shape, np.int16), affine), tmp_path / "plan",
                 SeriesIds("P1", generate_uid(), generate_uid()), "T1C", 1)  # fmt: skip
    prob = np.random.default_rng(0).random(shape).astype(np.float32)
    ref = write_parametric_map(tmp_path / "plan", prob, affine, tmp_path / "pm.dcm")
    assert validator_errors(dciodvfy, tmp_path / "pm.dcm") == []
    pm = pydicom.dcmread(tmp_path / "pm.dcm")
    assert (
        pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
        and pm.FrameOfReferenceUID == ref["frame_of_reference_uid"]
    )
    assert pm.PatientID == "P1" and int(pm.NumberOfFrames) == shape[2]
    ras, _ = series_affine([pydicom.dcmread(p) for p in (tmp_path / "plan").iterdir()])
    assert np.allclose(ras, affine, atol=1e-3)  # the exported series is on the NIfTI grid: no resampling
    inv = np.linalg.inv(affine)
    for frame, group in zip(pm.pixel_array, pm.PerFrameFunctionalGroupsSequence, strict=True):
        lps = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        k = round(float((inv @ [-lps[0], -lps[1], lps[2], 1.0])[2]))  # the frame's slice on the NIfTI grid
        np.testing.assert_allclose(frame, prob[:, :, k].T, atol=1e-6)  # (row, column) = (j, i)
    groups = pm.SharedFunctionalGroupsSequence[0]
    mapping = groups.RealWorldValueMappingSequence[0]
    assert (
        mapping.DoubleFloatRealWorldValueFirstValueMapped == 0.0
        and mapping.DoubleFloatRealWorldValueLastValueMapped == 1.0
    )
    assert mapping.MeasurementUnitsCodeSequence[0].CodeMeaning == "no units"
    with pytest.raises(DataError):
        write_parametric_map(tmp_path / "plan", prob, affine, tmp_path / "other.dcm",
                             expect=Identity("P2", source="the manifest"), patient="P2")  # fmt: skip
    assert not (tmp_path / "other.dcm").exists()
