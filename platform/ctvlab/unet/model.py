"""The 3D U-Net of the study (Methods; Fig. 5b), as a short module of our own.

Four encoder stages with f, 2f, 4f and 8f features, each two 3×3×3 convolutions with normalisation
and ReLU, max-pooling between stages; a decoder that mirrors it with transposed convolutions and
skip connections by concatenation; a 1×1×1 convolution to one channel of logits.

Why not MONAI's networks: `BasicUNet` has five levels (four poolings), `UNet` uses strided residual
units instead of pooling, and `DynUNet` would need a page of kernel/stride lists to say the same thing.
This module is the figure, line by line, and its state-dict keys do not change with MONAI releases.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ctvlab.config import UNetModelConfig
from ctvlab.data.layout import MODALITY_SETS
from ctvlab.unet.conv import Conv3d

SPEC_ARCHITECTURE = "ctvlab.unet.UNet3D"
SPEC_VERSION = 1
NORMS = ("instance", "batch", "group")
POOLINGS = 3  # four stages, three poolings: spatial sizes must be multiples of 2**3


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        # Up to 8 groups, as many as divide the channels (base features need not be a multiple of 8).
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


class ConvBlock(nn.Sequential):
    """Two (3×3×3 convolution, normalisation, ReLU); spatial size unchanged."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            # No bias: the normalisation that follows removes it. `Conv3d`: nn.Conv3d with a faster CPU
            # path for a batch of one (ctvlab.unet.conv).
            layers += [
                Conv3d(c_in, out_channels, kernel_size=3, padding=1, bias=False),
                _norm(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D U-Net: (B, in_channels, X, Y, Z) → (B, 1, X, Y, Z) logits; X, Y, Z multiples of 8.

    Args:
        in_channels: input channels (the modality set's size).
        base_features: features f of the first stage; stages have f, 2f, 4f, 8f (study: 48).
        norm: "instance", "batch" or "group".
        dropout: Dropout3d probability after the bottleneck block (0: none).
    """

    def __init__(
        self, in_channels: int, base_features: int = 48, norm: str = "instance", dropout: float = 0.0
    ):
        super().__init__()
        if in_channels < 1 or base_features < 1:
            raise ValueError(f"in_channels and base_features must be ≥ 1, got {in_channels}, {base_features}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        self.in_channels = in_channels
        f = [base_features * 2**i for i in range(POOLINGS + 1)]  # f, 2f, 4f, 8f
        self.encoders = nn.ModuleList(
            [ConvBlock(c_in, c_out, norm) for c_in, c_out in zip([in_channels, *f[:-1]], f, strict=True)]
        )
        self.pool = nn.MaxPool3d(2)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        # Decoder, deepest first: upsample 2× and halve the features, concatenate the skip, two convs.
        self.ups = nn.ModuleList(
            [nn.ConvTranspose3d(f[i + 1], f[i], kernel_size=2, stride=2) for i in reversed(range(POOLINGS))]
        )
        self.decoders = nn.ModuleList([ConvBlock(2 * f[i], f[i], norm) for i in reversed(range(POOLINGS))])
        self.head = nn.Conv3d(f[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet3D expects (B, {self.in_channels}, X, Y, Z), got shape {tuple(x.shape)}")
        multiple = 2**POOLINGS
        if any(n % multiple for n in x.shape[2:]):
            raise ValueError(
                f"UNet3D needs spatial sizes that are multiples of {multiple} ({POOLINGS} poolings), got "
                f"{tuple(x.shape[2:])}; pad the input (ctvlab.unet.inputs.fit_shape, crop_or_pad)."
            )
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = decoder(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def build_unet(cfg: UNetModelConfig, in_channels: int) -> UNet3D:
    """The configured network for `in_channels` inputs."""
    return UNet3D(in_channels, base_features=cfg.base_features, norm=cfg.norm, dropout=cfg.dropout)


def model_spec(cfg: UNetModelConfig, in_channels: int) -> dict[str, Any]:
    """A JSON-able description that rebuilds the network (`model_from_spec`); saved next to its weights.

    Holds the input channel names too, so that inference feeds the channels in training order.
    """
    channels = MODALITY_SETS.get(cfg.modality_set, ())
    return {
        "architecture": SPEC_ARCHITECTURE,
        "version": SPEC_VERSION,
        "in_channels": int(in_channels),
        "base_features": int(cfg.base_features),
        "norm": cfg.norm,
        "dropout": float(cfg.dropout),
        "modality_set": cfg.modality_set,
        "channels": list(channels) if len(channels) == in_channels else None,
    }


def model_from_spec(spec: dict[str, Any]) -> UNet3D:
    """The (untrained) network a `model_spec` describes; load its state dict next.

    Raises:
        ValueError: the spec is not a ctvlab UNet3D spec of a known version.
    """
    if spec.get("architecture") != SPEC_ARCHITECTURE or spec.get("version") != SPEC_VERSION:
        raise ValueError(
            f"not a {SPEC_ARCHITECTURE} spec of version {SPEC_VERSION}: "
            f"architecture={spec.get('architecture')!r}, version={spec.get('version')!r}"
        )
    return UNet3D(
        spec["in_channels"], base_features=spec["base_features"], norm=spec["norm"], dropout=spec["dropout"]
    )
