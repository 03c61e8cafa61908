"""Fused CSP stages: drop-in twins of the reference stage twins, with one concat buffer per call.

ultralytics' Bottleneck, C2f, C3, C3k, C3k2 (reference: csp_kernels/reference/yolo_stages.py)
and timm's BottleneckBlock, DarkBlock, CrossStage, CrossStage3, DarkStage (reference:
csp_kernels/reference/timm_stages.py), each subclassing its reference twin: same __init__
signature, state_dict keys, outputs, gradients and running statistics. Every ConvBNAct is the
fused one (nn/transition.py; op, autograd and kernel routing: ops/transition.py, ops/routing.py),
and every buffer slot is checked and sized by the shared helpers (`ops.conv.conv_output_shape`,
`ops.batch_norm_act.shares_memory`). Tests: tests/test_stages.py, tests/test_reference_stages.py.

No torch.cat or chunk runs: a call allocates one buffer holding the concat its last 1x1
convolution reads; every ConvBNAct and block writes its output straight into its channel slot
with `forward(x, out=slot)` and the split is a view:
  C2f, C3k2    [cv1 (2c) | m[0] (c) | ... | m[n-1] (c)]; block i reads slot 1 + i; cv2 reads all.
  C3, C3k      [m(cv1(x)) | cv2(x)]; cv3 reads all.
  CrossStage   [xs | xb] from conv_exp; conv_transition_b(blocks(xb)) replaces xb; conv_transition reads all.
  CrossStage3  [x1 | x2] from conv_exp; blocks(x1) replaces x1; conv_transition reads all.
The cross stages' blocks read a copy of their half while autograd records: the backward of the
first block needs it after the stage has overwritten it (a copy of one half, not of both).
Residual blocks (Bottleneck with shortcut, DarkBlock) write their convolution into their slot
and add the shortcut in place there. BottleneckBlock's act3 follows the add, so it runs
unfused; a fused "BN -> + shortcut -> act" epilogue needs a C++ kernel (the next step).

Every module takes `forward(x, out=None)` as ConvBNAct does: out, a (batch, channels, height,
width) tensor with contiguous (height, width) planes such as a channel slot of a bigger NCHW
buffer, is written and returned. What the buffered forward does not model runs the reference
twin's forward (whose ConvBNActs stay fused where they can be) with a ReferenceFallbackWarning
naming the reason: a submodule that receives `out=` replaced by another type or carrying forward
hooks (their output would bypass the slot), autocast (which mixes dtypes in the residual adds),
torch.jit.trace and torch.func transforms. The "reference" backend and torch.compile (which
fuses the concat itself) run it without a warning. Shapes are written (batch, channels, height,
width).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .. import backend, checks, reference
from ..ops.batch_norm_act import shares_memory
from ..ops.conv import conv_output_shape
from .transition import ConvBNAct, conv_reason

# (qualified name, submodule, the types whose forward(x, out=) the buffered forward relies on)
Writers = Iterable[tuple[str, nn.Module, tuple[type, ...]]]


class _ReadSlot(torch.autograd.Function):
    """buf[:, start:stop] as a tensor of its own: the same memory, but not a view, so it has its
    own version counter. A view shares its base's counter, and a reader that saves its input for
    backward (every training convolution) would then see the later writes into *other* slots of
    the buffer as a modification and refuse to run backward. The stages write each slot once,
    residual add included, before any reader reads it, so what that check guards against cannot
    happen here."""

    @staticmethod
    def forward(ctx, buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        ctx.shape, ctx.start, ctx.stop = buf.shape, start, stop
        ctx.set_materialize_grads(False)
        slot = buf[:, start:stop]
        return slot.new_empty(0).set_(slot.untyped_storage(), slot.storage_offset(), slot.shape, slot.stride())

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None, None
        grad_buf = grad.new_zeros(ctx.shape)
        grad_buf[:, ctx.start:ctx.stop] = grad
        return grad_buf, None, None


def read_slot(buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Channels start:stop of buf for a reader, as `_ReadSlot` while autograd may save it, else
    the plain view."""
    return _ReadSlot.apply(buf, start, stop) if torch.is_grad_enabled() else buf[:, start:stop]


