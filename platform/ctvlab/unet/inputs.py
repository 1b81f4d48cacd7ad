"""Network inputs from prepared volumes: channel selection, min-max normalisation, the region the network
sees, crop and pad.

All arrays are NumPy, spatial axes last: features (C, X, Y, Z) on the 3 mm grid of the prepared
dataset, masks (X, Y, Z). What the network sees of a patient is a `NetworkView`: a box on the patient's
grid, centred in a fixed input grid (every spatial size a multiple of 8, for three poolings); `uncrop`
puts its predictions back on the full 3 mm grid (zero outside the box).

Two regions (`unet.model.input_region`):
- "ring" (default): the box of the study's analysis region, the brain within `ring_mm` (4 cm) of the
  pre-RT T2L, where every recurrence of the study happened (the study's Methods: Regions). The input grid is the largest
  such box of the training patients; a later patient whose region is larger gets a larger grid along
  that axis. The region is computed from the pre-RT T2L alone, so a new patient gets it as a training
  patient did. At 3 mm it is a third to a half of the whole grid, and training and inference cost that
  much less.
- "grid": the patient's whole prepared grid centred in the largest grid of the training patients (models
  trained before the region existed record no region and are read as "grid").

`network_input` is the one place that builds what the network sees, for training, validation,
evaluation, ablation and prediction alike: with instance normalisation the amount of zero background
around the brain changes the normalisation statistics, so a patient placed in another grid gets another
prediction. The view's settings are recorded in the model's spec (`input_region`, `ring_mm`,
`input_shape`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.data.layout import MODALITY_SETS
from ctvlab.errors import ConfigError, DataError

Box = tuple[slice, slice, slice]
REGIONS = ("ring", "grid")


def select_channels(features: np.ndarray, feature_names: Sequence[str], modality_set: str) -> np.ndarray:
    """The channels of a modality set, in the order of `MODALITY_SETS[modality_set]`.

    Args:
        features: (F, X, Y, Z), one channel per name in `feature_names` (the 13 of `FEATURES`).
        feature_names: the channel names of `features`, in order.
        modality_set: "anat", "anat_diff", "anat_mrsi" or "all".

    Returns:
        (C, X, Y, Z), a copy.

    Raises:
        ConfigError: unknown modality set.
        DataError: a channel of the set is not in `feature_names`.
    """
    if modality_set not in MODALITY_SETS:
        valid = ", ".join(MODALITY_SETS)
        raise ConfigError(f"unknown modality set {modality_set!r}; choose one of: {valid}.")
    names = list(feature_names)
    if features.shape[0] != len(names):
        raise DataError(
            f"features have {features.shape[0]} channels but {len(names)} channel names were given."
        )
    missing = [n for n in MODALITY_SETS[modality_set] if n not in names]
    if missing:
        raise DataError(
            f"modality set {modality_set!r} needs channel(s) {missing}, which the prepared volume lacks "
            f"(it has {names}); re-run `ctvlab preprocess` or choose another modality set."
        )
    return features[[names.index(n) for n in MODALITY_SETS[modality_set]]].copy()


def require_channels(prep: Path, patient_ids: Sequence[str], modality_set: str) -> None:
    """Refuse a modality set whose channels some patients were prepared without, naming both
    (`preprocess.prepare.missing_channels`; MRSI is exempt: its channels are zero for a patient without it).

    Raises:
        ConfigError: unknown modality set.
        DataError: the channels and the patients that lack them.
    """
    from ctvlab.preprocess.prepare import describe_missing, missing_channels

    if modality_set not in MODALITY_SETS:
        raise ConfigError(
            f"unknown modality set {modality_set!r}; choose one of: {', '.join(MODALITY_SETS)}."
        )
    lacking = missing_channels(Path(prep), list(patient_ids), list(MODALITY_SETS[modality_set]))
    if lacking:
        usable = [s for s, cs in MODALITY_SETS.items() if not set(cs) & set(lacking)]
        raise DataError(
            f"modality set {modality_set!r} needs {', '.join(lacking)}, which the cohort does not have "
            f"({describe_missing(lacking)}); choose a modality set without it (unet.model.modality_set: "
            f"{', '.join(usable) or 'none fits'}) or give those maps in the manifest and run `ctvlab preprocess` again"
        )


def minmax_within_brain(x: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Per-channel min-max normalisation to [0, 1] over the finite brain voxels (Methods).

    Args:
        x: (C, X, Y, Z) maps; NaN where a value is missing (MRSI outside its PRESS box or not acquired).
        brain: (X, Y, Z) or (1, X, Y, Z) brain mask (nonzero = brain).

    Returns:
        float32 (C, X, Y, Z): in [0, 1] inside the brain; 0 outside it, where the value is missing (the
        study's convention for missing MRSI), and for a channel that is constant or entirely missing in
        the brain.
    """
    inside = np.asarray(brain).reshape(x.shape[1:]) > 0
    out = np.zeros(x.shape, dtype=np.float32)
    for c in range(x.shape[0]):
        channel = x[c].astype(np.float64)
        valid = inside & np.isfinite(channel)
        if not valid.any():
            continue
        lo, hi = channel[valid].min(), channel[valid].max()
        if hi <= lo:
            continue
        out[c][valid] = ((channel[valid] - lo) / (hi - lo)).astype(np.float32)
    return out


