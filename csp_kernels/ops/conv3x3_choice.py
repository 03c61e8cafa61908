"""Which kernel runs a float32 CPU 3x3 stride-1 convolution: Winograd F(2x2, 3x3) (`ops.conv3x3`)
or ATen's (oneDNN), decided by measuring both once per shape in this process.

Why measured: Winograd's advantage depends on the CPU (its GEMM rate against oneDNN's) and on the
shape. On large maps it multiplies 2.25x less; on small maps (timm's CSP backbones at stage 5:
7x7 and below) its 4x4 tiles are mostly padding and the per-call weight transform is not
amortized, so it runs several times slower than oneDNN. A first call per (input shape, weight
shape, transform cached or not) times both and keeps the faster; later calls look it up.

CSP_KERNELS_CPU_CONV3X3 = "winograd" | "onednn" pins the choice (read once); unset measures.
Inside a torch.compile / torch.export trace nothing can be timed: a shape measured before the trace
keeps its verdict, an unmeasured one takes the rule that large maps go to Winograd
(`_UNMEASURED_MIN_SIDE`).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..checks import env_choice
from .conv3x3 import conv3x3_winograd, winograd_weight

ENV_VAR = "CSP_KERNELS_CPU_CONV3X3"
CHOICES = ("winograd", "onednn")
_PINNED = env_choice(ENV_VAR, CHOICES, "")
_UNMEASURED_MIN_SIDE = 14  # the smallest map side on which Winograd won in every measurement we have
_ROUNDS = 3

# (input shape, weight shape, transform cached) -> whether Winograd was measured faster.
_verdicts: dict[tuple, bool] = {}


def winograd_chosen(x_shape, weight_shape, transform_cached: bool) -> bool:
    """Whether a conv2d(x, weight, padding=1) of these shapes (float32, CPU, where Winograd can
    run) should run by Winograd; `transform_cached`: the weight's transform is computed once
    beforehand (eval) rather than per call (training)."""
    if _PINNED:
        return _PINNED == "winograd"
    key = (tuple(x_shape), tuple(weight_shape), transform_cached)
    verdict = _verdicts.get(key)
    if verdict is None:
        if torch.compiler.is_compiling():
            return min(x_shape[2], x_shape[3]) >= _UNMEASURED_MIN_SIDE
        verdict = _verdicts[key] = _winograd_faster(*key)
    return verdict


def measured_verdicts() -> dict[tuple, bool]:
    """What this process measured so far: (input shape, weight shape, transform cached) ->
    whether Winograd won."""
    return dict(_verdicts)


def _winograd_faster(x_shape, weight_shape, transform_cached: bool) -> bool:
    x = torch.randn(x_shape)
    weight = torch.randn(weight_shape)
    transform = winograd_weight(weight) if transform_cached else None
    out = x.new_empty(x_shape[0], weight_shape[0], x_shape[2], x_shape[3])

    def by_winograd():
        conv3x3_winograd(x, weight, transform, out=out)

    def by_onednn():
        F.conv2d(x, weight, padding=1)

    with torch.no_grad():
        by_winograd(), by_onednn()  # first calls pay allocation and primitive set-up
        best = {by_winograd: float("inf"), by_onednn: float("inf")}
        for _ in range(_ROUNDS):  # alternated, fastest kept: other load on the machine only slows a call
            for run in best:
                start = time.perf_counter()
                run()
                best[run] = min(best[run], time.perf_counter() - start)
    return best[by_winograd] < best[by_onednn]
