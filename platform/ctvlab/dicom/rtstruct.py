"""The CTVs as one DICOM RT Structure Set on a planning series' frame of reference.

rt-utils builds the RTSTRUCT's modules and references from the series; ctvlab maps the masks from their
NIfTI grid onto the series' grid (`ctvlab.dicom.geometry.series_affine`) and draws the contours itself, on
the half-voxel iso-line (`iso_contours`). rt-utils 1.2.7 traces contours through the centres of the
boundary voxels (OpenCV), which a planning system's centre-inside rule reads back half a voxel small and
without its one-voxel-wide parts; its ContourData are also raw Python floats (over the 16 characters a
decimal string may hold) placed with the two in-plane spacings swapped. Its later `contour_mode=
"voxel_edge"` (qurit/rt-utils PR 141) is not in the release on the registry. The file is written
atomically (`ctvlab.atomic.atomic_path`).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ctvlab import __version__
from ctvlab.atomic import atomic_path
from ctvlab.dicom.identity import Identity
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


def series_folder(slices: list) -> str:
    """The folder that holds a series' files, as the user's path names it."""
    return str(Path(os.path.commonpath([str(Path(ds.filename).parent) for ds in slices])))


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


def iso_contours(plane: np.ndarray) -> list[np.ndarray]:
    """The closed 0.5 iso-lines of a binary slice (i, j): (N, 2) arrays of (i, j) voxel coordinates, without
    the repeated closing point (CLOSED_PLANAR closes itself).

    The lines run half-way between inside and outside voxel centres (marching squares, contourpy: the
    library under matplotlib's contours), so a reader that counts a voxel when its centre lies inside (as
    planning systems do), combining a slice's contours by even-odd, gets the slice back exactly; a part one
    voxel wide is a contour one voxel wide, not a line of no area. A zero border makes every line close."""
    import contourpy

    padded = np.pad(np.asarray(plane, dtype=np.float64), 1).T  # contourpy: z[y, x]; here y = j, x = i
    gen = contourpy.contour_generator(z=padded, name="serial", line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(0.5):
        line = np.asarray(line, dtype=float) - 1.0  # the padding
        if len(line) > 1 and np.allclose(line[0], line[-1]):
            line = line[:-1]
        if len(line) >= 3:
            out.append(line)
    return out


def contour_items(mask: np.ndarray, series_aff: np.ndarray, slices: list) -> list:
    """ContourSequence items of a mask on the series grid (column, row, slice): each slice's iso-lines
    (`iso_contours`) in patient coordinates (LPS mm), written as decimal strings of at most 16 characters
    and referencing the slice's image."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.valuerep import format_number_as_ds

    from ctvlab.dicom.geometry import lps_to_ras

    items = []
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        for line in iso_contours(mask[:, :, k]):
            ijk = np.c_[line, np.full(len(line), float(k)), np.ones(len(line))]
            lps = lps_to_ras((ijk @ series_aff.T)[:, :3])  # the flip is its own inverse
            image = Dataset()
            image.ReferencedSOPClassUID = slices[k].SOPClassUID
            image.ReferencedSOPInstanceUID = slices[k].SOPInstanceUID
            item = Dataset()
            item.ContourImageSequence = Sequence([image])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(lps)
            item.ContourData = [format_number_as_ds(float(v)) for v in lps.ravel()]
            items.append(item)
    return items


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


def planning_grid(series_dir, affine, shape, expect=None, patient: str | None = None):
    """The planning series a DICOM object is written on, checked to be the patient's: its affine, slices,
    identity and (columns, rows, slices) grid.

    Args:
        affine, shape: the grid of what is written (to order and match the slices).
        expect: the identity the series must have (`ctvlab.dicom.identity`); None checks nothing.

    Raises:
        CtvlabError: the series cannot be read, or it is another patient's.
    """
    from ctvlab.dicom import identity

    series_aff, slices = read_series(series_dir, like=(np.asarray(affine, dtype=float), tuple(shape)))
    found = identity.of_series(slices, series_folder(slices))
    if expect is not None:
        identity.check(expect, found, patient or expect.patient_id)
    return series_aff, slices, found, (int(slices[0].Columns), int(slices[0].Rows), len(slices))


