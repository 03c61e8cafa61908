"""BatchNorm + activation: the compiled per-channel kernels and a differentiable training op.

The C++ ops (csrc/cpu/batch_norm_act.cpp, csrc/cuda/batch_norm_act.cu) take 4-D tensors whose
(height, width) planes are contiguous — channel slices of a larger NCHW buffer included — and
per-channel float32 vectors (float64 for float64 data):

  channel_stats(x) -> (mean, var)                      biased batch statistics, one pass
  scale_shift_act(x, scale, shift, act[, out])         act(x * scale[c] + shift[c]), one pass
  bn_act_backward_reduce / bn_act_backward_apply       training BN + act backward, two passes
  bn_scale_shift, bn_track_running_stats_               a training BN's per-channel arithmetic
                                                       (`batch_scale_shift`, `track_running_stats`)

`batch_norm_act` composes them into a custom op with autograd that matches
`act(F.batch_norm(z, ..., training=True))`. It is test-only: no module calls it (the fused
modules run BN + act inside their conv ops); it stays as the smallest op that exercises the
kernels through torch.library, autograd, opcheck and the ONNX decomposition
(tests/test_batch_norm_act.py, tests/test_onnx_export.py). `track_running_stats` and
`update_running_stats` update the running statistics as nn.BatchNorm2d does (the one place every
fused module's update goes through, via nn/transition.py's `track_batch_stats`). The C++ ops' fake kernels:
ops/fakes.py. The plane-layout tests here (`pixels_contiguous`, `planes_contiguous`) are the
only Python ones; csrc/plane_layout.h is their C++ twin.
"""
from __future__ import annotations

import torch

from .. import extension  # noqa: F401  (loads csp_kernels._C, which defines the C++ ops)
from .inductor_fallbacks import keep_fused_in_inductor

_ops = torch.ops.csp_kernels


def refuse_double_backward(op: str) -> None:
    """Raise from a backward that runs with create_graph=True: the fused backwards are
    computed by kernels autograd cannot differentiate, which would give None or wrong second
    derivatives."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} does not support double backward (backward with create_graph=True, "
                           "e.g. a gradient penalty): run that forward under csp_kernels.use_backend('reference'), "
                           "plain PyTorch, whose second derivatives work")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The per-channel vectors' (statistics, BN parameters, accumulators) dtype for data of
    `dtype`: float64 for float64, else float32 (every kernel, C++ and Triton, uses it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pixels_contiguous(t: torch.Tensor) -> bool:
    """Whether pixel (h, w) of every (height, width) plane of the (N, C, H, W) tensor `t` sits at
    h * width + w from the plane's first (the planes themselves may lie anywhere)."""
    _, _, h, w = t.shape
    return (w == 1 or t.stride(3) == 1) and (h == 1 or t.stride(2) == w)


