"""Network inputs from prepared volumes: channel selection, min-max normalisation, crop and pad.

All arrays are NumPy, spatial axes last: features (C, X, Y, Z) on the 3 mm grid of the prepared
dataset, masks (X, Y, Z). The network sees the patient's whole 3 mm grid centred in a fixed input grid
(every spatial size a multiple of 8, for three poolings); `uncrop` puts its predictions back on the full
3 mm grid.

`network_input` is the one place that builds what the network sees, for training, validation,
evaluation, ablation and prediction alike: with instance normalisation the amount of zero background
around the brain changes the normalisation statistics, so a patient padded to another grid gets another
prediction. The grid a model was trained on is recorded in its spec (`input_shape`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctvlab.data.layout import MODALITY_SETS
from ctvlab.errors import ConfigError, DataError

Box = tuple[slice, slice, slice]


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
    """The box of a whole grid (the network sees the whole prepared 3 mm grid, not a crop)."""
    return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]


def network_grid(shape: Sequence[int], trained: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The network's input grid for a patient grid of `shape` (X, Y, Z).

    The model's training grid (`trained`, the spec's `input_shape`) where the patient fits in it, which is
    every training and validation patient by construction; per axis where a new patient is larger, that
    axis grows to the next multiple of 8 instead of cropping away part of the brain.
    """
    fitted = fit_shape(shape, multiple=8)
    if trained is None:
        return fitted  # type: ignore[return-value]
    return tuple(max(int(a), int(b)) for a, b in zip(fitted, trained, strict=True))  # type: ignore[return-value]


def network_input(
    features: np.ndarray,
    feature_names: Sequence[str],
    brain: np.ndarray,
    modality_set: str,
    grid: Sequence[int],
) -> np.ndarray:
    """What the network sees of one patient: float32 (C, *grid).

    Args:
        features: (F, X, Y, Z) prepared feature channels named by `feature_names` (NaN = missing).
        brain: (X, Y, Z) brain mask (nonzero = brain).
        modality_set: the input channels (`MODALITY_SETS`).
        grid: the network's spatial input shape (`network_grid`); the whole (X, Y, Z) grid is centred in
            it (cropped centrally along an axis where the grid is smaller, which `network_grid` avoids).
    """
    image = minmax_within_brain(select_channels(features, feature_names, modality_set), brain)
    return crop_or_pad(image, full_box(features.shape[1:]), grid)


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


def prepare_example(
    features: np.ndarray,
    feature_names: Sequence[str],
    masks: np.ndarray,
    mask_names: Sequence[str],
    modality_set: str,
    box: Box,
    out_shape: Sequence[int],
) -> dict[str, np.ndarray]:
    """One training or inference example from a prepared patient.

    Args:
        features: (F, X, Y, Z) float32 feature channels named by `feature_names` (NaN = missing).
        masks: (M, X, Y, Z) mask channels named by `mask_names` (`ctvlab.data.layout.MASKS`).
        modality_set: the input channels (`MODALITY_SETS`).
        box, out_shape: the crop box on the full grid and the network's spatial input shape.

    Returns:
        {"image": float32 (C, *out_shape) min-max normalised within the brain, "label": float32
        (1, *out_shape) the composite lesion ("target" mask), "brain": float32 (1, *out_shape)}.

    Raises:
        DataError: a needed mask channel is missing.
    """
    names = list(mask_names)
    for needed in ("brain", "target"):
        if needed not in names:
            raise DataError(
                f"the masks lack the {needed!r} channel (they have {names}); re-run preprocessing."
            )
    brain = masks[names.index("brain")] > 0
    target = masks[names.index("target")] > 0
    image = minmax_within_brain(select_channels(features, feature_names, modality_set), brain)
    return {
        "image": crop_or_pad(image, box, out_shape),
        "label": crop_or_pad(target[None].astype(np.float32), box, out_shape),
        "brain": crop_or_pad(brain[None].astype(np.float32), box, out_shape),
    }
