"""The generic convolution helpers every op family uses (transition, dense, dense eval,
synchronized BatchNorm): the output shape, a bias-free conv and its backward by the kernels
`ops.routing` picks, and the eval BatchNorm fold. The 1x1 GEMMs, Winograd and the stride-2
input gradient by phases themselves are ops/conv1x1.py, ops/conv3x3.py and ops/conv_phases.py.
Tests: tests/test_conv_bn_act.py, tests/test_conv3x3.py, tests/test_conv_phases.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import routing
from .batch_norm_act import bn_scale_shift, plane_contiguous, scale_shift_act, stats_dtype
from .conv1x1 import gemm_conv1x1
from .conv3x3 import conv3x3_winograd, conv3x3_winograd_weight_grad
from .conv_phases import conv3x3_stride2_input_grad


def conv_output_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(batch, out_channels, height', width') of conv2d(x, weight)."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x_shape[2:], weight_shape[2:], stride, padding, dilation)]
    return (x_shape[0], weight_shape[0], *spatial)


def conv_over_batch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation, act: str,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv2d(x, weight, bias)) (no groups) as one GEMM over the whole batch's output
    pixels: x's patches gathered into an (in * kh * kw, batch * pixels) matrix (x itself for a
    1x1 stride-1 conv), torch.mm, and the bias + act pass writing NCHW. For eval on maps too
    small for per-plane GEMMs or convolution kernels (`routing.runs_as_gemm_over_batch`): a 2x2
    output map gives a plane GEMM 4 columns wide, and the convolution kernels pay per sample.

    x: (batch, in, height, width), any strides; weight: (out, in, kh, kw); bias: (out,) in the
    statistics dtype; out: (batch, out, height', width') with contiguous planes, or None.
    -> out, or a new NCHW tensor
    """
    n, k, h, w = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    if h <= 0 or w <= 0:  # a kernel larger than the padded input: ATen's error, as the reference raises it
        F.conv2d(x, weight, None, stride, padding, dilation)
    if tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        columns = x.transpose(0, 1).reshape(x.shape[1], n * h * w)
    else:
        columns = F.unfold(x, weight.shape[2:], dilation, padding, stride).transpose(0, 1).reshape(-1, n * h * w)
    z = torch.mm(weight.reshape(k, -1), columns)
    if out is None:
        out = x.new_empty(n, k, h, w)
    # z's (height, width) planes are contiguous in this (batch, out) view: one pass to NCHW.
    return scale_shift_act(z.view(k, n, h, w).transpose(0, 1), torch.ones_like(bias), bias, act, out=out)


def fold_batch_norm(conv_weight, bn_weight, bn_bias, running_mean, running_var, eps: float):
    """Eval BatchNorm folded into the conv before it: (weight', bias') with
    weight' = weight * s, bias' = bn_bias - running_mean * s, s = bn_weight / sqrt(running_var + eps).
    Differentiable; weight' in conv_weight's dtype, bias' in the BN parameters'.

    conv_weight: (out_channels, in_channels / groups, kh, kw); the others: (out_channels,)
    """
    scale, shift = bn_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    return conv_weight * scale.to(conv_weight.dtype).reshape(-1, 1, 1, 1), shift


def eval_fold(conv_weight, bn_weight, bn_bias, running_mean, running_var, eps: float, dtype: torch.dtype,
              folded: bool):
    """An eval conv + BatchNorm for data of `dtype`, as (weight, bias, scale): with `folded`, BN
    folded into the weight (`fold_batch_norm`, computed in the parameters' dtype, the weight then
    rounded to `dtype` once) and scale None; else, and where that fold is not finite (eps 0 on a
    zero running variance, an inf parameter: folded into the weight, an inf or NaN would reach
    every output of its channel), the conv's own weight and BN's (scale, shift) for the conv's
    output, as the reference's eval computes it. Bias and scale in `dtype`'s statistics dtype.
    In a torch.compile trace, which cannot branch on data, `folded` alone decides."""
    sdtype = stats_dtype(dtype)
    running_mean, running_var = running_mean.to(sdtype), running_var.to(sdtype)
    if folded:
        weight, bias = fold_batch_norm(conv_weight, bn_weight, bn_bias, running_mean, running_var, eps)
        if torch.compiler.is_compiling() or (weight.isfinite().all() and bias.isfinite().all()):
            return weight.to(dtype), bias.to(sdtype), None
    scale, shift = bn_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    return conv_weight.detach().to(dtype), shift.to(sdtype), scale.to(sdtype)


