"""RTSTRUCT contours both ways: what ctvlab writes reads back as the mask under a planning system's
centre-inside rule (checked by a reader that is not ctvlab's), what other exporters write through voxel
centres (rt-utils, OpenCV) reads back with its one-voxel-wide parts (checked against Pillow), and the
structure set names whose it is and what drew it."""

from __future__ import annotations

import contextlib
import io

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ctvlab.dicom.geometry import series_affine
from ctvlab.dicom.rtstruct import rasterise, read_rois, write_rtstruct
from ctvlab.dicom.series import SeriesIds, write_series
from ctvlab.errors import DataError
from tests.dicom.test_dicom import (
    centre_inside_read,
    ellipsoid,
    oblique_affine,
    pillow_read,
    validator_errors,
)

SHAPE = (40, 32, 8)


def thin_mask() -> np.ndarray:
    """One-voxel-wide lines (straight, diagonal, a ring, an isolated voxel) beside a blob: 'thin' ROIs."""
    m = np.zeros(SHAPE, bool)
    m[5:30, 4, 1] = True  # a line along i
    m[3, 6:28, 2] = True  # a line along j
    for n in range(15):
        m[8 + n, 8 + n, 3] = True  # a diagonal line (8-connected only)
    m[20, 20, 4] = True  # one voxel
    ring = ellipsoid((*SHAPE[:2], 1), (20, 16, 0), (9, 7, 1))[:, :, 0]
    m[:, :, 5] = ring & ~ellipsoid((*SHAPE[:2], 1), (20, 16, 0), (8, 6, 1))[:, :, 0]
    m[:, :, 6] = ellipsoid((*SHAPE[:2], 1), (14, 14, 0), (6, 5, 1))[:, :, 0]
    m[25:35, 25, 6] = True  # a one-voxel-wide spur on the blob's slice
    return m


@pytest.fixture
def plan(tmp_path):
    affine = oblique_affine(spacing=(1.5, 2.0, 2.5))
    ids = SeriesIds("P1", generate_uid(), generate_uid())
    write_series(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), tmp_path / "plan", ids, "T1C", 1)
    return tmp_path / "plan", affine, ids


def series_grid(folder):
    ras, ordered = series_affine([pydicom.dcmread(p) for p in sorted(folder.iterdir())])
    return ras, ordered, (int(ordered[0].Columns), int(ordered[0].Rows), len(ordered))


def test_a_thin_roi_survives_export_and_import(plan, tmp_path):
    folder, affine, _ = plan
    mask = thin_mask()
    write_rtstruct(folder, {"thin": mask}, affine, tmp_path / "rt.dcm")
    ras, _, shape = series_grid(folder)
    back = rasterise(read_rois(tmp_path / "rt.dcm")["thin"], ras, shape)
    assert int(mask.sum()) == int(back.sum()) and np.array_equal(back, mask)


def test_a_planning_systems_centre_inside_rule_reads_the_masks_back(plan, tmp_path, dciodvfy):
    folder, affine, _ = plan
    masks = {"thin": thin_mask(), "CTV": ellipsoid(SHAPE, (20, 16, 4), (14, 10, 3))}
    write_rtstruct(folder, masks, affine, tmp_path / "rt.dcm")
    assert validator_errors(dciodvfy, tmp_path / "rt.dcm") == []
    read, _ = centre_inside_read(tmp_path / "rt.dcm", folder)
    for name, mask in masks.items():
        assert np.array_equal(read[name], mask), (name, int((read[name] ^ mask).sum()))


