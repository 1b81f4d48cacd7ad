"""The probability map as a DICOM Parametric Map on the planning series (written with highdicom).

Why a Parametric Map and not RT Dose: the map is a probability, not a dose, and the Parametric Map IOD says
so in its own terms (a real-world value mapping with its unit, "no units", and its range 0–1; float pixel
data, no rescaling to integers), and it refers to the very images it was computed on. RT Dose is what more
planning systems import for dose painting, but calling a probability a dose in Gy would put a wrong unit on
it; a team whose system needs RT Dose converts it knowingly.

The map is resampled (trilinear) from the NIfTI grid onto the planning series' grid, one frame per slice
(highdicom stores the frames in its own order, each with its slice's position), and carries the series' patient, study and frame of reference (highdicom copies them from
the source images). The series must be the patient's, as for the RTSTRUCT (`ctvlab.dicom.identity`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctvlab.errors import DataError


def write_parametric_map(series_dir: Path, prob: np.ndarray, affine: np.ndarray, out: Path, *, expect=None,
                         patient: str | None = None, description: str = "ctvlab probability of progression",
                         software: str = "ctvlab") -> dict[str, str]:  # fmt: skip
    """Write `prob` (float in [0, 1] on the NIfTI grid `affine`) as a Parametric Map referencing the series
    in `series_dir`; returns the series it references.

    Raises:
        DataError: the series cannot be read, is not the expected patient's, or highdicom refuses it.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from ctvlab.atomic import atomic_path
    from ctvlab.dicom.rtstruct import planning_grid, series_folder
    from ctvlab.preprocess.grid import resample

    affine = np.asarray(affine, dtype=float)
    series_aff, slices, found, shape = planning_grid(series_dir, affine, np.shape(prob), expect, patient)
    where = series_folder(slices)
    on = np.asarray(prob, dtype=np.float32)
    if on.shape != shape or not np.allclose(affine, series_aff, atol=1e-3):
        on = resample(on, affine, series_aff, shape)
    frames = np.ascontiguousarray(
        np.clip(on, 0.0, 1.0).transpose(2, 1, 0), dtype=np.float32
    )  # (slice, row, col)
    sources = [pydicom.dcmread(ds.filename) for ds in slices]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="probability", lut_explanation="probability of progression"[:64],
        unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
    )  # fmt: skip
    try:
        pm = hd.pm.ParametricMap(
            source_images=sources, pixel_array=frames, series_instance_uid=hd.UID(), series_number=9001,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ctvlab", manufacturer_model_name="ctvlab U-Net",
            software_versions=software[:64], device_serial_number="none", contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping], window_center=0.5, window_width=1.0,
            content_description=description[:64], content_label="PROBABILITY",
        )  # fmt: skip
    except (ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: cannot write a parametric map on this series: {e}") from None
    pm.SeriesDescription = description[:64]
    # Type 2C in the General Series module when the body part is paired: copied from the series (empty when
    # it has none), as the images it was computed on say.
    pm.Laterality = str(getattr(sources[0], "Laterality", "") or "")
    with atomic_path(Path(out)) as tmp:
        pm.save_as(tmp)
    return {"series_instance_uid": found.series_uid if hasattr(found, "series_uid") else str(slices[0].SeriesInstanceUID),
            "frame_of_reference_uid": str(slices[0].FrameOfReferenceUID)}  # fmt: skip
