"""Public collections' conventions as array maths: label images to ctvlab's masks, a label mapping checked
against a collection's volume file, the brain of a skull-stripped image, the ADC from a DTI trace, and
whether two images share a grid. Pure functions, no files (`ingest.import_layout` reads and writes them).
"""

from __future__ import annotations

import numpy as np

from ctvlab.ingest.layouts import Labels
from ctvlab.ingest.volume import AFFINE_TOLERANCE

# Brain mean diffusivity (median over the brain, lesion included) lies near 0.7–1.5 × 10⁻³ mm²/s; these
# windows tell which unit a trace-derived value is in, and anything outside them is refused.
MD_UNITS: tuple[tuple[float, float, float, str], ...] = (
    (1e-4, 5e-3, 1.0, "mm²/s"),
    (0.1, 5.0, 1e-3, "10⁻³ mm²/s"),
    (100.0, 5000.0, 1e-6, "10⁻⁶ mm²/s"),
)
# A volume file and the label counts agree within half a voxel, or 1% of a large compartment (a file that
# rounds its volumes); a swapped mapping differs by whole compartments.
VOLUME_TOLERANCE = 0.01


def masks_from_labels(seg: np.ndarray, labels: Labels) -> dict[str, np.ndarray]:
    """ctvlab's masks from a label image: "cel_mask", "t2l_mask" and, when the convention has one,
    "cavity_mask" (bool arrays of `seg`'s shape).

    Raises:
        ValueError: `seg` holds a label the convention does not know, or non-integer values.
    """
    values = np.unique(seg)
    if not np.array_equal(values, np.round(values)):
        raise ValueError(
            f"holds non-integer values ({values[values != np.round(values)][:3].tolist()}): not a label image"
        )
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in labels.known)
    if unknown:
        raise ValueError(
            f"holds label(s) {unknown}, which this convention does not map (it knows "
            f"{sorted(labels.known)}): is it another collection's file? Map them with --labels FILE"
        )
    masks = {"cel_mask": np.isin(seg, labels.cel), "t2l_mask": np.isin(seg, labels.t2l)}
    if labels.cavity:
        masks["cavity_mask"] = np.isin(seg, labels.cavity)
    return masks


def volume_mismatches(
    seg: np.ndarray, voxel_mm3: float, volumes: dict[str, float], labels: Labels
) -> list[str]:
    """How the label counts of `seg` disagree with a volume file (key → mm³); empty when they agree.

    A swapped mapping shows here: the volume the file gives one compartment is the count of another label.
    """
    problems = []
    for label, key in sorted(labels.volume_keys.items()):
        if key not in volumes:
            problems.append(f"has no {key!r} (label {label}); it holds {sorted(volumes)}")
            continue
        counted = float((seg == label).sum()) * voxel_mm3
        stated = float(volumes[key])
        if abs(counted - stated) > max(0.5 * voxel_mm3, VOLUME_TOLERANCE * stated):
            problems.append(f"gives {key} {stated:g} mm³ but label {label} covers {counted:g} mm³")
    return problems


def brain_from_t1c(t1c: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """The brain of a skull-stripped T1c: voxels other than its background value, with the lesion, holes filled.

    The background is the corner voxel's value, not 0: some collections store z-scored images whose
    background is a negative constant.
    """
    from scipy.ndimage import binary_fill_holes

    background = t1c[(0,) * t1c.ndim]
    return binary_fill_holes((t1c != background) | lesion)


def adc_from_trace(trace: np.ndarray) -> tuple[np.ndarray, str]:
    """ADC (mean diffusivity, mm²/s) from a DTI trace map: trace / 3, scaled to mm²/s.

    Returns:
        (the ADC as float32, the unit the trace was found in).

    Raises:
        ValueError: the trace's scale matches no known unit.
    """
    md = np.asarray(trace, dtype=np.float64) / 3.0
    inside = md[np.isfinite(md) & (md > 0)]
    if not inside.size:
        raise ValueError("holds no positive value: not a diffusion trace")
    median = float(np.median(inside))
    for low, high, scale, unit in MD_UNITS:
        if low <= median <= high:
            return (md * scale).astype(np.float32), unit
    raise ValueError(
        f"trace / 3 has a median of {median:g} over the brain, which is no known unit of diffusivity (brain "
        "tissue is near 0.8 × 10⁻³ mm²/s): check that this is the trace (λ1+λ2+λ3) map"
    )


def on_grid(
    shape: tuple[int, ...], affine: np.ndarray, ref_shape: tuple[int, ...], ref_affine: np.ndarray
) -> bool:
    return tuple(shape[:3]) == tuple(ref_shape[:3]) and np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE)
