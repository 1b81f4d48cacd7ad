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


def series_affine(datasets: Sequence) -> tuple[np.ndarray, list]:
    """The RAS affine of the voxel index (column, row, slice) of a series, and its datasets sorted along
    the slice normal (ascending, as RT tools and viewers order them).

    Raises:
        ValueError: the slices disagree on orientation or spacing, or are not evenly spaced.
    """
    if not datasets:
        raise ValueError("no image slices")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index grows), along a column (row index)
    normal = np.cross(row_dir, col_dir)
    for ds in datasets[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise ValueError("slices with different ImageOrientationPatient")
    ordered = sorted(datasets, key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, float)))
    pos = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in ordered])
    dr, dc = (float(v) for v in ordered[0].PixelSpacing)
    if len(ordered) > 1:
        steps = np.diff(pos, axis=0)
        step = steps.mean(axis=0)
        if not np.allclose(steps, step, atol=1e-3):
            raise ValueError("slices are not evenly spaced")
    else:
        step = normal * float(getattr(ordered[0], "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return ras, ordered


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """(N, 3) patient coordinates (LPS mm) to world (RAS mm); the same flip goes back."""
    return np.asarray(points, dtype=float) @ LPS
