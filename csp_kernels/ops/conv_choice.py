"""The measured part of the routing (`ops.routing` asks it): which kernel runs a float32 CPU
convolution, decided by measuring the candidates once per shape in this process:
  1x1 stride-1  our GEMMs over (channels, height * width) planes (`ops.conv1x1`: statistics or
                bias + act in the epilogue, the BN + act backward fused into the gradient GEMMs)
                or ATen's (oneDNN) convolution — `gemm_chosen`;
  3x3 stride-1  Winograd F(2x2, 3x3) (`ops.conv3x3`) or ATen's (oneDNN) — `winograd_chosen`
                for the forward and input gradient, `winograd_weight_grad_chosen` for the
                weight gradient;
  3x3 stride-2  the input gradient as four stride-1 convolutions, one per input phase
                (`ops.conv_phases`), or ATen's backward — `phases_input_grad_chosen`;
  eval on small one GEMM over the whole batch's output pixels (`ops.conv.conv_over_batch`) or
  maps          ATen's convolution and a bias + act pass — `gemm_over_batch_chosen`;
  other eval    oneDNN's post-op convolution with a prepacked weight, or ATen's convolution
                and a bias + act pass — `onednn_eval_chosen`.

Why measured: the winner depends on the CPU (our kernels' GEMM rate against oneDNN's) and on the
shape. On large maps the GEMMs read channel slices in place and keep their tiles in cache, and
Winograd multiplies 2.25x less; on small maps (timm's CSP backbones at stages 4-5: 14x14, 7x7 and
below) each plane GEMM is a few dozen columns wide and re-reads the weight per sample, Winograd's
4x4 tiles are mostly padding and its per-call weight transform is not amortized, and oneDNN's
batched kernels win by up to several times. A first call per key times both candidates and keeps
the faster; later calls look it up.

CSP_KERNELS_CPU_CONV1X1 = "gemm" | "onednn", CSP_KERNELS_CPU_CONV3X3 = "winograd" | "onednn" and
CSP_KERNELS_CPU_CONV3X3_STRIDE2 = "phases" | "onednn" pin the choices (read once); unset
measures. Inside a torch.compile / torch.export trace nothing can be timed: a shape measured
before the trace keeps its verdict, an unmeasured one takes the rule that large maps go to our
kernels (`_UNMEASURED_MIN_PIXELS`, `_UNMEASURED_MIN_SIDE`; oneDNN's for the stride-2 gradient).
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..checks import env_choice
from .batch_norm_act import bn_act_backward, channel_stats, plane_contiguous, scale_shift_act
from .conv3x3 import conv3x3_winograd, conv3x3_winograd_weight_grad, winograd_weight
from .conv_phases import conv3x3_stride2_input_grad
from .fold_cache import same_bits

CONV1X1_ENV_VAR = "CSP_KERNELS_CPU_CONV1X1"
CONV1X1_CHOICES = ("gemm", "onednn")
CONV3X3_ENV_VAR = "CSP_KERNELS_CPU_CONV3X3"
CONV3X3_CHOICES = ("winograd", "onednn")
_PINNED_1X1 = env_choice(CONV1X1_ENV_VAR, CONV1X1_CHOICES, "")
_PINNED_3X3 = env_choice(CONV3X3_ENV_VAR, CONV3X3_CHOICES, "")
STRIDE2_ENV_VAR = "CSP_KERNELS_CPU_CONV3X3_STRIDE2"
STRIDE2_CHOICES = ("phases", "onednn")
_PINNED_STRIDE2 = env_choice(STRIDE2_ENV_VAR, STRIDE2_CHOICES, "")
# The smallest maps on which our kernels won in every measurement we have (2-core Zen 4: 1x1
# train from 28x28 at 128-1024 channels; 3x3 from 14x14).
_UNMEASURED_MIN_PIXELS = 28 * 28
_UNMEASURED_MIN_SIDE = 14
_ROUNDS = 3

# ("1x1" | "3x3", input shape, weight shape, training | transform cached) -> whether ours won.
_verdicts: dict[tuple, bool] = {}


def gemm_chosen(x_shape, weight_shape, training: bool) -> bool:
    """Whether a float32 CPU conv2d(x, weight) of these shapes, 1x1 stride 1, should run as our
    GEMMs; `training`: the training forward and backward (statistics in the forward GEMM's
    epilogue, BN + act backward fused into the gradient GEMMs), else the eval forward (bias +
    act in the epilogue)."""
    if _PINNED_1X1:
        return _PINNED_1X1 == "gemm"
    return _verdict(("1x1", tuple(x_shape), tuple(weight_shape), training),
                    x_shape[2] * x_shape[3] >= _UNMEASURED_MIN_PIXELS, _gemm_faster)


def gemm_over_batch_chosen(x_shape, weight_shape, stride, padding, dilation) -> bool:
    """Whether a CPU eval conv2d(x, weight) (no groups) of this geometry, with bias + act, should
    run as one GEMM over the batch's output pixels (`ops.conv.conv_over_batch`) rather than as
    ATen's convolution and the bias + act pass. Inside a trace, unmeasured: ATen's."""
    return _verdict(("gemm over the batch", tuple(x_shape), tuple(weight_shape), tuple(stride), tuple(padding),
                     tuple(dilation)), False, _gemm_over_batch_faster)


def winograd_chosen(x_shape, weight_shape, transform_cached: bool) -> bool:
    """Whether a float32 CPU conv2d(x, weight, padding=1) of these shapes (where Winograd can
    run) should run by Winograd; `transform_cached`: the weight's transform is computed once
    beforehand (eval) rather than per call (training)."""
    if _PINNED_3X3:
        return _PINNED_3X3 == "winograd"
    return _verdict(("3x3", tuple(x_shape), tuple(weight_shape), transform_cached),
                    min(x_shape[2], x_shape[3]) >= _UNMEASURED_MIN_SIDE, _winograd_faster)


def winograd_weight_grad_chosen(x_shape, weight_shape) -> bool:
    """Whether the weight gradient of a float32 CPU conv2d(x, weight, padding=1) of these shapes
    (where Winograd can run) should run by Winograd. CSP_KERNELS_CPU_CONV3X3 pins it too."""
    if _PINNED_3X3:
        return _PINNED_3X3 == "winograd"
    return _verdict(("3x3 weight grad", tuple(x_shape), tuple(weight_shape)),
                    min(x_shape[2], x_shape[3]) >= _UNMEASURED_MIN_SIDE, _winograd_weight_grad_faster)


def phases_input_grad_chosen(x_shape, weight_shape) -> bool:
    """Whether the input gradient of a float32 CPU conv2d(x, weight, stride=2, padding=1), 3x3,
    should run as four stride-1 convolutions, one per input phase (`ops.conv_phases`), rather
    than as oneDNN's backward. Inside a trace, unmeasured: oneDNN's (the phases won on maps of
    about 100 pixels a side and more, and lost up to 5x on small ones)."""
    if _PINNED_STRIDE2:
        return _PINNED_STRIDE2 == "phases"
    return _verdict(("3x3 stride-2 input grad", tuple(x_shape), tuple(weight_shape)), False, _phases_faster)


def onednn_eval_chosen(x_shape, weight_shape, stride, padding, dilation, groups) -> bool:
    """Whether a float32 CPU eval conv of this geometry should run as oneDNN's convolution with
    the activation as a post-op and a weight (BN folded in) prepacked once, rather than as ATen's
    convolution and BN's scale + act pass. The prepacked weight spares the reorder of a plain
    weight into oneDNN's blocked layout at every call, but costs the cache's check of the
    weight's bits; on large maps the copy of oneDNN's channels_last output back to NCHW costs more.
    Inside a trace, unmeasured: ATen's."""
    return _verdict(("onednn eval", tuple(x_shape), tuple(weight_shape), tuple(stride), tuple(padding),
                     tuple(dilation), groups), False, _onednn_eval_faster)


