"""Geometry between a NIfTI image (world RAS+, voxel index (i, j, k)) and a DICOM image series (patient
LPS, pixel (row, column) per slice).

A NIfTI volume is written as DICOM slices along k, columns along i and rows along j:
ImageOrientationPatient = [LPS(A[:, 0]) / |A[:, 0]|, LPS(A[:, 1]) / |A[:, 1]|], PixelSpacing = [|A[:, 1]|,
|A[:, 0]|] (row spacing first), ImagePositionPatient of slice k = LPS(A @ (0, 0, k, 1)), and the pixel
array of slice k is `data[:, :, k].T`. Read back, a series gives the RAS affine of the index
(column, row, slice) with its slices sorted along their normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS: the sign of x and y flips (its own inverse)


@dataclass(frozen=True)
class SliceGeometry:
    orientation: list[float]  # ImageOrientationPatient: row direction, then column direction (LPS)
    pixel_spacing: list[float]  # PixelSpacing: [between rows, between columns] mm
    positions: list[list[float]]  # ImagePositionPatient of each slice k (LPS mm)
    slice_thickness: float


def slices_of(affine: np.ndarray, n_slices: int) -> SliceGeometry:
    """The DICOM geometry of the slices k = 0..n_slices-1 of a NIfTI image with this affine."""
    a = np.asarray(affine, dtype=float)
    col_dir, row_dir = a[:3, 0], a[:3, 1]
    di, dj, dk = (float(np.linalg.norm(a[:3, n])) for n in range(3))
    orientation = list(LPS @ col_dir / di) + list(LPS @ row_dir / dj)
    positions = [list(LPS @ (a @ np.array([0.0, 0.0, k, 1.0]))[:3]) for k in range(n_slices)]
    return SliceGeometry([float(v) for v in orientation], [dj, di],
                         [[float(v) for v in p] for p in positions], dk)  # fmt: skip


class GeometryError(ValueError):
    """The slices of a series do not form one regular grid; the message names the files."""


# Float noise in the scanners' own arithmetic (positions computed in single precision): the least a step
# may differ by, whatever the number of decimals a file writes.
FLOAT_NOISE_MM = 1e-3
# Slice steps that are whole multiples of the series' step (a gap of 2, 3, ... steps) are reported as missing
# slices; anything else uneven is "not evenly spaced".
_REQUIRED = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")


def _name(ds) -> str:
    return str(getattr(ds, "filename", None) or "a slice")


def decimals(values) -> int:
    """The fewest decimals among decimal strings as their file wrote them (pydicom keeps each DS value's
    original string); 6 for values not read from a file."""
    from decimal import Decimal, InvalidOperation

    fewest = None
    for v in values:
        text = getattr(v, "original_string", None)
        if text is None:
            continue
        try:
            exponent = Decimal(str(text).strip()).as_tuple().exponent
        except InvalidOperation:
            continue
        n = max(0, -int(exponent)) if isinstance(exponent, int) else 0
        fewest = n if fewest is None else min(fewest, n)
    return 6 if fewest is None else fewest


def step_tolerance(datasets: Sequence) -> float:
    """How much two slice steps may differ (mm) and still be one step.

    A decimal string (DS, PS3.5 6.2) holds at most 16 characters, and scanners write positions with as
    few as two decimals. A position written with d decimals is exact to 0.5 * 10^-d, a step is the
    difference of two positions, and two steps differ by up to 4 such roundings: 2 * 10^-d (0.02 mm for two
    decimals), never less than `FLOAT_NOISE_MM`."""
    d = decimals(v for ds in datasets for v in ds.ImagePositionPatient)
    return max(FLOAT_NOISE_MM, 2.0 * 10.0 ** (-d))


def series_affine(datasets: Sequence) -> tuple[np.ndarray, list]:
    """The RAS affine of the voxel index (column, row, slice) of a series, and its datasets sorted along
    the slice normal (ascending, as RT tools and viewers order them).

    Raises:
        GeometryError: an attribute the grid needs is missing or unreadable, the orientation is not two
            orthogonal unit vectors, the slices disagree on orientation, spacing or size, two slices share
            a position, a slice is missing, or the slices are otherwise not evenly spaced. The message
            names the files.
    """
    if not datasets:
        raise GeometryError("no image slices")
    for ds in datasets:
        missing = [a for a in _REQUIRED if a not in ds]
        if missing:
            raise GeometryError(f"{_name(ds)} has no {', '.join(missing)}: not a slice of an image grid")
    try:
        iops = [np.asarray(ds.ImageOrientationPatient, dtype=float) for ds in datasets]
        positions = [np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets]
        spacings = [np.asarray(ds.PixelSpacing, dtype=float) for ds in datasets]
    except (TypeError, ValueError) as e:
        raise GeometryError(f"an orientation, position or pixel spacing is not numbers: {e}") from None
    for ds, iop, pos, ps in zip(datasets, iops, positions, spacings, strict=True):
        if (
            iop.shape != (6,)
            or pos.shape != (3,)
            or ps.shape != (2,)
            or not (
                np.isfinite(iop).all() and np.isfinite(pos).all() and (ps > 0).all() and np.isfinite(ps).all()
            )
        ):
            raise GeometryError(f"{_name(ds)}: ImageOrientationPatient needs 6 numbers, ImagePositionPatient "
                                "3 and PixelSpacing 2 positive ones")  # fmt: skip
    iop = iops[0]
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index grows), along a column (row index)
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(
        row_dir @ col_dir
    ) > 1e-3:  # fmt: skip
        raise GeometryError(f"{_name(datasets[0])}: ImageOrientationPatient {list(iop)} is not two orthogonal "
                            "unit vectors")  # fmt: skip
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    size = (int(datasets[0].Rows), int(datasets[0].Columns))
    for ds, other, ps in zip(datasets[1:], iops[1:], spacings[1:], strict=True):
        if not np.allclose(other, iop, atol=1e-4):
            raise GeometryError(f"{_name(ds)} and {_name(datasets[0])} have different ImageOrientationPatient "
                                f"({list(other)} and {list(iop)}): slices of different grids")  # fmt: skip
        if not np.allclose(ps, spacings[0], rtol=1e-4, atol=1e-4):
            raise GeometryError(f"{_name(ds)} and {_name(datasets[0])} have different PixelSpacing "
                                f"({list(ps)} and {list(spacings[0])})")  # fmt: skip
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise GeometryError(f"{_name(ds)} and {_name(datasets[0])} have different sizes "
                                f"({ds.Rows}x{ds.Columns} and {size[0]}x{size[1]})")  # fmt: skip
    order = sorted(range(len(datasets)), key=lambda n: float(normal @ positions[n]))
    ordered = [datasets[n] for n in order]
    pos = np.array([positions[n] for n in order])
    dr, dc = (float(v) for v in spacings[0])
    if len(ordered) > 1:
        tol = step_tolerance(ordered)
        steps = np.diff(pos, axis=0)
        along = steps @ normal
        for n in np.flatnonzero(np.linalg.norm(steps, axis=1) <= tol):
            raise GeometryError(f"{_name(ordered[n])} and {_name(ordered[n + 1])} are at the same position "
                                f"{list(np.round(pos[n], 3))} (a duplicated slice?)")  # fmt: skip
        usual = float(np.median(along))
        if usual <= tol:  # most slices coincide: not a volume
            raise GeometryError(f"{_name(ordered[0])}: the slices do not advance along their normal")
        ratio = along / usual
        gap = np.flatnonzero((np.abs(ratio - np.rint(ratio)) * usual <= tol) & (np.rint(ratio) >= 2))
        if gap.size:
            n = int(gap[0])
            raise GeometryError(f"{int(np.rint(ratio[n])) - 1} missing slice(s) between {_name(ordered[n])} and "
                                f"{_name(ordered[n + 1])}: {along[n]:.3f} mm apart, the other slices "
                                f"{usual:.3f} mm")  # fmt: skip
        step = (pos[-1] - pos[0]) / (len(ordered) - 1)
        off = np.linalg.norm(steps - step, axis=1)
        if off.max() > tol:
            n = int(np.argmax(off))
            raise GeometryError(f"slices are not evenly spaced: {_name(ordered[n])} to {_name(ordered[n + 1])} "
                                f"steps {list(np.round(steps[n], 4))} mm, the series on average "
                                f"{list(np.round(step, 4))} mm (tolerance {tol:g} mm, from the positions' "
                                "decimals)")  # fmt: skip
    else:
        thickness = float(getattr(ordered[0], "SliceThickness", 1.0) or 1.0)
        step = normal * (thickness if thickness > 0 else 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if abs(np.linalg.det(ras[:3, :3])) < 1e-9:
        raise GeometryError(f"{_name(ordered[0])}: the slices lie in their own plane (no volume)")
    return ras, ordered


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """(N, 3) patient coordinates (LPS mm) to world (RAS mm); the same flip goes back."""
    return np.asarray(points, dtype=float) @ LPS
