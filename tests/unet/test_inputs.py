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
    network_view,
    place_box,
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


def _patient(shape=(24, 20, 16)):
    """Features and masks of a small patient: brain a box, T2L a cube, target the T2L and one far voxel."""
    rng = np.random.default_rng(1)
    features = rng.random((len(FEATURES), *shape)).astype(np.float32) * 5
    features[FEATURES.index("CNI")] = np.nan  # no MRSI for this patient
    masks = np.zeros((len(MASKS), *shape), np.uint8)
    masks[MASKS.index("brain"), 1:23, 1:19, 1:15] = 1
    masks[MASKS.index("t2l"), 4:7, 4:7, 4:7] = 1
    masks[MASKS.index("target"), 4:7, 4:7, 4:7] = 1
    masks[MASKS.index("target"), 21, 17, 13] = 1  # beyond the ring's box
    return {"patient_id": "P1", "features": features, "masks": masks}


def test_prepare_row_on_the_whole_grid():
    from ctvlab.unet.batches import prepare_row

    row = _patient()
    ex = prepare_row(row, "all", {"input_region": "grid", "input_shape": [24, 24, 16]}, (3.0, 3.0, 3.0))
    assert ex["image"].shape == (6, 24, 24, 16) and ex["label"].shape == ex["brain"].shape == (1, 24, 24, 16)
    assert ex["brain"].sum() == 22 * 18 * 14 and ex["label"].sum() == 28
    assert ex["outside_target"] == 0 and ex["outside_brain"] == 0
    assert ex["fraction"] == pytest.approx(28 / (22 * 18 * 14))
    image = ex["image"]
    assert image.min() >= 0 and image.max() <= 1 and not image[:, ex["brain"][0] == 0].any()
    np.testing.assert_array_equal(image[MODALITY_SETS["all"].index("CNI")], 0)
    # One channel checked end to end against the formula (the grid is centred: y padded by 2 on each side).
    flair = row["features"][FEATURES.index("nFLAIR")][1:23, 1:19, 1:15]
    expected = (flair - flair.min()) / (flair.max() - flair.min())
    np.testing.assert_allclose(image[0][1:23, 3:21, 1:15], expected, atol=1e-6)


def test_prepare_row_in_the_ring_region_keeps_the_whole_brain_terms():
    """The box around the T2L's 6 mm ring (3 mm voxels): the far target voxel is outside it and counted as
    missed; f is the whole brain's; normalisation is over the whole brain, before the crop."""
    from ctvlab.unet.batches import prepare_row

    row = _patient()
    spec = {"input_region": "ring", "ring_mm": 6.0}
    ex = prepare_row(row, "all", spec, (3.0, 3.0, 3.0))
    # ring: T2L voxels 4..6 grown by 2 voxels → 2..8 (7 voxels) per axis → grid 8 per axis, box 1..9 or 2..10
    assert ex["image"].shape == (6, 8, 8, 8)
    assert ex["label"].sum() == 27 and ex["outside_target"] == 1
    assert ex["outside_brain"] == 22 * 18 * 14 - ex["brain"].sum()
    assert ex["fraction"] == pytest.approx(28 / (22 * 18 * 14))
    view = network_view(spec, row["masks"][MASKS.index("brain")], row["masks"][MASKS.index("t2l")], (3, 3, 3))
    whole = minmax_within_brain(
        select_channels(row["features"], FEATURES, "all"), row["masks"][MASKS.index("brain")]
    )
    np.testing.assert_array_equal(ex["image"], view.crop(whole))


@pytest.mark.parametrize(
    ("region", "shape", "size", "expected"),
    [
        ((slice(4, 8),), (20,), (8,), (slice(2, 10),)),  # centred on the region
        ((slice(0, 3),), (20,), (8,), (slice(0, 8),)),  # moved inside the grid at the low end
        ((slice(17, 20),), (20,), (8,), (slice(12, 20),)),  # ... and at the high end
        ((slice(2, 6),), (6,), (8,), (slice(0, 6),)),  # the grid is smaller than the box: the whole axis
    ],
)
def test_place_box(region, shape, size, expected):
    # one axis at a time: the function works per axis
    full = (region[0], slice(0, 4), slice(0, 4))
    out = place_box(full, (shape[0], 4, 4), (size[0], 4, 4))
    assert out[0] == expected[0] and out[0].stop - out[0].start == min(size[0], shape[0])


def test_network_view_grows_where_a_new_patient_region_is_larger():
    brain = np.ones((40, 40, 40), bool)
    t2l = np.zeros_like(brain)
    t2l[10:30, 18:22, 18:22] = True
    spec = {"input_region": "ring", "ring_mm": 3.0, "input_shape": [16, 16, 16]}
    view = network_view(spec, brain, t2l, (3.0, 3.0, 3.0))
    assert view.grid == (24, 16, 16)  # x: 22 voxels of region → 24; y, z: 6 → the trained 16
    assert view.box[0] == slice(8, 32)


def test_validation_metrics_in_the_box_equal_the_whole_grid_metrics():
    from ctvlab.ctv import metrics as M
    from ctvlab.unet.batches import prepare_row, val_metrics_for

    row = _patient()
    masks = row["masks"]
    spec = {"input_region": "ring", "ring_mm": 6.0}
    ex = prepare_row(row, "all", spec, (3.0, 3.0, 3.0))
    view = network_view(spec, masks[MASKS.index("brain")], masks[MASKS.index("t2l")], (3, 3, 3))
    prob = np.random.default_rng(2).random(view.grid).astype(np.float32)
    ours = val_metrics_for(
        prob, ex["label"][0], ex["brain"][0], 0.5, ex["outside_target"], ex["outside_brain"]
    )
    brain, target = masks[MASKS.index("brain")] > 0, masks[MASKS.index("target")] > 0
    pred = view.uncrop(prob, brain.shape) >= 0.5
    whole = {
        k: getattr(M, k)(pred, target, brain)
        for k in ("tversky", "pcc", "dice", "sensitivity", "specificity")
    }
    assert ours == pytest.approx(whole)


def test_the_loss_in_the_box_equals_the_whole_brain_loss():
    """PCC in the box with the whole brain's f and the missed target voxels equals PCC on the whole grid
    with probability 0 outside the box."""
    import torch

    from ctvlab.config import LossConfig
    from ctvlab.unet.batches import loss_extras, prepare_row
    from ctvlab.unet.losses import make_loss

    row = _patient()
    masks = row["masks"]
    spec = {"input_region": "ring", "ring_mm": 6.0}
    ex = prepare_row(row, "all", spec, (3.0, 3.0, 3.0))
    view = network_view(spec, masks[MASKS.index("brain")], masks[MASKS.index("t2l")], (3, 3, 3))
    logits = torch.randn(1, 1, *view.grid)
    loss = make_loss(LossConfig(name="pcc"))
    ours = loss(logits, torch.from_numpy(ex["label"][None]), torch.from_numpy(ex["brain"][None]), 0,
                **loss_extras([ex], torch.device("cpu")))  # fmt: skip
    full = view.uncrop(logits.numpy(), masks.shape[1:])
    inside = view.uncrop(np.ones((1, 1, *view.grid), np.float32), masks.shape[1:]) > 0
    full = np.where(inside, full, -1e4)  # probability 0 outside the box
    brain = torch.from_numpy(masks[MASKS.index("brain")][None, None].astype(np.float32))
    target = torch.from_numpy(masks[MASKS.index("target")][None, None].astype(np.float32))
    whole = loss(torch.from_numpy(full), target, brain, 0)
    assert float(ours) == pytest.approx(float(whole), rel=1e-5)