def planes_contiguous(t: torch.Tensor, written: bool = False) -> bool:
    """Whether the kernels take the (N, C, H, W) tensor `t` as it is (csrc/plane_layout.h checks
    the same): every (n, c) plane is H*W contiguous elements, and the planes of one sample lie
    apart (channel stride >= H*W: the GEMMs' leading dimension, which BLAS refuses below that;
    an `expand` over channels has stride 0). A tensor the kernels write (`written`) must also
    have no two elements in one place, across samples too. Batch strides of inputs are free: a
    stride-0 batch is read as it is."""
    n, c, h, w = t.shape
    if not pixels_contiguous(t):
        return False
    if not written:
        return c <= 1 or t.stride(1) >= h * w
    return not overlaps_itself(t)


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of `t` may share memory: False when its dims, sorted by stride, each
    step over all the earlier ones (every dense layout, permuted or sliced with steps, passes);
    True for an `expand` and for layouts interleaved too finely to tell."""
    extent = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size > 1:
            if stride < extent:
                return t.numel() > 0
            extent = stride * size
    return False


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether an element of `a` and one of `b` lie in one place: exact where both have
    `planes_contiguous` planes (a slice of a buffer that reads another slice of it does not
    overlap it; only the planes' N*C starts are compared), else whether their spans meet."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):  # [first, last + 1) in bytes of the storage
        first = t.storage_offset() * t.element_size()
        return first, first + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    if a1 <= b0 or b1 <= a0:
        return False
    if not (planes_contiguous(a) and planes_contiguous(b)):
        return True
    same_grid = _planes_on_one_grid_overlap(a, b)
    if same_grid is not None:
        return same_grid

    def plane_starts(t):  # sorted byte offsets of the (n, c) planes, and a plane's length in bytes
        n, c, h, w = t.shape
        starts = (torch.arange(n).mul_(t.stride(0))[:, None] + torch.arange(c).mul_(t.stride(1))).flatten()
        return (starts + t.storage_offset()).mul_(t.element_size()).sort().values, h * w * t.element_size()

    (starts_a, length_a), (starts_b, length_b) = plane_starts(a), plane_starts(b)
    # For each plane of a, the last plane of b starting before a's ends must end after a's starts.
    before = torch.searchsorted(starts_b, starts_a + length_a) - 1
    found = before >= 0
    return bool((starts_b[before.clamp(min=0)][found] + length_b > starts_a[found]).any())


def _planes_on_one_grid_overlap(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """`shares_memory` for two tensors with contiguous planes laid on one grid, in integer
    arithmetic (no tensor ops: this runs at every call of a unit that writes a slice of the
    buffer it reads, as a CSP stage's units do): the same batch, planes, dtype, batch stride and
    channel stride, planes of one sample not overlapping each other (channel stride >= plane
    size) and the batch stride a multiple of the channel stride. None where they are not.

    Plane (i, j) of a starts at a0 + i*S0 + j*S1 and plane (i2, k) of b at b0 + i2*S0 + k*S1,
    d = b0 - a0 apart plus a multiple of S1: they overlap where that distance v lies within one
    plane length L; with S1 >= L only v = d mod S1 and v - S1 can, for t = (v - d) / S1 =
    (i2 - i)*P + (k - j) channel steps, P = S0 / S1."""
    n, ca, h, w = a.shape
    cb, length = b.shape[1], h * w
    s0, s1 = a.stride(0), a.stride(1)
    if (b.shape[0] != n or tuple(b.shape[2:]) != (h, w) or a.element_size() != b.element_size()
            or b.stride(1) != s1 or s1 < length
            or (n > 1 and (b.stride(0) != s0 or s0 <= 0 or s0 % s1))):
        return None
    d = b.storage_offset() - a.storage_offset()
    for v in (d % s1, d % s1 - s1):
        if -length < v < length:
            t = (v - d) // s1  # channel steps: k - j ranges over [-(ca - 1), cb - 1]
            if n == 1:
                if -(ca - 1) <= t <= cb - 1:
                    return True
                continue
            period = s0 // s1  # batch steps: i2 - i ranges over [-(n - 1), n - 1]
            lowest = max(-(n - 1), -((cb - 1 - t) // period))  # ceil((t - cb + 1) / period)
            highest = min(n - 1, (t + ca - 1) // period)
            if lowest <= highest:
                return True
    return False


def plane_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when the kernels read it as it is (`planes_contiguous`), else an NCHW copy.

    channels_last tensors take the copy: the kernels walk whole planes. (A clone, not
    .contiguous(): torch calls every empty tensor contiguous, whatever its strides.)
    """
    return x if planes_contiguous(x) else x.clone(memory_format=torch.contiguous_format)


def suggests_channels_last(t: torch.Tensor) -> bool:
    """Whether PyTorch's convolution, BatchNorm and activations give their result for `t` (an
    input or a convolution's weight) in channels_last: ATen's `suggest_memory_format`
    (is_channels_last_strides_2d, which C++ alone exposes), ambiguous strides counting as NCHW."""
    if t.dim() != 4 or t.layout != torch.strided:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    lowest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lowest or (d == 0 and lowest == strides[1]):
            return False
        lowest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def as_channels_last_if(y: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """`y`, a fused module's result, which the kernels write NCHW, in the memory format its
    plain-PyTorch twin gives: a channels_last copy where `channels_last`, else y itself."""
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance.

    x: (batch, channels, height, width) -> mean, var: (channels,)
    """
    return _ops.channel_stats(plane_contiguous(x))


def scale_shift_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: str,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x * scale[c] + shift[c]), written to `out` (a (N, C, H, W) view, may be `x`) if given.

    x: (batch, channels, height, width); scale, shift: (channels,)
    """
    x = plane_contiguous(x)
    if out is None:
        return _ops.scale_shift_act(x, scale, shift, act)
    _ops.scale_shift_act_out(x, scale, shift, act, out)
    return out


def bn_act_backward(grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, act: str):
    """Gradients of y = act(weight * (z - mean) * invstd + bias) with batch statistics of z.

    Returns (grad_z, grad_weight, grad_bias); two passes over grad_y and z.
    """
    grad_y, z = plane_contiguous(grad_y), plane_contiguous(z)
    grad_bias, grad_weight = _ops.bn_act_backward_reduce(grad_y, z, mean, invstd, weight, bias, act)
    grad_z = _ops.bn_act_backward_apply(grad_y, z, mean, invstd, weight, bias, grad_bias, grad_weight, act)
    return grad_z, grad_weight, grad_bias


def per_channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v, a BatchNorm parameter, as the kernels read a per-channel vector: of `dtype` (`stats_dtype`)
    and contiguous (a strided or expanded parameter, from a slice or a functional_call, is copied)."""
    return v.to(dtype).contiguous()


def bn_scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of BatchNorm with statistics (mean, var): y = x * scale + shift,
    in var's dtype. In ATen ops: differentiable (the eval fold of a module with gradients goes
    through it) and traced as such (ops/decompositions.py). `batch_scale_shift` is its one-call
    twin for the training kernels."""
    scale = weight.to(var.dtype) * torch.rsqrt(var + eps)
    return scale, bias.to(var.dtype) - mean * scale


def batch_scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`bn_scale_shift` for the training kernels, from batch statistics: one C++ op
    (csrc/batch_norm_bookkeeping.cpp) instead of five tiny tensor ops, which on small maps cost
    more than the kernels they feed. No gradient (the training ops' backwards compute BN's)."""
    return _ops.bn_scale_shift(mean, var, weight, bias, eps)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, unbias: float | torch.Tensor, momentum: float | torch.Tensor) -> None:
    """nn.BatchNorm2d's update: running = momentum * statistic + (1 - momentum) * running, for
    the mean and the unbiased variance var * unbias (unbias = count / (count - 1) for the count
    of values per channel), in float64 as its CPU kernel computes it, rounded to the running
    statistics' dtype. In tensor ops, for a count or momentum held in a tensor and for
    torch.compile (`track_running_stats` takes the common case in one C++ op with the same
    formula). The statistics are detached rather than updated under no_grad: a no_grad region in
    an exported training graph does not load back (torch.export.load: "wrap_with_set_grad_enabled
    is missing val")."""
    mean, var = mean.detach().to(torch.float64), var.detach().to(torch.float64)
    running_mean.copy_(mean * momentum + running_mean.to(torch.float64) * (1 - momentum))
    running_var.copy_(var * unbias * momentum + running_var.to(torch.float64) * (1 - momentum))


def track_running_stats(num_batches_tracked: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                        mean: torch.Tensor, var: torch.Tensor, unbias: float, momentum: float) -> None:
    """num_batches_tracked += 1 and `update_running_stats` with a float unbias and momentum, in
    one C++ op outside a torch.compile trace."""
    if torch.compiler.is_compiling():
        num_batches_tracked.add_(1)
        update_running_stats(running_mean, running_var, mean, var, unbias, momentum)
    else:
        # (The op has no autograd formula and writes only the running statistics: no detach needed.)
        _ops.bn_track_running_stats_(num_batches_tracked, running_mean, running_var, mean, var, unbias, momentum)


@torch.library.custom_op("csp_kernels::batch_norm_act", mutates_args=())
def batch_norm_act(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, act: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode act(BatchNorm2d(z)) in two passes (statistics, normalize+act). Test-only
    (see the module docstring).

    z: (batch, channels, height, width); weight, bias: (channels,)
    Returns (y, mean, var) with the biased batch variance; the caller updates running
    statistics (`update_running_stats`), which keeps this op functional for autograd.
    """
    count = z.numel() // z.shape[1]
    if count <= 1:
        raise ValueError(f"batch_norm_act needs more than 1 value per channel when training; got input "
                         f"shape {tuple(z.shape)}")
    mean, var = channel_stats(z)
    y = scale_shift_act(z, *bn_scale_shift(mean, var, weight, bias, eps), act)
    return y, mean, var


@batch_norm_act.register_fake
@keep_fused_in_inductor
def _(z, weight, bias, eps, act):
    c = z.shape[1]
    dtype = stats_dtype(z.dtype)
    return (torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(c, dtype=dtype),
            z.new_empty(c, dtype=dtype))


def _setup_context(ctx, inputs, output):
    z, weight, bias, eps, act = inputs
    _, mean, var = output
    ctx.act = act
    ctx.save_for_backward(z, weight, bias, mean, torch.rsqrt(var + eps))


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    refuse_double_backward("csp_kernels::batch_norm_act")
    z, weight, bias, mean, invstd = ctx.saved_tensors
    stats_dtype = mean.dtype
    grad_z, grad_weight, grad_bias = bn_act_backward(
        grad_y, z, mean, invstd, per_channel(weight, stats_dtype), per_channel(bias, stats_dtype), ctx.act)
    return grad_z, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None, None


batch_norm_act.register_autograd(_backward, setup_context=_setup_context)
