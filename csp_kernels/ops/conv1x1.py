"""The 1x1 convolution with its prologue and epilogue fused, on every engine:

    out = act(conv1x1(in_act(x * in_scale + in_shift), weight) * scale + bias)

and optionally out's per-channel batch statistics. It is the dense layer's BN1-ReLU-Conv1x1
(normalize on load) and every transition's conv + bias + act (eval) or conv + statistics
(training).

Engines:
  CPU "aten"   `csp_kernels::conv1x1_fused_out` (csrc/cpu/conv1x1.cpp): BLAS over column tiles
               whose normalized input and raw output stay in cache, so memory sees x read once
               and out written once; it may run in place (`in_place=True`).
  "triton"     the Triton GEMM of `csp_kernels.triton.conv1x1` (prologue on load, epilogue,
               statistics from per-channel sums).
  CUDA "aten"  passes: `scale_shift_act` into a temporary, a cuBLAS batched GEMM, the bias +
               act in place, `channel_stats`.
The last two cannot overwrite their input: `in_place=True` is for the CPU GEMM alone
(`ops.routing.conv1x1_writes_over_input`), and callers give the others a separate output tensor
(`ops.dense_eval`). Which one runs: `ops.routing.conv1x1_kernel` (forward) and
`ops.routing.conv1x1_backward_kernel`. Tests: tests/test_conv1x1.py, tests/test_triton_conv1x1.py.
"""
from __future__ import annotations

import torch

from .. import extension  # noqa: F401  (loads csp_kernels._C, which defines the C++ ops)
from . import routing
from .batch_norm_act import bn_act_backward, channel_stats, plane_contiguous, scale_shift_act, stats_dtype

_ops = torch.ops.csp_kernels

# The plain GEMMs: 1x1 convolutions as batched GEMMs over (channels, height * width) planes, one
# per sample with the weight broadcast (stride-0 batch). They read channel slices of the buffer
# through strides with no copy (oneDNN copies a strided input to its own layout first).
# torch.matmul(2-D, 3-D) would fold the batch into a transposed copy of both operands instead.

