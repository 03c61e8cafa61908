"""The partial dense block as one op: a preallocated concat buffer, per-channel statistics
computed once, and a backward that recomputes instead of saving (docs/semantics.md, "The dense
layer, algebraically").

Layout. One buffer `buf` (batch, part1 + t, height, width), t = part2 + num_layers * growth:
x is copied in once (part 1 first, then part 2, as in x), dense layer j reads the channel prefix
`buf[:, part1 : part1 + c_j]` (c_j = part2 + j * growth) in place and writes its growth channels
right after it. With fusion "first" the transition reads `buf` whole, so the concat with part 1
is free; "last" and "csp" read the dense part `buf[:, part1:]`. Fusion "none" (NO_TRANSITION:
a whole DenseBlock, part1 = 0 and no transition) returns `buf` itself as the output, so that the
buffer the backward needs is the output, saved once; the backward starts from a copy of the
output's gradient, into which the dense layers' backward accumulates in place.

Training (`partial_dense_block`, a torch.library custom op with registered autograd):
  forward   per layer: conv1 with BN1+ReLU of the prefix applied on load (shared statistics)
            and BN2's statistics from its epilogue (`ops.conv1x1.conv1x1_fused`), BN2+ReLU in
            place, conv2 3x3 into its growth channels of the buffer (Winograd where measured faster
            than ATen's, `ops.conv3x3`), their statistics.
            Transitions: GEMM with statistics, BN+act written straight into the output (or, for
            "csp", into the second transition's input).
  saved     `buf`, the transitions' pre-BN outputs, the per-channel statistics. Nothing per
            layer: the normalized prefix, conv1's output and BN2+ReLU are recomputed (one extra
            1x1 GEMM per layer).
            Why: saved memory grows by one growth slice of `buf` per layer; saving the first
            "csp" transition's output spares the backward its GEMM for a little memory, while
            saving conv1's outputs would cost a bottleneck-sized activation per layer (over the
            saved-memory target) for one cheap GEMM each (benchmarks/results/design-notes.md).
  backward  layers in reverse, one accumulator G shaped like the BN1-read part of the buffer:
            each layer adds weight1 * dpre to G[:, :c_j] (`dense_conv1_backward`: on
            the CPU conv1's input gradient goes tile by tile from the GEMM into this
            accumulation; it also returns the layer's BN1 weight/bias gradients), and the BN
            correction runs once per channel (`bn_grad_correct`) when a layer's channels are
            final. G is float32 for float16/bfloat16 data on the GPU engines
            (`routing.dense_grad_acc_dtype`), rounded once, as the correction adds it into the
            input gradient. conv1's recompute and weight gradient normalize the prefix on load; each
            transition's backward is `conv1x1_bn_act_backward`.
Running statistics are returned (biased batch variance), and updated by the module, which keeps
the op functional. Every BatchNorm's statistics and backward sums pass through `LocalStatistics`
hooks (`block_train`, `block_backward`), which `ops.sync_dense` overrides to synchronize them
over a process group.

The eval forward, with BatchNorms folded, is `ops.dense_eval`.

Engines (which kernel each piece takes: `ops.routing`, `conv1x1_kernel`,
`dense_conv1_backward_kernel`, `eager_is_faster`): "aten" runs the forward 1x1 convolutions as
`conv1x1_fused`'s C++ tiled GEMM on the CPU (BLAS on cache-resident tiles, normalize-on-load
prologue, epilogue with bias, act and statistics) and as passes around cuBLAS on a GPU; "triton"
runs them as the Triton GEMM of `csp_kernels.triton.conv1x1`, the backward's recompute of conv1
included, and each dense layer's conv1 backward as the two GEMMs of
`csp_kernels.triton.conv1x1_backward` (prefix normalized on load, input gradient consumed by the
BN1 accumulation in the epilogue). "aten" runs the backward as the CPU's tiled ops, or on a GPU
as passes around cuBLAS (which store the normalized prefix and the gradients between them); the
transitions' backward is the same for both.

Parameters travel as flat lists:
  dense_params       per layer: norm1.weight, norm1.bias, conv1.weight, norm2.weight,
                     norm2.bias, conv2.weight
  transition_params  per transition (one, or two for "csp"): conv.weight, bn.weight, bn.bias
Every BatchNorm of the block must share one `eps`.

Modules: csp_kernels.nn.PartialDenseBlock, DenseBlock (nn/dense.py); reference:
csp_kernels.reference.PartialDenseBlock, DenseBlock; autograd: `register_autograd` at the end of
this module; kernels: csrc/cpu/dense.cpp (`dense_conv1_backward` on the tiling of csrc/cpu/conv1x1_tiles.h),
triton/conv1x1_backward.py; tests: tests/test_partial_dense_block.py, tests/test_dense_block.py.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import extension  # noqa: F401  (loads csp_kernels._C, which defines the C++ ops)
from . import routing
from .batch_norm_act import (bn_scale_shift, channel_stats, per_channel, plane_contiguous, refuse_double_backward,
                             scale_shift_act, stats_dtype)
from .conv import conv3x3_into, conv_backward
from .conv1x1 import conv1x1_bn_act_backward, conv1x1_fused, conv1x1_input_grad, conv1x1_weight_grad
from .inductor_fallbacks import keep_fused_in_inductor
from .stats_update import update_before_saving

_ops = torch.ops.csp_kernels
DENSE_PARAMS_PER_LAYER = 6
TRANSITION_PARAMS = 3
DENSE_ACT = "relu"  # DenseNet's layers always use ReLU; `act` is the transitions'.
NO_TRANSITION = "none"  # the fusion value of a whole DenseBlock: the concat buffer is the output

class LocalStatistics:
    """Each BatchNorm's batch statistics over this process's batch (nn.BatchNorm2d's). The
    training block passes every per-channel statistic and backward sum through these hooks,
    which `ops.sync_dense.GroupStatistics` overrides to make them a process group's."""

    def stats(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, biased var) to normalize with, from this process's: (channels,) each."""
        return mean, var

    def sums(self, sum_dpre: torch.Tensor, sum_dpre_xhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN backward sums (channels,) to correct with, from this process's, as the kernels
        take them (they divide by this process's count)."""
        return sum_dpre, sum_dpre_xhat

    conv1x1_bn_act_backward = staticmethod(conv1x1_bn_act_backward)  # a transition's backward


LOCAL = LocalStatistics()


def bn_act_backward_accumulate(grad_a, x, mean, invstd, weight, bias, act, grad_acc):
    """dpre = grad_a * act'(weight * xhat + bias); grad_acc += weight * dpre (in place).

    grad_a, x, grad_acc: (batch, channels, height, width), planes contiguous (channel slices
    allowed), grad_acc in x's dtype or, for float16/bfloat16 x, float32; mean, invstd, weight,
    bias: (channels,). Returns (sum dpre, sum dpre * xhat), the BN's bias and weight gradients.
    """
    return _ops.bn_act_backward_accumulate(grad_a, x, mean, invstd, weight, bias, act, grad_acc)


def dense_conv1_backward(grad_b, z, bn2, x, bn1, act, weight, grad_acc, engine="aten", hooks=LOCAL):
    """A dense layer's conv1 backward, from the gradient of BN2+act's output `grad_b`.

    grad_b, z: (batch, bottleneck, height, width), z conv1's output; x, grad_acc: (batch, c,
    height, width), the layer's prefix of the buffer and of the BN1 accumulator (grad_acc in x's
    dtype, or float32 for 16-bit x: `routing.dense_grad_acc_dtype`); bn2, bn1:
    (mean, invstd, weight, bias) in the statistics dtype; weight: (bottleneck, c, 1, 1).
    Adds weight1 * dpre of BN1 + act into grad_acc; returns (conv1's weight gradient, BN2's
    weight and bias gradients, sum dpre and sum dpre * xhat of BN1).

    CPU float32/float64 ("aten"): BN2's reduction pass, then `csp_kernels::dense_conv1_backward`,
    one pass over cache tiles in which grad_z, BN1 + act of the prefix and conv1's input gradient
    never leave the cache. "triton": `bn_act_backward`, then the two GEMMs of
    `csp_kernels.triton.conv1x1_backward` (the prefix normalized on load; the input gradient
    consumed by its epilogue). Elsewhere: `bn_act_backward`, the two GEMMs (the weight gradient
    normalizing the prefix into a temporary) and `bn_act_backward_accumulate`. BN2's correction
    takes its backward sums as `hooks.sums` returns them (`LOCAL`: unchanged).
    """
    grad_b, z = plane_contiguous(grad_b), plane_contiguous(z)
    grad_bn2_b, grad_bn2_w = _ops.bn_act_backward_reduce(grad_b, z, *bn2, act)
    sums2 = hooks.sums(grad_bn2_b, grad_bn2_w)
    kernel = routing.dense_conv1_backward_kernel(x, engine)
    if kernel == "cpu":
        grad_weight, sum1, sum_xhat1 = _ops.dense_conv1_backward(grad_b, z, *bn2, *sums2, x, *bn1, act,
                                                                 weight.flatten(1).contiguous(), grad_acc)
        return grad_weight.view(weight.shape), grad_bn2_w, grad_bn2_b, sum1, sum_xhat1
    grad_z = _ops.bn_act_backward_apply(grad_b, z, *bn2, *sums2, act)
    mean1, invstd1, weight1, bias1 = bn1
    scale1 = weight1 * invstd1
    if kernel == "triton":
        from ..triton import conv1x1_backward as triton_backward
        grad_weight = triton_backward.weight_grad(grad_z, x, in_scale=scale1, in_shift=bias1 - mean1 * scale1,
                                                  in_act=act)
        sum1, sum_xhat1 = triton_backward.dgrad_bn_accumulate(grad_z, weight, x, *bn1, act, grad_acc)
        return grad_weight, grad_bn2_w, grad_bn2_b, sum1, sum_xhat1
    grad_weight = conv1x1_weight_grad(grad_z, x, in_scale=scale1, in_shift=bias1 - mean1 * scale1, in_act=act)
    sum1, sum_xhat1 = bn_act_backward_accumulate(conv1x1_input_grad(grad_z, weight), x, *bn1, act, grad_acc)
    return grad_weight, grad_bn2_w, grad_bn2_b, sum1, sum_xhat1


def bn_grad_correct(grad_acc, x, mean, invstd, sum_grad, sum_grad_xhat, grad_x) -> None:
    """grad_x += invstd * (g - mean(g) - xhat * mean(g * xhat)) per channel, g = grad_acc, the
    means given as sums over the channel's batch * height * width values (in place; grad_acc
    may be float32 for float16/bfloat16 x and grad_x, which round the sum once)."""
    _ops.bn_grad_correct(grad_acc, x, mean, invstd, sum_grad, sum_grad_xhat, grad_x)


# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
    """Channel bookkeeping of one block, from x and the parameter lists."""
    batch: int
    height: int
    width: int
    part1: int
    part2: int
    growth: int
    bottleneck: int
    num_layers: int

    @staticmethod
    def of(x: torch.Tensor, part1: int, dense_params) -> Geometry:
        n, c, h, w = x.shape
        conv1_weight, conv2_weight = dense_params[2], dense_params[5]
        return Geometry(n, h, w, part1, c - part1, conv2_weight.shape[0], conv1_weight.shape[0],
                        len(dense_params) // DENSE_PARAMS_PER_LAYER)

    @property
    def dense_channels(self) -> int:
        """t: part 2 and every layer's new channels."""
        return self.part2 + self.num_layers * self.growth

    @property
    def count(self) -> int:
        """Values per channel that batch statistics average over."""
        return self.batch * self.height * self.width

    def prefix(self, layer: int) -> int:
        """c_j: the channels layer `layer` (0-based) reads."""
        return self.part2 + layer * self.growth

    def scratch(self, like: torch.Tensor, channels: int) -> torch.Tensor:
        """Flat storage for a contiguous (batch, up to `channels`, height, width) tensor."""
        return like.new_empty(self.batch * channels * self.height * self.width)

    def view(self, scratch: torch.Tensor, channels: int) -> torch.Tensor:
        """The contiguous (batch, channels, height, width) tensor at the start of `scratch`."""
        return scratch[: self.batch * channels * self.height * self.width].view(
            self.batch, channels, self.height, self.width)


def layer_params(dense_params, layer: int):
    """(norm1 weight, norm1 bias, conv1 weight, norm2 weight, norm2 bias, conv2 weight)."""
    return dense_params[DENSE_PARAMS_PER_LAYER * layer: DENSE_PARAMS_PER_LAYER * (layer + 1)]


def transition_params_of(transition_params, index: int):
    """(conv weight, bn weight, bn bias) of transition `index`."""
    return transition_params[TRANSITION_PARAMS * index: TRANSITION_PARAMS * (index + 1)]


def _check_batch(g: Geometry) -> None:
    if g.count <= 1:
        raise ValueError(f"a training dense block needs more than 1 value per channel "
                         f"(batch * height * width); got input shape "
                         f"{(g.batch, g.part1 + g.part2, g.height, g.width)}")


def new_buffer(x: torch.Tensor, g: Geometry, channels: int | None = None) -> torch.Tensor:
    """The concat buffer with x copied in (this copy also converts channels_last to NCHW), with
    `channels` per sample (default: exactly the concat's part1 + t) of which the concat uses the
    first part1 + t."""
    buf = x.new_empty(g.batch, channels or g.part1 + g.dense_channels, g.height, g.width)
    buf[:, : g.part1 + g.part2].copy_(x)
    return buf


def _transition_train(inp, params, eps, act, out, engine, hooks=LOCAL):
    """Training 1x1 ConvBNAct of `inp` written into `out`; returns (pre-BN z, mean, var)."""
    weight, bn_weight, bn_bias = params
    z, mean, var = conv1x1_fused(inp, weight, stats=True, engine=engine)
    mean, var = hooks.stats(mean, var)
    scale_shift_act(z, *bn_scale_shift(mean, var, bn_weight, bn_bias, eps), act, out=out)
    return z, mean, var


def _dense_train(buf, dense_params, g: Geometry, eps, engine, hooks=LOCAL):
    """Runs the dense layers into `buf`; returns (dense mean, dense var, bottleneck mean (L, 4k),
    bottleneck var (L, 4k))."""
    dense = buf[:, g.part1:]
    sdtype = stats_dtype(buf.dtype)
    mean = buf.new_empty(g.dense_channels, dtype=sdtype)
    var = torch.empty_like(mean)
    mean[: g.part2], var[: g.part2] = hooks.stats(*channel_stats(dense[:, : g.part2]))
    bottleneck_mean = buf.new_empty(g.num_layers, g.bottleneck, dtype=sdtype)
    bottleneck_var = torch.empty_like(bottleneck_mean)
    # One bottleneck for all layers: a fresh allocation per layer costs page faults on its first
    # write.
    bottleneck = g.view(g.scratch(buf, g.bottleneck), g.bottleneck)
    for j in range(g.num_layers):
        c = g.prefix(j)
        norm1_w, norm1_b, conv1_w, norm2_w, norm2_b, conv2_w = layer_params(dense_params, j)
        scale1, shift1 = bn_scale_shift(mean[:c], var[:c], norm1_w, norm1_b, eps)
        z, bottleneck_mean[j], bottleneck_var[j] = conv1x1_fused(
            dense[:, :c], conv1_w, in_scale=scale1, in_shift=shift1, in_act=DENSE_ACT, out=bottleneck, stats=True,
            engine=engine)
        bottleneck_mean[j], bottleneck_var[j] = hooks.stats(bottleneck_mean[j], bottleneck_var[j])
        scale_shift_act(z, *bn_scale_shift(bottleneck_mean[j], bottleneck_var[j], norm2_w, norm2_b, eps),
                        DENSE_ACT, out=z)
        new = dense[:, c: c + g.growth]
        conv3x3_into(z, conv2_w, out=new)
        stats = channel_stats(new)
        # The last layer's channels feed no BN1 (a transition convolves the raw buffer).
        mean[c: c + g.growth], var[c: c + g.growth] = hooks.stats(*stats) if j < g.num_layers - 1 else stats
    return mean, var, bottleneck_mean, bottleneck_var


@torch.library.custom_op("csp_kernels::partial_dense_block", mutates_args=())
def partial_dense_block(x: torch.Tensor, dense_params: list[torch.Tensor], transition_params: list[torch.Tensor],
                        part1: int, fusion: str, act: str, eps: float, engine: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward of a partial dense block (see the module docstring).

    x: (batch, in_channels, height, width), any memory format.
    Returns (out, buf, z_first, z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var,
    transition_mean, transition_var):
      out              (batch, out_channels, height, width), the block's output
      buf, z_first, z_last  the concat buffer and the transitions' pre-BN outputs (z_first: the
                       first of "csp", empty otherwise), saved for backward (outputs so that
                       the op stays functional; not differentiable)
      dense_mean/var   (t,) batch statistics of the buffer's dense channels (norm1's inputs)
      bottleneck_*     (num_layers, bn_size * growth) statistics of conv1's outputs (norm2's)
      transition_*     the transitions' statistics, concatenated in order
    Variances are biased; the caller updates running statistics. Fusion NO_TRANSITION
    (part1 = 0, no transition_params): out is the concat buffer (batch, in_channels + num_layers
    * growth, height, width); buf, z_first, z_last and transition_* are empty.
    """
    return block_train(x, dense_params, transition_params, part1, fusion, act, eps, engine)


def block_train(x, dense_params, transition_params, part1, fusion, act, eps, engine, hooks=LOCAL):
    """`partial_dense_block`'s forward, every BatchNorm's statistics through `hooks`
    (`ops.sync_dense` synchronizes them), which the op cannot take."""
    g = Geometry.of(x, part1, dense_params)
    _check_batch(g)
    buf = new_buffer(x, g)
    dense_stats = _dense_train(buf, dense_params, g, eps, engine, hooks)
    if fusion == NO_TRANSITION:
        return (buf, *_empty_slots(x), *dense_stats, *_empty_stats(x))
    dense = buf[:, part1:]
    z_first = x.new_empty(0)
    if fusion == "first":
        first = transition_params_of(transition_params, 0)
        out = x.new_empty(g.batch, first[0].shape[0], g.height, g.width)
        z_last, t_mean, t_var = _transition_train(buf, first, eps, act, out, engine, hooks)
    elif fusion == "last":
        first = transition_params_of(transition_params, 0)
        out = x.new_empty(g.batch, part1 + first[0].shape[0], g.height, g.width)
        out[:, :part1].copy_(x[:, :part1])
        z_last, t_mean, t_var = _transition_train(dense, first, eps, act, out[:, part1:], engine, hooks)
    else:
        cat = _csp_concat_head(buf, g, transition_params_of(transition_params, 0)[0].shape[0])
        z_first, mean_first, var_first = _transition_train(
            dense, transition_params_of(transition_params, 0), eps, act, cat[:, part1:], engine, hooks)
        second = transition_params_of(transition_params, 1)
        out = x.new_empty(g.batch, second[0].shape[0], g.height, g.width)
        z_last, t_mean, t_var = _transition_train(cat, second, eps, act, out, engine, hooks)
        t_mean, t_var = torch.cat([mean_first, t_mean]), torch.cat([var_first, t_var])
    return (out, buf, z_first, z_last, *dense_stats, t_mean, t_var)


def _empty_slots(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """buf, z_first and z_last of fusion NO_TRANSITION: empty, each its own tensor (the op's
    outputs must not alias each other)."""
    return x.new_empty(0), x.new_empty(0), x.new_empty(0)


def _empty_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transition_mean and transition_var of fusion NO_TRANSITION: empty."""
    sdtype = stats_dtype(x.dtype)
    return x.new_empty(0, dtype=sdtype), x.new_empty(0, dtype=sdtype)


def _csp_concat_head(buf, g: Geometry, first_channels: int) -> torch.Tensor:
    """The second transition's input of fusion "csp", (batch, part1 + first_channels, height,
    width), with part 1 copied in from the buffer's head; transition1's output goes after it."""
    cat = buf.new_empty(g.batch, g.part1 + first_channels, g.height, g.width)
    cat[:, : g.part1].copy_(buf[:, : g.part1])
    return cat


@partial_dense_block.register_fake
@keep_fused_in_inductor
def _(x, dense_params, transition_params, part1, fusion, act, eps, engine):
    g = Geometry.of(x, part1, dense_params)
    sdtype = stats_dtype(x.dtype)
    t = g.dense_channels
    bottleneck_stats = (x.new_empty(g.num_layers, g.bottleneck, dtype=sdtype),
                        x.new_empty(g.num_layers, g.bottleneck, dtype=sdtype))
    if fusion == NO_TRANSITION:
        return (x.new_empty(g.batch, t, g.height, g.width), *_empty_slots(x), x.new_empty(t, dtype=sdtype),
                x.new_empty(t, dtype=sdtype), *bottleneck_stats, *_empty_stats(x))
    last_out = transition_params[-TRANSITION_PARAMS].shape[0]
    out_channels = last_out + (part1 if fusion == "last" else 0)
    transition_channels = sum(w.shape[0] for w in transition_params[::TRANSITION_PARAMS])
    new = x.new_empty
    first_out = transition_params[0].shape[0] if fusion == "csp" else 0
    return (new(g.batch, out_channels, g.height, g.width), new(g.batch, part1 + t, g.height, g.width),
            new(g.batch, first_out, g.height, g.width) if first_out else new(0),
            new(g.batch, last_out, g.height, g.width), new(t, dtype=sdtype), new(t, dtype=sdtype),
            *bottleneck_stats, new(transition_channels, dtype=sdtype), new(transition_channels, dtype=sdtype))


def _setup_context(ctx, inputs, output):
    x, dense_params, transition_params, part1, fusion, act, eps, engine = inputs
    out, buf, z_first, z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var, t_mean, t_var = output
    ctx.geometry = Geometry.of(x, part1, dense_params)
    ctx.fusion, ctx.act, ctx.eps, ctx.engine = fusion, act, eps, engine
    ctx.num_dense, ctx.num_transition = len(dense_params), len(transition_params)
    # Only `out` carries a gradient; without these autograd would hand backward zero-filled
    # gradients of buf, z_first and z_last (activation-sized writes each step).
    ctx.mark_non_differentiable(buf, z_first, z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var, t_mean,
                                t_var)
    ctx.set_materialize_grads(False)
    saved_buf = out if fusion == NO_TRANSITION else buf  # the output is the buffer: saved once
    ctx.save_for_backward(saved_buf, z_first, z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var, t_mean,
                          t_var, *dense_params, *transition_params)


def _backward(ctx, grad_out, *_grads_of_saved_outputs):
    return block_backward(ctx, grad_out)


def block_backward(ctx, grad_out, hooks=LOCAL):
    """`partial_dense_block`'s backward (`ctx` as `_setup_context` fills it), every BatchNorm's
    backward sums through `hooks`. Returns the op's input gradients, the lists as lists."""
    refuse_double_backward("csp_kernels::partial_dense_block (a training csp_kernels.PartialDenseBlock or DenseBlock)")
    if grad_out is None:  # no gradient reached `out` (grads are not materialized, see above)
        return None, [None] * ctx.num_dense, [None] * ctx.num_transition, None, None, None, None, None
    g: Geometry = ctx.geometry
    buf, z_first, z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var, t_mean, t_var, *params = (
        ctx.saved_tensors)
    dense_params, transition_params = params[: ctx.num_dense], params[ctx.num_dense:]
    eps, act, part1 = ctx.eps, ctx.act, g.part1
    grad_out = grad_out.contiguous()
    dense = buf[:, part1:]
    transition_grads = []

    def transition_backward(grad_y, z, mean, var, inp, index):
        """Backward of one transition; returns the gradient of its input."""
        weight, bn_weight, bn_bias = transition_params_of(transition_params, index)
        grad_inp, grad_weight, grad_bn_w, grad_bn_b = hooks.conv1x1_bn_act_backward(
            grad_y, z, mean, torch.rsqrt(var + eps), per_channel(bn_weight, mean.dtype),
            per_channel(bn_bias, mean.dtype), act, inp, weight)
        transition_grads[:0] = [grad_weight, grad_bn_w, grad_bn_b]
        return grad_inp

    last_channels = z_last.shape[1] if z_last.dim() == 4 else 0  # empty for NO_TRANSITION
    last_mean, last_var = t_mean[-last_channels:], t_var[-last_channels:]
    if ctx.fusion == NO_TRANSITION:
        # grad_out is the buffer's gradient: the dense layers' backward accumulates into a copy
        # (grad_out may be the caller's tensor).
        grad_buf = grad_dense = grad_out.clone()
    elif ctx.fusion == "first":
        grad_buf = transition_backward(grad_out, z_last, last_mean, last_var, buf, 0)
        grad_dense, grad_part1 = grad_buf[:, part1:], grad_buf[:, :part1]
    elif ctx.fusion == "last":
        grad_dense = transition_backward(grad_out[:, part1:], z_last, last_mean, last_var, dense, 0)
        grad_part1 = grad_out[:, :part1]
    else:
        first_channels = z_first.shape[1]
        first_mean, first_var = t_mean[:first_channels], t_var[:first_channels]
        first_bn = transition_params_of(transition_params, 0)[1:]
        cat = _csp_concat_head(buf, g, first_channels)
        scale_shift_act(z_first, *bn_scale_shift(first_mean, first_var, *first_bn, eps), act, out=cat[:, part1:])
        grad_cat = transition_backward(grad_out, z_last, last_mean, last_var, cat, 1)
        del cat
        # A copy of part 1's gradient, so that grad_cat (part1 + t channels) is freed before the
        # dense layers' backward, the step's peak memory.
        grad_part1 = grad_cat[:, :part1].clone()
        grad_dense = transition_backward(grad_cat[:, part1:], z_first, first_mean, first_var, dense, 0)
        del grad_cat

    dense_grads = _dense_backward(grad_dense, buf, dense_params, g, eps, dense_mean, dense_var,
                                  bottleneck_mean, bottleneck_var, ctx.engine, hooks)
    grad_x = None
    if ctx.needs_input_grad[0]:
        if ctx.fusion in ("first", NO_TRANSITION):
            grad_x = grad_buf[:, : part1 + g.part2]
        else:
            grad_x = torch.cat([grad_part1, grad_dense[:, : g.part2]], 1)
    dense_grads = [grad.to(p.dtype) for grad, p in zip(dense_grads, dense_params)]
    transition_grads = [grad.to(p.dtype) for grad, p in zip(transition_grads, transition_params)]
    return grad_x, dense_grads, transition_grads, None, None, None, None, None


def _dense_backward(grad_dense, buf, dense_params, g: Geometry, eps, mean, var, bottleneck_mean, bottleneck_var,
                    engine, hooks=LOCAL):
    """Backward of the dense layers, in place on `grad_dense` (batch, t, height, width), which
    holds the transitions' gradient of the dense channels on entry and their full gradient on
    return. Returns the dense parameters' gradients in `dense_params` order."""
    dense = buf[:, g.part1:]
    invstd = torch.rsqrt(var + eps)
    read = g.prefix(g.num_layers - 1)  # channels some layer's BN1 reads
    # float32 for 16-bit data on the GPU engines: one rounding, in bn_grad_correct's write of grad_dense.
    grad_acc = buf.new_zeros(g.batch, read, g.height, g.width, dtype=routing.dense_grad_acc_dtype(buf, engine))
    sum_grad = torch.zeros_like(mean[:read])
    sum_grad_xhat = torch.zeros_like(sum_grad)
    scratch_b, scratch_z = g.scratch(buf, g.bottleneck), g.scratch(buf, g.bottleneck)
    grads = [None] * len(dense_params)

    def correct(lo, hi):
        bn_grad_correct(grad_acc[:, lo:hi], dense[:, lo:hi], mean[lo:hi], invstd[lo:hi],
                        *hooks.sums(sum_grad[lo:hi], sum_grad_xhat[lo:hi]), grad_dense[:, lo:hi])

    for j in reversed(range(g.num_layers)):
        c = g.prefix(j)
        norm1_w, norm1_b, conv1_w, norm2_w, norm2_b, conv2_w = layer_params(dense_params, j)
        if j < g.num_layers - 1:  # layer j's channels are read by layers j+1.., now all done
            correct(c, c + g.growth)
        # Recompute the layer's activations from the buffer, as the forward computed them.
        norm1_w, norm1_b = per_channel(norm1_w, mean.dtype), per_channel(norm1_b, mean.dtype)
        norm2_w, norm2_b = per_channel(norm2_w, mean.dtype), per_channel(norm2_b, mean.dtype)
        # conv1's input, BN1+ReLU of the prefix, is normalized on load here (CPU, Triton) and in
        # the weight gradient below (CPU), never stored.
        scale1, shift1 = bn_scale_shift(mean[:c], var[:c], norm1_w, norm1_b, eps)
        z = conv1x1_fused(dense[:, :c], conv1_w, in_scale=scale1, in_shift=shift1, in_act=DENSE_ACT,
                          out=g.view(scratch_z, g.bottleneck), engine=engine)
        b = g.view(scratch_b, g.bottleneck)
        scale_shift_act(z, *bn_scale_shift(bottleneck_mean[j], bottleneck_var[j], norm2_w, norm2_b, eps), DENSE_ACT,
                        out=b)
        invstd2 = torch.rsqrt(bottleneck_var[j] + eps)
        # Backward through conv2, BN2 + ReLU, conv1, then BN1 + ReLU into the accumulator.
        grad_b, grad_conv2 = conv_backward(grad_dense[:, c: c + g.growth].contiguous(), b, conv2_w, [1, 1], [1, 1],
                                           [1, 1], 1, True, True)
        grad_conv1, grad_norm2_w, grad_norm2_b, grad_norm1_b, grad_norm1_w = dense_conv1_backward(
            grad_b, z, (bottleneck_mean[j], invstd2, norm2_w, norm2_b), dense[:, :c],
            (mean[:c], invstd[:c], norm1_w, norm1_b), DENSE_ACT, conv1_w, grad_acc[:, :c], engine, hooks)
        sum_grad[:c] += norm1_w * grad_norm1_b
        sum_grad_xhat[:c] += norm1_w * grad_norm1_w
        grads[DENSE_PARAMS_PER_LAYER * j: DENSE_PARAMS_PER_LAYER * (j + 1)] = [
            grad_norm1_w, grad_norm1_b, grad_conv1, grad_norm2_w, grad_norm2_b, grad_conv2]
    correct(0, g.part2)
    return grads


def _setup_op_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    update_before_saving(output, ctx.geometry.count)


partial_dense_block.register_autograd(_backward, setup_context=_setup_op_context)
