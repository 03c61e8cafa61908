"""Synchronized BatchNorm for data-parallel training of the fused modules.

A fused `ConvBNAct` (and every stage built from it: C2f, C3, C3k2, CrossStage, ...) whose `bn`
is an nn.SyncBatchNorm, and a fused PartialDenseBlock or DenseBlock whose BatchNorms all are,
computes, in training under an initialized process group of more than one process, the batch
statistics of the whole group's batch, as nn.SyncBatchNorm does, on any device: the CPU with
gloo too, where nn.SyncBatchNorm's own forward refuses CPU tensors. Each ConvBNAct costs one
all_reduce in forward and one in backward (`csp_kernels.ops.sync_batch_norm`); a dense block
all-reduces each buffer channel's statistics once, as many collectives as it has BatchNorms but
without a layer's norm1 re-sending the prefix it reads (`csp_kernels.ops.sync_dense`;
`python -m benchmarks.collectives` counts them against eager nn.SyncBatchNorm's).

`convert_sync_batchnorm(model)` puts the SyncBatchNorms in (torch's
nn.SyncBatchNorm.convert_sync_batchnorm does as well: the fused modules look at the BatchNorm's
type, not at who converted it); `check_sync_batch_norm(model)` finds stages whose BatchNorms
would not share one process group.

torch.compile of a synchronized model, DDP-wrapped or not, computes what eager does: a ConvBNAct's
synchronization is traced into the graph (functional all_reduces), a dense block's runs eagerly
at a graph break (`ops.sync_dense.partial_dense_block_sync`).
"""
from __future__ import annotations

from torch import nn

from . import checks
from . import nn as fused_nn
from .convert import batch_norm_sharing
from .ops.sync_batch_norm import process_group_of

__all__ = ["convert_sync_batchnorm", "check_sync_batch_norm"]


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """`model` with every nn.BatchNorm2d (and every nn.SyncBatchNorm) replaced by an
    nn.SyncBatchNorm over `process_group` (None: WORLD at each call), as
    torch.nn.SyncBatchNorm.convert_sync_batchnorm does, but for 2-D BatchNorms only: the ones the
    fused kernels synchronize. The new module holds the old one's parameters and buffers (the
    same tensors: requires_grad, device, dtype and an optimizer made before all hold), eps,
    momentum and train/eval mode; state_dict keys are unchanged. Like torch's, it converts
    `model` in place (children are replaced) and returns it, or the new module when `model` is
    itself a BatchNorm; forward hooks on a BatchNorm are not carried over.

    This is the library's path on the CPU (gloo): the fused ConvBNAct, the stages built from it
    and the dense blocks synchronize there. A converted BatchNorm elsewhere — one in a plain
    nn.Sequential, or in a dense block that falls back to the reference (e.g. converted only in
    part: a ReferenceFallbackWarning names it) — runs torch's SyncBatchNorm, which in training
    with more than one process accepts only GPU tensors and raises on the CPU.
    """
    checks.check_module(model)
    if isinstance(model, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        sync = batch_norm_sharing(model, nn.SyncBatchNorm, process_group=process_group)
        if hasattr(model, "qconfig"):
            sync.qconfig = model.qconfig
        return sync
    for name, child in model.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(model, name, converted)
    return model


def check_sync_batch_norm(model: nn.Module) -> None:
    """Raise ValueError, naming the BatchNorms, if a fused module of `model` made of several
    ConvBNActs or dense layers (a stage, a block, a PartialDenseBlock or DenseBlock) mixes
    nn.SyncBatchNorm with other BatchNorms, or holds SyncBatchNorms over different process
    groups: its layers would then normalize over different sets of processes, which is what
    converting part of a stage (e.g. `convert_sync_batchnorm(stage.m)`) leaves (a dense block
    then falls back to the reference with a ReferenceFallbackWarning naming them). Call it after
    converting by hand.
    """
    for stage_name, stage in checks.check_module(model).named_modules():
        if not isinstance(stage, _STAGES):
            continue
        what = f"{type(stage).__name__} {stage_name or '(the model)'}"
        norms = [(f"{stage_name}.{name}" if stage_name else name, m) for name, m in stage.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        synced = [(name, m) for name, m in norms if isinstance(m, nn.SyncBatchNorm)]
        others = [(name, m) for name, m in norms if not isinstance(m, nn.SyncBatchNorm)]
        if synced and others:
            raise ValueError(f"{what} mixes SyncBatchNorm ({synced[0][0]}) with {type(others[0][1]).__name__} "
                             f"({others[0][0]}): convert the whole stage with "
                             "csp_kernels.distributed.convert_sync_batchnorm")
        first_of_group = {}
        for name, m in synced:
            first_of_group.setdefault(process_group_of(m), name)
        if len(first_of_group) > 1:
            first, second = list(first_of_group.values())[:2]
            raise ValueError(f"{what} holds SyncBatchNorms over different process groups ({first} and {second}): "
                             "its layers would normalize over different sets of processes")


# The fused modules made of several layers, each with its own BatchNorm.
_STAGES = (fused_nn.PartialDenseBlock, fused_nn.DenseBlock, fused_nn.Bottleneck, fused_nn.C2f, fused_nn.C3,
           fused_nn.BottleneckBlock, fused_nn.DarkBlock, fused_nn.CrossStage, fused_nn.CrossStage3, fused_nn.DarkStage)