def measured_verdicts() -> dict[tuple, bool]:
    """What this process measured so far: ("1x1" | "3x3", input shape, weight shape, training |
    transform cached), ("3x3 weight grad" | "3x3 stride-2 input grad", input shape, weight
    shape) or ("onednn eval", input shape, weight shape, stride, padding, dilation, groups) ->
    whether our kernel (oneDNN's prepacked one for the last) won."""
    return dict(_verdicts)


def _verdict(key: tuple, unmeasured_rule: bool, measure: Callable[..., bool]) -> bool:
    """measure(*key[1:]) once per key (key[1]: the input's shape), stored; `unmeasured_rule`
    inside a trace."""
    if any(isinstance(size, torch.SymInt) for size in key[1]):
        return unmeasured_rule  # a dynamic shape in a trace (torch.compile, export): no verdict to look up
    if 0 in key[1]:  # an empty input: nothing to time; ATen's kernels take it
        return False
    verdict = _verdicts.get(key)
    if verdict is None:
        if torch.compiler.is_compiling():
            return unmeasured_rule
        # The first verdict stored stands: threads measuring one key at once would otherwise
        # leave callers with different verdicts (a weight prepared for one kernel, run by another).
        # The candidates are timed on float32 as they are, whatever autocast the caller runs under.
        with torch.autocast("cpu", enabled=False):
            measured = measure(*key[1:])
        verdict = _verdicts.setdefault(key, measured)
    return verdict


