"""The U-Net's 3×3×3 convolution, with a CPU path that keeps a batch of one on oneDNN.

PyTorch picks a CPU convolution kernel per call. For a float32 batch of ONE volume whose
N·C·X·Y is at most 20480 (every layer below the first at 3 mm, and all of a 40³ crop) it picks its generic
im2col kernel (`aten::slow_conv3d_forward`, and the same for the backward pass) instead of oneDNN;
a batch of two always gets oneDNN. The study trains with mini-batch 1, so on CPU most of a step ran in the
slow kernel: 62% of a step was `convolution_backward` (profile in docs/training-speed.md).

`Conv3d` below is `torch.nn.Conv3d` (same parameters, same state-dict keys) that, on exactly those calls,
runs the forward pass with oneDNN (`aten::mkldnn_convolution`) and computes both gradients as oneDNN
convolutions too: the input gradient is the convolution of the output gradient with the flipped,
transposed kernel; the weight gradient is the correlation of the padded input with the output gradient,
i.e. a convolution over the batch axis with the output gradient as a (large) kernel. Gradients equal
PyTorch's own to float32 rounding (`tests/unet/test_conv.py` against float64). Every other call (GPU,
bf16, larger inputs, batches > 1, another kernel size, stride or padding) is PyTorch's own convolution.

Why not a library: the choice is a private heuristic of ATen's convolution dispatcher; neither PyTorch nor
MONAI exposes a switch for it (`torch.backends.mkldnn` only enables or disables oneDNN as a whole).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# ATen's threshold: a batch-1 float32 CPU convolution with N·C·X·Y above it already runs on oneDNN.
ATEN_ONEDNN_MIN = 20480
_ONE = (1, 1, 1)
_ZERO = (0, 0, 0)
_enabled = True


@contextlib.contextmanager
def aten_only() -> Iterator[None]:
    """Within the block, every convolution is PyTorch's own choice (the benchmark's "before" path)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _onednn(x: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
    return torch.ops.aten.mkldnn_convolution(x, weight, None, list(padding), list(_ONE), list(_ONE), 1)


class _OneDnnConv3d(torch.autograd.Function):
    """y = conv3d(x, w, padding=1) for a 3×3×3 kernel, stride 1, no bias; both passes on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight, _ONE)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # The adjoint of a stride-1 'same' convolution: the flipped kernel, in and out swapped.
            grad_x = _onednn(grad, weight.flip(2, 3, 4).transpose(0, 1), _ONE)
        if ctx.needs_input_grad[1]:
            # dW[o, i, a, b, c] = Σ_n Σ_s grad[n, o, s] · x_pad[n, i, s + (a, b, c)]: the batch axis becomes
            # the channel axis that the convolution sums over.
            x_pad = F.pad(x, (1, 1, 1, 1, 1, 1))
            grad_w = _onednn(x_pad.transpose(0, 1), grad.transpose(0, 1), _ZERO).transpose(0, 1)
        return grad_x, grad_w


def takes_onednn_path(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    """Whether `Conv3d` sends this call to oneDNN itself (where ATen would pick its slow kernel)."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[0] == 1
        and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= ATEN_ONEDNN_MIN
        and conv.kernel_size == (3, 3, 3)
        and conv.stride == _ONE
        and conv.padding == _ONE
        and conv.dilation == _ONE
        and conv.groups == 1
        and conv.bias is None
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # torch.compile chooses its own kernels
    )


class Conv3d(nn.Conv3d):
    """`torch.nn.Conv3d` whose batch-1 CPU calls that ATen would run in its slow kernel run on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_onednn_path(x, self):
            return _OneDnnConv3d.apply(x, self.weight)
        return super().forward(x)
