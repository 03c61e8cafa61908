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
with `forward(x, out=slot)` and the split costs no copy:
  C2f, C3k2    [cv1 (2c) | m[0] (c) | ... | m[n-1] (c)]; block i reads slot 1 + i; cv2 reads all.
  C3, C3k      [m(cv1(x)) | cv2(x)]; cv3 reads all.
  CrossStage   [xs | xb] from conv_exp; conv_transition_b(blocks(xb)) replaces xb; conv_transition reads all.
  CrossStage3  [x1 | x2] from conv_exp; blocks(x1) replaces x1; conv_transition reads all.
A slot is a tensor of its own over the buffer's memory (`slot`), not a view, and the last conv
reads the slots' outputs as one tensor (`gather`): autograd sees each write as a plain output,
so the backward hands each slot its channels of the buffer's gradient as views, without the
copies of the whole buffer's gradient that writes into views cost. The cross stages split
conv_exp's output into two such tensors (`halves`), whose gradients backward concatenates once.
The cross stages' blocks
read a copy of their half while autograd records (the stage overwrites that half); it is freed
after the forward, since the blocks rebuild it in backward. Every tensor the stage assembles
(the buffer, a block's input, a residual sum) is tagged with how to rebuild it from the
ConvBNActs' own saved conv outputs (ops/recompute.py): saved for backward are x and one conv
output per ConvBNAct.
Residual blocks (Bottleneck with shortcut, DarkBlock) write their convolution into their slot
and add the shortcut in place there. BottleneckBlock's act3 follows the add; where its gradient
can read its output (ReLU, LeakyReLU) it runs in place on the sum, and the output is tagged with
its recipe (`recompute.activated`), which the next block's conv1 and act3's own backward rebuild.

Every module takes `forward(x, out=None)` as ConvBNAct does: out, a (batch, channels, height,
width) tensor with contiguous (height, width) planes such as a channel slot of a bigger NCHW
buffer, is written and returned. What the buffered forward does not model runs the reference
twin's forward (whose ConvBNActs stay fused where they can be) with a ReferenceFallbackWarning
naming the reason: a submodule that receives `out=`, or a Sequential of blocks that the
buffered forward runs one by one, replaced by another type, carrying hooks, forward or
backward, or with its forward replaced on the instance (what the buffer would bypass),
autocast (which mixes dtypes in the residual adds), torch.jit.trace, torch.func transforms,
forward-mode AD and global module hooks (`backend.mode_reason`). The "reference" backend, torch.compile (which
fuses the concat itself), a training stage on CPU maps of at most
`ops.routing.SMALL_TRAINING_MAP_PIXELS` pixels (faster as plain PyTorch:
`ops.routing.training_eager_is_faster`) and a stage called without autograd on CPU maps of at
most `ops.routing.SMALL_EVAL_STAGE_PIXELS` pixels (chunk and cat faster than the buffer's slots:
`ops.routing.eval_stage_unbuffered_is_faster`) run it without a warning. Shapes are written (batch, channels, height,
width).
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn

from .. import backend, checks, reference
from ..ops import recompute, routing
from ..ops.batch_norm_act import as_channels_last_if, shares_memory, suggests_channels_last
from ..ops.conv import conv_output_shape
from ..ops.transition import check_out
from .transition import ConvBNAct, conv_reason

# (qualified name, submodule, its types that the buffered forward relies on): a submodule called
# with forward(x, out=), or an nn.Sequential of blocks that it runs one by one, skipping the
# Sequential's own call
Writers = Iterable[tuple[str, nn.Module, tuple[type, ...]]]


def slot(buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Channels start:stop of buf as a tensor of its own: the same memory, but not a view, so
    autograd links it to nothing and it has its own version counter. The stages' writers write
    into slots with `out=`. Into a view, autograd would record each write on the whole buffer
    (in backward, a copy of the buffer's gradient per write), and a later write into another
    slot would count as a modification of what an earlier reader saved. The stages write each
    slot once, residual add included, before any reader reads it."""
    batch, _, height, width = buf.shape
    return buf.new_empty(0).set_(buf.untyped_storage(), buf.storage_offset() + start * buf.stride(1),
                                 (batch, stop - start, height, width), buf.stride())


def channels(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """t[:, start:stop], rebuildable in backward as t is (ops/recompute.py)."""
    if not torch.is_grad_enabled():  # no backward to rebuild it in
        return t[:, start:stop]
    return recompute.tag(t[:, start:stop], recompute.narrow(recompute.recipe_of(t), start, stop))


class _Halves(torch.autograd.Function):
    """t's channels [0, half) and [half, C) as two tensors over its memory (`slot`): backward
    concatenates their gradients (zeros for one that has none) in one pass, where two slices
    would each fill a zero tensor of t's shape, copy their channels in, and add the two."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.shapes = t[:, :half].shape, t[:, half:].shape
        ctx.set_materialize_grads(False)
        return slot(t, 0, half), slot(t, half, t.shape[1])

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        if all(g is None for g in grads):
            return None, None
        like = next(g for g in grads if g is not None)
        return torch.cat([like.new_zeros(shape) if g is None else g for g, shape in zip(grads, ctx.shapes)], 1), None


def halves(t: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t[:, :half], t[:, half:]), each rebuildable in backward as t is (ops/recompute.py)."""
    if torch.is_grad_enabled() and t.requires_grad:
        first, second = _Halves.apply(t, half)
    else:
        first, second = t[:, :half], t[:, half:]
    if not torch.is_grad_enabled():  # no backward to rebuild them in
        return first, second
    recipe = recompute.recipe_of(t)
    return (recompute.tag(first, recompute.narrow(recipe, 0, half)),
            recompute.tag(second, recompute.narrow(recipe, half, t.shape[1])))


class _Gather(torch.autograd.Function):
    """The whole buffer, as the one tensor its last 1x1 conv reads, from the tensors written into
    its slots (which tile its channels in order): no copy; backward hands each slot its
    channels of the gradient, as views."""

    @staticmethod
    def forward(ctx, buf: torch.Tensor, *slots: torch.Tensor) -> torch.Tensor:
        ctx.bounds, start = [], 0
        for s in slots:
            ctx.bounds.append((start, start + s.shape[1]))
            start += s.shape[1]
        ctx.set_materialize_grads(False)
        return slot(buf, 0, buf.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return (None,) * (1 + len(ctx.bounds))
        return None, *(grad[:, start:stop] for start, stop in ctx.bounds)


def gather(buf: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
    """buf, written through `slots` (`slot` tensors, or channel views of them, in channel
    order), as one tensor that carries their gradients and rebuilds from their recipes."""
    if not torch.is_grad_enabled():  # no backward to hand gradients to or rebuild it in
        return buf
    return recompute.tag(_Gather.apply(buf, *slots), recompute.concat([recompute.recipe_of(s) for s in slots]))


def new_output(module: ConvBNAct, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An uninitialized NCHW tensor shaped as what `module` computes from x, with `channels`
    channels (its out_channels by default): (batch, channels, height', width')."""
    conv = module.conv
    batch, out_channels, height, width = conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding,
                                                           conv.dilation)
    return x.new_empty(batch, channels or out_channels, height, width)


def follows_input_format(forward):
    """A stage's `forward(x, out=None)` returning its result in x's memory format, as the
    reference twin's convolutions, cats and adds give it; a result written into `out` is the
    caller's. A channels_last x is copied to NCHW once, where every convolution reading it
    would copy it (the kernels walk planes), and the result back."""
    return _reading_nchw(forward, result_channels_last=True)


def reads_input_as_nchw(forward):
    """A stage's `forward(x, out=None)` reading a channels_last x as an NCHW copy, made once, and
    returning its result as its last ConvBNAct gives it: timm's CrossStage, whose NCHW cat
    (upstream's `.contiguous()`) makes its result NCHW unless that conv's weight is channels_last."""
    return _reading_nchw(forward, result_channels_last=False)


def follows_convolutions_format(*convs: str):
    """A timm residual block's `forward(x, out=None)`, whose result, conv_chain(x) + x, takes the
    first operand's memory format, the convolutions': channels_last where x or the weight of
    any of `convs` (its ConvBNActs' names) is. A channels_last x is read as an NCHW copy."""
    def decorate(forward):
        def result_channels_last(self, x_channels_last: bool) -> bool:
            return x_channels_last or any(_weight_channels_last(getattr(self, name, None)) for name in convs)
        return _reading_nchw(forward, result_channels_last)
    return decorate


def _weight_channels_last(unit: nn.Module | None) -> bool:
    """Whether `unit`, a ConvBNAct, has a channels_last conv weight (False for another module, a
    swapped one the reference runs)."""
    weight = getattr(getattr(unit, "conv", None), "weight", None)
    return isinstance(weight, torch.Tensor) and suggests_channels_last(weight)


def _reading_nchw(forward, result_channels_last):
    """forward, reading a channels_last x as an NCHW copy made once; its result, unless written
    into `out`, channels_last where `result_channels_last` (True, False, or a function of the
    module and whether x is channels_last) says so."""
    @functools.wraps(forward)
    def in_input_format(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        checks.check_input(x)
        if out is not None:
            checks.check_tensor(out, "out")
        x_channels_last = suggests_channels_last(x)
        y = forward(self, x.contiguous() if x_channels_last else x, out)
        if out is not None:
            return y
        wanted = result_channels_last(self, x_channels_last) if callable(result_channels_last) else (
            result_channels_last and x_channels_last)
        return as_channels_last_if(y, wanted)
    return in_input_format


def _reference_reason(module: nn.Module, x: torch.Tensor, writers: Writers,
                      shape_source: tuple[str, ConvBNAct] | None) -> str | None:
    """None when the buffered forward covers this call; else why the reference twin's forward
    runs ("" when no warning is due: the "reference" backend, torch.compile, a training stage on
    maps that plain PyTorch runs faster). `writers` are the submodules that receive `out=`;
    `shape_source` is the ConvBNAct whose geometry sizes a new tensor (`new_output`), if any."""
    name = backend.resolve_backend(x.device)
    if name == "reference" or torch.compiler.is_compiling():
        return ""
    if name == "cpu" and module.training and routing.training_eager_is_faster(x):
        return ""  # its ConvBNActs choose for themselves (a synchronized one stays fused)
    if name == "cpu" and routing.eval_stage_unbuffered_is_faster(x):
        return ""  # its ConvBNActs stay fused
    if reason := backend.mode_reason():
        return reason
    if checks.autocast_enabled(x.device.type):
        return "autocast is enabled (it mixes dtypes in the stage's residual adds; cast instead)"
    for name, module, kinds in writers:
        if type(module) not in kinds:
            expected = " or ".join(f"{'nn' if kind is nn.Sequential else 'csp_kernels'}.{kind.__name__}"
                                   for kind in kinds)
            return f"{name} is {type(module).__name__} (the fused stage writes into its buffer through {expected})"
        if reason := checks.bypass_reason(module, name, f"the fused stage writes {name}'s output into its buffer, "
                                                      "past the hook"):
            return reason
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
    if out is not None and shares_memory(out, x):
        return _copy_into(out, module.forward(x), x)
    reason = _reference_reason(module, x, writers, shape_source)
    if reason is None:
        return None
    if reason:
        backend.warn_reference_fallback(module, reason)
    y = reference_forward(x)
    return y if out is None else _copy_into(out, y, x)


def _copy_into(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out.copy_(y), `out` checked as the buffered forward's last ConvBNAct checks it (a tensor
    of y's shape, dtype and device, no two elements in one place): copy_ would cast, broadcast
    or write an expand()ed out silently."""
    check_out(out, y.shape, y.dtype, y.device, any_strides=True, x=x, recording=False)
    return out.copy_(y)


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
    return _add_shortcut(conv(hidden, out=new_output(conv, hidden) if out is None else out), x)


def _add_shortcut(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y += x in place, tagged with the sum's recipe (x's terms first, then y's)."""
    if not torch.is_grad_enabled():  # no backward to rebuild it in
        return y.add_(x)
    term = recompute.recipe_of(y)
    return recompute.tag(y.add_(x), recompute.add(recompute.recipe_of(x), term))


# ultralytics ------------------------------------------------------------------------------


class Bottleneck(reference.Bottleneck):
    __doc__ = reference.Bottleneck.__doc__
    conv_bn_act = ConvBNAct

    @follows_input_format
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _residual_forward(self, super().forward, x, out, "cv1", "cv2", self.add)


class C2f(reference.C2f):
    __doc__ = reference.C2f.__doc__
    conv_bn_act, bottleneck = ConvBNAct, Bottleneck

    @follows_input_format
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("cv1", self.cv1, (ConvBNAct,)), ("cv2", self.cv2, (ConvBNAct,))] + [
            (f"m.{i}", block, (Bottleneck, C3k)) for i, block in enumerate(self.m)]  # C3k: in a C3k2
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("cv1", self.cv1))) is not None:
            return y
        # The widths from cv1, as the reference's chunk(2, 1) of its output takes them (not self.c,
        # which the forward never reads, and a pruned or edited stage may not have kept up to date).
        first = self.cv1.conv.out_channels
        c = first // 2
        buf = new_output(self.cv1, x, first + len(self.m) * c)
        slots = [self.cv1(x, out=slot(buf, 0, first))]
        for i, block in enumerate(self.m):  # block i reads the last c channels written
            last = slots[-1]
            slots.append(block(channels(last, last.shape[1] - c, last.shape[1]),
                               out=slot(buf, first + i * c, first + (i + 1) * c)))
        return self.cv2(gather(buf, slots), out=out)


class C3(reference.C3):
    __doc__ = reference.C3.__doc__
    conv_bn_act, bottleneck = ConvBNAct, Bottleneck

    @follows_input_format
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("cv2", self.cv2, (ConvBNAct,)), ("cv3", self.cv3, (ConvBNAct,)), ("m", self.m, (nn.Sequential,)),
                   (f"m.{len(self.m) - 1}", self.m[-1], (Bottleneck,))]
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("cv2", self.cv2))) is not None:
            return y
        hidden = self.cv2.out_channels
        buf = new_output(self.cv2, x, 2 * hidden)
        y = self.cv1(x)
        for block in self.m[:-1]:
            y = block(y)
        slots = [self.m[-1](y, out=slot(buf, 0, hidden)), self.cv2(x, out=slot(buf, hidden, 2 * hidden))]
        return self.cv3(gather(buf, slots), out=out)