def folds_into_weight(dtype: torch.dtype) -> bool:
    """Whether the eval BatchNorm of `dtype` data is folded into the conv's weight. Not in
    float16/bfloat16: the folded weight would be rounded to 16 bits (errors up to 2x the plain
    module's, which rounds only the conv's output); there `conv_bias_act` gets BN's float32
    scale and applies it, with the shift, to the conv's output before it is rounded again (the
    same passes as the folded bias: those dtypes never run a fused epilogue on the CPU)."""
    return dtype not in (torch.float16, torch.bfloat16)


def run_conv(kernel: str, x, weight, stride, padding, dilation, groups):
    """conv2d(x, weight) without bias, NCHW output, by `kernel` ("gemm", "winograd" or "aten",
    as `routing.conv_kernel` names them)."""
    if kernel == "gemm":
        return gemm_conv1x1(x, weight)
    if kernel == "winograd":
        return conv3x3_winograd(x, weight)
    # NCHW once here rather than a copy in every later pass (channels_last x gives channels_last z).
    return plane_contiguous(F.conv2d(x, weight, None, stride, padding, dilation, groups))


def conv3x3_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                 transform: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, padding=1) written into `out` (the dense layers' conv2 into their slot
    of the concat buffer): by Winograd where `routing.runs_as_winograd` takes it, straight into
    `out`, else ATen's conv and a copy. With `transform` (`winograd_weight(weight)`, cached by
    the caller) as eval chooses for a cached transform, without it (transformed per call) as
    training does.

    x: (batch, in_channels, height, width); weight: (out_channels, in_channels, 3, 3);
    out: (batch, out_channels, height, width) with contiguous planes.
    """
    if routing.runs_as_winograd(x, weight, [1, 1], [1, 1], [1, 1], 1, transform_cached=transform is not None):
        return conv3x3_winograd(x, weight, transform, out=out)
    return out.copy_(F.conv2d(x, weight, padding=1))


def conv(x, weight, stride, padding, dilation, groups, training: bool):
    """conv2d(x, weight) without bias, NCHW output, by the kernel chosen for `training` or eval."""
    kernel = routing.conv_kernel(x, weight, stride, padding, dilation, groups, training)
    return run_conv(kernel, x, weight, stride, padding, dilation, groups)


def conv_backward(grad_z, x, weight, stride, padding, dilation, groups, needs_x: bool, needs_weight: bool):
    """(grad_x, grad_weight) of conv2d(x, weight), None where not needed, each by the kernel
    `ops.routing` picks; ATen computes both in one call where it computes both."""
    if not (needs_x or needs_weight):
        return None, None
    x_kernel = routing.conv_input_grad_kernel(x, grad_z, weight, stride, padding, dilation, groups) if needs_x else ""
    winograd_weight = needs_weight and routing.runs_winograd_weight_grad(x, grad_z, weight, stride, padding, dilation,
                                                                         groups)
    grad_x = grad_weight = None
    if x_kernel == "aten" or (needs_weight and not winograd_weight):
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_z, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [x_kernel == "aten", needs_weight and not winograd_weight, False])
    if x_kernel == "winograd":  # the same convolution of grad_z with the flipped, transposed weight
        grad_x = conv3x3_winograd(grad_z, weight.transpose(0, 1).flip(2, 3))
    elif x_kernel == "phases":
        grad_x = conv3x3_stride2_input_grad(grad_z, weight, x.shape)
    if winograd_weight:
        grad_weight = conv3x3_winograd_weight_grad(x, grad_z)
    return grad_x, grad_weight
