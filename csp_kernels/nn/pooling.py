"""MaxPool2d whose backward keeps the recipe of its input (ops/recompute.py) instead of the
input, where the input is a fused unit's output: timm's CSPNet stems pool their first
ConvBNAct's output (4x64x128x128 in cspresnet50 at 256 px: 16 MiB saved twice, by the pool
and as the unit's conv output), YOLO's SPPF pools cv1's. Same values and gradients as
nn.MaxPool2d (the same ATen op); `csp_kernels.convert` swaps it in for nn.MaxPool2d.
Tests: tests/test_recompute.py, tests/test_convert.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import recompute


class MaxPool2d(nn.MaxPool2d):
    __doc__ = nn.MaxPool2d.__doc__

    def forward(self, x: torch.Tensor):
        with recompute.saving_recipes():
            return super().forward(x)