class C3k(reference.C3k, C3):
    __doc__ = reference.C3k.__doc__


class C3k2(reference.C3k2, C2f):
    __doc__ = reference.C3k2.__doc__
    c3k_block = C3k


# timm --------------------------------------------------------------------------------------


class BottleneckBlock(reference.BottleneckBlock):
    __doc__ = reference.BottleneckBlock.__doc__
    conv_bn_act = ConvBNAct

    @follows_convolutions_format("conv1", "conv2", "conv3")
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if (y := _unbuffered_output(self, super().forward, x, out, [("conv3", self.conv3, (ConvBNAct,))],
                                    ("conv3", self.conv3))) is not None:
            return y
        hidden = self.conv2(self.conv1(x))
        act = _in_place_activation(self.act3)
        # A fresh or a caller's tensor, which no backward reads, is safe to add into in place;
        # act3 saves its input unless it runs in place, so `out` then receives a copy.
        y = _add_shortcut(self.conv3(hidden, out=out if out is not None and act else new_output(self.conv3, hidden)), x)
        if act:  # into a caller's `out`, autograd's own in-place op: a buffer `out` views carries it
            return _activate_in_place(y, act) if out is None else recompute.activate_(y, act)
        y = self.act3(y)
        return y if out is None else out.copy_(y)