def gemm_conv1x1(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (batch, in, height, width) with contiguous planes; weight: (out, in, 1, 1)
    -> (batch, out, height, width), contiguous, or written into `out` (contiguous planes)."""
    n, _, h, w = x.shape
    a = weight.flatten(1).expand(n, -1, -1)
    if out is None:
        return torch.bmm(a, x.flatten(2)).view(n, weight.shape[0], h, w)
    torch.bmm(a, x.flatten(2), out=out.flatten(2))
    return out


def conv1x1_input_grad(grad_z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_z: (batch, out, height, width) -> (batch, in, height, width)."""
    n, _, h, w = grad_z.shape
    return torch.bmm(weight.flatten(1).t().expand(n, -1, -1), grad_z.flatten(2)).view(n, weight.shape[1], h, w)


def conv1x1_weight_grad(grad_z: torch.Tensor, x: torch.Tensor, *, in_scale: torch.Tensor | None = None,
                        in_shift: torch.Tensor | None = None, in_act: str = "identity") -> torch.Tensor:
    """The weight gradient of `conv1x1_fused` with the same prologue (a pass into a temporary):
    grad_z: (batch, out, height, width), x: (batch, in, height, width) -> (out, in, 1, 1).

    One small (out, in) partial per sample, summed: a bmm beats a single GEMM over the
    (batch * height * width)-long reduction, which would need transposed copies of both, and
    also the CPU's tiled GEMM without a prologue, whose short per-tile reductions re-read the
    (out, in) accumulator (benchmarks/results/design-notes.md). The CPU backward ops
    that need it with a prologue normalize in cache themselves (`dense.dense_conv1_backward`).
    """
    if in_scale is not None:
        x = scale_shift_act(x, in_scale, in_shift, in_act)
    g, a = grad_z.flatten(2), x.flatten(2).transpose(1, 2)
    # 16-bit partials stay float32 until summed over the batch (one rounding, not one per
    # sample); bmm's out_dtype exists on CUDA alone.
    if grad_z.is_cuda and grad_z.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(g, a, out_dtype=torch.float32).sum(0).to(grad_z.dtype)[:, :, None, None]
    return torch.bmm(g, a).sum(0)[:, :, None, None]


def conv1x1_fused(x: torch.Tensor, weight: torch.Tensor, *, in_scale: torch.Tensor | None = None,
                  in_shift: torch.Tensor | None = None, in_act: str = "identity", bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, act: str = "identity", out: torch.Tensor | None = None,
                  stats: bool = False, engine: str = "aten", in_place: bool = False):
    """x: (batch, in, height, width) with contiguous planes (channel slices allowed);
    weight: (out, in, 1, 1); in_scale, in_shift: (in,), bias, scale: (out,), float32 (float64
    for float64 data); scale None is 1 (an output scale is for 16-bit data, whose BatchNorm is
    not folded into the weight: it runs as passes); out: (batch, out, height, width) with
    contiguous planes, or None for a new tensor. in_place: out overlaps x, sample n's output
    covering only sample n's input; only where `routing.conv1x1_writes_over_input` allows it
    (the CPU GEMM), else a ValueError.

    Returns out, or with `stats=True` (out, mean, biased var) of out's channels.
    """
    n, _, h, w = x.shape
    if out is None:
        out = x.new_empty(n, weight.shape[0], h, w)
    if in_place and not routing.conv1x1_writes_over_input(x, engine, scaled=scale is not None):
        raise ValueError(f"conv1x1_fused: in_place=True needs the CPU GEMM (engine 'aten', float32/float64 CPU "
                         f"data, no output scale); engine {engine!r} on {x.dtype} {x.device.type} data writes "
                         "a separate output tensor")
    kernel = routing.conv1x1_kernel(x, engine, scaled=scale is not None)
    if kernel == "cpu":
        mean, var = _ops.conv1x1_fused_out(x, weight.flatten(1).contiguous(), in_scale, in_shift, in_act, bias, act,
                                           stats, out)
        return (out, mean, var) if stats else out
    return _conv1x1_passes(x, weight, in_scale, in_shift, in_act, bias, scale, act, out, stats, kernel)


def check_triton_dtype(x: torch.Tensor) -> None:
    """Refuses bfloat16 for Triton on a CPU: there Triton runs through its interpreter, whose
    tl.dot misreads bfloat16 (a 16x16 product off by 2e10), so the kernels would return garbage."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        raise TypeError("the 'triton' backend cannot run bfloat16 on the CPU: Triton's interpreter "
                        "(TRITON_INTERPRET=1) misreads bfloat16 in tl.dot; use float16, float32 or the "
                        "'cpu' backend")


def _conv1x1_passes(x, weight, in_scale, in_shift, in_act, bias, scale, act, out, stats, kernel):
    """`conv1x1_fused` by `kernel` "triton" (an output scale in a pass after the GEMM) or "bmm"
    (the prologue, the GEMM and the epilogue as passes)."""
    if kernel == "triton" and scale is None:
        from ..triton.conv1x1 import conv1x1 as triton_conv1x1
        check_triton_dtype(x)
        return triton_conv1x1(x, weight.flatten(1), in_scale=in_scale, in_shift=in_shift, in_act=in_act,
                              bias=bias, act=act, out=out, stats=stats)
    if kernel == "triton":  # the output scale in a pass after the GEMM
        _conv1x1_passes(x, weight, in_scale, in_shift, in_act, None, None, "identity", out, False, kernel)
    else:
        if in_scale is not None:
            x = scale_shift_act(x, in_scale, in_shift, in_act)
        gemm_conv1x1(x, weight, out=out)
    if bias is not None or scale is not None or act != "identity":
        shift = bias if bias is not None else out.new_zeros(out.shape[1], dtype=stats_dtype(out.dtype))
        scale_shift_act(out, torch.ones_like(shift) if scale is None else scale, shift, act, out=out)
    return (out, *channel_stats(out)) if stats else out


def conv1x1_bn_act_backward(grad_y, z, mean, invstd, bn_weight, bn_bias, act, x, weight, needs_x=True,
                            needs_weight=True):
    """The backward of y = act(BN(z)), z = conv1x1(x, weight), BN with batch statistics.

    grad_y, z: (batch, out, height, width); x: (batch, in, height, width) with contiguous
    planes; weight: (out, in, 1, 1); mean, invstd, bn_weight, bn_bias: (out,) in the statistics
    dtype. Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias), None where not needed.

    CPU float32/float64: one reduction pass, then `csp_kernels::conv1x1_bn_act_backward`, which
    computes grad_z tile by tile in cache for both GEMMs, so grad_z is never stored. Elsewhere:
    `bn_act_backward` (two passes, grad_z stored) and the two GEMMs.
    """
    if routing.conv1x1_backward_kernel(x) == "cpu":
        grad_y, z = plane_contiguous(grad_y), plane_contiguous(z)
        grad_bn_bias, grad_bn_weight = _ops.bn_act_backward_reduce(grad_y, z, mean, invstd, bn_weight, bn_bias, act)
        grad_x, grad_weight = _ops.conv1x1_bn_act_backward(grad_y, z, mean, invstd, bn_weight, bn_bias, grad_bn_bias,
                                                           grad_bn_weight, act, x, weight.flatten(1).contiguous(),
                                                           needs_x, needs_weight)
        return (grad_x if needs_x else None, grad_weight.view(weight.shape) if needs_weight else None,
                grad_bn_weight, grad_bn_bias)
    grad_z, grad_bn_weight, grad_bn_bias = bn_act_backward(grad_y, z, mean, invstd, bn_weight, bn_bias, act)
    return (conv1x1_input_grad(grad_z, weight) if needs_x else None,
            conv1x1_weight_grad(grad_z, x) if needs_weight else None, grad_bn_weight, grad_bn_bias)
