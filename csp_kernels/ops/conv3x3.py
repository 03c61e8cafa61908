"""The dense layer's 3x3 convolution (stride 1, padding 1, no bias), forward and backward.

Winograd's F(2x2, 3x3) on CPUs in float32 where csp_kernels' AVX-512 GEMM runs:
`csp_kernels::conv3x3_winograd_out` (csrc/cpu/conv3x3_winograd.cpp), 2.25x fewer
multiplications than direct convolution; `ops.conv.conv_backward` runs the input gradient
with it (the same convolution of grad_y with the flipped, transposed weight) and the weight
gradient with `csp_kernels::conv3x3_winograd_weight_grad` (the gradient of the transformed
computation), each where measured faster; so does the dense layer's conv2 forward
(`ops.conv.conv3x3_into`), straight into the concat buffer: in training with the weight
transformed per call, in eval (`ops.dense_eval`) with the transform folded once (no output copy,
no fresh output and reorder buffers per layer). Where Winograd runs: `ops.routing`
(`winograd_usable`, `runs_as_winograd`, `runs_winograd_weight_grad`); the figures:
benchmarks/results/design-notes.md. Tests: tests/test_conv3x3.py.
"""
from __future__ import annotations

import torch

from .. import extension  # noqa: F401  (loads csp_kernels._C, which defines the C++ ops)

def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight: (out_channels, in_channels, 3, 3) float32, any strides -> its transform
    U = G g G^T (G of F(2x2, 3x3)) as the contiguous (16, out_channels, in_channels) matrices of
    the 16 tile GEMMs, computed in float64 and rounded once, where `routing.winograd_usable`
    (a training step transforms each weight twice: forward and input gradient)."""
    return torch.ops.csp_kernels.winograd_weight(weight.detach().contiguous())


def conv3x3_winograd(x: torch.Tensor, weight: torch.Tensor, transform: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, padding=1) by Winograd F(2x2, 3x3), where `routing.winograd_usable(x)`.

    x: (batch, in_channels, height, width) with contiguous planes (a channel slice is fine);
    weight: (out_channels, in_channels, 3, 3); transform: None, or `winograd_weight(weight)`
    computed beforehand; out: None, or a (batch, out_channels, height, width) tensor with
    contiguous planes to write into. Returns the output. An x holding inf or NaN runs as
    ATen's direct convolution (the op finds them in its input transform): Winograd's transforms
    would spread one inf into NaNs where the direct convolution gives +-inf.
    """
    if out is None:
        out = x.new_empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    torch.ops.csp_kernels.conv3x3_winograd_out(x, winograd_weight(weight) if transform is None else transform, out,
                                               weight)
    return out


def conv3x3_winograd_weight_grad(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The weight gradient of conv2d(x, weight, padding=1) by Winograd F(2x2, 3x3) (the gradient
    of the transformed computation: 2.25x fewer multiplications than direct), where
    `routing.winograd_usable(x)`.

    x: (batch, in_channels, height, width), grad_y: (batch, out_channels, height, width), both
    with contiguous planes. Returns (out_channels, in_channels, 3, 3). Where x or grad_y holds an
    inf or a NaN, ATen's direct weight gradient instead.
    """
    return torch.ops.csp_kernels.conv3x3_winograd_weight_grad(x, grad_y)
