"""Training-time augmentation (Methods): random flips and rotations, Gaussian noise, channel shuffle
and channel drop, on an example {"image": (C, X, Y, Z), "label": (1, X, Y, Z), "brain": (1, X, Y, Z)}.

Flips and rotations come from MONAI's dictionary transforms and move all three keys together (label
and brain with nearest-neighbour interpolation, so they stay binary). MONAI has no masked noise and no
channel shuffle or drop, so those three are small `Randomizable` transforms here; they touch the image
only. Use on training volumes only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, MapTransform, RandFlipd, RandomizableTransform, RandRotated

from ctvlab.config import AugmentConfig

KEYS = ("image", "label", "brain")


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class RandGaussianNoiseInMaskd(RandomizableTransform, MapTransform):
    """With probability `prob`, add N(0, std²) noise to `key` where `mask_key` is nonzero."""

    def __init__(self, key: str, mask_key: str, prob: float, std: float):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, [key])
        self.key, self.mask_key, self.std = key, mask_key, std

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image = _to_numpy(d[self.key])
        inside = _to_numpy(d[self.mask_key]) > 0
        noise = self.R.normal(0.0, self.std, size=image.shape).astype(np.float32)
        d[self.key] = (image + noise * inside).astype(np.float32)
        return d


class RandChannelShuffled(RandomizableTransform, MapTransform):
    """With probability `prob`, permute the channels of `key` at random."""

    def __init__(self, key: str, prob: float):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, [key])
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            image = _to_numpy(d[self.key])
            d[self.key] = image[self.R.permutation(image.shape[0])]
        return d


class RandChannelDropd(RandomizableTransform, MapTransform):
    """With probability `prob`, zero one channel of `key` chosen at random (never the only channel)."""

    def __init__(self, key: str, prob: float):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, [key])
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        image = _to_numpy(d[self.key])
        if self._do_transform and image.shape[0] > 1:
            image = image.copy()
            image[self.R.randint(image.shape[0])] = 0
            d[self.key] = image
        return d


def build_augmentation(
    cfg: AugmentConfig, seed: int | None = None
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The configured augmentation as a callable on an example dict.

    Args:
        cfg: probabilities and magnitudes (`AugmentConfig`).
        seed: seeds the random state; the same seed and the same sequence of examples give the
            same outputs.

    Returns:
        `augment(example) -> example`: takes {"image", "label", "brain"} as NumPy arrays or torch
        tensors (C, X, Y, Z) and returns them as the same kind (float32; torch on the input's device),
        other keys passed through. Label and brain stay binary.
    """
    angle = math.radians(cfg.rotate_deg)
    transforms = Compose(
        [
            # One draw per axis, so any combination of the three flips occurs.
            *(RandFlipd(keys=KEYS, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)),
            RandRotated(
                keys=KEYS,
                range_x=angle,
                range_y=angle,
                range_z=angle,
                prob=cfg.rotate_prob,
                mode=("bilinear", "nearest", "nearest"),
                padding_mode="zeros",
                keep_size=True,
            ),
            RandGaussianNoiseInMaskd("image", "brain", prob=cfg.noise_prob, std=cfg.noise_std),
            RandChannelShuffled("image", prob=cfg.channel_shuffle_prob),
            RandChannelDropd("image", prob=cfg.channel_drop_prob),
        ]
    )
    transforms.set_random_state(seed=seed)

    def augment(example: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(example)
        out.update(transforms({k: example[k] for k in KEYS}))
        for k in KEYS:
            array = _to_numpy(out[k]).astype(np.float32, copy=False)
            if isinstance(example[k], torch.Tensor):
                out[k] = torch.from_numpy(np.ascontiguousarray(array)).to(example[k].device)
            else:
                out[k] = np.ascontiguousarray(array)
        return out

    return augment
