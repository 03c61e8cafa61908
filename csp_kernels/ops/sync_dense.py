"""The training dense block (`ops.dense`: PartialDenseBlock, DenseBlock) with its BatchNorms'
batch statistics synchronized over a process group, as nn.SyncBatchNorm's: `ops.dense`'s own
forward and backward (`block_train`, `block_backward`), each statistic and backward sum made the
group's by `GroupStatistics` hooks, in an autograd.Function (collectives cannot run inside a
torch.library op).

A buffer channel's statistics are computed once, shared by every later layer's BN1, so the
collectives follow the data, not the BatchNorms (L layers, T transitions; all_reduce only):
  forward   x's dense channels (part2) once; per layer BN2's input (bottleneck channels), then
            its new growth channels, which the next layer's BN1 needs (the last layer's feed
            no BN1: not reduced); each transition's output. 2L + T collectives of 3C + 1
            float64 values (`all_reduce_stats`), C = part2 + L·bottleneck + (L − 1)·growth +
            the transitions' channels in all.
  backward  each transition's sums; per layer, BN2's sums before conv1's backward, and the BN1
            correction sums of its growth channels once the later layers have added theirs
            (`_dense_backward` corrects each channel once); part2's last. 2L + T collectives,
            2C values in the statistics dtype (`all_reduce_sums`).
Each collective waits on the one before (a layer's statistics feed the next layer's ReLU), so
the count equals eager nn.SyncBatchNorm's (one all_gather per BatchNorm forward, one all_reduce
backward); the values carried do not grow with the prefix each BN1 reads, as eager's do
(all_gather of W·(2c_j + 1) for layer j's BN1 over c_j channels). `benchmarks.collectives`
counts both.

Running statistics: the module updates them from the returned global statistics with the global
count (unbiased variance over the group's batch), as nn.SyncBatchNorm. BatchNorm weight and
bias gradients stay this rank's, as nn.SyncBatchNorm's: DDP (or the caller) averages them.
"""
from __future__ import annotations

import torch

from . import dense as dense_ops
from .stats_update import update_before_saving
from .sync_batch_norm import all_reduce_sums, all_reduce_stats, conv_bn_act_backward_sync

# (stride, padding, dilation, groups) of the transitions' 1x1 convolutions.
_CONV1X1_ARGS = ([1, 1], [0, 0], [1, 1], 1)


class GroupStatistics(dense_ops.LocalStatistics):
    """`ops.dense`'s statistics hooks over a process group: each call one all_reduce.

    local_count: this rank's values per channel (batch * height * width); `count`, () float64,
    is the group's once `stats` has run.
    """

    def __init__(self, group, local_count: int):
        self.group, self.local_count = group, local_count
        self.count: torch.Tensor | None = None

    def stats(self, mean, var):
        mean64, var64, self.count = all_reduce_stats(mean, var, self.local_count, self.group)
        return mean64.to(mean.dtype), var64.to(var.dtype)

    def sums(self, sum_dpre, sum_dpre_xhat):
        share = (self.local_count / self.count).to(sum_dpre.dtype)
        return all_reduce_sums(sum_dpre, sum_dpre_xhat, share, self.group)

    def conv1x1_bn_act_backward(self, grad_y, z, mean, invstd, bn_weight, bn_bias, act, x, weight):
        return conv_bn_act_backward_sync(grad_y, z, (mean, invstd, bn_weight, bn_bias), act, x, weight, _CONV1X1_ARGS,
                                         self.sums)


class SyncDenseBlock(torch.autograd.Function):
    """`ops.dense.partial_dense_block` with `GroupStatistics` hooks; the parameters flat after
    `num_dense` (autograd tracks tensors only), the op's other arguments in `layout`."""

    @staticmethod
    def forward(ctx, x, hooks, layout, num_dense, *params):
        part1, fusion, act, eps, engine = layout
        inputs = (x, list(params[:num_dense]), list(params[num_dense:]), part1, fusion, act, eps, engine)
        output = dense_ops.block_train(*inputs, hooks)
        dense_ops._setup_context(ctx, inputs, output)
        update_before_saving(output, hooks.count)
        ctx.hooks = hooks
        return output

    @staticmethod
    def backward(ctx, grad_out, *_grads_of_saved_outputs):
        grad_x, dense_grads, transition_grads, *_ = dense_ops.block_backward(ctx, grad_out, ctx.hooks)
        return grad_x, None, None, None, *dense_grads, *transition_grads


@torch.compiler.disable
def partial_dense_block_sync(x, dense_params, transition_params, part1, fusion, act, eps, engine, group):
    """Differentiable synchronized training forward: (the op's 10 outputs, count), the
    statistics over the group's whole batch (the last layer's growth channels' this rank's: no
    BatchNorm reads them), count () float64 the group's values per channel.

    Arguments as `ops.dense.partial_dense_block`'s; x: batch >= 1 on every rank; group: a process
    group of more than one process (`sync_batch_norm.sync_group`).

    Under torch.compile a graph break: it runs eagerly between two graphs. Dynamo cannot capture
    this Function (torch 2.14): `GroupStatistics` hands the group's count from forward to
    backward as Python state, a view of a collective's result, which a traced subgraph does not
    carry.
    """
    hooks = GroupStatistics(group, x.shape[0] * x.shape[2] * x.shape[3])
    output = SyncDenseBlock.apply(x, hooks, (part1, fusion, act, eps, engine), len(dense_params), *dense_params,
                                  *transition_params)
    return output, hooks.count
