"""Every forward custom op of csp_kernels as plain ATen ops, so that exporters that lower to a
standard op set (torch.onnx.export, whose default `dynamo=True` path decomposes an exported
program before translating it) can write them. Each decomposition computes what the op's kernels
compute (csp_kernels.reference, docs/semantics.md): same values up to rounding, same output
shapes, dtypes and NCHW-contiguous layouts as the fake kernels.

How they are found, and why two mechanisms:
  functional ops  `torch._decomp.register_decomposition`: torch.onnx's decomposition table is
                  torch.export's defaults plus `torch._decomp.decomposition_table`. Neither
                  torch.compile (Inductor has its own table) nor `ExportedProgram.run_decompositions()`
                  with its default table reads it, so their graphs keep the fused kernels. Fake
                  tensors with symbolic sizes (dynamic shapes) run these in place of the fake
                  kernels, hence the matching metadata. Inductor, which refuses an implicit
                  fallback for an op with a decomposition when env CI is set, gets explicit
                  ones (ops.inductor_fallbacks).
  mutating ops    (`*_out`, writing a caller's buffer) a Python CompositeImplicitAutograd kernel
                  that acts only inside torch.onnx.export (`torch.onnx.is_in_onnx_export`).
                  Functionalization turns a mutating op into an `auto_functionalized` node,
                  which has no ONNX translation, before any decomposition table is consulted;
                  only a CompositeImplicitAutograd kernel is asked first. Everywhere else it
                  returns NotImplemented, so torch.compile, torch.export, `run_decompositions`
                  and AOTInductor keep the fused op as before.
Not decomposed: the backward ops (BACKWARD_OPS), which only autograd calls; an exported
inference graph never holds them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._decomp import register_decomposition

from .. import checks, extension, reference
from . import inductor_fallbacks
from . import transition as _transition  # noqa: F401  (defines the transition ops decomposed here)
from .batch_norm_act import bn_scale_shift, stats_dtype, update_running_stats
from .dense import DENSE_ACT, NO_TRANSITION, Geometry, layer_params, transition_params_of

_ops = torch.ops.csp_kernels

BACKWARD_OPS = ("bn_act_backward_reduce", "bn_act_backward_apply", "conv1x1_bn_act_backward",
                "bn_act_backward_accumulate", "dense_conv1_backward", "bn_grad_correct", "maxout_pyramid_backward",
                "conv3x3_winograd_weight_grad")

# L with L @ G = I for Winograd F(2x2, 3x3)'s G (ops.conv3x3): rows 0 and 3 of G g are g's rows
# 0 and 2, and row 1 - row 2 is g's row 1, so g = L (G g G^T) L^T undoes the weight transform.
_WINOGRAD_G_LEFT_INVERSE = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, -1.0, 0.0), (0.0, 0.0, 0.0, 1.0))


def _decomposes(op):
    """Registers the decorated function as functional `op`'s decomposition in torch._decomp's
    global table (see the module docstring), Inductor keeping the fused op (ops.inductor_fallbacks)."""
    def register(decomposition):
        inductor_fallbacks.DECOMPOSED_OPS.append(op)
        register_decomposition(op)(inductor_fallbacks.keep_fused_in_inductor(decomposition))
        return decomposition
    return register


def _decomposes_in_onnx_export(op):
    """Registers the decorated function as `op`'s decomposition inside torch.onnx.export only
    (see the module docstring: mutating ops)."""
    def register(decomposition):
        def kernel(*args, **kwargs):
            if not torch.onnx.is_in_onnx_export():
                return NotImplemented
            return decomposition(*args, **kwargs)

        op.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(kernel)
        return decomposition
    return register


# -- shared pieces: what the kernels compute per element and per channel --------------------

def _affine_act(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x * scale[c] + shift[c]) as the kernels compute it: in the statistics dtype (float32
    for 16-bit data), rounded to x's dtype once, NCHW-contiguous. scale None: 1; shift None: 0.

    x: (batch, channels, height, width); scale, shift: (channels,)
    """
    u = x.to(stats_dtype(x.dtype))
    if scale is not None:
        u = u * scale[:, None, None]
    if shift is not None:
        u = u + shift[:, None, None]
    name, slope = checks.parse_activation(act)
    return checks.activation_module(name, slope)(u).to(x.dtype).contiguous()


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance in the statistics dtype: (channels,) each."""
    var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _conv(x, weight, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """conv2d(x, weight) without bias, NCHW-contiguous, as every engine writes it."""
    return F.conv2d(x, weight, None, stride, padding, dilation, groups).contiguous()


def _no_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two empty statistics a kernel returns when not asked for them."""
    empty = x.new_empty(0, dtype=stats_dtype(x.dtype))
    return empty, empty.clone()


