"""BatchNorm + activation: the compiled per-channel kernels and a differentiable training op.

The C++ ops (csrc/cpu/batch_norm_act.cpp, csrc/cuda/batch_norm_act.cu) take 4-D tensors whose
(height, width) planes are contiguous — channel slices of a larger NCHW buffer included — and
per-channel float32 vectors (float64 for float64 data):

  channel_stats(x) -> (mean, var)                      biased batch statistics, one pass
  scale_shift_act(x, scale, shift, act[, out])         act(x * scale[c] + shift[c]), one pass
  bn_act_backward_reduce / bn_act_backward_apply       training BN + act backward, two passes

`batch_norm_act` composes them into a custom op with autograd that matches
`act(F.batch_norm(z, ..., training=True))`; `update_running_stats` then updates the running
statistics exactly as nn.BatchNorm2d does.
"""
from __future__ import annotations

import torch

from .. import extension  # noqa: F401  (loads csp_kernels._C, which defines the C++ ops)

_ops = torch.ops.csp_kernels


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if extension._C is not None:
    @torch.library.register_fake("csp_kernels::channel_stats")
    def _(x):
        c = x.shape[1]
        return x.new_empty(c, dtype=stats_dtype(x.dtype)), x.new_empty(c, dtype=stats_dtype(x.dtype))

    @torch.library.register_fake("csp_kernels::scale_shift_act")
    def _(x, scale, shift, act):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake("csp_kernels::scale_shift_act_out")
    def _(x, scale, shift, act, out):
        return None

    @torch.library.register_fake("csp_kernels::bn_act_backward_reduce")
    def _(grad_y, z, mean, invstd, weight, bias, act):
        return torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("csp_kernels::bn_act_backward_apply")
    def _(grad_y, z, mean, invstd, weight, bias, sum_dpre, sum_dpre_xhat, act):
        return torch.empty(z.shape, dtype=z.dtype, device=z.device)


def plane_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its (height, width) planes are contiguous, else an NCHW copy.

    channels_last tensors take the copy: the kernels walk whole planes.
    """
    _, _, h, w = x.shape
    if (w == 1 or x.stride(3) == 1) and (h == 1 or x.stride(2) == w):
        return x
    return x.contiguous()


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance.

    x: (batch, channels, height, width) -> mean, var: (channels,)
    """
    return _ops.channel_stats(plane_contiguous(x))


def scale_shift_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: str,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x * scale[c] + shift[c]), written to `out` (a (N, C, H, W) view, may be `x`) if given.

    x: (batch, channels, height, width); scale, shift: (channels,)
    """
    x = plane_contiguous(x)
    if out is None:
        return _ops.scale_shift_act(x, scale, shift, act)
    _ops.scale_shift_act_out(x, scale, shift, act, out)
    return out


def bn_act_backward(grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, act: str):
    """Gradients of y = act(weight * (z - mean) * invstd + bias) with batch statistics of z.

    Returns (grad_z, grad_weight, grad_bias); two passes over grad_y and z.
    """
    grad_y, z = plane_contiguous(grad_y), plane_contiguous(z)
    grad_bias, grad_weight = _ops.bn_act_backward_reduce(grad_y, z, mean, invstd, weight, bias, act)
    grad_z = _ops.bn_act_backward_apply(grad_y, z, mean, invstd, weight, bias, grad_bias, grad_weight, act)
    return grad_z, grad_weight, grad_bias


def bn_scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of BatchNorm with statistics (mean, var): y = x * scale + shift,
    in var's dtype. Differentiable (the eval fold of a module with gradients goes through it)."""
    scale = weight.to(var.dtype) * torch.rsqrt(var + eps)
    return scale, bias.to(var.dtype) - mean * scale


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, count: int, momentum: float) -> None:
    """nn.BatchNorm2d's update: exponential average, with the unbiased variance."""
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


@torch.library.custom_op("csp_kernels::batch_norm_act", mutates_args=())
def batch_norm_act(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, act: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode act(BatchNorm2d(z)) in two passes (statistics, normalize+act).

    z: (batch, channels, height, width); weight, bias: (channels,)
    Returns (y, mean, var) with the biased batch variance; the caller updates running
    statistics (`update_running_stats`), which keeps this op functional for autograd.
    """
    count = z.numel() // z.shape[1]
    if count <= 1:
        raise ValueError(f"batch_norm_act needs more than 1 value per channel when training; got input "
                         f"shape {tuple(z.shape)}")
    mean, var = channel_stats(z)
    y = scale_shift_act(z, *bn_scale_shift(mean, var, weight, bias, eps), act)
    return y, mean, var


@batch_norm_act.register_fake
def _(z, weight, bias, eps, act):
    c = z.shape[1]
    dtype = stats_dtype(z.dtype)
    return (torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(c, dtype=dtype),
            z.new_empty(c, dtype=dtype))


def _setup_context(ctx, inputs, output):
    z, weight, bias, eps, act = inputs
    _, mean, var = output
    ctx.act = act
    ctx.save_for_backward(z, weight, bias, mean, torch.rsqrt(var + eps))


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    z, weight, bias, mean, invstd = ctx.saved_tensors
    stats_dtype = mean.dtype
    grad_z, grad_weight, grad_bias = bn_act_backward(
        grad_y, z, mean, invstd, weight.to(stats_dtype), bias.to(stats_dtype), ctx.act)
    return grad_z, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None, None


batch_norm_act.register_autograd(_backward, setup_context=_setup_context)