def new_output(module: ConvBNAct, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An uninitialized NCHW tensor shaped as what `module` computes from x, with `channels`
    channels (its out_channels by default): (batch, channels, height', width')."""
    conv = module.conv
    batch, out_channels, height, width = conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding,
                                                           conv.dilation)
    return x.new_empty(batch, channels or out_channels, height, width)


def _reference_reason(x: torch.Tensor, writers: Writers, shape_source: tuple[str, ConvBNAct] | None) -> str | None:
    """None when the buffered forward covers this call; else why the reference twin's forward
    runs ("" when no warning is due: the "reference" backend, torch.compile). `writers` are the
    submodules that receive `out=`; `shape_source` is the ConvBNAct whose geometry sizes a new
    tensor (`new_output`), if any."""
    if backend.resolve_backend(x.device) == "reference" or torch.compiler.is_compiling():
        return ""
    if reason := backend.tracing_reason():
        return reason
    if checks.autocast_enabled(x.device.type):
        return "autocast is enabled (it mixes dtypes in the stage's residual adds; cast instead)"
    for name, module, kinds in writers:
        if type(module) not in kinds:
            expected = " or ".join(f"csp_kernels.{kind.__name__}" for kind in kinds)
            return f"{name} is {type(module).__name__} (the fused stage writes into its buffer through {expected})"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a forward hook on {name} (the fused stage writes {name}'s output into its buffer, past the hook)"
    if shape_source is None:
        return None
    name, module = shape_source
    return conv_reason(module.conv, f"{name}.conv") or None


def _unbuffered_output(module: nn.Module, reference_forward, x: torch.Tensor, out: torch.Tensor | None,
                       writers: Writers, shape_source: tuple[str, ConvBNAct] | None) -> torch.Tensor | None:
    """What a stage's forward returns when its buffered forward does not run this call, else
    None: for an `out` over x (which the stage reads after it starts writing out), the output
    computed aside and copied; where `_reference_reason` gives a reason, the reference twin's
    forward, with the warning the reason calls for, into `out` if given."""
    checks.check_input(x)
    if out is not None and shares_memory(out, x):
        return out.copy_(module.forward(x))
    reason = _reference_reason(x, writers, shape_source)
    if reason is None:
        return None
    if reason:
        backend.warn_reference_fallback(module, reason)
    y = reference_forward(x)
    return y if out is None else out.copy_(y)


def _residual_forward(module: nn.Module, reference_forward, x: torch.Tensor, out: torch.Tensor | None, first: str,
                      second: str, add: bool) -> torch.Tensor:
    """second(first(x)), plus x when `add`, for a block whose ConvBNActs are named `first` and
    `second`: the second writes into `out` (or a new tensor) and the shortcut is added in place
    there."""
    conv = getattr(module, second)
    if (y := _unbuffered_output(module, reference_forward, x, out, [(second, conv, (ConvBNAct,))],
                                (second, conv))) is not None:
        return y
    hidden = getattr(module, first)(x)
    if not add:
        return conv(hidden, out=out)
    # A fresh or a caller's tensor, which no backward reads, is safe to add into in place.
    return conv(hidden, out=new_output(conv, hidden) if out is None else out).add_(x)


# ultralytics ------------------------------------------------------------------------------


class Bottleneck(reference.Bottleneck):
    __doc__ = reference.Bottleneck.__doc__
    conv_bn_act = ConvBNAct

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _residual_forward(self, super().forward, x, out, "cv1", "cv2", self.add)


class C2f(reference.C2f):
    __doc__ = reference.C2f.__doc__
    conv_bn_act, bottleneck = ConvBNAct, Bottleneck

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("cv1", self.cv1, (ConvBNAct,)), ("cv2", self.cv2, (ConvBNAct,))] + [
            (f"m.{i}", block, (Bottleneck, C3k)) for i, block in enumerate(self.m)]  # C3k: in a C3k2
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("cv1", self.cv1))) is not None:
            return y
        c = self.c
        buf = new_output(self.cv1, x, (2 + len(self.m)) * c)
        self.cv1(x, out=buf[:, :2 * c])
        for i, block in enumerate(self.m, start=1):
            block(read_slot(buf, i * c, (i + 1) * c), out=buf[:, (i + 1) * c:(i + 2) * c])
        return self.cv2(buf, out=out)


class C3(reference.C3):
    __doc__ = reference.C3.__doc__
    conv_bn_act, bottleneck = ConvBNAct, Bottleneck

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("cv2", self.cv2, (ConvBNAct,)), ("cv3", self.cv3, (ConvBNAct,)),
                   (f"m.{len(self.m) - 1}", self.m[-1], (Bottleneck,))]
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("cv2", self.cv2))) is not None:
            return y
        hidden = self.cv2.out_channels
        buf = new_output(self.cv2, x, 2 * hidden)
        y = self.cv1(x)
        for block in self.m[:-1]:
            y = block(y)
        self.m[-1](y, out=buf[:, :hidden])
        self.cv2(x, out=buf[:, hidden:])
        return self.cv3(buf, out=out)


class C3k(reference.C3k, C3):
    __doc__ = reference.C3k.__doc__


class C3k2(reference.C3k2, C2f):
    __doc__ = reference.C3k2.__doc__
    c3k_block = C3k


# timm --------------------------------------------------------------------------------------


class BottleneckBlock(reference.BottleneckBlock):
    __doc__ = reference.BottleneckBlock.__doc__
    conv_bn_act = ConvBNAct

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if (y := _unbuffered_output(self, super().forward, x, out, [("conv3", self.conv3, (ConvBNAct,))],
                                    ("conv3", self.conv3))) is not None:
            return y
        hidden = self.conv2(self.conv1(x))
        y = self.act3(self.conv3(hidden, out=new_output(self.conv3, hidden)).add_(x))
        return y if out is None else out.copy_(y)


class DarkBlock(reference.DarkBlock):
    __doc__ = reference.DarkBlock.__doc__
    conv_bn_act = ConvBNAct

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _residual_forward(self, super().forward, x, out, "conv1", "conv2", True)


_TIMM_BLOCKS = {reference.BottleneckBlock: BottleneckBlock, reference.DarkBlock: DarkBlock,
                BottleneckBlock: BottleneckBlock, DarkBlock: DarkBlock}


def _run_blocks(blocks: nn.Sequential, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """blocks(x), the last block writing into `out` when given."""
    *first, last = blocks
    for block in first:
        x = block(x)
    return last(x, out=out)


def _last_block(blocks: nn.Sequential) -> tuple[str, nn.Module, tuple[type, ...]]:
    return f"blocks.{len(blocks) - 1}", blocks[-1], (BottleneckBlock, DarkBlock)


class CrossStage(reference.CrossStage):
    __doc__ = reference.CrossStage.__doc__
    conv_bn_act, block_classes = ConvBNAct, _TIMM_BLOCKS

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("conv_exp", self.conv_exp, (ConvBNAct,)),
                   ("conv_transition_b", self.conv_transition_b, (ConvBNAct,)),
                   ("conv_transition", self.conv_transition, (ConvBNAct,))]
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("conv_exp", self.conv_exp))) is not None:
            return y
        half = self.expand_chs // 2
        down = self.conv_down(x)
        buf = self.conv_exp(down, out=new_output(self.conv_exp, down))
        xb = buf[:, half:].clone() if torch.is_grad_enabled() else buf[:, half:]
        self.conv_transition_b(self.blocks(xb), out=buf[:, half:])
        return self.conv_transition(buf, out=out)


class CrossStage3(reference.CrossStage3):
    __doc__ = reference.CrossStage3.__doc__
    conv_bn_act, block_classes = ConvBNAct, _TIMM_BLOCKS

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("conv_exp", self.conv_exp, (ConvBNAct,)), _last_block(self.blocks),
                   ("conv_transition", self.conv_transition, (ConvBNAct,))]
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("conv_exp", self.conv_exp))) is not None:
            return y
        half = self.expand_chs // 2
        down = self.conv_down(x)
        buf = self.conv_exp(down, out=new_output(self.conv_exp, down))
        # Without autograd a one-block stage reads x1 where it writes: the block copies then.
        x1 = buf[:, :half].clone() if torch.is_grad_enabled() else buf[:, :half]
        _run_blocks(self.blocks, x1, buf[:, :half])
        return self.conv_transition(buf, out=out)


class DarkStage(reference.DarkStage):
    __doc__ = reference.DarkStage.__doc__
    conv_bn_act, block_classes = ConvBNAct, _TIMM_BLOCKS

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if (y := _unbuffered_output(self, super().forward, x, out, [_last_block(self.blocks)], None)) is not None:
            return y
        return _run_blocks(self.blocks, self.conv_down(x), out)
