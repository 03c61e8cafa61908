"""Fused Maxout and Exact Fusion Model: drop-in twins of `csp_kernels.reference`'s, running the
one-pass Maxout pyramid op (ops/maxout.py) on the "cpu", "cuda" and "triton" backends.

Maxout is memory-bound, so it has no Triton kernel: the "triton" backend runs the compiled
extension's kernel for it, by design (docs/semantics.md).

Reference: csp_kernels.reference.Maxout, ExactFusion, maxout, maxout_pyramid (reference/blocks.py);
op and autograd: ops/maxout.py; kernels: csrc/cpu/maxout.cpp, csrc/cuda/maxout.cu; tests:
tests/test_maxout.py.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import backend, checks, reference
from ..ops import maxout as maxout_ops
from ..ops.batch_norm_act import as_channels_last_if, suggests_channels_last
from .transition import ConvBNAct


def maxout(x: torch.Tensor, out_channels: int, grouping: str = "interleaved") -> torch.Tensor:
    """Channel Maxout in one pass; semantics, ties and gradient as `reference.maxout`.

    x: (batch, channels, height, width) -> (batch, out_channels, height, width), in x's memory format
    """
    out_channels, grouping = checks.maxout_args(x, out_channels, grouping)
    # An empty map has nothing to compute (the pyramid op, which resizes, takes no empty size).
    if _runs_reference(x.device, "maxout") or x.shape[2] == 0 or x.shape[3] == 0:
        return reference.maxout(x, out_channels, grouping)
    y = maxout_ops.maxout_pyramid([x], tuple(x.shape[-2:]), out_channels, grouping == "interleaved")
    return as_channels_last_if(y, suggests_channels_last(x))  # the reference's slices keep x's format


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
    -> (batch, out_channels, height, width), channels_last where every feature is;
    sum(channels_i) must be divisible by out_channels.
    """
    size, out_channels, grouping = checks.maxout_pyramid_args(features, size, out_channels, grouping)
    if _runs_reference(features[0].device, "maxout_pyramid"):
        return reference.maxout_pyramid(features, size, out_channels, grouping)
    if reason := _resize_reason(features, size):
        backend.warn_reference_fallback_of("csp_kernels.maxout_pyramid", reason)
        return reference.maxout_pyramid(features, size, out_channels, grouping)
    y = maxout_ops.maxout_pyramid(features, size, out_channels, grouping == "interleaved")
    # The reference's torch.cat answers channels_last where all its inputs are.
    return as_channels_last_if(y, all(suggests_channels_last(f) for f in features))


def _resize_reason(features: Sequence[torch.Tensor], size: tuple[int, int]) -> str:
    """Why the kernels' nearest resize would read other source pixels than F.interpolate does for
    these features, or "": the kernels' index arithmetic is ATen's for float32 (and ATen's on
    CUDA), but for float64 on the CPU ATen computes some ratios in double (45 -> 129 rows)."""
    if features[0].dtype != torch.float64 or features[0].device.type != "cpu":
        return ""
    for feature in features:
        for axis, source, target in zip(("height", "width"), feature.shape[2:], size):
            if not _float64_resize_picks_as_float32(source, target):
                return (f"float64 nearest resize of {axis} {source} -> {target}: ATen's index arithmetic in double "
                        "picks other source pixels than the kernels' float32 one")
    return ""


@functools.lru_cache(maxsize=4096)
def _float64_resize_picks_as_float32(source: int, target: int) -> bool:
    """Whether F.interpolate(mode="nearest") from `source` to `target` positions on the CPU reads
    the same source positions for float64 data as for float32 (measured on a ramp, once)."""
    ramp = torch.arange(source, dtype=torch.float64).view(1, 1, source, 1)
    picks = [F.interpolate(ramp.to(dtype), size=(target, 1), mode="nearest").double() for dtype in
             (torch.float64, torch.float32)]
    return torch.equal(*picks)


def _runs_reference(device: torch.device, function: str) -> bool:
    """Whether `function` runs the reference: on the "reference" backend, and, with a warning,
    under an autograd transform the pyramid op has no rule for (`backend.transform_reason`).
    (Under torch.jit.trace the op is recorded as it is: TorchScript holds a torch.library op.)"""
    if backend.resolve_backend(device) == "reference":
        return True
    if reason := backend.transform_reason():
        backend.warn_reference_fallback_of(f"csp_kernels.{function}", reason)
        return True
    return False


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

    pyramid = staticmethod(maxout_pyramid)
    conv_bn_act = ConvBNAct
