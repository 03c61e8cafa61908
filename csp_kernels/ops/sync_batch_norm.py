"""The training CSP transition, conv -> BatchNorm -> activation, with batch statistics
synchronized over a process group: what nn.SyncBatchNorm computes, one collective per pass.

  forward   z = conv(x, weight) and z's local per-channel mean and biased variance (the same
            kernels as `conv_bn_act_train`: the 1x1 GEMM's epilogue or one `channel_stats`
            pass); one all_reduce of [n·mean, n·var, n·mean², n] (3C + 1 float64 values) gives
            the global count N, mean and biased variance; y = act(BN(z)) in one
            `scale_shift_act` pass, straight into `out` when one is given.
  backward  the local per-channel sums of dpre = dy·act' and dpre·x̂ (`bn_act_backward_reduce`,
            with the global mean and invstd); one all_reduce of both (2C values); grad_z from the
            global sums, then the conv's gradients (on CPU 1x1 stride-1 convs the GEMMs compute
            grad_z tile by tile in cache, as `conv_bn_act_train`'s backward does).
The BatchNorm's weight and bias gradients stay local, as nn.SyncBatchNorm's do: DDP (or the
caller) averages them with the other parameters' gradients.

nn.SyncBatchNorm all-gathers each rank's (mean, invstd, count) instead (W·(2C + 1) values, since
counts may differ between ranks) and merges them; the sums above merge in one all_reduce:
mean = Σn·mean / N, var = (Σn·var + Σn·mean² − N·mean²) / N, where only the spread of the
ranks' means cancels (in float64), not the variance itself.

Collectives cannot run inside a torch.library op's fake kernel, so this is an autograd.Function
(not one op to torch.export). torch.compile's Dynamo traces it through without a graph break:
the Function's forward and backward as a higher-order op, the all_reduces as functional
collectives, so a compiled step computes what the eager one does. `ops.sync_dense` synchronizes
the dense blocks with the same collectives (`all_reduce_stats`, `all_reduce_sums`) and
transition backward (`conv_bn_act_backward_sync`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .batch_norm_act import (_ops, batch_scale_shift, per_channel, plane_contiguous, refuse_double_backward,
                             scale_shift_act, stats_dtype)
from .conv import conv_backward, conv_output_shape
from .routing import runs_as_gemm, train_conv_kernel
from .stats_update import update_before_saving
from .transition import _batch_stats_conv


def sync_group(bn: nn.Module):
    """The process group whose batch statistics `bn` must share in this call, or None when it
    computes as nn.BatchNorm2d: not a training nn.SyncBatchNorm, torch.distributed not
    initialized, or a group of one process. The group is `bn.process_group`, else WORLD (as
    nn.SyncBatchNorm picks it, `process_group_of`)."""
    if type(bn) is not nn.SyncBatchNorm or not bn.training or not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group_of(bn)
    return group if dist.get_world_size(group) > 1 else None


def process_group_of(bn: nn.SyncBatchNorm):
    """The process group `bn` synchronizes over at a call: its own, else WORLD."""
    return bn.process_group or dist.group.WORLD


def all_reduce_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (mean, biased var, count) from each rank's per-channel (mean, biased var) over
    `count` local values, in one all_reduce.

    mean, var: (channels,) -> mean, var: (channels,) float64; count: () float64.
    """
    c = mean.shape[0]
    mean, var = mean.to(torch.float64), var.to(torch.float64)
    sums = torch.cat([mean * count, var * count, mean * mean * count, mean.new_full((1,), count)])
    dist.all_reduce(sums, dist.ReduceOp.SUM, group)
    total_mean, total_m2, total_sq, total = sums[:c], sums[c:2 * c], sums[2 * c:3 * c], sums[3 * c]
    global_mean = total_mean / total
    # Σn·(mean_r − mean)² = Σn·mean_r² − N·mean², >= 0 up to rounding.
    spread = (total_sq - global_mean * total_mean).clamp_(min=0)
    return global_mean, (total_m2 + spread) / total, total