def _in_place_activation(act: nn.Module) -> str:
    """The name (`recompute.activate_`'s) of `act` where its gradient reads its output as well
    as its input (ReLU, LeakyReLU with a slope >= 0, which keep the input's sign; no hooks),
    else "": in place on the block's sum, backward keeps the output alone, or its recipe."""
    name, _ = checks.kernel_activation(act)
    if not name:
        return ""
    kind, slope = checks.parse_activation(name)
    return name if kind == "relu" or (kind == "leaky_relu" and slope >= 0) else ""


class _ActivateInPlace(torch.autograd.Function):
    """`recompute.activate_(s, act)` in s's memory, returned as a tensor of its own over it
    (`slot`: s, the block's sum, is read by no backward). Backward reads the output, which it
    saves as itself or, tagged with its recipe under `recompute.saving_recipes()`, as that."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, act: str, recipe: recompute.Recipe | None) -> torch.Tensor:
        y = recompute.tag(slot(recompute.activate_(s, act), 0, s.shape[1]), recipe)
        ctx.act = act
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return recompute.activation_backward(grad, ctx.saved_tensors[0], ctx.act), None, None


def _activate_in_place(s: torch.Tensor, act: str) -> torch.Tensor:
    """act(s) in the memory of s, a tensor of the block's own (the result is another tensor over
    it, which no view of a caller's buffer would follow), tagged with its recipe (a residual
    block's output, which the next block's conv1 and this activation's backward then rebuild
    rather than save)."""
    if not (torch.is_grad_enabled() and s.requires_grad):
        return recompute.activate_(s, act)
    recipe = recompute.activated(recompute.recipe_of(s), act)
    with recompute.saving_recipes():
        return _ActivateInPlace.apply(s, act, recipe)  # tagged in forward, before its own pack


class DarkBlock(reference.DarkBlock):
    __doc__ = reference.DarkBlock.__doc__
    conv_bn_act = ConvBNAct

    @follows_convolutions_format("conv1", "conv2")
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


def _blocks_writers(blocks: nn.Sequential) -> Writers:
    """The blocks and their last block, which `_run_blocks` calls one by one and with `out=`."""
    return [("blocks", blocks, (nn.Sequential,)),
            (f"blocks.{len(blocks) - 1}", blocks[-1], (BottleneckBlock, DarkBlock))]


class CrossStage(reference.CrossStage):
    __doc__ = reference.CrossStage.__doc__
    conv_bn_act, block_classes = ConvBNAct, _TIMM_BLOCKS

    @reads_input_as_nchw
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("conv_exp", self.conv_exp, (ConvBNAct,)),
                   ("conv_transition_b", self.conv_transition_b, (ConvBNAct,)),
                   ("conv_transition", self.conv_transition, (ConvBNAct,))]
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("conv_exp", self.conv_exp))) is not None:
            return y
        half = self.expand_chs // 2
        down = self.conv_down(x)
        buf = new_output(self.conv_exp, down)
        xs, xb = halves(self.conv_exp(down, out=slot(buf, 0, self.expand_chs)), half)
        # conv_transition_b overwrites xb's channels: the blocks read a copy while autograd records.
        xb = recompute.tag(xb.clone(), recompute.recipe_of(xb)) if torch.is_grad_enabled() else xb
        xb = self.conv_transition_b(self.blocks(xb), out=slot(buf, half, self.expand_chs))
        return self.conv_transition(gather(buf, [xs, xb]), out=out)


class CrossStage3(reference.CrossStage3):
    __doc__ = reference.CrossStage3.__doc__
    conv_bn_act, block_classes = ConvBNAct, _TIMM_BLOCKS

    @follows_input_format
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writers = [("conv_exp", self.conv_exp, (ConvBNAct,)), *_blocks_writers(self.blocks),
                   ("conv_transition", self.conv_transition, (ConvBNAct,))]
        if (y := _unbuffered_output(self, super().forward, x, out, writers, ("conv_exp", self.conv_exp))) is not None:
            return y
        half = self.expand_chs // 2
        down = self.conv_down(x)
        buf = new_output(self.conv_exp, down)
        x1, x2 = halves(self.conv_exp(down, out=slot(buf, 0, self.expand_chs)), half)
        # The blocks overwrite x1's channels: they read a copy while autograd records; without
        # autograd a one-block stage reads x1 where it writes, and the block copies then.
        x1 = recompute.tag(x1.clone(), recompute.recipe_of(x1)) if torch.is_grad_enabled() else x1
        x1 = _run_blocks(self.blocks, x1, slot(buf, 0, half))
        return self.conv_transition(gather(buf, [x1, x2]), out=out)


class DarkStage(reference.DarkStage):
    __doc__ = reference.DarkStage.__doc__
    conv_bn_act, block_classes = ConvBNAct, _TIMM_BLOCKS

    @follows_input_format
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if (y := _unbuffered_output(self, super().forward, x, out, _blocks_writers(self.blocks), None)) is not None:
            return y
        return _run_blocks(self.blocks, self.conv_down(x), out)
