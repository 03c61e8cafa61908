"""The CSPNet building blocks of the specification (see the package docstring): ConvBNAct, the
DenseNet layers and the partial dense block, Maxout and the Exact Fusion Model.

Shapes are written (batch, channels, height, width).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks


class ConvBNAct(nn.Module):
    """Convolution (no bias) -> BatchNorm2d -> activation; a CSP transition when 1x1.

    x: (batch, in_channels, height, width) -> (batch, out_channels, height', width'),
    height' = (height + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1 (width' likewise).
    `padding=None` means (dilation * (kernel_size - 1) + 1) // 2, ultralytics' autopad ("same" for
    odd kernels at stride 1).
    `negative_slope` is leaky_relu's (timm's and PyTorch's default is 0.01, darknet's 0.1).
    `dilation` comes last: callers, the fused ConvBNAct among them, pass the others by position.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        act: str = "relu",
        negative_slope: float = checks.LEAKY_RELU_SLOPE,
        dilation: int = 1,
    ):
        super().__init__()
        self.in_channels = checks.check_positive_int(in_channels, "in_channels")
        self.out_channels = checks.check_positive_int(out_channels, "out_channels")
        kernel_size = checks.check_positive_int(kernel_size, "kernel_size")
        dilation = checks.check_positive_int(dilation, "dilation")
        self.conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            kernel_size,
            stride=checks.check_positive_int(stride, "stride"),
            padding=(dilation * (kernel_size - 1) + 1) // 2 if padding is None else checks.check_padding(padding),
            dilation=dilation,
            groups=checks.check_positive_int(groups, "groups"),
            bias=False,
        )
        self.bn = nn.BatchNorm2d(self.out_channels)
        self.act = checks.activation_module(act, negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        checks.check_module_input(x, self)
        return self.act(self.bn(self.conv(x)))


class DenseLayer(nn.Module):
    """One DenseNet layer: BN-ReLU-Conv1x1(bn_size * growth_rate)-BN-ReLU-Conv3x3(growth_rate).

    Submodules are named as torchvision's `densenet._DenseLayer` (norm1, relu1, conv1, norm2,
    relu2, conv2), so its weights load as-is.

    x: (batch, in_channels, height, width), the concat of all earlier feature maps
    -> (batch, growth_rate, height, width), the new feature maps only.
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        self.in_channels = checks.check_positive_int(in_channels, "in_channels")
        self.growth_rate = checks.check_positive_int(growth_rate, "growth_rate")
        bottleneck = checks.check_positive_int(bn_size, "bn_size") * self.growth_rate
        self.norm1 = nn.BatchNorm2d(self.in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(self.in_channels, bottleneck, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bottleneck, self.growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        checks.check_module_input(x, self)
        bottleneck = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.Module):
    """`num_layers` DenseLayers; layer j reads the concat of x and the outputs of layers 1..j-1.

    Layers are registered as "denselayer1".."denselayerN", as in torchvision's `_DenseBlock`,
    whose state_dict therefore loads as-is.

    x: (batch, in_channels, height, width)
    -> (batch, out_channels, height, width), out_channels = in_channels + num_layers * growth_rate:
    x first, then each layer's growth_rate new channels in layer order.
    """

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        self.in_channels = checks.check_positive_int(in_channels, "in_channels")
        self.num_layers = checks.check_positive_int(num_layers, "num_layers")
        self.growth_rate = checks.check_positive_int(growth_rate, "growth_rate")
        for j in range(self.num_layers):
            layer = DenseLayer(self.in_channels + j * self.growth_rate, self.growth_rate, bn_size)
            self.add_module(f"denselayer{j + 1}", layer)
        self.out_channels = self.in_channels + self.num_layers * self.growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        features = [x]
        for layer in self.children():
            # torch.cat copies every earlier map again at each layer: the cost CSPNet measures.
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class PartialDenseBlock(nn.Module):
    """CSPNet's partial dense block (Wang et al. 2019, Fig. 2 and 3).

    The first part1 = round(in_channels * part_ratio) channels of x bypass the block; the other
    part2 channels go through a DenseBlock, giving t = part2 + num_layers * growth_rate channels.
    The two meet at a partial transition (every transition is a 1x1 ConvBNAct):
      fusion "last":  cat(part 1, transition(dense(part 2)))
      fusion "first": transition(cat(part 1, dense(part 2)))
      fusion "csp":   transition2(cat(part 1, transition1(dense(part 2))))
    `out_channels=None` keeps part1 + t output channels; an int sets them (for "last" the
    transition then outputs out_channels - part1, so it must exceed part1).

    x: (batch, in_channels, height, width) -> (batch, out_channels, height, width)
    """

    def __init__(
        self,
        in_channels: int,
        num_layers: int,
        growth_rate: int,
        part_ratio: float = 0.5,
        bn_size: int = 4,
        fusion: str = "last",
        act: str = "relu",
        out_channels: int | None = None,
    ):
        super().__init__()
        self.in_channels = checks.check_positive_int(in_channels, "in_channels")
        self.part1, self.part2 = checks.partial_split(self.in_channels, part_ratio)
        self.fusion = checks.check_fusion(fusion)
        self.dense = DenseBlock(self.part2, num_layers, growth_rate, bn_size)
        dense_channels = self.dense.out_channels
        if out_channels is None:
            self.out_channels = self.part1 + dense_channels
        else:
            self.out_channels = checks.check_positive_int(out_channels, "out_channels")
        if self.fusion == "last":
            if self.out_channels <= self.part1:
                raise ValueError(
                    f'out_channels must exceed part1 = {self.part1} with fusion "last" (the '
                    f"transition outputs out_channels - part1 channels); got {self.out_channels}"
                )
            self.transition = ConvBNAct(dense_channels, self.out_channels - self.part1, act=act)
        elif self.fusion == "first":
            self.transition = ConvBNAct(self.part1 + dense_channels, self.out_channels, act=act)
        else:
            self.transition1 = ConvBNAct(dense_channels, dense_channels, act=act)
            self.transition2 = ConvBNAct(self.part1 + dense_channels, self.out_channels, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        bypass, through = x[:, : self.part1], x[:, self.part1 :]
        if self.fusion == "last":
            return torch.cat([bypass, self.transition(self.dense(through))], 1)
        if self.fusion == "first":
            return self.transition(torch.cat([bypass, self.dense(through)], 1))
        return self.transition2(torch.cat([bypass, self.transition1(self.dense(through))], 1))


def maxout(x: torch.Tensor, out_channels: int, grouping: str = "interleaved") -> torch.Tensor:
    """Channel Maxout: the maximum over groups of group_size = channels // out_channels channels.

    grouping "interleaved" (darknet's maxpool_depth): out[:, g] = max_j x[:, g + j * out_channels]
    grouping "contiguous":                           out[:, g] = max_j x[:, g * group_size + j]
    Ties go to the lowest input channel, which alone receives the gradient (darknet's strict `>`).
    Hence a NaN wins only as its group's first candidate.

    x: (batch, channels, height, width) -> (batch, out_channels, height, width)
    """
    out_channels, grouping = checks.maxout_args(x, out_channels, grouping)
    group_size = x.shape[1] // out_channels
    if grouping == "interleaved":
        candidates = [x[:, j * out_channels : (j + 1) * out_channels] for j in range(group_size)]
    else:
        candidates = [x[:, j::group_size] for j in range(group_size)]
    # A running max with strict `>` and torch.where: amax would split the gradient among ties.
    best = candidates[0]
    for candidate in candidates[1:]:
        best = torch.where(candidate > best, candidate, best)
    return best


class Maxout(nn.Module):
    """Module form of `maxout`.

    x: (batch, channels, height, width) -> (batch, out_channels, height, width)
    """

    def __init__(self, out_channels: int, grouping: str = "interleaved"):
        super().__init__()
        self.out_channels = checks.check_positive_int(out_channels, "out_channels")
        self.grouping = checks.check_grouping(grouping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maxout(x, self.out_channels, self.grouping)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, grouping={self.grouping!r}"


def maxout_pyramid(
    features: Sequence[torch.Tensor],
    size: int | tuple[int, int],
    out_channels: int,
    grouping: str = "interleaved",
) -> torch.Tensor:
    """Resize every feature map to `size`, concatenate them in order, then Maxout.

    Resizing is nearest-neighbour exactly as F.interpolate(mode="nearest") (any ratio, up or
    down); a map already at `size` is used as is.

    features: list of (batch, channels_i, height_i, width_i), same batch, dtype and device
    size: (height, width), or an int for a square
    -> (batch, out_channels, height, width); sum(channels_i) must be divisible by out_channels.
    """
    size, out_channels, grouping = checks.maxout_pyramid_args(features, size, out_channels, grouping)
    resized = [
        feature if feature.shape[-2:] == size else F.interpolate(feature, size=size, mode="nearest")
        for feature in features
    ]
    return maxout(torch.cat(resized, 1), out_channels, grouping)


class ExactFusion(nn.Module):
    """CSPNet's Exact Fusion Model (EFM): each pyramid level is rebuilt from itself and its
    neighbours, resized to its own resolution and compressed by Maxout.

    output[i] = maxout_pyramid([features[i-1], features[i], features[i+1]] (those that exist, in
    that order), size of features[i], out_channels), followed by its own 1x1 ConvBNAct
    (`transitions[i]`) when transition=True.

    features: list of (batch, in_channels[i], height_i, width_i), one per level
    -> list of (batch, out_channels, height_i, width_i)
    """

    # The fused twin swaps in its own implementations of these two.
    pyramid = staticmethod(maxout_pyramid)
    conv_bn_act = ConvBNAct

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        grouping: str = "interleaved",
        transition: bool = False,
        act: str = "leaky_relu",
    ):
        super().__init__()
        if not isinstance(in_channels, (list, tuple)):
            raise TypeError(f"in_channels must be a list of ints; got {type(in_channels).__name__}")
        if len(in_channels) == 0:
            raise ValueError("in_channels must be a non-empty list of ints; got []")
        self.in_channels = tuple(
            checks.check_positive_int(c, f"in_channels[{i}]") for i, c in enumerate(in_channels)
        )
        self.out_channels = checks.check_positive_int(out_channels, "out_channels")
        self.grouping = checks.check_grouping(grouping)
        checks.check_activation(act)
        for level in range(len(self.in_channels)):
            gathered = self.in_channels[self.neighbours(level)]
            if sum(gathered) % self.out_channels != 0:
                raise ValueError(
                    f"in_channels of level {level} and its neighbours, {' + '.join(map(str, gathered))}"
                    f" = {sum(gathered)}, must be divisible by out_channels; got {self.out_channels}"
                )
        self.transitions = None
        if transition:
            self.transitions = nn.ModuleList(
                self.conv_bn_act(self.out_channels, self.out_channels, act=act) for _ in self.in_channels
            )

    def neighbours(self, level: int) -> slice:
        """The levels that feed output `level`: level-1, level, level+1 where they exist."""
        return slice(max(level - 1, 0), min(level + 2, len(self.in_channels)))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        checks.feature_list(features, num_levels=len(self.in_channels))
        for i, (feature, channels) in enumerate(zip(features, self.in_channels)):
            checks.check_input(feature, name=f"features[{i}]", channels=channels)
        outputs = [
            self.pyramid(
                features[self.neighbours(level)], features[level].shape[-2:], self.out_channels, self.grouping
            )
            for level in range(len(features))
        ]
        if self.transitions is not None:
            outputs = [transition(out) for transition, out in zip(self.transitions, outputs)]
        return outputs
