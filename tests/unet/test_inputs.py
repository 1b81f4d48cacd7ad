"""Channel selection, min-max normalisation within the brain, crop/pad and its inverse."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.data.layout import FEATURES, MASKS, MODALITY_SETS
from ctvlab.errors import ConfigError, DataError
from ctvlab.unet.inputs import (
    brain_bbox,
    crop_or_pad,
    fit_shape,
    minmax_within_brain,
    prepare_example,
    select_channels,
    uncrop,
    union_bbox,
)


def _labelled_features(shape=(4, 4, 4)) -> np.ndarray:
    """Channel i filled with the value i, so a selected channel tells which feature it came from."""
    return np.stack([np.full(shape, i, np.float32) for i in range(len(FEATURES))])


@pytest.mark.parametrize(
    ("modality_set", "expected"),
    [
        ("anat", ["nFLAIR", "nT1c"]),
        ("anat_diff", ["nFLAIR", "nT1c", "nADC", "nFA"]),
        ("anat_mrsi", ["nFLAIR", "nT1c", "CNI", "CCrI"]),
        ("all", ["nFLAIR", "nT1c", "nADC", "nFA", "CNI", "CCrI"]),
    ],
)
def test_select_channels_order(modality_set, expected):
    out = select_channels(_labelled_features(), FEATURES, modality_set)
    assert [FEATURES[int(v)] for v in out[:, 0, 0, 0]] == expected == list(MODALITY_SETS[modality_set])


def test_select_channels_unknown_set_names_the_valid_ones():
    with pytest.raises(ConfigError, match="anat, anat_diff, anat_mrsi, all"):
        select_channels(_labelled_features(), FEATURES, "mrsi_only")


def test_select_channels_missing_channel():
    names = [n for n in FEATURES if n != "CNI"]
    with pytest.raises(DataError, match="CNI"):
        select_channels(_labelled_features()[: len(names)], names, "all")


def test_minmax_hand_case():
    brain = np.zeros((2, 2, 2), bool)
    brain[0] = True  # 4 brain voxels
    x = np.full((4, 2, 2, 2), 100.0)  # 100 outside the brain must not change min or max
    x[0, 0] = [[2.0, 4.0], [6.0, np.nan]]  # → 0, 0.5, 1; NaN (missing MRSI) → 0
    x[1, 0] = 7.0  # constant in the brain → 0
    x[2, 0] = np.nan  # entirely missing → 0
    x[3, 0] = [[-1.0, 1.0], [0.0, 3.0]]  # → 0, 0.5, 0.25, 1
    out = minmax_within_brain(x, brain)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], [[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_array_equal(out[2], 0)
    np.testing.assert_array_equal(out[3, 0], [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(out[:, 1], 0)  # outside the brain


def test_brain_bbox_and_union():
    brain = np.zeros((10, 12, 14), bool)
    brain[2:5, 3:9, 7] = True
    assert brain_bbox(brain) == (slice(2, 5), slice(3, 9), slice(7, 8))
    other = (slice(1, 4), slice(5, 11), slice(0, 3))
    assert union_bbox([brain_bbox(brain), other]) == (slice(1, 5), slice(3, 11), slice(0, 8))
    with pytest.raises(DataError, match="empty"):
        brain_bbox(np.zeros((3, 3, 3)))


@pytest.mark.parametrize(
    ("shape", "multiple", "expected"),
    [((13, 16, 17), 8, (16, 16, 24)), ((1, 8, 9), 8, (8, 8, 16)), ((5, 6, 7), 4, (8, 8, 8))],
)
def test_fit_shape(shape, multiple, expected):
    assert fit_shape(shape, multiple) == expected


def test_crop_or_pad_centres_the_box():
    x = np.arange(10 * 3 * 3, dtype=np.float32).reshape(10, 3, 3)
    box = (slice(2, 7), slice(0, 3), slice(0, 3))  # 5 along X
    out = crop_or_pad(x, box, (8, 3, 3))
    # 5 voxels centred in 8: one zero before, two after.
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_array_equal(out[1:6], x[2:7])
    np.testing.assert_array_equal(out[6:], 0)
    # Smaller output than box: the centre 3 of the 5 (x[3:6]).
    np.testing.assert_array_equal(crop_or_pad(x, box, (3, 3, 3)), x[3:6])


@pytest.mark.parametrize("out_shape", [(16, 16, 16), (8, 16, 8)])
def test_uncrop_inverts_crop_or_pad(out_shape):
    rng = np.random.default_rng(0)
    x = rng.random((2, 20, 18, 15)).astype(np.float32)
    box = (slice(3, 14), slice(2, 16), slice(4, 15))  # 11 × 14 × 11
    back = uncrop(crop_or_pad(x, box, out_shape), box, out_shape, x.shape[1:])
    assert back.shape == x.shape
    # Where the output is smaller than the box, only its centre survives.
    kept = []
    for s, m in zip(box, out_shape, strict=True):
        n = s.stop - s.start
        start = s.start + max(0, (n - m) // 2)
        kept.append(slice(start, start + min(n, m)))
    np.testing.assert_array_equal(back[(..., *kept)], x[(..., *kept)])
    outside = np.ones(x.shape[1:], bool)
    outside[tuple(kept)] = False
    assert not back[:, outside].any()
    if out_shape == (16, 16, 16):  # box fits: the whole box comes back
        np.testing.assert_array_equal(back[(..., *box)], x[(..., *box)])


def test_prepare_example():
    shape = (12, 12, 12)
    rng = np.random.default_rng(1)
    features = rng.random((len(FEATURES), *shape)).astype(np.float32) * 5
    features[FEATURES.index("CNI")] = np.nan  # no MRSI for this patient
    masks = np.zeros((len(MASKS), *shape), np.uint8)
    masks[MASKS.index("brain"), 2:10, 3:9, 1:11] = 1
    masks[MASKS.index("target"), 4:6, 4:6, 4:6] = 1
    box = brain_bbox(masks[MASKS.index("brain")])
    out_shape = fit_shape((8, 6, 10))
    ex = prepare_example(features, FEATURES, masks, MASKS, "all", box, out_shape)
    assert ex["image"].shape == (6, 8, 8, 16)
    assert ex["label"].shape == ex["brain"].shape == (1, 8, 8, 16)
    assert all(v.dtype == np.float32 for v in ex.values())
    assert ex["brain"].sum() == 8 * 6 * 10 and ex["label"].sum() == 8
    image = ex["image"]
    assert image.min() >= 0 and image.max() <= 1
    assert not image[:, ex["brain"][0] == 0].any()
    np.testing.assert_array_equal(image[MODALITY_SETS["all"].index("CNI")], 0)
    # One channel checked end to end against the formula.
    flair = features[FEATURES.index("nFLAIR")][box]
    expected = (flair - flair.min()) / (flair.max() - flair.min())
    np.testing.assert_allclose(image[0][:, 1:7, 3:13], expected, atol=1e-6)