def write_rtstruct(series_dir: Path, masks: Mapping[str, np.ndarray], affine: np.ndarray, out: Path,
                   description: str = "ctvlab CTVs", kinds: Mapping[str, str] | None = None, *,
                   expect: Identity | None = None, patient: str | None = None, label: str = "CTV",
                   algorithms: Mapping[str, tuple[str, str]] | None = None) -> dict[str, str]:  # fmt: skip
    """Write the masks (ROI name -> mask on the NIfTI grid `affine`) as one RTSTRUCT referencing the series
    in `series_dir`; returns the series it references (UID, description, frame of reference).

    Contours lie on each mask's half-voxel iso-line on the series grid (`iso_contours`): a planning system
    that counts a voxel when its centre is inside reads the mask back. The structure set carries the series'
    patient and study identity (rt-utils copies them from the series), `label` as StructureSetLabel,
    unapproved status, and each ROI's generating algorithm and its description (`algorithms`: ROI name ->
    (AUTOMATIC | SEMIAUTOMATIC | MANUAL, what made it), empty where not given).

    Args:
        kinds: an ROI's RTROIInterpretedType (default CTV); an empty mask is an ROI without contours.
        expect: whose series it must be (`ctvlab.dicom.identity`); a series of another patient, study or
            frame of reference is refused before anything is written.
        patient: the patient's id, for messages.

    Raises:
        DataError: the series cannot be read, is not the expected patient's, or does not cover a mask.
    """
    import tempfile

    from rt_utils import RTStructBuilder

    affine = np.asarray(affine, dtype=float)
    first = next(iter(masks.values()))
    series_aff, slices, found, shape = planning_grid(series_dir, affine, np.shape(first), expect, patient)
    where = series_folder(slices)
    on_series = masks_on_series(masks, affine, series_aff, shape)
    with tempfile.TemporaryDirectory(prefix="ctvlab-series-") as only:  # rt-utils reads a whole folder
        for n, ds in enumerate(slices):
            os.symlink(Path(ds.filename).resolve(), Path(only, f"{n:05d}.dcm"))
        # rt-utils builds the modules and references; the contours are ctvlab's (`contour_items`), so its
        # ROIs are added empty. It prints "[INFO]: ROI mask is empty" and sets attributes pydicom 3
        # deprecates; neither is the user's concern.
        empty = np.zeros((shape[1], shape[0], shape[2]), dtype=bool)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_pydicom():
            try:
                rt = RTStructBuilder.create_new(dicom_series_path=only)
            except Exception as e:
                raise DataError(f"{where}: rt-utils cannot read the series: {e}") from None
            for name in on_series:
                rt.add_roi(mask=empty, name=name, color=ROI_COLOURS.get(name, [255, 200, 0]))
    ds = rt.ds
    for roi, mask in zip(ds.ROIContourSequence, on_series.values(), strict=True):
        items = contour_items(mask, series_aff, slices)
        if items:
            roi.ContourSequence = items
        elif "ContourSequence" in roi:
            del roi.ContourSequence  # an empty structure: the ROI without contours (Type 3 sequence)
    for obs, roi in zip(ds.RTROIObservationsSequence, ds.StructureSetROISequence, strict=True):
        obs.RTROIInterpretedType = (kinds or {}).get(str(roi.ROIName), "CTV")
        obs.ROIObservationDescription = ""
        algorithm, what = (algorithms or {}).get(str(roi.ROIName), ("", ""))
        roi.ROIGenerationAlgorithm = algorithm  # Type 2: empty when ctvlab does not know what drew it
        if what:
            roi.ROIGenerationDescription = what[:64]  # LO
    ref = rt.series_data[0]
    ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName = "ctvlab", "ctvlab", ""
    ds.SoftwareVersions = __version__
    # Type 1 and 2 attributes that rt-utils leaves out; the frame of reference is the planning series'.
    ds.FrameOfReferenceUID = rt.frame_of_reference_uid
    ds.PositionReferenceIndicator = getattr(ref, "PositionReferenceIndicator", "")
    ds.ReferringPhysicianName = getattr(ref, "ReferringPhysicianName", "")
    ds.AccessionNumber = getattr(ref, "AccessionNumber", "")
    ds.OperatorsName = ""
    ds.StructureSetLabel, ds.SeriesDescription = label[:16], description[:64]  # SH, LO
    ds.StructureSetDescription = description
    ds.ApprovalStatus = "UNAPPROVED"  # research output, for review by the treating team
    with _quiet_pydicom(), atomic_path(out) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return {"series_instance_uid": str(ref.SeriesInstanceUID),
            "series_description": str(getattr(ref, "SeriesDescription", "")),
            "frame_of_reference_uid": str(rt.frame_of_reference_uid),
            "patient_id": found.patient_id, "study_instance_uid": found.study_instance_uid}  # fmt: skip


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


