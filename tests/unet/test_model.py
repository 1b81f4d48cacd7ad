"""The 3D U-Net: shapes, parameter count against the architecture, save/load, a toy fit."""

from __future__ import annotations

import io
import json

import pytest
import torch

from ctvlab.config import UNetModelConfig
from ctvlab.data.layout import MODALITY_SETS
from ctvlab.unet.losses import bce_loss, dice_loss
from ctvlab.unet.model import UNet3D, build_unet, model_from_spec, model_spec


def expected_parameters(in_channels: int, f: int) -> int:
    """Parameters of the architecture written out by hand (instance norm with affine, no conv bias).

    Encoder stage: conv(c_in→c) + norm(c) + conv(c→c) + norm(c). Decoder level: transposed conv
    (2c→c, kernel 2, with bias) + conv(2c→c) + norm + conv(c→c) + norm. Head: 1×1×1 conv (c→1) + bias.
    """

    def block(c_in, c):
        return 27 * c_in * c + 2 * c + 27 * c * c + 2 * c

    widths = [f, 2 * f, 4 * f, 8 * f]
    encoder = sum(block(c_in, c) for c_in, c in zip([in_channels, *widths[:-1]], widths, strict=True))
    decoder = sum(8 * 2 * c * c + c + block(2 * c, c) for c in widths[:-1])
    return encoder + decoder + f + 1


@pytest.mark.parametrize(("in_channels", "base"), [(6, 48), (2, 4), (4, 5)])
def test_parameter_count_matches_architecture(in_channels, base):
    model = UNet3D(in_channels, base)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(in_channels, base)


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_forward_shape(norm):
    model = UNet3D(3, base_features=4, norm=norm, dropout=0.1)
    out = model(torch.randn(2, 3, 16, 8, 24))
    assert out.shape == (2, 1, 16, 8, 24) and out.dtype == torch.float32


@pytest.mark.parametrize(
    ("shape", "match"), [((1, 2, 16, 12, 16), "multiples of 8"), ((1, 3, 16, 16, 16), r"\(B, 2, X, Y, Z\)")]
)
def test_forward_rejects_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        UNet3D(2, 4)(torch.zeros(shape))


def test_output_depends_on_input_at_full_resolution():
    """The top-level skip connection carries full-resolution detail: a one-voxel change in the input
    changes the logit at that voxel."""
    torch.manual_seed(0)
    model = UNet3D(1, 4).eval()
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    model(x)[0, 0, 5, 6, 7].backward()
    assert x.grad[0, 0, 5, 6, 7].abs() > 0


def test_spec_round_trip_with_weights_only(tmp_path):
    cfg = UNetModelConfig(base_features=4, modality_set="anat_diff", norm="group", dropout=0.2)
    torch.manual_seed(0)
    model = build_unet(cfg, in_channels=4).eval()
    spec = model_spec(cfg, 4)
    assert spec["channels"] == list(MODALITY_SETS["anat_diff"])
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)

    rebuilt = model_from_spec(json.loads((tmp_path / "spec.json").read_text()))
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    rebuilt.eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_model_from_spec_rejects_foreign_spec():
    with pytest.raises(ValueError, match=r"not a ctvlab\.unet\.UNet3D spec"):
        model_from_spec({"architecture": "monai.BasicUNet", "version": 1})


def test_toy_problem_trains():
    """The target is where channel 0 is bright: a wired network learns it within 20 Adam steps."""
    torch.manual_seed(0)
    x = torch.rand(1, 2, 16, 16, 16)
    target = (x[:, :1] > 0.6).float()
    model = UNet3D(2, base_features=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        logits = model(x)
        loss = dice_loss(logits, target) + bce_loss(logits, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_forward_and_backward_on_cuda():
    model = UNet3D(6, base_features=8).cuda()
    x = torch.rand(1, 6, 32, 32, 32, device="cuda")
    target = (x[:, :1] > 0.5).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = dice_loss(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