def _bn_act_of_batch(z, bn_weight, bn_bias, eps, act):
    """Training BatchNorm + act of z with its batch statistics: (y, mean, biased var)."""
    mean, var = _channel_stats(z)
    return _affine_act(z, *bn_scale_shift(mean, var, bn_weight, bn_bias, eps), act), mean, var


# -- BatchNorm + activation family (ops.batch_norm_act) ----------------------------------------

@_decomposes(torch.ops.csp_kernels.batch_norm_act.default)
def _batch_norm_act(z, weight, bias, eps, act):
    return _bn_act_of_batch(z, weight, bias, eps, act)


# -- the transition (ops.transition) -----------------------------------------------------------

def _conv_bias_act(x, weight, bias, stride, padding, dilation, groups, act, scale):
    # Every engine ("aten", "triton") computes the same convolution; the Winograd transform is
    # the weight's, precomputed. (A oneDNN-prepacked weight never reaches a trace: ConvBNAct
    # folds BatchNorm into the traced graph there.)
    return _affine_act(_conv(x, weight, stride, padding, dilation, groups), scale, bias, act)


@_decomposes(torch.ops.csp_kernels.conv_bias_act.default)
def _conv_bias_act_functional(x, weight, bias, stride, padding, dilation, groups, act, engine, transform=None,
                              scale=None):
    return _conv_bias_act(x, weight, bias, stride, padding, dilation, groups, act, scale)


@_decomposes_in_onnx_export(torch.ops.csp_kernels.conv_bias_act_out.default)
def _conv_bias_act_out(x, weight, bias, stride, padding, dilation, groups, act, engine, out, transform=None,
                       scale=None):
    out.copy_(_conv_bias_act(x, weight, bias, stride, padding, dilation, groups, act, scale))


def _conv_bn_act_train(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act):
    """(y, z, mean, var) of the training transition."""
    z = _conv(x, weight, stride, padding, dilation, groups)
    y, mean, var = _bn_act_of_batch(z, bn_weight, bn_bias, eps, act)
    return y, z, mean, var


@_decomposes(torch.ops.csp_kernels.conv_bn_act_train.default)
def _conv_bn_act_train_functional(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act,
                                  engine):
    return _conv_bn_act_train(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act)


@_decomposes_in_onnx_export(torch.ops.csp_kernels.conv_bn_act_train_out.default)
def _conv_bn_act_train_out(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine,
                           out):
    y, z, mean, var = _conv_bn_act_train(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act)
    out.copy_(y)
    return z, mean, var


# -- the partial dense block's training op (ops.dense), without its buffer ---------------------

@_decomposes(torch.ops.csp_kernels.partial_dense_block.default)
def _partial_dense_block(x, dense_params, transition_params, part1, fusion, act, eps, engine):
    g = Geometry.of(x, part1, dense_params)
    dense_chunks = [x[:, part1:]]
    stats = [_channel_stats(dense_chunks[0])]
    bottleneck_stats = []
    for j in range(g.num_layers):
        norm1_w, norm1_b, conv1_w, norm2_w, norm2_b, conv2_w = layer_params(dense_params, j)
        mean = torch.cat([m for m, _ in stats])
        var = torch.cat([v for _, v in stats])
        # BN1 with the statistics each channel got when it was written, shared by all layers.
        a = _affine_act(torch.cat(dense_chunks, 1), *bn_scale_shift(mean, var, norm1_w, norm1_b, eps), DENSE_ACT)
        z = _conv(a, conv1_w)
        b, z_mean, z_var = _bn_act_of_batch(z, norm2_w, norm2_b, eps, DENSE_ACT)
        bottleneck_stats.append((z_mean, z_var))
        dense_chunks.append(_conv(b, conv2_w, padding=1))
        stats.append(_channel_stats(dense_chunks[-1]))
    dense = torch.cat(dense_chunks, 1)
    buf = torch.cat([x[:, :part1], dense], 1)
    dense_stats = (torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats]),
                   torch.stack([m for m, _ in bottleneck_stats]), torch.stack([v for _, v in bottleneck_stats]))
    if fusion == NO_TRANSITION:  # the buffer is the output; the other slots are empty
        no_stats = x.new_empty(0, dtype=dense_stats[0].dtype)
        return (buf, x.new_empty(0), x.new_empty(0), x.new_empty(0), *dense_stats, no_stats, no_stats.clone())

    def transition(inp, index):
        weight, bn_weight, bn_bias = transition_params_of(transition_params, index)
        z = _conv(inp, weight)
        y, mean, var = _bn_act_of_batch(z, bn_weight, bn_bias, eps, act)
        return y, z, mean, var

    z_first = x.new_empty(0)
    if fusion == "first":
        out, z_last, t_mean, t_var = transition(buf, 0)
    elif fusion == "last":
        y, z_last, t_mean, t_var = transition(dense, 0)
        out = torch.cat([x[:, :part1], y], 1)
    else:
        y, z_first, mean_first, var_first = transition(dense, 0)
        out, z_last, t_mean, t_var = transition(torch.cat([x[:, :part1], y], 1), 1)
        t_mean, t_var = torch.cat([mean_first, t_mean]), torch.cat([var_first, t_var])
    return (out, buf, z_first, z_last, *dense_stats, t_mean, t_var)


