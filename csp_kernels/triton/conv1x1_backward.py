"""The backward of a dense layer's BN1-ReLU-Conv1x1 as two Triton GEMMs whose normalized input
and input gradient never reach memory (the GPU twin of csrc/cpu/dense.cpp's
dense_conv1_backward):

  weight_grad     grad_w[o, i] = sum over (n, h, w) of grad_z[n, o, h, w] * a[n, i, h, w],
                  a = in_act(x * in_scale[i] + in_shift[i])            (normalized on load)
  dgrad_bn_accumulate
                  grad_a[n, i] = sum_o weight[o, i] * grad_z[n, o]     (the conv's input gradient)
                  dpre = grad_a * act'(bn_weight * xhat + bn_bias),  xhat = (x - mean) * invstd
                  grad_acc += bn_weight * dpre                          (in place)
                  and per channel, sum dpre and sum dpre * xhat         (BN1's bias/weight grads)

Unfused, the same work writes and reads the normalized prefix and grad_a: 4 passes over the
prefix per layer. Pixels are addressed as in `conv1x1`: one image per grid row (weight_grad: a
run of pixel blocks per program), so NCHW planes load in contiguous runs. Sums are per program
and merged on the host in float64 (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import act_constexprs, act_forward, act_grad
from ..ops.batch_norm_act import pixels_contiguous, stats_dtype
from .conv1x1 import device_guard, input_precision_of, launch_config, pixel_offsets


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, partial_ptr,
    batch, plane, width, out_channels, in_channels,
    sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w,
    HAS_IN_AFFINE: tl.constexpr, IN_ACT: tl.constexpr, IN_SLOPE: tl.constexpr, ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    G_PLANES: tl.constexpr, X_PLANES: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Programs: (output channel block, input channel block, split). Split s reduces the pixel
    # blocks s, s + splits, ... of all images into its own (out, in) partial.
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_o = offs_o < out_channels
    mask_i = offs_i < in_channels
    if HAS_IN_AFFINE:
        scale = tl.load(scale_ptr + offs_i, mask=mask_i, other=0.0)
        shift = tl.load(shift_ptr + offs_i, mask=mask_i, other=0.0)
    blocks = tl.cdiv(plane, BLOCK_P)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=acc_dtype)
    for block in range(split, batch * blocks, splits):
        n = (block // blocks).to(tl.int64)
        offs_p = (block % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < plane
        g_tile = tl.load(g_ptr + n * sg_n + offs_o[:, None].to(tl.int64) * sg_c
                         + pixel_offsets(offs_p, width, sg_h, sg_w, G_PLANES)[None, :],
                         mask=mask_o[:, None] & mask_p[None, :], other=0.0)
        x_mask = mask_i[:, None] & mask_p[None, :]
        x_tile = tl.load(x_ptr + n * sx_n + offs_i[:, None].to(tl.int64) * sx_c
                         + pixel_offsets(offs_p, width, sx_h, sx_w, X_PLANES)[None, :], mask=x_mask, other=0.0)
        if HAS_IN_AFFINE or IN_ACT != 0:
            a = x_tile.to(acc_dtype)
            if HAS_IN_AFFINE:
                a = a * scale[:, None] + shift[:, None]
            x_tile = tl.where(x_mask, act_forward(a, IN_ACT, IN_SLOPE), 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(g_tile, tl.trans(x_tile), acc, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
    tl.store(partial_ptr + (split * out_channels + offs_o[:, None]) * in_channels + offs_i[None, :], acc,
             mask=mask_o[:, None] & mask_i[None, :])


def dgrad_launch_config(in_channels: int, out_channels: int, dtype: torch.dtype, input_precision: str,
                        on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_I, BLOCK_P, BLOCK_O, num_warps, num_stages) of `_dgrad_bn_accumulate_kernel`: the
    1x1 GEMM's (`launch_config`), but at most 64 pixels wide on a GPU, because its epilogue (BN +
    activation gradient, accumulation, two sums) holds more of the tile live: Triton 3.6 spills at
    128x128 in float32 on sm_90 (benchmarks.gpu_compile)."""
    block_i, block_p, block_o, num_warps, num_stages = launch_config(in_channels, out_channels, dtype,
                                                                     input_precision, on_gpu)
    return block_i, min(block_p, 64) if on_gpu else block_p, block_o, num_warps, num_stages


