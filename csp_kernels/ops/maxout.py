"""Maxout pyramid: nearest resize + concat + channel Maxout as one differentiable op.

The C++ ops (csrc/cpu/maxout.cpp, csrc/cuda/maxout.cu) read every input at its own resolution
and write each output element once; nothing resized or concatenated is materialized:

  maxout_pyramid_forward(features, out_h, out_w, out_channels, interleaved) -> out
  maxout_pyramid_backward(grad_out, features, out_channels, interleaved) -> grads (one per input)

The backward recomputes each output's argmax from the saved inputs (no index tensor) and sends
the gradient to that element alone; an input read by several outputs (upsampled) receives their
sum, in a fixed order on both devices (deterministic, no atomics). Double backward is refused
with an error when a second derivative through the op is actually requested.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import extension  # noqa: F401  (loads csp_kernels._C, which defines the C++ ops)
from .batch_norm_act import plane_contiguous

_ops = torch.ops.csp_kernels


def maxout_pyramid(features: Sequence[torch.Tensor], size: tuple[int, int], out_channels: int,
                   interleaved: bool) -> torch.Tensor:
    """Differentiable w.r.t. every feature; arguments are assumed valid (see nn.maxout).

    features: list of (batch, channels_i, height_i, width_i); channels_last (or any layout
    without contiguous planes) is copied to NCHW first.
    -> (batch, out_channels, size[0], size[1]), contiguous
    """
    return _ops.maxout_pyramid_forward([plane_contiguous(f) for f in features], size[0], size[1],
                                       out_channels, interleaved)


def _setup_context(ctx, inputs, output):
    features, _, _, out_channels, interleaved = inputs
    ctx.out_channels, ctx.interleaved = out_channels, interleaved
    ctx.save_for_backward(*features)


def _backward(ctx, grad_out):
    grads = _ops.maxout_pyramid_backward(plane_contiguous(grad_out), list(ctx.saved_tensors),
                                         ctx.out_channels, ctx.interleaved)
    return list(grads), None, None, None, None


def _refuse_double_backward(ctx, *grad_grads):
    raise RuntimeError("csp_kernels: maxout_pyramid does not support double backward (a second derivative "
                       "through Maxout); use csp_kernels.use_backend('reference') for higher-order gradients")


if extension._C is not None:  # the fake kernels: ops/fakes.py
    torch.library.register_autograd("csp_kernels::maxout_pyramid_forward", _backward, setup_context=_setup_context)
    torch.library.register_autograd("csp_kernels::maxout_pyramid_backward", _refuse_double_backward)