def brain_bbox(brain: np.ndarray) -> Box:
    """The smallest box (as slices) that holds every brain voxel of an (X, Y, Z) mask.

    Raises:
        DataError: the mask is empty.
    """
    nonzero = np.nonzero(np.asarray(brain) > 0)
    if len(nonzero) != 3:
        raise ValueError(f"brain mask must be (X, Y, Z), got shape {np.shape(brain)}")
    if nonzero[0].size == 0:
        raise DataError("the brain mask is empty; check the patient's brain mask in the prepared dataset.")
    return tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in nonzero)  # type: ignore[return-value]


def union_bbox(boxes: Sequence[Box]) -> Box:
    """The smallest box that holds every box in `boxes` (for a cohort on one common grid)."""
    if not boxes:
        raise ValueError("union_bbox needs at least one box")
    return tuple(
        slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3)
    )  # type: ignore[return-value]


def fit_shape(shape: Sequence[int], multiple: int = 8) -> tuple[int, ...]:
    """Each size rounded up to a multiple of `multiple` (8: the U-Net pools three times)."""
    return tuple(int(-(-int(n) // multiple) * multiple) for n in shape)


def full_box(shape: Sequence[int]) -> Box:
    """The box of a whole grid."""
    return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]


def network_grid(shape: Sequence[int], trained: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The network's input grid for a box of `shape` (X, Y, Z).

    The model's training grid (`trained`, the spec's `input_shape`) where the box fits in it, which is
    every training and validation patient by construction; per axis where a new patient's box is larger,
    that axis grows to the next multiple of 8 instead of cropping part of it away.
    """
    fitted = fit_shape(shape, multiple=8)
    if trained is None:
        return fitted  # type: ignore[return-value]
    return tuple(max(int(a), int(b)) for a, b in zip(fitted, trained, strict=True))  # type: ignore[return-value]


def region_box(brain: np.ndarray, t2l: np.ndarray, spacing: Sequence[float], ring_mm: float) -> Box:
    """The bounding box of the study's analysis region: brain voxels within `ring_mm` of the pre-RT T2L
    (`ctvlab.preprocess.regions.ring`, the T2L included).

    Raises:
        DataError: the T2L or the region is empty.
    """
    from ctvlab.preprocess.regions import ring

    t2l = np.asarray(t2l) > 0
    if not t2l.any():
        raise DataError("the pre-RT T2L mask is empty: the network's region is defined around it.")
    region = ring(np.asarray(brain) > 0, t2l, tuple(float(s) for s in spacing), float(ring_mm))
    if not region.any():
        raise DataError("no brain voxel lies within the analysis ring of the T2L; check the brain mask.")
    return brain_bbox(region)


def place_box(region: Box, shape: Sequence[int], size: Sequence[int]) -> Box:
    """A box of `size` centred on `region`, moved inside a grid of `shape` (X, Y, Z).

    Along an axis where the grid is smaller than `size`, the box is the whole axis (`crop_or_pad` centres
    it in the network grid with zero padding). Where `region` is larger than `size` the box is `region`'s
    central part; `network_view` never asks for that.
    """
    out = []
    for s, n, m in zip(region, shape, size, strict=True):
        n, m = int(n), int(m)
        if n <= m:
            out.append(slice(0, n))
            continue
        centre = (s.start + s.stop) / 2.0
        start = int(np.clip(np.floor(centre - m / 2.0 + 0.5), 0, n - m))
        out.append(slice(start, start + m))
    return tuple(out)  # type: ignore[return-value]


@dataclass(frozen=True)
class NetworkView:
    """What the network sees of one patient: `box` on the patient's grid, centred in an input of `grid`."""

    box: Box
    grid: tuple[int, int, int]

    def crop(self, x: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) on the patient's grid → (..., *grid)."""
        return crop_or_pad(x, self.box, self.grid)

    def uncrop(self, y: np.ndarray, full_shape: Sequence[int]) -> np.ndarray:
        """(..., *grid) → (..., *full_shape), zero outside the box."""
        return uncrop(y, self.box, self.grid, full_shape)


def view_settings(spec: Mapping[str, Any]) -> tuple[str, float | None, tuple[int, int, int] | None]:
    """(region, ring_mm, trained grid) of a model spec; a spec without a region is a "grid" model.

    Raises:
        DataError: an unknown region, or a "ring" model without `ring_mm`.
    """
    region = spec.get("input_region") or "grid"
    if region not in REGIONS:
        raise DataError(f"model spec: unknown input_region {region!r}; expected one of {', '.join(REGIONS)}")
    ring_mm = spec.get("ring_mm")
    if region == "ring" and not ring_mm:
        raise DataError("model spec: input_region 'ring' needs ring_mm")
    shape = spec.get("input_shape")
    trained = tuple(int(n) for n in shape) if shape else None
    return region, (float(ring_mm) if ring_mm else None), trained  # type: ignore[return-value]


def network_view(
    spec: Mapping[str, Any], brain: np.ndarray, t2l: np.ndarray, spacing: Sequence[float]
) -> NetworkView:
    """The view of a patient for a model (`spec`: `input_region`, `ring_mm`, `input_shape`).

    Args:
        spec: the model's spec, or the same three keys before training (`input_shape` may be absent).
        brain, t2l: (X, Y, Z) masks on the patient's prepared grid.
        spacing: the grid's voxel size in mm.
    """
    shape = tuple(int(n) for n in np.shape(brain))
    region, ring_mm, trained = view_settings(spec)
    if region == "grid":
        return NetworkView(full_box(shape), network_grid(shape, trained))
    roi = region_box(brain, t2l, spacing, ring_mm)  # type: ignore[arg-type]
    grid = network_grid(box_shape(roi), trained)
    return NetworkView(place_box(roi, shape, grid), grid)


def network_input(
    features: np.ndarray,
    feature_names: Sequence[str],
    brain: np.ndarray,
    modality_set: str,
    view: NetworkView,
) -> np.ndarray:
    """What the network sees of one patient: float32 (C, *view.grid).

    Args:
        features: (F, X, Y, Z) prepared feature channels named by `feature_names` (NaN = missing).
        brain: (X, Y, Z) brain mask (nonzero = brain).
        modality_set: the input channels (`MODALITY_SETS`).
        view: the box and input grid (`network_view`). Normalisation runs over the whole brain before
            the crop, so the box changes where the network looks, not the values it sees.
    """
    image = minmax_within_brain(select_channels(features, feature_names, modality_set), brain)
    return view.crop(image)


def box_shape(box: Box) -> tuple[int, int, int]:
    """Sizes of a box of explicit slices."""
    return tuple(s.stop - s.start for s in box)  # type: ignore[return-value]


def _placement(box: Box, out_shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per axis (offset into the box, offset into the output, length) of the copied block.

    The box is centred in the output: padded with zeros where it is smaller, centre-cropped where it
    is larger (a patient whose brain exceeds the cohort's box loses its outermost rim).
    """
    placement = []
    for s, m in zip(box, out_shape, strict=True):
        if s.start is None or s.stop is None or s.step not in (None, 1):
            raise ValueError(f"box slices need explicit start and stop and step 1, got {s}")
        n = s.stop - s.start
        placement.append((max(0, (n - m) // 2), max(0, (m - n) // 2), min(n, m)))
    return placement


def crop_or_pad(x: np.ndarray, box: Box, out_shape: Sequence[int]) -> np.ndarray:
    """Crop (..., X, Y, Z) to `box`, then centre it in a zero array of spatial shape `out_shape`.

    Args:
        x: (..., X, Y, Z) on the full grid.
        box: three slices with explicit start and stop, inside the grid (see `brain_bbox`).
        out_shape: spatial output shape; where smaller than the box, the box's centre is kept.

    Returns:
        (..., *out_shape), same dtype as `x`.
    """
    lead = x.shape[:-3]
    out = np.zeros((*lead, *out_shape), dtype=x.dtype)
    src, dst = [], []
    for s, (src_off, dst_off, n) in zip(box, _placement(box, out_shape), strict=True):
        src.append(slice(s.start + src_off, s.start + src_off + n))
        dst.append(slice(dst_off, dst_off + n))
    out[(..., *dst)] = x[(..., *src)]
    return out


def uncrop(y: np.ndarray, box: Box, out_shape: Sequence[int], full_shape: Sequence[int]) -> np.ndarray:
    """Put (..., *out_shape) made by `crop_or_pad(x, box, out_shape)` back on the full grid.

    Returns:
        (..., *full_shape), same dtype as `y`, zero outside the part of the box the network saw.
    """
    lead = y.shape[:-3]
    out = np.zeros((*lead, *full_shape), dtype=y.dtype)
    src, dst = [], []
    for s, (src_off, dst_off, n) in zip(box, _placement(box, out_shape), strict=True):
        dst.append(slice(s.start + src_off, s.start + src_off + n))
        src.append(slice(dst_off, dst_off + n))
    out[(..., *dst)] = y[(..., *src)]
    return out
