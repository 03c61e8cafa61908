"""Twins of ultralytics' CSP modules (ultralytics.nn.modules.block): Bottleneck, C2f, C3, C3k, C3k2.

Upstream's constructor arguments, submodule names (every ultralytics Conv is a ConvBNAct: conv,
bn, act), hence state_dict keys, and forward, so a trained model's weights load with
load_state_dict(strict=True). ultralytics sets its Conv activation for the whole process
(nn.SiLU unless a model yaml says `activation:`); here each module takes it as the keyword-only
`act` and `negative_slope` (see ConvBNAct). Kernel sizes are ints or square (height, width) pairs.

Shapes are written (batch, channels, height, width).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import checks
from .blocks import ConvBNAct


def _hidden_channels(c2, e) -> int:
    """int(c2 * e), upstream's hidden width, which must leave at least one channel."""
    c2 = checks.check_positive_int(c2, "c2")
    hidden = int(c2 * checks.check_positive_ratio(e, "e"))
    if hidden == 0:
        raise ValueError(f"c2={c2} and e={e} give int(c2 * e) = 0 hidden channels; increase e")
    return hidden


def _square_kernel(k, name: str) -> int:
    """The kernel size of an int or a square (height, width) pair (ConvBNAct's kernels are square)."""
    if isinstance(k, (tuple, list)):
        if len(k) != 2 or k[0] != k[1]:
            raise ValueError(f"{name} must be an int or a square (height, width) pair; got {k!r}")
        k = k[0]
    return checks.check_positive_int(k, name)


class Bottleneck(nn.Module):
    """ultralytics' Bottleneck: cv2(cv1(x)), plus x when shortcut and c1 == c2.

    cv1: c1 -> int(c2 * e) channels, kernel k[0]; cv2: -> c2 channels, kernel k[1], g groups.

    x: (batch, c1, height, width) -> (batch, c2, height, width)
    """

    conv_bn_act = ConvBNAct  # the fused twins build theirs

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: tuple = (3, 3), e: float = 0.5, *,
                 act: str = "silu", negative_slope: float = checks.LEAKY_RELU_SLOPE):
        super().__init__()
        if not isinstance(k, (tuple, list)) or len(k) != 2:
            raise ValueError(f"k must be a pair of kernel sizes (cv1's, cv2's); got {k!r}")
        hidden = _hidden_channels(c2, e)
        self.cv1 = self.conv_bn_act(c1, hidden, _square_kernel(k[0], "k[0]"), act=act, negative_slope=negative_slope)
        self.cv2 = self.conv_bn_act(hidden, c2, _square_kernel(k[1], "k[1]"), groups=g, act=act,
                                    negative_slope=negative_slope)
        self.add = bool(shortcut) and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """ultralytics' C2f: cv1 to 2c channels (c = int(c2 * e)), split into two halves; n
    Bottlenecks (c -> c, 3x3 and 3x3) each read the latest piece and append its output; cv2
    compresses the concat of the 2 + n pieces to c2.

    x: (batch, c1, height, width) -> (batch, c2, height, width)
    """

    conv_bn_act, bottleneck = ConvBNAct, Bottleneck  # the fused twins build theirs

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5, *,
                 act: str = "silu", negative_slope: float = checks.LEAKY_RELU_SLOPE):
        super().__init__()
        n = checks.check_positive_int(n, "n")
        self.c = _hidden_channels(c2, e)
        self.cv1 = self.conv_bn_act(c1, 2 * self.c, 1, act=act, negative_slope=negative_slope)
        self.cv2 = self.conv_bn_act((2 + n) * self.c, c2, 1, act=act, negative_slope=negative_slope)
        self.m = nn.ModuleList(
            self.bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0, act=act, negative_slope=negative_slope)
            for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            pieces.append(block(pieces[-1]))
        return self.cv2(torch.cat(pieces, 1))


class C3(nn.Module):
    """ultralytics' C3: cv3(cat(m(cv1(x)), cv2(x))), cv1 and cv2 1x1 to c_ = int(c2 * e)
    channels, m n Bottlenecks (c_ -> c_, 1x1 and 3x3), cv3 1x1 to c2.

    x: (batch, c1, height, width) -> (batch, c2, height, width)
    """

    conv_bn_act, bottleneck = ConvBNAct, Bottleneck  # the fused twins build theirs

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, *,
                 act: str = "silu", negative_slope: float = checks.LEAKY_RELU_SLOPE):
        super().__init__()
        n = checks.check_positive_int(n, "n")
        hidden = _hidden_channels(c2, e)
        self.cv1 = self.conv_bn_act(c1, hidden, 1, act=act, negative_slope=negative_slope)
        self.cv2 = self.conv_bn_act(c1, hidden, 1, act=act, negative_slope=negative_slope)
        self.cv3 = self.conv_bn_act(2 * hidden, c2, 1, act=act, negative_slope=negative_slope)
        self.m = nn.Sequential(*(
            self.bottleneck(hidden, hidden, shortcut, g, k=(1, 3), e=1.0, act=act, negative_slope=negative_slope)
            for _ in range(n)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    """ultralytics' C3k: a C3 whose Bottlenecks use k x k kernels for both convolutions.

    x: (batch, c1, height, width) -> (batch, c2, height, width)
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, k: int = 3, *,
                 act: str = "silu", negative_slope: float = checks.LEAKY_RELU_SLOPE):
        super().__init__(c1, c2, n, shortcut, g, e, act=act, negative_slope=negative_slope)
        hidden = self.cv1.out_channels
        # Replaced as upstream does, which keeps `m` after cv1..cv3 in the state_dict.
        self.m = nn.Sequential(*(
            self.bottleneck(hidden, hidden, shortcut, g, k=(k, k), e=1.0, act=act, negative_slope=negative_slope)
            for _ in range(n)
        ))


class C3k2(C2f):
    """ultralytics' C3k2: a C2f whose n inner blocks are C3k(c, c, n=2) when c3k, else
    Bottleneck(c, c) (3x3 and 3x3, e=0.5). attn=True (Bottleneck + PSABlock attention) is not
    modeled and raises ValueError.

    x: (batch, c1, height, width) -> (batch, c2, height, width)
    """

    c3k_block = C3k  # the fused twin builds its own

    def __init__(self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, attn: bool = False,
                 g: int = 1, shortcut: bool = True, *, act: str = "silu",
                 negative_slope: float = checks.LEAKY_RELU_SLOPE):
        if attn:
            raise ValueError("attn=True (C3k2 with PSABlock attention) is not modeled by the reference twin; "
                             "only attn=False")
        super().__init__(c1, c2, n, shortcut, g, e, act=act, negative_slope=negative_slope)
        # Replaced as upstream does, which keeps `m` after cv1 and cv2 in the state_dict.
        self.m = nn.ModuleList(
            self.c3k_block(self.c, self.c, 2, shortcut, g, act=act, negative_slope=negative_slope) if c3k
            else self.bottleneck(self.c, self.c, shortcut, g, act=act, negative_slope=negative_slope)
            for _ in range(len(self.m))
        )
