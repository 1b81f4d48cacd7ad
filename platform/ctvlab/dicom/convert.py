"""One DICOM image series to one NIfTI file with dcm2niix (its Python package ships the binary), its
refusals given back with the user's file names, and its image checked to lie on the series' grid."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ctvlab.dicom.index import Series
from ctvlab.errors import ConfigError, DataError


def dcm2niix_binary() -> str:
    """The dcm2niix executable: the one the `dcm2niix` Python package installs beside this Python, else on
    the PATH."""
    import sys

    here = Path(sys.executable).parent / "dcm2niix"
    found = str(here) if here.is_file() else shutil.which("dcm2niix")
    if not found:
        raise ConfigError("dcm2niix not found: pip install dcm2niix (ctvlab's dependencies include it)")
    return found


def convert_series(series: Series, out_file: Path, grid: tuple[np.ndarray, list] | None = None) -> None:
    """One series to one NIfTI file with dcm2niix (scanner coordinates kept, no cropping or reorienting).

    dcm2niix reads a folder, so the series' files are linked into a temporary one; its messages are
    given back with the user's file names, not the links'. Given the series' `grid` (`series_grid`), the
    converted image must lie on it.

    Raises:
        DataError: dcm2niix refuses the series, or its image is not on the series' grid.
    """
    import nibabel as nib

    where = f"series {series.description!r} in {series.folder}"
    with tempfile.TemporaryDirectory(prefix="ctvlab-dcm-") as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.mkdir()
        dst.mkdir()
        links = {}
        for n, f in enumerate(series.files):
            link = src / f"{n:05d}.dcm"
            os.symlink(f.resolve(), link)
            links[str(link)] = str(f)
        r = subprocess.run([dcm2niix_binary(), "-z", "y", "-b", "n", "-f", "image", "-o", str(dst), str(src)],
                           capture_output=True, text=True)  # fmt: skip
        made = sorted(dst.glob("image*.nii.gz"))
        if r.returncode != 0 or len(made) != 1:
            raise DataError(f"{where}: dcm2niix cannot convert its {len(series.files)} files into one image "
                            f"(it made {len(made)}): {_dcm2niix_reasons(r.stdout + r.stderr, links, tmp)}")  # fmt: skip
        if grid is not None:
            img = nib.load(str(made[0]))
            gap = _grid_gap(img.affine, img.shape[:3], grid)
            if gap is not None:
                raise DataError(f"{where}: dcm2niix placed the image {gap} away from the grid its headers "
                                "describe; the series' geometry is not what ctvlab can trust")  # fmt: skip
        shutil.move(str(made[0]), out_file)


def _dcm2niix_reasons(text: str, links: dict[str, str], tmp: str) -> str:
    """dcm2niix's warnings and errors, its temporary links replaced by the user's files."""
    for link in sorted(links, key=len, reverse=True):
        text = text.replace(link, links[link])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(("Conversion required", "Chris Rorden", "dcm2niix"))
            and tmp not in line and "Unable to determine manufacturer" not in line]  # fmt: skip
    return " / ".join(keep[-4:]) or "no reason given"


def _grid_gap(affine: np.ndarray, shape, grid: tuple[np.ndarray, list]) -> str | None:
    """How far the corners of a converted image's grid lie from the series' grid; None when within a tenth
    of a voxel (dcm2niix and ctvlab compute the slice step from the same positions)."""
    from itertools import product

    series_aff, slices = grid
    ours = (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    if sorted(int(n) for n in shape) != sorted(ours):
        return f"as {tuple(int(n) for n in shape)} voxels instead of {ours}"

    def corners(a, sh):
        return np.array(
            [a[:3, :3] @ np.array(c, float) + a[:3, 3] for c in product(*[(0, n - 1) for n in sh])]
        )

    theirs, mine = corners(affine, shape), corners(series_aff, ours)
    gap = max(float(np.linalg.norm(theirs - p, axis=1).min()) for p in mine)
    voxel = float(np.linalg.norm(series_aff[:3, :3], axis=0).min())
    return None if gap <= 0.1 * voxel else f"{gap:.2f} mm"
