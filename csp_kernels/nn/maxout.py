"""Fused Maxout and Exact Fusion Model: drop-in twins of `csp_kernels.reference`'s, running the
one-pass Maxout pyramid op (ops/maxout.py) on the "cpu", "cuda" and "triton" backends.

Maxout is memory-bound, so it has no Triton kernel: the "triton" backend runs the compiled
extension's kernel for it, by design (DESIGN.md, "Layers of the code").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import backend, checks, reference
from ..ops import maxout as maxout_ops
from .transition import ConvBNAct


def _check_maxout_args(x, out_channels, grouping) -> tuple[int, str]:
    """reference.maxout's checks, with its messages."""
    checks.check_input(x)
    out_channels = checks.check_positive_int(out_channels, "out_channels")
    grouping = checks.check_grouping(grouping)
    if x.shape[1] % out_channels != 0:
        raise ValueError(
            f"x channels ({x.shape[1]}) must be divisible by out_channels; got out_channels={out_channels}"
        )
    return out_channels, grouping


def _check_pyramid_args(features, size, out_channels, grouping) -> tuple[tuple[int, int], int, str]:
    """reference.maxout_pyramid's checks, with its messages."""
    reference._check_feature_list(features, num_levels=None)
    names = [f"features[{i}]" for i in range(len(features))]
    for feature, name in zip(features, names):
        checks.check_input(feature, name=name)
    checks.check_same_device_dtype(features, names)
    batches = [feature.shape[0] for feature in features]
    if any(b != batches[0] for b in batches):
        raise ValueError(f"features must all have the same batch size (dim 0); got {batches}")
    size = reference._check_size(size)
    out_channels = checks.check_positive_int(out_channels, "out_channels")
    channels = [feature.shape[1] for feature in features]
    if sum(channels) % out_channels != 0:
        raise ValueError(
            f"the features' total channels {' + '.join(map(str, channels))} = {sum(channels)} must "
            f"be divisible by out_channels; got out_channels={out_channels}"
        )
    return size, out_channels, checks.check_grouping(grouping)


def maxout(x: torch.Tensor, out_channels: int, grouping: str = "interleaved") -> torch.Tensor:
    """Channel Maxout in one pass; semantics, ties and gradient as `reference.maxout`.

    x: (batch, channels, height, width) -> (batch, out_channels, height, width)
    """
    out_channels, grouping = _check_maxout_args(x, out_channels, grouping)
    if backend.resolve_backend(x.device) == "reference":
        return reference.maxout(x, out_channels, grouping)
    return maxout_ops.maxout_pyramid([x], tuple(x.shape[-2:]), out_channels, grouping == "interleaved")


def maxout_pyramid(
    features: Sequence[torch.Tensor],
    size: int | tuple[int, int],
    out_channels: int,
    grouping: str = "interleaved",
) -> torch.Tensor:
    """Nearest resize to `size` + concat + Maxout in one pass, reading each input at its own
    resolution; semantics as `reference.maxout_pyramid`.

    features: list of (batch, channels_i, height_i, width_i), same batch, dtype and device
    size: (height, width), or an int for a square
    -> (batch, out_channels, height, width); sum(channels_i) must be divisible by out_channels.
    """
    size, out_channels, grouping = _check_pyramid_args(features, size, out_channels, grouping)
    if backend.resolve_backend(features[0].device) == "reference":
        return reference.maxout_pyramid(features, size, out_channels, grouping)
    return maxout_ops.maxout_pyramid(features, size, out_channels, grouping == "interleaved")


class Maxout(reference.Maxout):
    """Module form of `maxout`; drop-in for `reference.Maxout`.

    x: (batch, channels, height, width) -> (batch, out_channels, height, width)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maxout(x, self.out_channels, self.grouping)


class ExactFusion(reference.ExactFusion):
    """CSPNet's Exact Fusion Model with one fused Maxout pyramid per level and fused ConvBNAct
    transitions; drop-in for `reference.ExactFusion` (same arguments, state_dict and, seeded, the
    same initial weights).

    features: list of (batch, in_channels[i], height_i, width_i), one per level
    -> list of (batch, out_channels, height_i, width_i)
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        grouping: str = "interleaved",
        transition: bool = False,
        act: str = "leaky_relu",
    ):
        super().__init__(in_channels, out_channels, grouping, transition=False, act=act)
        if transition:
            # Built last, as the reference builds them, so a seeded init draws the same weights.
            self.transitions = nn.ModuleList(
                ConvBNAct(self.out_channels, self.out_channels, act=act) for _ in self.in_channels
            )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        reference._check_feature_list(features, num_levels=len(self.in_channels))
        for i, (feature, channels) in enumerate(zip(features, self.in_channels)):
            checks.check_input(feature, name=f"features[{i}]", channels=channels)
        outputs = [
            maxout_pyramid(
                features[self.neighbours(level)], features[level].shape[-2:], self.out_channels, self.grouping
            )
            for level in range(len(features))
        ]
        if self.transitions is not None:
            outputs = [transition(out) for transition, out in zip(self.transitions, outputs)]
        return outputs
