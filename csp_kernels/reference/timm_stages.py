"""Twins of timm's CSPNet blocks and stages (timm.models.cspnet): BottleneckBlock, DarkBlock,
CrossStage, CrossStage3, DarkStage, with what cspresnet50, cspresnext50 and cspdarknet53 use.

Upstream's constructor arguments (those of these models), submodule names, hence state_dict
keys, and forward, so their weights load with load_state_dict(strict=True). Every timm
ConvNormAct is a ConvBNAct: timm keeps the activation inside `bn` (a BatchNormAct2d), here it is
the parameterless `act` beside it, so the keys are the same conv.weight and bn.*. Convolutions
are padded as timm's default, ((stride - 1) + dilation * (kernel_size - 1)) // 2.

act_layer is one of timm's names in TIMM_ACTIVATIONS; timm's "leaky_relu" is nn.LeakyReLU's
default slope, 0.01. What these models do not use is not modeled and raises ValueError naming the
argument: attn_layer, aa_layer, drop_block, drop_path / block_dpr other than 0, avg_down=True,
norm layers other than BatchNorm2d, block_fn other than BottleneckBlock and DarkBlock.

Shapes are written (batch, channels, height, width).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import checks
from .blocks import ConvBNAct

TIMM_ACTIVATIONS = ("relu", "leaky_relu", "silu", "mish")
TIMM_LEAKY_RELU_SLOPE = 0.01  # nn.LeakyReLU's default, which timm's "leaky_relu" builds
TIMM_BATCH_NORMS = ("batchnorm", "batchnorm2d", nn.BatchNorm2d)


def _check_layers(act_layer, norm_layer) -> str:
    """`act_layer` if it is a modeled timm activation name and norm_layer is BatchNorm2d."""
    if not isinstance(act_layer, str) or act_layer.lower() not in TIMM_ACTIVATIONS:
        raise ValueError(f"act_layer must be one of timm's names {TIMM_ACTIVATIONS}; got {act_layer!r}")
    if (norm_layer.lower() if isinstance(norm_layer, str) else norm_layer) not in TIMM_BATCH_NORMS:
        raise ValueError(f"norm_layer must be BatchNorm2d ('batchnorm', 'batchnorm2d' or nn.BatchNorm2d); "
                         f"got {norm_layer!r}")
    return act_layer.lower()


def _reject(name: str, value, modeled) -> None:
    """ValueError for an upstream option the twins do not model, unless value is `modeled`."""
    if value is not modeled and value != modeled:
        raise ValueError(f"{name}={value!r} is not modeled by the reference twin; only {name}={modeled!r}")


def _conv_norm_act(conv_bn_act: type[ConvBNAct], in_chs: int, out_chs: int, kernel_size: int, act_layer: str,
                   stride: int = 1, dilation: int = 1, groups: int = 1, apply_act: bool = True) -> ConvBNAct:
    """timm's ConvNormAct with BatchNorm and its default padding, built as `conv_bn_act`."""
    stride, dilation = checks.check_positive_int(stride, "stride"), checks.check_positive_int(dilation, "dilation")
    padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    return conv_bn_act(in_chs, out_chs, kernel_size, stride, padding, groups,
                       act=act_layer if apply_act else "identity",
                     negative_slope=TIMM_LEAKY_RELU_SLOPE, dilation=dilation)


def _mid_channels(out_chs: int, ratio: float, name: str) -> int:
    """int(round(out_chs * ratio)), timm's rounding of a ratio's width, which must be positive."""
    channels = int(round(checks.check_positive_int(out_chs, "out_chs") * checks.check_positive_ratio(ratio, name)))
    if channels <= 0:
        raise ValueError(f"out_chs={out_chs} and {name}={ratio} give round(out_chs * {name}) = {channels} "
                         f"channels; increase {name}")
    return channels