@triton.jit
def _dgrad_bn_accumulate_kernel(
    g_ptr, w_ptr, x_ptr, acc_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, sums_ptr,
    plane, width, out_channels, in_channels,
    sg_n, sg_c, sg_h, sg_w, sw_o, sw_i, sx_n, sx_c, sx_h, sx_w, sa_n, sa_c, sa_h, sa_w,
    ACT: tl.constexpr, SLOPE: tl.constexpr, ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    G_PLANES: tl.constexpr, X_PLANES: tl.constexpr, ACC_PLANES: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    # Programs: (pixel block of one image, input channel block, image), as in `conv1x1` with
    # the roles of in and out swapped: the GEMM's rows are the conv's input channels.
    pid_p = tl.program_id(0)
    pid_i = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_p = offs_p < plane
    mask_i = offs_i < in_channels
    g_pixel = pixel_offsets(offs_p, width, sg_h, sg_w, G_PLANES)
    grad_a = tl.zeros((BLOCK_I, BLOCK_P), dtype=acc_dtype)
    for o0 in range(0, out_channels, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mask_o = offs_o < out_channels
        w_tile = tl.load(w_ptr + offs_i[:, None] * sw_i + offs_o[None, :] * sw_o,
                         mask=mask_i[:, None] & mask_o[None, :], other=0.0)
        g_tile = tl.load(g_ptr + n * sg_n + offs_o[:, None].to(tl.int64) * sg_c + g_pixel[None, :],
                         mask=mask_o[:, None] & mask_p[None, :], other=0.0)
        grad_a = tl.dot(w_tile, g_tile, grad_a, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)

    tile_mask = mask_i[:, None] & mask_p[None, :]
    x = tl.load(x_ptr + n * sx_n + offs_i[:, None].to(tl.int64) * sx_c
                + pixel_offsets(offs_p, width, sx_h, sx_w, X_PLANES)[None, :], mask=tile_mask, other=0.0)
    mean = tl.load(mean_ptr + offs_i, mask=mask_i, other=0.0)
    invstd = tl.load(invstd_ptr + offs_i, mask=mask_i, other=0.0)
    bn_w = tl.load(bnw_ptr + offs_i, mask=mask_i, other=0.0)
    bn_b = tl.load(bnb_ptr + offs_i, mask=mask_i, other=0.0)
    xhat = (x.to(acc_dtype) - mean[:, None]) * invstd[:, None]
    dpre = tl.where(tile_mask, act_grad(grad_a, bn_w[:, None] * xhat + bn_b[:, None], ACT, SLOPE), 0.0)
    acc_ptrs = (acc_ptr + n * sa_n + offs_i[:, None].to(tl.int64) * sa_c
                + pixel_offsets(offs_p, width, sa_h, sa_w, ACC_PLANES)[None, :])
    accumulated = tl.load(acc_ptrs, mask=tile_mask, other=0.0).to(acc_dtype) + bn_w[:, None] * dpre
    tl.store(acc_ptrs, accumulated.to(acc_ptr.dtype.element_ty), mask=tile_mask)
    # sums_ptr: (2, images, pixel blocks per image, in_channels)
    row = (n * tl.num_programs(0) + pid_p) * in_channels + offs_i
    tl.store(sums_ptr + row, tl.sum(dpre, axis=1), mask=mask_i)
    tl.store(sums_ptr + tl.num_programs(2) * tl.num_programs(0) * in_channels + row, tl.sum(dpre * xhat, axis=1),
             mask=mask_i)


def weight_grad(grad_z: torch.Tensor, x: torch.Tensor, *, in_scale: torch.Tensor | None = None,
                in_shift: torch.Tensor | None = None, in_act: str = "identity") -> torch.Tensor:
    """grad_z: (batch, out, height, width); x: (batch, in, height, width), any strides (channel
    slices of a buffer); in_scale, in_shift: (in,) or None (1 and 0) -> (out, in, 1, 1), the weight
    gradient of conv1x1(in_act(x * in_scale + in_shift)), in the accumulator's dtype (float32,
    float64 for float64 data)."""
    batch, in_channels, height, width = x.shape
    out_channels = grad_z.shape[1]
    plane = height * width
    precision = input_precision_of(x.dtype)
    # The GEMM (out, in) = grad_z (out, pixels) @ a^T (pixels, in): conv1x1's tiles with the
    # pixels as the reduction.
    block_o, block_i, block_p, num_warps, num_stages = launch_config(out_channels, in_channels, x.dtype, precision,
                                                                     x.is_cuda)
    grid_oi = triton.cdiv(out_channels, block_o) * triton.cdiv(in_channels, block_i)
    # Splits of the pixel reduction: two programs per SM, each writing an (out, in) partial
    # that the host sums (deterministic; more splits would move more partial bytes than they
    # save in waiting); 1 in the interpreter.
    blocks = batch * triton.cdiv(plane, block_p)
    wanted = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count // grid_oi if x.is_cuda else 1
    splits = max(1, min(blocks, wanted))
    # Every split stores its whole partial (zeros where it got no pixels), so only a batch
    # without pixels, which launches nothing, needs zeros.
    partial = (torch.empty if blocks > 0 else torch.zeros)(splits, out_channels, in_channels,
                                                           dtype=stats_dtype(x.dtype), device=x.device)
    has_affine = in_scale is not None or in_shift is not None
    if blocks > 0 and out_channels > 0 and in_channels > 0:
        scale = shift = partial  # dummy pointers without a prologue
        if has_affine:
            scale = (partial.new_ones(in_channels) if in_scale is None else in_scale.to(partial.dtype)).contiguous()
            shift = (partial.new_zeros(in_channels) if in_shift is None else in_shift.to(partial.dtype)).contiguous()
        grid = (triton.cdiv(out_channels, block_o), triton.cdiv(in_channels, block_i), splits)
        with device_guard(x):
            _weight_grad_kernel[grid](
                grad_z, x, scale, shift, partial, batch, plane, width, out_channels, in_channels,
                *grad_z.stride(), *x.stride(),
                HAS_IN_AFFINE=has_affine, **act_constexprs(in_act, "IN_"), ACC_FP64=x.dtype == torch.float64,
                INPUT_PRECISION=precision, G_PLANES=pixels_contiguous(grad_z), X_PLANES=pixels_contiguous(x),
                BLOCK_O=block_o, BLOCK_P=block_p, BLOCK_I=block_i, num_warps=num_warps, num_stages=num_stages)
    return partial.sum(0)[:, :, None, None]


def dgrad_bn_accumulate(grad_z: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                        invstd: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, act: str,
                        grad_acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_z: (batch, out, height, width); weight: (out, in, 1, 1); x, grad_acc: (batch, in,
    height, width), any strides; mean, invstd, bn_weight, bn_bias: (in,), x's BN + act before the
    conv. Adds bn_weight * dpre into grad_acc (dpre: the gradient of the BN + act's pre-activation
    from the conv's input gradient); returns (sum dpre, sum dpre * xhat) per input channel."""
    batch, in_channels, height, width = x.shape
    out_channels = grad_z.shape[1]
    plane = height * width
    stat_dtype = stats_dtype(x.dtype)
    precision = input_precision_of(x.dtype)
    block_i, block_p, block_o, num_warps, num_stages = dgrad_launch_config(in_channels, out_channels, x.dtype,
                                                                           precision, x.is_cuda)
    blocks = triton.cdiv(plane, block_p)
    sums = torch.empty(2, batch, blocks, in_channels, dtype=stat_dtype, device=x.device)  # every row is stored
    if batch * plane > 0 and in_channels > 0:
        w = weight.flatten(1)
        vectors = [v.to(stat_dtype).contiguous() for v in (mean, invstd, bn_weight, bn_bias)]
        grid = (blocks, triton.cdiv(in_channels, block_i), batch)
        with device_guard(x):
            _dgrad_bn_accumulate_kernel[grid](
                grad_z, w, x, grad_acc, *vectors, sums, plane, width, out_channels, in_channels,
                *grad_z.stride(), *w.stride(), *x.stride(), *grad_acc.stride(),
                **act_constexprs(act), ACC_FP64=x.dtype == torch.float64, INPUT_PRECISION=precision,
                G_PLANES=pixels_contiguous(grad_z), X_PLANES=pixels_contiguous(x),
                ACC_PLANES=pixels_contiguous(grad_acc),
                BLOCK_I=block_i, BLOCK_P=block_p, BLOCK_O=block_o, num_warps=num_warps, num_stages=num_stages)
    totals = sums.double().sum((1, 2)).to(stat_dtype)
    return totals[0], totals[1]