def _randn(*shape) -> torch.Tensor:
    """Random float32 data to time the candidates on, from a generator of its own: a model's draws
    from the global one (dropout, augmentation) must not depend on whether a shape was new, in
    this thread or another (restoring the global generator's state afterwards, as fork_rng does,
    would rewind other threads' draws made meanwhile)."""
    return torch.empty(*shape).normal_(generator=_TIMING_GENERATOR)


_TIMING_GENERATOR = torch.Generator().manual_seed(0)


def _faster(ours: Callable[[], object], theirs: Callable[[], object], ours_extra: float = 0.0) -> bool:
    """Whether `ours` ran faster than `theirs`, `ours_extra` seconds added to each of its calls:
    the fastest of a few alternated calls each, after a first untimed call each (allocation,
    primitive set-up); other load on the machine only slows a call."""
    with torch.no_grad():
        ours(), theirs()
        best = {ours: float("inf"), theirs: float("inf")}
        for _ in range(_ROUNDS):
            for run in best:
                start = time.perf_counter()
                run()
                best[run] = min(best[run], time.perf_counter() - start)
    return best[ours] + ours_extra < best[theirs]


def _fold_check_seconds(weight: torch.Tensor) -> float:
    """What the check an eval fold cache makes at each call over the weight it derives from
    (`fold_cache_hit`) costs in a model: the kernels that take a folded, prepacked or transformed
    weight pay it, ATen's eval conv (the module's own weight) does not. A forward reads each of
    a model's weights once, more than the caches hold, so the check reads the weight and its kept
    copy from memory: their bytes at the speed `same_bits` reads memory. (Timed with the check in
    the loop, both copies would sit in cache, and the check would look several times cheaper.)"""
    return 2 * weight.numel() * weight.element_size() / _same_bits_bandwidth()