def _check_residual(in_chs: int, out_chs: int) -> None:
    if in_chs != out_chs:
        raise ValueError(f"in_chs ({in_chs}) must equal out_chs ({out_chs}): the block adds its input to its output")


def _residual_block_args(in_chs: int, out_chs: int, bottle_ratio: float, act_layer, norm_layer, attn_layer,
                         drop_block, drop_path) -> tuple[str, int]:
    """(activation name, mid channels) of a residual block, after refusing what is not modeled."""
    act_layer = _check_layers(act_layer, norm_layer)
    _reject("attn_layer", attn_layer, None)
    _reject("drop_block", drop_block, None)
    _reject("drop_path", drop_path, 0.0)
    _check_residual(in_chs, out_chs)
    return act_layer, _mid_channels(out_chs, bottle_ratio, "bottle_ratio")


class BottleneckBlock(nn.Module):
    """timm's ResNe(X)t bottleneck: act3(conv3(conv2(conv1(x))) + x); conv1 1x1 to
    round(out_chs * bottle_ratio) channels, conv2 3x3 (dilation, groups), conv3 1x1 to out_chs
    without activation. The residual needs in_chs == out_chs.

    x: (batch, in_chs, height, width) -> (batch, out_chs, height, width)
    """

    conv_bn_act = ConvBNAct  # the fused twins build theirs

    def __init__(self, in_chs: int, out_chs: int, dilation: int = 1, bottle_ratio: float = 0.25, groups: int = 1,
                 act_layer: str = "relu", norm_layer=nn.BatchNorm2d, attn_layer=None, drop_block=None,
                 drop_path: float = 0.0):
        super().__init__()
        act_layer, mid_chs = _residual_block_args(in_chs, out_chs, bottle_ratio, act_layer, norm_layer, attn_layer,
                                                  drop_block, drop_path)
        self.conv1 = _conv_norm_act(self.conv_bn_act, in_chs, mid_chs, 1, act_layer)
        self.conv2 = _conv_norm_act(self.conv_bn_act, mid_chs, mid_chs, 3, act_layer, dilation=dilation, groups=groups)
        self.conv3 = _conv_norm_act(self.conv_bn_act, mid_chs, out_chs, 1, act_layer, apply_act=False)
        self.act3 = checks.activation_module(act_layer, TIMM_LEAKY_RELU_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(self.conv3(self.conv2(self.conv1(x))) + x)


class DarkBlock(nn.Module):
    """timm's DarkNet block: conv2(conv1(x)) + x; conv1 1x1 to round(out_chs * bottle_ratio)
    channels, conv2 3x3 (dilation, groups) to out_chs. The residual needs in_chs == out_chs.

    x: (batch, in_chs, height, width) -> (batch, out_chs, height, width)
    """

    conv_bn_act = ConvBNAct  # the fused twins build theirs

    def __init__(self, in_chs: int, out_chs: int, dilation: int = 1, bottle_ratio: float = 0.5, groups: int = 1,
                 act_layer: str = "relu", norm_layer=nn.BatchNorm2d, attn_layer=None, drop_block=None,
                 drop_path: float = 0.0):
        super().__init__()
        act_layer, mid_chs = _residual_block_args(in_chs, out_chs, bottle_ratio, act_layer, norm_layer, attn_layer,
                                                  drop_block, drop_path)
        self.conv1 = _conv_norm_act(self.conv_bn_act, in_chs, mid_chs, 1, act_layer)
        self.conv2 = _conv_norm_act(self.conv_bn_act, mid_chs, out_chs, 3, act_layer, dilation=dilation, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + x


def _blocks(block_classes: dict, block_fn, depth: int, in_chs: int, out_chs: int, dilation: int,
            bottle_ratio: float, groups: int, act_layer: str, norm_layer) -> nn.Sequential:
    """`depth` blocks named "0", "1", ..., the first from in_chs, all to out_chs, each built as
    block_classes[block_fn]."""
    if not isinstance(block_fn, type) or block_fn not in block_classes:
        # By the names users import them under: csp_kernels.reference.X, csp_kernels.X (the fused twins).
        accepted = sorted(("csp_kernels.reference." if cls.__module__.startswith("csp_kernels.reference") else
                           "csp_kernels.") + cls.__qualname__ for cls in block_classes)
        raise ValueError(f"block_fn must be one of {', '.join(accepted)}; got {block_fn!r}")
    blocks = nn.Sequential()
    for i in range(checks.check_positive_int(depth, "depth")):
        blocks.add_module(str(i), block_classes[block_fn](in_chs, out_chs, dilation, bottle_ratio, groups, act_layer,
                                                          norm_layer))
        in_chs = out_chs
    return blocks


def _check_stage_options(avg_down, block_dpr: Sequence[float] | None, aa_layer, attn_layer, stride, dilation,
                         first_dilation) -> None:
    checks.check_positive_int(stride, "stride")
    checks.check_positive_int(dilation, "dilation")
    if first_dilation is not None:
        checks.check_positive_int(first_dilation, "first_dilation")
    _reject("avg_down", avg_down, False)
    _reject("aa_layer", aa_layer, None)
    _reject("attn_layer", attn_layer, None)
    if block_dpr is not None and not isinstance(block_dpr, (list, tuple)):
        raise TypeError(f"block_dpr must be None or a list of drop-path rates, one per block; got {block_dpr!r}")
    if block_dpr is not None and any(rate != 0 for rate in block_dpr):
        raise ValueError(f"block_dpr={block_dpr!r} (drop path) is not modeled by the reference twin; only None or "
                         "zeros")


def _expand_channels(out_chs: int, expand_ratio: float) -> int:
    """The width of conv_exp's output, which the cross stages split into two equal halves."""
    expand_chs = _mid_channels(out_chs, expand_ratio, "expand_ratio")
    if expand_chs % 2:
        raise ValueError(f"round(out_chs * expand_ratio) = {expand_chs} must be even: the stage splits it in halves")
    return expand_chs


class _CrossStageBase(nn.Module):
    """What CrossStage and CrossStage3 share: conv_down (3x3, stride, first_dilation, groups; to
    out_chs if down_growth else in_chs) when stride != 1 or first_dilation != dilation, else an
    identity; conv_exp 1x1 to round(out_chs * expand_ratio) channels, linear if cross_linear,
    whose two halves the stage splits; `depth` blocks on one half (to round(out_chs *
    block_ratio)); conv_transition_b (1x1, back to half width) when `transition_b`; conv_transition
    (1x1) to out_chs."""

    transition_b: bool
    conv_bn_act = ConvBNAct  # the fused twins build theirs
    block_classes = {BottleneckBlock: BottleneckBlock, DarkBlock: DarkBlock}  # block_fn -> the class built

    def __init__(self, in_chs: int, out_chs: int, stride: int, dilation: int, depth: int, block_ratio: float = 1.0,
                 bottle_ratio: float = 1.0, expand_ratio: float = 1.0, groups: int = 1,
                 first_dilation: int | None = None, avg_down: bool = False, down_growth: bool = False,
                 cross_linear: bool = False,
                 block_dpr: Sequence[float] | None = None, block_fn: type[nn.Module] = BottleneckBlock, *,
                 act_layer: str = "leaky_relu", norm_layer="batchnorm", aa_layer=None, attn_layer=None):
        super().__init__()
        act_layer = _check_layers(act_layer, norm_layer)
        _check_stage_options(avg_down, block_dpr, aa_layer, attn_layer, stride, dilation, first_dilation)
        first_dilation = first_dilation or dilation
        self.expand_chs = _expand_channels(out_chs, expand_ratio)
        block_out_chs = _mid_channels(out_chs, block_ratio, "block_ratio")
        if stride != 1 or first_dilation != dilation:
            down_chs = out_chs if down_growth else in_chs
            self.conv_down = _conv_norm_act(self.conv_bn_act, in_chs, down_chs, 3, act_layer, stride, first_dilation,
                                            groups)
        else:
            down_chs = in_chs
            self.conv_down = nn.Identity()
        self.conv_exp = _conv_norm_act(self.conv_bn_act, down_chs, self.expand_chs, 1, act_layer,
                                       apply_act=not cross_linear)
        self.blocks = _blocks(self.block_classes, block_fn, depth, self.expand_chs // 2, block_out_chs, dilation,
                              bottle_ratio, groups, act_layer, norm_layer)
        if self.transition_b:
            self.conv_transition_b = _conv_norm_act(self.conv_bn_act, block_out_chs, self.expand_chs // 2, 1, act_layer)
        self.conv_transition = _conv_norm_act(self.conv_bn_act, self.expand_chs, out_chs, 1, act_layer)


class CrossStage(_CrossStageBase):
    """timm's CrossStage (cspresnet50, cspresnext50, cspdarknet53): conv_exp(conv_down(x)) split
    into halves xs, xb; out = conv_transition(cat(xs, conv_transition_b(blocks(xb)))). The
    arguments and submodules are _CrossStageBase's.

    x: (batch, in_chs, height, width) -> (batch, out_chs, height', width'), height' that of a 3x3
    convolution at `stride` (height when stride is 1).
    """

    transition_b = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.conv_exp(self.conv_down(x)).split(self.expand_chs // 2, dim=1)
        # .contiguous() as timm's: the cat, and so the stage, answers NCHW for a channels_last x.
        xb = self.conv_transition_b(self.blocks(xb)).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class CrossStage3(_CrossStageBase):
    """timm's CrossStage3: conv_exp(conv_down(x)) split into halves x1, x2; out =
    conv_transition(cat(blocks(x1), x2)); no conv_transition_b. The arguments and submodules are
    _CrossStageBase's; without downsampling conv_down is an identity (upstream's None fails in
    forward).

    x: (batch, in_chs, height, width) -> (batch, out_chs, height', width'), height' as CrossStage's.
    """

    transition_b = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv_exp(self.conv_down(x)).split(self.expand_chs // 2, dim=1)
        return self.conv_transition(torch.cat([self.blocks(x1), x2], dim=1))


class DarkStage(nn.Module):
    """timm's DarkStage: conv_down (3x3, stride, first_dilation, groups) to out_chs, then `depth`
    blocks (to round(out_chs * block_ratio)).

    x: (batch, in_chs, height, width) -> (batch, block out channels, height', width'), height' as
    CrossStage's.
    """

    conv_bn_act = ConvBNAct  # the fused twin builds its own
    block_classes = _CrossStageBase.block_classes

    def __init__(self, in_chs: int, out_chs: int, stride: int, dilation: int, depth: int, block_ratio: float = 1.0,
                 bottle_ratio: float = 1.0, groups: int = 1, first_dilation: int | None = None, avg_down: bool = False,
                 block_fn: type[nn.Module] = BottleneckBlock, block_dpr: Sequence[float] | None = None, *,
                 act_layer: str = "leaky_relu", norm_layer="batchnorm", aa_layer=None, attn_layer=None):
        super().__init__()
        act_layer = _check_layers(act_layer, norm_layer)
        _check_stage_options(avg_down, block_dpr, aa_layer, attn_layer, stride, dilation, first_dilation)
        self.conv_down = _conv_norm_act(self.conv_bn_act, in_chs, out_chs, 3, act_layer, stride,
                                        first_dilation or dilation, groups)
        self.blocks = _blocks(self.block_classes, block_fn, depth, out_chs,
                              _mid_channels(out_chs, block_ratio, "block_ratio"), dilation, bottle_ratio, groups,
                              act_layer, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv_down(x))
