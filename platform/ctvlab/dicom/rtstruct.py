"""The CTVs as one DICOM RT Structure Set on a planning series' frame of reference.

rt-utils traces each slice's contours (OpenCV) and builds the RTSTRUCT's modules; ctvlab maps the masks
from their NIfTI grid onto the series' grid (`ctvlab.dicom.geometry.series_affine`), then mends two things
in rt-utils 1.2.7's output: ContourData written as raw Python floats (over the 16 characters a decimal
string may hold, which validators reject) and contour points placed with the two in-plane spacings swapped
(exact only for square pixels). The file is written atomically (`ctvlab.atomic.atomic_path`).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ctvlab.atomic import atomic_path
from ctvlab.errors import DataError

# ROI names, display colours (RGB) of the written structures, in the order of the CTVs.
ROI_COLOURS = {"CTV_model": [230, 60, 60], "CTV_RTOG": [60, 120, 230], "CTV_EORTC": [60, 200, 90]}
# A CTV that loses more than this fraction of its volume on the planning series' grid lies partly outside
# the series: refused rather than written as a truncated structure.
MAX_LOST_FRACTION = 0.02


def _image_slices(folder: Path) -> dict[str, list]:
    """The image slices (headers only) under `folder`, by SeriesInstanceUID."""
    import pydicom

    series: dict[str, list] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # not a DICOM file
        if "ImagePositionPatient" in ds and "PixelSpacing" in ds:
            ds.filename = str(path)
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return series


def read_series(
    folder: Path, like: tuple[np.ndarray, tuple[int, ...]] | None = None
) -> tuple[np.ndarray, list]:
    """The RAS affine (index: column, row, slice) and the sorted slices of the planning series in `folder`:
    its only image series, or, when it holds several, the one on the grid `like` = (affine, shape) (the
    series a T1c NIfTI was converted from; among several on that grid, the lowest SeriesNumber).

    Raises:
        DataError: no image slice, several series and none on the grid `like`, or slices that do not form
            one regular grid.
    """
    from ctvlab.dicom.geometry import series_affine

    folder = Path(folder)
    found = _image_slices(folder)
    if not found:
        raise DataError(f"{folder}: no DICOM image slices (a planning series is needed for the RTSTRUCT)")
    grids = {}
    for uid, slices in found.items():
        try:
            grids[uid] = series_affine(slices)
        except ValueError as e:
            if len(found) == 1:
                raise DataError(f"{folder}: {e}") from None
    if len(found) == 1:
        return grids[next(iter(found))]
    if like is not None:
        aff, shape = np.asarray(like[0], dtype=float), tuple(like[1][:3])
        same = [g for g in grids.values()
                if (int(g[1][0].Columns), int(g[1][0].Rows), len(g[1])) == shape
                and np.allclose(g[0], aff, atol=1e-2)]  # fmt: skip
        if same:  # several on the grid (a T1 registered to the T1c): same geometry; the first series number
            return min(same, key=lambda g: int(getattr(g[1][0], "SeriesNumber", 0) or 0))
    names = ", ".join(sorted(repr(str(getattr(s[0], "SeriesDescription", ""))) for s in found.values()))
    raise DataError(f"{folder}: {len(found)} image series ({names}) and none on the T1c's grid; give "
                    "the folder of the planning series only")  # fmt: skip


def masks_on_series(masks: Mapping[str, np.ndarray], affine: np.ndarray, series_affine: np.ndarray,
                    series_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:  # fmt: skip
    """Each mask (on the NIfTI grid `affine`) on the series grid; refuses a CTV the series cuts off."""
    from ctvlab.preprocess.grid import resample_mask

    out = {}
    src_voxel = abs(float(np.linalg.det(affine[:3, :3])))
    dst_voxel = abs(float(np.linalg.det(series_affine[:3, :3])))
    for name, mask in masks.items():
        mask = np.asarray(mask) > 0
        if mask.shape == series_shape and np.allclose(affine, series_affine, atol=1e-3):
            on = mask
        else:
            on = resample_mask(mask, affine, series_affine, series_shape)
        before, after = mask.sum() * src_voxel, on.sum() * dst_voxel
        if before > 0 and after < (1 - MAX_LOST_FRACTION) * before:
            raise DataError(f"{name}: {before / 1000:.1f} cm³ on the NIfTI grid but {after / 1000:.1f} cm³ "
                            "inside the planning series: the series does not cover the CTV (is it the "
                            "patient's planning series?)")  # fmt: skip
        out[name] = on
    return out


def _fix_contours(ds, first_slice) -> None:
    """Decimal strings of at most 16 characters, and in-plane spacings where they belong."""
    from pydicom.valuerep import format_number_as_ds

    iop = np.asarray(first_slice.ImageOrientationPatient, dtype=float)
    rd, cd = iop[:3], iop[3:]
    origin = np.asarray(first_slice.ImagePositionPatient, dtype=float)
    ps_rows, ps_cols = (float(v) for v in first_slice.PixelSpacing)
    for roi in ds.ROIContourSequence:
        for contour in getattr(roi, "ContourSequence", []):
            pts = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            # rt-utils steps along a row by PixelSpacing[0] and down a column by PixelSpacing[1].
            d = pts - origin
            a, b = d @ rd, d @ cd
            pts = origin + np.outer(a * ps_cols / ps_rows, rd) + np.outer(b * ps_rows / ps_cols, cd) + (
                d - np.outer(a, rd) - np.outer(b, cd))  # fmt: skip
            contour.ContourData = [format_number_as_ds(float(v)) for v in pts.ravel()]
            contour.NumberOfContourPoints = len(pts)


@contextlib.contextmanager
def _quiet_pydicom():
    import logging
    import warnings

    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def write_rtstruct(series_dir: Path, masks: Mapping[str, np.ndarray], affine: np.ndarray, out: Path,
                   description: str = "ctvlab CTVs", kinds: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """Write the masks (ROI name -> mask on the NIfTI grid `affine`) as one RTSTRUCT referencing the series
    in `series_dir`; returns the series it references (UID, description, frame of reference). `kinds` gives an ROI's RTROIInterpretedType (default CTV); an empty mask
    is an ROI without contours.

    Raises:
        DataError: the series cannot be read, or does not cover a mask.
    """
    import tempfile

    from rt_utils import RTStructBuilder

    affine = np.asarray(affine, dtype=float)
    first = next(iter(masks.values()))
    series_aff, slices = read_series(series_dir, like=(affine, np.shape(first)))
    shape = (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    on_series = masks_on_series(masks, affine, series_aff, shape)
    with tempfile.TemporaryDirectory(prefix="ctvlab-series-") as only:  # rt-utils reads a whole folder
        for n, ds in enumerate(slices):
            os.symlink(Path(ds.filename).resolve(), Path(only, f"{n:05d}.dcm"))
        # rt-utils prints "[INFO]: ROI mask is empty" for an empty mask and sets dataset attributes that
        # pydicom 3 deprecates; neither is the user's concern.
        with contextlib.redirect_stdout(io.StringIO()), _quiet_pydicom():
            try:
                rt = RTStructBuilder.create_new(dicom_series_path=only)
            except Exception as e:
                raise DataError(f"{series_dir}: rt-utils cannot read the series: {e}") from None
            for name, mask in on_series.items():
                rt.add_roi(mask=np.ascontiguousarray(mask.transpose(1, 0, 2)), name=name,
                           color=ROI_COLOURS.get(name, [255, 200, 0]), approximate_contours=False)  # fmt: skip
    for roi in rt.ds.ROIContourSequence:
        if "ContourSequence" in roi and len(roi.ContourSequence) == 0:
            del roi.ContourSequence  # an empty structure: the ROI without contours (Type 3 sequence)
    ds = rt.ds
    _fix_contours(ds, rt.series_data[0])
    for obs, roi in zip(ds.RTROIObservationsSequence, ds.StructureSetROISequence, strict=True):
        obs.RTROIInterpretedType = (kinds or {}).get(str(roi.ROIName), "CTV")
        obs.ROIObservationDescription = ""
    ref = rt.series_data[0]
    ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName = "ctvlab", "ctvlab", ""
    # Type 1 and 2 attributes that rt-utils leaves out; the frame of reference is the planning series'.
    ds.FrameOfReferenceUID = rt.frame_of_reference_uid
    ds.PositionReferenceIndicator = getattr(ref, "PositionReferenceIndicator", "")
    ds.ReferringPhysicianName = getattr(ref, "ReferringPhysicianName", "")
    ds.AccessionNumber = getattr(ref, "AccessionNumber", "")
    ds.OperatorsName = ""
    ds.StructureSetLabel, ds.SeriesDescription = "CTV", description
    ds.ApprovalStatus = "UNAPPROVED"  # research output, for review by the treating team
    with _quiet_pydicom(), atomic_path(out) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return {"series_instance_uid": str(ref.SeriesInstanceUID),
            "series_description": str(getattr(ref, "SeriesDescription", "")),
            "frame_of_reference_uid": str(rt.frame_of_reference_uid)}  # fmt: skip


def read_rois(source) -> dict[str, list[np.ndarray]]:
    """ROI name -> its contours, each an (N, 3) array of patient (LPS) points, from an RTSTRUCT file or
    its already-read dataset."""
    import pydicom

    ds = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out: dict[str, list[np.ndarray]] = {name: [] for name in names.values()}
    for roi in getattr(ds, "ROIContourSequence", []):
        name = names.get(int(roi.ReferencedROINumber))
        for contour in getattr(roi, "ContourSequence", []):
            out[name].append(np.asarray(contour.ContourData, dtype=float).reshape(-1, 3))
    return out


def rasterise(contours: list[np.ndarray], series_aff: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Planar contours (LPS points) filled on the series grid (column, row, slice).

    The contours of a slice combine by even-odd (an inner contour is a hole); a voxel whose centre lies
    within half a voxel of a contour's line is inside too, so a contour drawn through the centres of the
    boundary voxels (as rt-utils and most exporters draw them, holes included) keeps those voxels."""
    from matplotlib.path import Path as Polygon

    from ctvlab.dicom.geometry import lps_to_ras

    inv = np.linalg.inv(series_aff)
    interior = np.zeros(shape, dtype=bool)
    edge = np.zeros(shape, dtype=bool)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.c_[ii.ravel(), jj.ravel()]
    for pts in contours:
        ijk = (np.c_[lps_to_ras(pts), np.ones(len(pts))] @ inv.T)[:, :3]
        k = round(float(ijk[:, 2].mean()))
        if not 0 <= k < shape[2] or np.abs(ijk[:, 2] - k).max() > 0.1:
            raise ValueError(f"a contour does not lie on a slice of the series (slice index {ijk[0, 2]:.2f})")
        poly = Polygon(ijk[:, :2])
        grown, shrunk = (
            poly.contains_points(centres, radius=0.49),
            poly.contains_points(centres, radius=-0.49),
        )
        interior[:, :, k] ^= poly.contains_points(centres).reshape(shape[:2])
        edge[:, :, k] |= (grown ^ shrunk).reshape(shape[:2])
        if len(ijk) < 3:  # a point or a segment: its voxels
            for i, j in np.rint(ijk[:, :2]).astype(int):
                edge[i, j, k] = True
    mask = interior | edge
    return mask