class SyncConvBNAct(torch.autograd.Function):
    """act(SyncBatchNorm(conv2d(x, weight))) in training, written into `out` when given.

    Autograd's rules for a Function that writes into a view (as `_TrainInto` in ops/transition.py):
    the view is its first input and its only output, so the statistics come back through `stats`,
    (2·C + 1,) float64, filled with [global mean (C), global biased var (C), global count].
    """

    @staticmethod
    def forward(ctx, out, x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine, group,
                stats):
        if x.numel() == 0:  # an empty rank adds nothing to the group's sums, but joins its collectives
            z = x.new_empty(conv_output_shape(x.shape, weight.shape, stride, padding, dilation))
            mean = var = z.new_zeros(z.shape[1], dtype=stats_dtype(x.dtype))
        else:
            kernel = train_conv_kernel(x, weight, stride, padding, dilation, groups, engine)
            z, mean, var = _batch_stats_conv(x, weight, stride, padding, dilation, groups, kernel)
        local_count = z.numel() // z.shape[1]
        mean64, var64, count = all_reduce_stats(mean, var, local_count, group)
        c = z.shape[1]
        stats[:c].copy_(mean64)
        stats[c:2 * c].copy_(var64)
        stats[2 * c].copy_(count)
        update_before_saving(stats[:c], stats[c:2 * c], stats[2 * c])
        mean, var = mean64.to(mean.dtype), var64.to(var.dtype)
        y = scale_shift_act(z, *batch_scale_shift(mean, var, bn_weight, bn_bias, eps), act, out=out)
        if out is not None:
            ctx.mark_dirty(out)
        ctx.set_materialize_grads(False)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.act, ctx.group = act, group
        # The backward kernels divide the summed gradients by the local count; the global sums
        # need the global one: local_count / N rescales them.
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, z, mean, torch.rsqrt(var + eps),
                              (local_count / count).to(mean.dtype))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward("csp_kernels.ops.sync_batch_norm.SyncConvBNAct (a training csp_kernels.ConvBNAct "
                               "with a synchronized BatchNorm)")
        if grad_y is None:
            return (None,) * 14
        x, weight, bn_weight, bn_bias, z, mean, invstd, share = ctx.saved_tensors
        needs_out, needs_x, needs_weight = ctx.needs_input_grad[:3]
        bn = (mean, invstd, per_channel(bn_weight, mean.dtype), per_channel(bn_bias, mean.dtype))
        grad_x, grad_weight, grad_bn_weight, grad_bn_bias = conv_bn_act_backward_sync(
            grad_y, z, bn, ctx.act, x, weight, ctx.conv_args, lambda *sums: all_reduce_sums(*sums, share, ctx.group),
            needs_x, needs_weight)
        # The overwritten contents of `out` get a zero gradient, which must be a tensor (see _TrainInto).
        overwritten = grad_y.new_zeros(()).expand_as(grad_y) if needs_out else None
        return (overwritten, grad_x, grad_weight, grad_bn_weight.to(bn_weight.dtype), grad_bn_bias.to(bn_bias.dtype),
                *(None,) * 9)


def all_reduce_sums(sum_dpre: torch.Tensor, sum_dpre_xhat: torch.Tensor, share, group
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm's backward sums over the group's batch, in one all_reduce, times `share`
    (local count / global count): the backward kernels divide the sums they are given by the
    local count, the global sums need the global one.

    sum_dpre, sum_dpre_xhat: (channels,) this rank's -> the same, global and scaled (new tensors).
    """
    sums = torch.cat([sum_dpre, sum_dpre_xhat])
    dist.all_reduce(sums, dist.ReduceOp.SUM, group)
    return sums.mul_(share).chunk(2)


def conv_bn_act_backward_sync(grad_y, z, bn, act, x, weight, conv_args, reduce_sums, needs_x=True, needs_weight=True):
    """Backward of y = act(BN(z)), z = conv2d(x, weight), with BN's backward sums made global by
    `reduce_sums` (`all_reduce_sums` with the caller's share and group).

    grad_y, z: (batch, out, height', width'); x: (batch, in, height, width); bn: (mean, invstd,
    weight, bias) (out,) in the statistics dtype; conv_args: (stride, padding, dilation, groups).
    Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias), the BN's gradients this rank's
    (local sums), grad_x / grad_weight None where not needed.
    """
    stride, padding, dilation, groups = conv_args
    grad_y, z = plane_contiguous(grad_y), plane_contiguous(z)
    sum_dpre, sum_dpre_xhat = _ops.bn_act_backward_reduce(grad_y, z, *bn, act)
    grad_x = grad_weight = None
    if needs_x or needs_weight:  # as nn.SyncBatchNorm: no collective when grad_z is not needed
        global_dpre, global_dpre_xhat = reduce_sums(sum_dpre, sum_dpre_xhat)
        if runs_as_gemm(x, weight, stride, padding, groups, training=True):
            grad_x, grad_weight = _ops.conv1x1_bn_act_backward(
                grad_y, z, *bn, global_dpre, global_dpre_xhat, act, x, weight.flatten(1).contiguous(), needs_x,
                needs_weight)
            grad_x = grad_x if needs_x else None
            grad_weight = grad_weight.view(weight.shape) if needs_weight else None
        else:
            grad_z = _ops.bn_act_backward_apply(grad_y, z, *bn, global_dpre, global_dpre_xhat, act)
            grad_x, grad_weight = conv_backward(grad_z, x, weight, stride, padding, dilation, groups, needs_x,
                                                needs_weight)
    return grad_x, grad_weight, sum_dpre_xhat, sum_dpre


def conv_bn_act_train_sync(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine, group,
                           out=None):
    """Differentiable synchronized training forward: (y, mean, var, count), y written into
    `out` when given (then y is `out`); mean and biased var (out_channels,) float64 over the
    group's whole batch, count () float64 its number of values per channel.

    x: (batch, in_channels, height, width), batch >= 1 on some rank (an empty one joins the
    collectives); weight:
    (out_channels, in_channels / groups, kh, kw); bn_weight, bn_bias: (out_channels,);
    group: a process group of more than one process (`sync_group`).
    """
    c = weight.shape[0]
    stats = x.new_empty(2 * c + 1, dtype=torch.float64)
    y = SyncConvBNAct.apply(out, x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine,
                            group, stats)
    return y, stats[:c], stats[c:2 * c], stats[2 * c]
