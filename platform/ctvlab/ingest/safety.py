"""Hostile and degenerate inputs: what validation checks before it trusts a path or allocates an array.

A cohort folder comes from outside the platform, so each of its paths and files is treated as untrusted:

- a manifest path must be relative, free of `..`, and resolve (symlinks followed) to a regular file inside
  the cohort folder; folders, FIFOs, devices, dangling or looping links and unreadable files are refused;
- sizes are capped before anything is allocated (`InputLimits`): the file on disk, the bytes a gzip stream
  decompresses to (read in bounded steps, so a gzip bomb stops at the cap), and the array the NIfTI header
  announces (dimensions × item size);
- a gzip file must hold exactly one stream and nothing after it (several members or trailing bytes mean
  a file that was concatenated or damaged), and the name must say what the content is;
- the header's scaling must be usable: per NIfTI-1, `scl_slope` 0 or NaN means "not scaled" (nibabel writes
  NaN by default), but an infinite slope or intercept, or a NaN intercept beside a real slope, turns every
  voxel into Inf or NaN.

Each check raises `UnsafeInputError` with a message for the user; validation turns it into a problem of
that patient and file, so one bad file never stops the rest of the cohort.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ctvlab.config import InputLimits

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24  # decompress in 16 MiB steps, so the cap is enforced before memory is spent
MB = 1024 * 1024


class UnsafeInputError(Exception):
    """A path or file that must not be read as it is; `fix` says what the user should do."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def resolve_inside(root: Path, rel: str) -> Path:
    """The file a manifest path names, resolved, checked to be a readable regular file inside `root`.

    Raises:
        UnsafeInputError: an absolute path, `..`, a link leading out of the cohort folder, a dangling or
            looping link, a folder, FIFO, socket or device, or a file this user cannot read.
    """
    fix_rel = "give the path relative to the cohort folder, without '..', to a file inside that folder"
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise UnsafeInputError(f"is an absolute path ({rel})", fix_rel)
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise UnsafeInputError(f"leads out of its folder with '..' ({rel})", fix_rel)
    root_real = Path(os.path.realpath(root))
    path = root / rel
    try:
        real = path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise UnsafeInputError("is a symbolic link that loops", "replace the link by the file") from None
    except OSError as e:
        if path.is_symlink():
            what = (
                "loops"
                if getattr(e, "errno", None) == 40
                else f"points to {os.readlink(path)}, which does not exist"
            )
            raise UnsafeInputError(
                f"is a symbolic link that {what}", "replace the link by the file"
            ) from None
        raise UnsafeInputError(
            "file not found",
            "check the path in manifest.csv (relative to the cohort folder) or restore the file",
        ) from None
    if not real.is_relative_to(root_real):
        raise UnsafeInputError(
            f"resolves to {real}, outside the cohort folder",
            "copy the file into the cohort folder: a cohort must be self-contained, and validation never "
            "reads outside it",
        )
    mode = real.stat().st_mode
    if stat.S_ISDIR(mode):
        raise UnsafeInputError("is a folder, not a file", "name the image file itself in manifest.csv")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise UnsafeInputError(f"is {kind}, not a regular file", "replace it by the image file")
    if not os.access(real, os.R_OK):
        raise UnsafeInputError("cannot be read: permission denied", "give this user read access to the file")
    return real


def read_capped(path: Path, limits: InputLimits) -> bytes:
    """The file's bytes, decompressed when its content is gzip, within `limits`.

    Raises:
        UnsafeInputError: too large on disk or decompressed, several gzip members, bytes after the stream,
            or a name that does not match the content.
    """
    size = path.stat().st_size
    if size > limits.max_file_mb * MB:
        raise UnsafeInputError(
            f"is {size / MB:.0f} MB on disk, over the {limits.max_file_mb:g} MB limit",
            "check the image (a brain MRI is tens of MB at most), or raise cohort.limits.max_file_mb",
        )
    with open(path, "rb") as fh:
        raw = fh.read(size + 1)
    if raw[:2] != GZIP_MAGIC:
        if path.name.endswith(".gz"):
            raise UnsafeInputError("not a gzip file although its name ends in .gz", "rename it to .nii")
        return raw
    if not path.name.endswith(".gz"):
        raise UnsafeInputError(
            "holds gzip-compressed data although its name ends in .nii", "rename it to .nii.gz"
        )
    return _gunzip_one_member(raw, limits)