@functools.cache
def _same_bits_bandwidth() -> float:
    """Bytes per second that `same_bits` compares out of memory, measured once a process: the
    fastest of three compares of two 64 MiB tensors, which together outsize a CPU's caches."""
    size = 64 << 20
    a, b = torch.ones(size, dtype=torch.uint8), torch.ones(size, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        same_bits((a,), (b,))
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def _aten_eval(x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1) -> Callable[[], None]:
    """`routing.eval_conv_kernel`'s "aten" for these arguments, the candidate our eval kernels
    are timed against: ATen's conv, then BN's scale + act pass in place."""
    ones, zeros = torch.ones(weight.shape[0]), torch.zeros(weight.shape[0])

    def run():
        z = plane_contiguous(F.conv2d(x, weight, None, stride, padding, dilation, groups))
        scale_shift_act(z, ones, zeros, "relu", out=z)

    return run


def _gemm_faster(x_shape, weight_shape, training: bool) -> bool:
    from .conv1x1 import conv1x1_bn_act_backward, conv1x1_fused  # they route through `ops.routing`, which asks us

    x, weight = _randn(x_shape), _randn(weight_shape)
    c = weight_shape[0]
    ones, zeros = torch.ones(c), torch.zeros(c)
    if not training:
        return _faster(lambda: conv1x1_fused(x, weight, bias=zeros, act="relu"), _aten_eval(x, weight),
                       _fold_check_seconds(weight))
    grad_y = _randn(x_shape[0], c, *x_shape[2:])

    def by_gemm():
        z, mean, var = conv1x1_fused(x, weight, stats=True)
        conv1x1_bn_act_backward(grad_y, z, mean, var.add(1e-5).rsqrt(), ones, zeros, "relu", x, weight)

    def by_onednn():
        z = plane_contiguous(F.conv2d(x, weight))
        mean, var = channel_stats(z)
        grad_z, _, _ = bn_act_backward(grad_y, z, mean, var.add(1e-5).rsqrt(), ones, zeros, "relu")
        torch.ops.aten.convolution_backward(grad_z, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                            [True, True, False])

    return _faster(by_gemm, by_onednn)


def _gemm_over_batch_faster(x_shape, weight_shape, stride, padding, dilation) -> bool:
    from .conv import conv_over_batch  # it routes through `ops.routing`, which asks us
    x, weight = _randn(x_shape), _randn(weight_shape)
    zeros = torch.zeros(weight_shape[0])
    return _faster(lambda: conv_over_batch(x, weight, zeros, stride, padding, dilation, "relu"),
                   _aten_eval(x, weight, stride, padding, dilation), _fold_check_seconds(weight))


def _onednn_eval_faster(x_shape, weight_shape, stride, padding, dilation, groups) -> bool:
    x, weight = _randn(x_shape), _randn(weight_shape)
    zeros = torch.zeros(weight_shape[0])
    prepacked = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), list(padding), list(stride),
                                                          list(dilation), groups, list(x_shape))

    def by_onednn():  # `routing.eval_conv_kernel`'s "onednn" with an activation post-op, back to NCHW
        torch.ops.mkldnn._convolution_pointwise(x, prepacked, zeros, padding, stride, dilation, groups, "leaky_relu",
                                                [0.1], None).contiguous()

    return _faster(by_onednn, _aten_eval(x, weight, stride, padding, dilation, groups), _fold_check_seconds(weight))


def _winograd_faster(x_shape, weight_shape, transform_cached: bool) -> bool:
    x, weight = _randn(x_shape), _randn(weight_shape)
    transform = winograd_weight(weight) if transform_cached else None
    out = x.new_empty(x_shape[0], weight_shape[0], x_shape[2], x_shape[3])

    def by_winograd():
        return conv3x3_winograd(x, weight, transform, out=out)

    return _faster(by_winograd, lambda: F.conv2d(x, weight, padding=1),
                   _fold_check_seconds(weight) if transform_cached else 0.0)


def _winograd_weight_grad_faster(x_shape, weight_shape) -> bool:
    x, grad_y = _randn(x_shape), _randn(x_shape[0], weight_shape[0], *x_shape[2:])
    weight = torch.empty(weight_shape)
    return _faster(lambda: conv3x3_winograd_weight_grad(x, grad_y),
                   lambda: torch.ops.aten.convolution_backward(grad_y, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                               [0, 0], 1, [False, True, False]))


def _phases_faster(x_shape, weight_shape) -> bool:
    x, weight = torch.empty(x_shape), _randn(weight_shape)
    grad_z = _randn(x_shape[0], weight_shape[0], (x_shape[2] + 1) // 2, (x_shape[3] + 1) // 2)
    return _faster(lambda: conv3x3_stride2_input_grad(grad_z, weight, x_shape),
                   lambda: torch.ops.aten.convolution_backward(grad_z, x, weight, None, [2, 2], [1, 1], [1, 1], False,
                                                               [0, 0], 1, [True, False, False]))
