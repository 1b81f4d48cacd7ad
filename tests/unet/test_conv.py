"""The U-Net's convolution: its oneDNN path for a batch of one gives PyTorch's own values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctvlab.unet.conv import Conv3d, takes_onednn_path
from ctvlab.unet.model import UNet3D


def _grads_in_float64(conv: nn.Conv3d, x: torch.Tensor, upstream: torch.Tensor):
    x64 = x.detach().double().requires_grad_()
    w64 = conv.weight.detach().double().requires_grad_()
    y = torch.nn.functional.conv3d(x64, w64, padding=1)
    (y * upstream.double()).sum().backward()
    return y, x64.grad, w64.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("channels", "out", "size", "layout"),
    [(6, 8, (16, 12, 20), torch.contiguous_format), (16, 32, (8, 8, 8), torch.channels_last_3d),
     (3, 5, (9, 7, 5), torch.contiguous_format)],
)  # fmt: skip
def test_onednn_path_matches_float64_values_and_gradients(channels, out, size, layout):
    torch.manual_seed(0)
    conv = Conv3d(channels, out, kernel_size=3, padding=1, bias=False)
    x = torch.randn(1, channels, *size).contiguous(memory_format=layout).requires_grad_()
    assert takes_onednn_path(x, conv)
    upstream = torch.randn(1, out, *size)
    y = conv(x)
    (y * upstream).sum().backward()
    y64, gx64, gw64 = _grads_in_float64(conv, x, upstream)
    assert _rel(y, y64) < 1e-6
    assert _rel(x.grad, gx64) < 1e-6
    assert _rel(conv.weight.grad, gw64) < 1e-5


@pytest.mark.parametrize(
    ("shape", "why"),
    [((2, 6, 8, 8, 8), "a batch of two already runs on oneDNN"),
     ((1, 16, 40, 40, 8), "N·C·X·Y above ATen's threshold already runs on oneDNN")],
)  # fmt: skip
def test_other_calls_are_pytorchs_own(shape, why):
    conv = Conv3d(shape[1], 4, kernel_size=3, padding=1, bias=False)
    assert not takes_onednn_path(torch.zeros(shape), conv), why
    with_bias = Conv3d(6, 4, kernel_size=3, padding=1, bias=True)
    assert not takes_onednn_path(torch.zeros(1, 6, 8, 8, 8), with_bias)
    x = torch.randn(shape)
    torch.testing.assert_close(conv(x), nn.functional.conv3d(x, conv.weight, padding=1))


def test_unet_gradients_equal_pytorchs_own_convolutions():
    """The whole network with the oneDNN path against the same weights with nn.Conv3d everywhere."""
    torch.manual_seed(1)
    fast = UNet3D(6, 4)
    plain = UNet3D(6, 4)
    for name, module in list(plain.named_modules()):
        if isinstance(module, Conv3d):
            parent, leaf = plain.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(
                parent, leaf, nn.Conv3d(module.in_channels, module.out_channels, 3, padding=1, bias=False)
            )
    plain.load_state_dict(fast.state_dict())  # same keys: the subclass changes no parameter
    x = torch.randn(1, 6, 16, 24, 16)
    upstream = torch.randn(1, 1, 16, 24, 16)
    for net in (fast, plain):
        (net(x) * upstream).sum().backward()
    grads = [(a.grad, b.grad) for a, b in zip(fast.parameters(), plain.parameters(), strict=True)]
    flat_fast = torch.cat([a.flatten() for a, _ in grads])
    flat_plain = torch.cat([b.flatten() for _, b in grads])
    assert _rel(flat_fast, flat_plain.double()) < 1e-4
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def test_under_torch_compile_the_convolution_is_pytorchs_own():
    """oneDNN's call cannot be traced with fake tensors: a compiled model takes PyTorch's path and agrees."""
    torch.manual_seed(2)
    conv = Conv3d(3, 4, kernel_size=3, padding=1, bias=False)
    x = torch.randn(1, 3, 8, 8, 8)
    compiled = torch.compile(conv, backend="eager")
    torch.testing.assert_close(compiled(x), conv(x), rtol=1e-5, atol=1e-5)