def _gunzip_one_member(raw: bytes, limits: InputLimits) -> bytes:
    cap = int(limits.max_decompressed_mb * MB)
    d = zlib.decompressobj(wbits=31)  # gzip wrapper: the trailer's CRC and length are verified
    out = bytearray()
    data = raw
    try:
        while True:
            out += d.decompress(data, min(_CHUNK, cap + 1 - len(out)))
            if len(out) > cap:
                raise UnsafeInputError(
                    f"decompresses to more than {limits.max_decompressed_mb:g} MB",
                    "check the image (a compression bomb, or a far larger volume than an MRI), or raise "
                    "cohort.limits.max_decompressed_mb",
                )
            data = d.unconsumed_tail
            if d.eof or not data:
                break
    except zlib.error as e:
        raise UnsafeInputError(
            f"corrupt compressed data ({e})", "re-export the file from the source data"
        ) from None
    if not d.eof:
        raise UnsafeInputError(
            "truncated: the compressed stream ends early", "re-export the file from the source data"
        )
    if d.unused_data:
        if d.unused_data[:2] == GZIP_MAGIC:
            raise UnsafeInputError(
                "holds several gzip members (files concatenated together)",
                "re-export the image as one file",
            )
        raise UnsafeInputError(
            f"has {len(d.unused_data)} bytes of trailing data after the gzip stream",
            "re-export the file from the source data",
        )
    return bytes(out)


def nifti_class(raw: bytes):
    """nibabel's NIfTI-1 or NIfTI-2 image class for decompressed bytes, by the header size they start
    with (either byte order); None when they are neither."""
    import nibabel as nib

    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    return nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None


def check_header(header, limits: InputLimits) -> None:
    """What a NIfTI header, as stored in the file, announces before the voxels are read: array size and
    usable scaling. (nibabel ignores a non-finite slope when it loads an image, but other readers may not:
    such a file has no one meaning, so it is refused.)

    Raises:
        UnsafeInputError: an array over `limits.max_image_mb`, or scaling that makes voxels Inf or NaN.
    """
    shape = tuple(int(n) for n in header.get_data_shape())
    itemsize = header.get_data_dtype().itemsize
    nbytes = float(np.prod(shape, dtype=np.float64)) * itemsize
    if nbytes > limits.max_image_mb * MB:
        raise UnsafeInputError(
            f"announces a {'×'.join(map(str, shape))} array of {itemsize}-byte values "
            f"({nbytes / MB:.0f} MB), over the {limits.max_image_mb:g} MB limit",
            "check the header's dimensions, or raise cohort.limits.max_image_mb",
        )
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    fix = "re-export the image with scl_slope 1 and scl_inter 0 (or without scaling)"
    if np.isinf(slope) or np.isinf(inter):
        raise UnsafeInputError(f"header scaling is infinite (scl_slope {slope}, scl_inter {inter})", fix)
    if np.isfinite(slope) and slope != 0 and np.isnan(inter):
        raise UnsafeInputError(f"header scaling has a NaN intercept beside slope {slope:g}", fix)


def qform_sform_mismatch_mm(header, shape: tuple[int, ...]) -> float | None:
    """Largest distance (mm) between the grid's corners placed by the sform and by the qform, when both are
    set; None otherwise. Two placements that disagree mean nobody knows where the image is."""
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if not scode or not qcode or sform is None or qform is None:
        return None
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    ones = np.c_[corners, np.ones(len(corners))]
    return float(np.linalg.norm((ones @ sform.T)[:, :3] - (ones @ qform.T)[:, :3], axis=1).max())


def output_grid_voxels(affine: np.ndarray, shape: tuple[int, ...], voxel_mm: float) -> float:
    """Voxels of a `voxel_mm` grid over this image's field of view (what preprocessing would allocate)."""
    extent = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)) * np.asarray(shape[:3], dtype=float)
    return float(np.prod(np.ceil(extent / voxel_mm)))
