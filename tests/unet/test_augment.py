"""Augmentation: alignment of image, label and brain; binary masks; per-channel ops; determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctvlab.config import AugmentConfig
from ctvlab.unet.augment import build_augmentation

OFF = {
    "flip_prob": 0.0,
    "rotate_prob": 0.0,
    "noise_prob": 0.0,
    "channel_shuffle_prob": 0.0,
    "channel_drop_prob": 0.0,
}


def _cfg(**on) -> AugmentConfig:
    return AugmentConfig(**{**OFF, **on})


def _example(seed=0, n=16):
    """Three channels; channel 0 is an off-centre ellipsoid blob whose threshold is the label."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij")).astype(np.float32)
    r2 = ((grid[0] - 5) / 4) ** 2 + ((grid[1] - 9) / 3) ** 2 + ((grid[2] - 7) / 5) ** 2
    blob = np.exp(-r2).astype(np.float32)
    image = np.stack([blob, rng.random((n, n, n)), rng.random((n, n, n))]).astype(np.float32)
    brain = np.zeros((1, n, n, n), np.float32)
    brain[:, 1:-1, 2:-2, 1:-1] = 1
    image *= brain
    return {"image": image, "label": (image[:1] > 0.5).astype(np.float32), "brain": brain}


def _dice(a, b):
    return 2 * (a * b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("as_torch", [False, True])
def test_all_probabilities_zero_is_identity(as_torch):
    ex = _example()
    if as_torch:
        ex = {k: torch.from_numpy(v) for k, v in ex.items()}
    out = build_augmentation(_cfg(), seed=0)({**ex, "patient_id": "P001"})
    assert out["patient_id"] == "P001"
    for k in ("image", "label", "brain"):
        assert isinstance(out[k], torch.Tensor) == as_torch
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ex[k]))


def test_flips_move_every_key_together():
    ex = _example()
    out = build_augmentation(_cfg(flip_prob=1.0), seed=0)(ex)
    for k in ("image", "label", "brain"):  # a flip on each axis, to the voxel
        np.testing.assert_array_equal(out[k], np.flip(ex[k], axis=(1, 2, 3)))
    np.testing.assert_array_equal(out["label"], out["image"][:1] > 0.5)


def test_rotation_keeps_label_on_image_and_masks_binary():
    ex = _example()
    augment = build_augmentation(_cfg(rotate_prob=1.0, rotate_deg=25.0), seed=3)
    for _ in range(3):
        out = augment(ex)
        assert not np.array_equal(out["label"], ex["label"])  # it did rotate
        assert set(np.unique(out["label"])) <= {0.0, 1.0}
        assert set(np.unique(out["brain"])) <= {0.0, 1.0}
        # Label (nearest) and thresholded image (linear) differ at most on the blob's rim.
        assert _dice(out["label"], out["image"][:1] > 0.5) > 0.85
        assert out["label"].sum() == pytest.approx(ex["label"].sum(), rel=0.25)


def test_noise_only_inside_the_brain():
    ex = _example()
    out = build_augmentation(_cfg(noise_prob=1.0, noise_std=0.1), seed=0)(ex)
    diff = out["image"] - ex["image"]
    inside = np.broadcast_to(ex["brain"] > 0, diff.shape)
    assert not diff[~inside].any()
    assert diff[inside].std() == pytest.approx(0.1, rel=0.05)
    np.testing.assert_array_equal(out["label"], ex["label"])


def test_channel_drop_zeroes_one_whole_channel():
    ex = _example()
    out = build_augmentation(_cfg(channel_drop_prob=1.0), seed=0)(ex)
    zero = [c for c in range(3) if not out["image"][c].any()]
    assert len(zero) == 1
    for c in set(range(3)) - set(zero):
        np.testing.assert_array_equal(out["image"][c], ex["image"][c])


def test_channel_shuffle_permutes_channels():
    ex = _example()
    augment = build_augmentation(_cfg(channel_shuffle_prob=1.0), seed=0)
    orders = set()
    for _ in range(6):
        out = augment(ex)
        order = tuple(
            next(j for j in range(3) if np.array_equal(out["image"][c], ex["image"][j])) for c in range(3)
        )
        assert sorted(order) == [0, 1, 2]
        orders.add(order)
    assert len(orders) > 1


def _run(seed, n=2):
    augment = build_augmentation(AugmentConfig(**{k: 1.0 for k in OFF}), seed=seed)
    ex = _example()
    return [augment(ex) for _ in range(n)]


def test_deterministic_per_seed():
    first, again, other = _run(7), _run(7), _run(8)
    for a, b in zip(first, again, strict=True):
        for k in ("image", "label", "brain"):
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert not np.array_equal(first[0]["image"], first[1]["image"])  # fresh draws per call
