"""The input gradient of a 3x3 stride-2 convolution (padding 1, no dilation, no groups) as four
stride-1 convolutions of the output gradient, one per phase of the input grid (sub-pixel
decomposition). Every CSP stage opens with such a conv (`conv_down`), and YOLO's downsampling
`Conv`s are too; on the CPU, oneDNN's backward-data kernel for them runs at about half its
forward's rate on large maps (it reorders to a blocked layout and back), while its forward
kernels are fast.

With z = conv2d(x, w, stride=2, padding=1), input row p = 2a + py receives, from output row i,
kernel row ky = p - 2i + 1: row a through ky = 1 when py = 0; rows a (ky = 2) and a + 1 (ky = 0)
when py = 1 (columns likewise). So grad_x[:, :, py::2, px::2] is a stride-1 correlation of grad_z
with the transposed weight's taps of that phase: 1x1, 1x2, 2x1 or 2x2, 9 taps in all, the
multiplications of the direct computation, then one strided copy per phase into grad_x.

Where it runs (float32 CPU, where measured faster than oneDNN's backward for the shape):
`ops.routing.conv_input_grad_kernel`; tests: tests/test_conv_phases.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The kernel taps reaching phase 0 / 1 of a dimension, in the order the phase's correlation
# reads grad_z: phase 1 correlates grad_z padded by one zero row with taps (2, 0), so that its
# row a + 1 reads rows a and a + 1, and is input row 2a + 1.
_TAPS = {0: [1], 1: [2, 0]}


def conv3x3_stride2_input_grad(grad_z: torch.Tensor, weight: torch.Tensor, x_shape) -> torch.Tensor:
    """The gradient of conv2d(x, weight, stride=2, padding=1) with respect to x, from grad_z.

    grad_z: (batch, out_channels, ceil(height / 2), ceil(width / 2)); weight: (out_channels,
    in_channels, 3, 3); x_shape: (batch, in_channels, height, width) -> grad_x of x_shape
    """
    height, width = x_shape[2], x_shape[3]
    weight_t = weight.transpose(0, 1)
    grad_x = grad_z.new_empty(x_shape[0], weight.shape[1], height, width)
    for py in (0, 1):
        for px in (0, 1):
            taps = weight_t[:, :, _TAPS[py]][:, :, :, _TAPS[px]].contiguous()
            phase = F.conv2d(grad_z, taps, padding=(py, px))
            grad_x[:, :, py::2, px::2] = phase[:, :, py:py + (height - py + 1) // 2, px:px + (width - px + 1) // 2]
    return grad_x