# A voxel whose centre lies this close to a contour's line (in voxels) is on the line, hence inside: contours
# drawn through the centres of boundary voxels (rt-utils, OpenCV, many exporters) keep those voxels, and a
# part one voxel wide (a contour that runs there and back, with no area) keeps its voxels. Far below the
# 0.35 voxel by which a centre outside a half-voxel iso-line contour misses it (a concave corner), and far
# above the rounding of contour points written with two decimals (0.005 mm).
ON_LINE_VOXELS = 0.05


def rasterise(contours: list[np.ndarray], series_aff: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Planar contours (LPS points) filled on the series grid (column, row, slice).

    A voxel is inside when its centre lies inside the contours of its slice, combined by even-odd (an inner
    contour is a hole; a planning system's rule), or on a contour's line (within `ON_LINE_VOXELS`). The
    second rule keeps what exporters mean by contours through the centres of the boundary voxels, including
    parts one voxel wide that have no area; contours on the half-voxel iso-line (`write_rtstruct`) read back
    as their mask under either rule.

    Raises:
        ValueError: a contour does not lie on a slice of the series.
    """
    from matplotlib.path import Path as Polygon

    from ctvlab.dicom.geometry import lps_to_ras

    inv = np.linalg.inv(series_aff)
    mask = np.zeros(shape, dtype=bool)
    inside = {}
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.c_[ii.ravel(), jj.ravel()]
    for pts in contours:
        if len(pts) == 0:
            continue
        ijk = (np.c_[lps_to_ras(pts), np.ones(len(pts))] @ inv.T)[:, :3]
        k = round(float(ijk[:, 2].mean()))
        if not 0 <= k < shape[2] or np.abs(ijk[:, 2] - k).max() > 0.1:
            raise ValueError(f"a contour does not lie on a slice of the series (slice index {ijk[0, 2]:.2f})")
        if len(ijk) >= 3:
            if k not in inside:
                inside[k] = np.zeros(shape[:2], dtype=bool)
            inside[k] ^= Polygon(ijk[:, :2]).contains_points(centres).reshape(shape[:2])
        for i, j in on_line(ijk[:, :2], ON_LINE_VOXELS):
            if 0 <= i < shape[0] and 0 <= j < shape[1]:
                mask[i, j, k] = True
    for k, plane in inside.items():
        mask[:, :, k] |= plane
    return mask


def on_line(points: np.ndarray, tol: float) -> np.ndarray:
    """The integer points (voxel centres) within `tol` (< 0.35) of the closed polyline `points` (N, 2).

    For each segment, the lattice points near it are found along its major axis: at each whole value of
    that axis within its extent, the segment's other coordinate rounded; then the exact distance decides.
    A lattice point within `tol` of the segment is always one of these (its other coordinate is off by at
    most tol * sqrt(2) < 0.5), so none is missed, and the work is linear in the contour's length."""
    start = np.asarray(points, dtype=float).reshape(-1, 2)
    end = np.roll(start, -1, axis=0)
    d = end - start
    major = (np.abs(d[:, 1]) > np.abs(d[:, 0])).astype(int)
    rows = np.arange(len(start))
    s0, s1 = start[rows, major], end[rows, major]
    first = np.ceil(np.minimum(s0, s1) - tol).astype(int)
    count = np.maximum(np.floor(np.maximum(s0, s1) + tol).astype(int) - first + 1, 0)
    seg = np.repeat(rows, count)
    m = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    dm = d[seg, major[seg]]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dm != 0, (m - s0[seg]) / np.where(dm != 0, dm, 1.0), 0.0)
    t = np.clip(t, 0.0, 1.0)
    cand = np.rint(start[seg] + t[:, None] * d[seg]).astype(int)
    cand[np.arange(len(seg)), major[seg]] = m
    q = cand - start[seg]
    length2 = np.einsum("ij,ij->i", d[seg], d[seg])
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(length2 > 0, np.einsum("ij,ij->i", q, d[seg]) / np.where(length2 > 0, length2, 1.0), 0.0)
    s = np.clip(s, 0.0, 1.0)
    dist = np.linalg.norm(q - s[:, None] * d[seg], axis=1)
    return np.unique(cand[dist <= tol], axis=0) if len(cand) else np.zeros((0, 2), dtype=int)