# -- the compiled (C++) ops --------------------------------------------------------------------

def _conv1x1_fused(x, weight, in_scale, in_shift, in_act, bias, act):
    """act(conv1x1(in_act(x * in_scale + in_shift), weight) + bias); weight: (out, in)."""
    if in_scale is not None:
        x = _affine_act(x, in_scale, in_shift, in_act)
    z = _conv(x, weight[:, :, None, None])
    return z if bias is None and act == "identity" else _affine_act(z, None, bias, act)


def _winograd_filter(transform: torch.Tensor) -> torch.Tensor:
    """The 3x3 weight (out, in, 3, 3) whose Winograd transform is `transform` (16, out, in)."""
    inverse = torch.tensor(_WINOGRAD_G_LEFT_INVERSE, dtype=transform.dtype, device=transform.device)
    u = transform.reshape(4, 4, *transform.shape[1:])
    return torch.einsum("ia,aboc,jb->ocij", inverse, u, inverse)


if extension._C is not None:
    @_decomposes(_ops.channel_stats.default)
    def _channel_stats_op(x):
        return _channel_stats(x)

    @_decomposes(_ops.scale_shift_act.default)
    def _scale_shift_act(x, scale, shift, act):
        return _affine_act(x, scale, shift, act)

    @_decomposes(_ops.bn_scale_shift.default)
    def _bn_scale_shift(mean, var, weight, bias, eps):
        return tuple(t.contiguous() for t in bn_scale_shift(mean, var, weight, bias, eps))

    @_decomposes_in_onnx_export(_ops.bn_track_running_stats_.default)
    def _bn_track_running_stats_(num_batches_tracked, running_mean, running_var, mean, var, unbias, momentum):
        num_batches_tracked.add_(1)
        update_running_stats(running_mean, running_var, mean, var, unbias, momentum)

    @_decomposes_in_onnx_export(_ops.scale_shift_act_out.default)
    def _scale_shift_act_out(x, scale, shift, act, out):
        out.copy_(_affine_act(x, scale, shift, act))

    @_decomposes_in_onnx_export(_ops.conv1x1_fused_out.default)
    def _conv1x1_fused_out(x, weight, in_scale, in_shift, in_act, bias, act, stats, out):
        y = _conv1x1_fused(x, weight, in_scale, in_shift, in_act, bias, act)
        out.copy_(y)
        return _channel_stats(y) if stats else _no_stats(x)

    @_decomposes(_ops.winograd_weight.default)
    def _winograd_weight(weight):
        # G's rows as arithmetic, no constant tensor (one created inside a decomposition leaves
        # an in-place detach_ that torch.export's functional graph refuses); in float64 and
        # rounded once, as the op.
        def g_times(rows, dim):  # G @ rows along `dim` (of size 3)
            r0, r1, r2 = rows.unbind(dim)
            return torch.stack((r0, 0.5 * (r0 + r1 + r2), 0.5 * (r0 - r1 + r2), r2), dim)

        u = g_times(g_times(weight.double(), 2), 3)  # (out, in, 4, 4): G g G^T
        return u.permute(2, 3, 0, 1).reshape(16, *weight.shape[:2]).to(weight.dtype)

    @_decomposes_in_onnx_export(_ops.conv3x3_winograd_out.default)
    def _conv3x3_winograd_out(x, weight, out, conv_weight=None):
        # The direct convolution that Winograd's F(2x2, 3x3) computes (up to its rounding).
        out.copy_(_conv(x, _winograd_filter(weight) if conv_weight is None else conv_weight, padding=1))

    @_decomposes(_ops.maxout_pyramid_forward.default)
    def _maxout_pyramid_forward(features, out_h, out_w, out_channels, interleaved):
        grouping = "interleaved" if interleaved else "contiguous"
        # A fresh tensor: with one map already at the size and one channel per group the
        # reference hands back its input itself.
        return reference.maxout_pyramid(list(features), (out_h, out_w), out_channels, grouping).clone(
            memory_format=torch.contiguous_format)