def test_contours_through_voxel_centres_keep_their_one_voxel_wide_parts(tmp_path):
    """An RTSTRUCT as rt-utils draws it (OpenCV, through the centres of the boundary voxels: a line one voxel
    wide is a contour there and back, with no area), read by ctvlab and by Pillow (outline included)."""
    from rt_utils import RTStructBuilder

    affine = oblique_affine(spacing=(2.0, 2.0, 2.5))  # square pixels: rt-utils places points right only there
    write_series(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), tmp_path / "plan",
                 SeriesIds("P1", generate_uid(), generate_uid()), "T1C", 1)  # fmt: skip
    mask = thin_mask()
    mask[:, :, 5] = (
        False  # rt-utils draws a ring's hole as a second contour: read alike by both, not the point
    )
    with contextlib.redirect_stdout(io.StringIO()):
        rt = RTStructBuilder.create_new(dicom_series_path=str(tmp_path / "plan"))
        rt.add_roi(
            mask=np.ascontiguousarray(mask.transpose(1, 0, 2)), name="thin", approximate_contours=False
        )
    rt.save(str(tmp_path / "rt.dcm"))
    ras, _, shape = series_grid(tmp_path / "plan")
    ours = rasterise(read_rois(tmp_path / "rt.dcm")["thin"], ras, shape)
    pillow, _, _ = pillow_read(tmp_path / "rt.dcm", tmp_path / "plan")
    assert np.array_equal(pillow["thin"], mask)  # the independent reader agrees with the mask drawn
    assert np.array_equal(ours, mask), int((ours ^ mask).sum())


def test_the_structure_set_says_whose_it_is_and_what_drew_it(plan, tmp_path, dciodvfy):
    folder, affine, ids = plan
    algorithms = {"CTV_model": ("AUTOMATIC", "ctvlab 0.1.0 U-Net models:/ctvlab-unet/3"),
                  "CTV_RTOG": ("AUTOMATIC", "ctvlab 0.1.0 RTOG margin rule")}  # fmt: skip
    masks = {
        "CTV_model": ellipsoid(SHAPE, (20, 16, 4), (10, 8, 2)),
        "CTV_RTOG": ellipsoid(SHAPE, (20, 16, 4), (12, 9, 3)),
    }
    write_rtstruct(folder, masks, affine, tmp_path / "rt.dcm", label="RESEARCH CTV", algorithms=algorithms)
    assert validator_errors(dciodvfy, tmp_path / "rt.dcm") == []
    rs = pydicom.dcmread(tmp_path / "rt.dcm")
    image = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    for attr in (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyID",
        "StudyDate",
        "FrameOfReferenceUID",
    ):
        assert rs.get(attr) == image.get(attr), attr
    assert rs.StructureSetLabel == "RESEARCH CTV" and rs.ApprovalStatus == "UNAPPROVED"
    for roi in rs.StructureSetROISequence:
        assert (roi.ROIGenerationAlgorithm, roi.ROIGenerationDescription) == algorithms[roi.ROIName]
        assert roi.ReferencedFrameOfReferenceUID == ids.frame_uid


@pytest.mark.parametrize(
    "want, words",
    [
        ({"patient_id": "P2", "source": "the manifest"}, ["PatientID 'P2'", "'P1'"]),
        (
            {"patient_id": "P1", "study_instance_uid": "1.2.3", "source": "provenance.json"},
            ["StudyInstanceUID '1.2.3'"],
        ),
        (
            {"patient_id": "P1", "frame_of_reference_uid": "1.2.4", "source": "provenance.json"},
            ["FrameOfReferenceUID '1.2.4'"],
        ),
        ({"patient_id": "P1", "patient_name": "Other^Person", "source": "provenance.json"}, ["PatientName"]),
    ],
)
def test_a_series_of_another_patient_study_or_frame_is_refused(plan, tmp_path, want, words):
    from ctvlab.dicom.identity import Identity

    folder, affine, _ = plan
    want = Identity(**want)
    with pytest.raises(DataError) as e:
        write_rtstruct(folder, {"CTV": ellipsoid(SHAPE, (20, 16, 4), (10, 8, 2))}, affine, tmp_path / "rt.dcm",
                       expect=want, patient="P7")  # fmt: skip
    text = str(e.value)
    assert "patient P7" in text and str(folder) in text and want.source in text
    for w in words:
        assert w in text, text
    assert not list(tmp_path.glob("*rt.dcm"))


def test_the_right_patient_is_accepted(plan, tmp_path):
    from ctvlab.dicom.identity import Identity

    folder, affine, ids = plan
    want = Identity("P1", "P1", ids.study_uid, ids.frame_uid, "provenance.json")
    ref = write_rtstruct(folder, {"CTV": ellipsoid(SHAPE, (20, 16, 4), (10, 8, 2))}, affine, tmp_path / "rt.dcm",
                         expect=want)  # fmt: skip
    assert ref["patient_id"] == "P1" and ref["study_instance_uid"] == ids.study_uid
