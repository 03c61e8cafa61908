"""1x1 convolution as a Triton GEMM with a normalize-on-load prologue and a fused epilogue.

out[n, o, h, w] = act(bias[o] + sum_i weight[o, i] * a[n, i, h, w]),
a[n, i, h, w]   = in_act(x[n, i, h, w] * in_scale[i] + in_shift[i])   (the prologue, optional)

Each image's pixels form the GEMM's N dimension (one image per grid row, so that a pixel block
of an NCHW plane is one contiguous run: 16-byte loads and stores, which the compiled PTX shows
and tests/test_gpu_compile.py checks), addressed through the tensors' strides, so x and out may
be NCHW, channels_last, channel slices of larger buffers or spatially strided views (a strided
1x1 conv is a 1x1 conv of x[..., ::s, ::s]). The
epilogue can also give each output channel's batch mean and variance, which gives training
BatchNorm its statistics without another pass over the output: every program stores its tile's
per-channel mean and sum of squared deviations (two passes over registers, no cancellation when
|mean| >> std, no atomics, so deterministic), and the host merges the tiles in float64.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import checks
from ..ops.batch_norm_act import pixels_contiguous, stats_dtype
from .activation import act_constexprs, act_forward


@triton.jit
def pixel_offsets(offs_p, width, s_h, s_w, PLANES: tl.constexpr):
    """Offsets of pixels offs_p of a (height, width) plane with strides (s_h, s_w); offs_p
    itself where the plane is contiguous (PLANES), so that the compiler sees contiguous runs."""
    if PLANES:
        offsets = offs_p
    else:
        offsets = (offs_p // width).to(tl.int64) * s_h + (offs_p % width).to(tl.int64) * s_w
    return offsets


@triton.jit
def _conv1x1_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, in_scale_ptr, in_shift_ptr, moments_ptr,
    plane, width, in_channels, out_channels,
    sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, so_n, so_c, so_h, so_w,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, HAS_IN_AFFINE: tl.constexpr,
    IN_ACT: tl.constexpr, IN_SLOPE: tl.constexpr,
    STATS: tl.constexpr, ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    X_PLANES: tl.constexpr, OUT_PLANES: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Programs: (pixel block of one image, output channel block, image). A block never spans
    # two images, so where an image's (height, width) plane is contiguous (X_PLANES, OUT_PLANES)
    # a pixel block is one contiguous run that the compiler sees as such: vectorized,
    # pipelined loads and stores. Elsewhere (channels_last, strided views) each pixel's (h, w)
    # goes through the strides.
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_p = offs_p < plane
    mask_o = offs_o < out_channels
    x_pixel = pixel_offsets(offs_p, width, sx_h, sx_w, X_PLANES)
    out_pixel = pixel_offsets(offs_p, width, so_h, so_w, OUT_PLANES)
    x_ptr += n * sx_n
    out_ptr += n * so_n

    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=acc_dtype)
    for k0 in range(0, in_channels, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_channels
        w_tile = tl.load(w_ptr + offs_o[:, None] * sw_o + offs_k[None, :] * sw_i,
                         mask=mask_o[:, None] & mask_k[None, :], other=0.0)
        x_mask = mask_k[:, None] & mask_p[None, :]
        # int64 channel offsets: a large buffer's channel stride times channels overflows int32.
        x_tile = tl.load(x_ptr + offs_k[:, None].to(tl.int64) * sx_c + x_pixel[None, :], mask=x_mask, other=0.0)
        if HAS_IN_AFFINE or IN_ACT != 0:
            a = x_tile.to(acc_dtype)
            if HAS_IN_AFFINE:
                scale = tl.load(in_scale_ptr + offs_k, mask=mask_k, other=0.0)
                shift = tl.load(in_shift_ptr + offs_k, mask=mask_k, other=0.0)
                a = a * scale[:, None] + shift[:, None]
            # Padding lanes must stay 0 after the shift and the activation.
            a = tl.where(x_mask, act_forward(a, IN_ACT, IN_SLOPE), 0.0)
            x_tile = a.to(x_ptr.dtype.element_ty)
        # out_dtype named (here and in conv1x1_backward): before Triton 3.8 it defaults to
        # float32 whatever the accumulator, and a float64 accumulator fails to compile.
        acc = tl.dot(w_tile, x_tile, acc, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(acc_dtype)[:, None]
    out_mask = mask_o[:, None] & mask_p[None, :]
    y = act_forward(acc, ACT, SLOPE)
    if STATS:  # moments_ptr: (2, images, pixel blocks per image, out_channels)
        count = tl.minimum(plane - pid_p * BLOCK_P, BLOCK_P).to(acc_dtype)
        tile_mean = tl.sum(tl.where(out_mask, y, 0.0), axis=1) / count
        deviation = tl.where(out_mask, y - tile_mean[:, None], 0.0)
        row = (n * tl.num_programs(0) + pid_p) * out_channels + offs_o
        tl.store(moments_ptr + row, tile_mean, mask=mask_o)
        tl.store(moments_ptr + tl.num_programs(2) * tl.num_programs(0) * out_channels + row,
                 tl.sum(deviation * deviation, axis=1), mask=mask_o)
    tl.store(out_ptr + offs_o[:, None].to(tl.int64) * so_c + out_pixel[None, :],
             y.to(out_ptr.dtype.element_ty), mask=out_mask)


def launch_config(out_channels: int, in_channels: int, dtype: torch.dtype, input_precision: str,
                  on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_O, BLOCK_P, BLOCK_K, num_warps, num_stages). tl.dot needs every block dim >= 16.

    On a GPU, tensor-core dots (16-bit types, float32 as tf32) take 128x128 output tiles and a
    64-byte K step (BLOCK_K 32 for 16-bit types, 16 for float32: with 32, float32 needs 255
    registers and spills on sm_80). Dots on CUDA cores (float64, float32 "ieee") hold the
    whole accumulator in registers: at 128x128 they spill 5-6 KiB of stack per thread, and at
    64x64 with 4 warps still 8-16 bytes, so they take 64x64x16 tiles over 8 warps (128-146
    registers). `benchmarks.gpu_compile` compiles every choice for sm_80 and sm_90 and
    reports registers and spills; tests/test_gpu_compile.py refuses any spill.
    The interpreter runs whole blocks as numpy arrays, so on CPU the smallest blocks that cover
    the channels waste the least work.
    """
    if not on_gpu:
        fit = lambda c: max(16, min(64, triton.next_power_of_2(c)))  # noqa: E731
        return fit(out_channels), 64, fit(in_channels), 4, 1
    if dtype == torch.float64 or input_precision == "ieee":
        return 64, 64, 16, 8, 3
    block_o = 128 if out_channels >= 128 else 64
    return block_o, 128, 64 // dtype.itemsize, 8 if block_o == 128 else 4, 3


def device_guard(t: torch.Tensor):
    """Launches on t's GPU (Triton launches on the current device), nothing on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def convolutions_use_tf32() -> bool:
    """Whether torch lets cuDNN run float32 convolutions as TF32. The new API's setting where
    torch has it (conv, else all of cuDNN, else the global default; "none" defers to the next,
    and none set means IEEE): the legacy `torch.backends.cudnn.allow_tf32` raises once a user
    has set conv and RNN apart through the new one."""
    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv"):
        return cudnn.allow_tf32
    for precision in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def input_precision_of(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 follows torch's switch for convolutions (a drop-in
    makes cuDNN's choice); float64 is exact; 16-bit types take Triton's default, which does
    not change them."""
    if dtype == torch.float64 or (dtype == torch.float32 and not convolutions_use_tf32()):
        return "ieee"
    return "tf32"


def _check_vector(v: torch.Tensor | None, name: str, length: int, x: torch.Tensor) -> None:
    if v is None:
        return
    checks.check_tensor(v, name)
    if v.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},); got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{name} must be on {x.device}; got {v.device}")


def conv1x1(x: torch.Tensor, weight: torch.Tensor, *, in_scale: torch.Tensor | None = None,
            in_shift: torch.Tensor | None = None, in_act: str = "identity",
            bias: torch.Tensor | None = None, act: str = "identity", out: torch.Tensor | None = None,
            stats: bool = False):
    """act(conv1x1(in_act(x * in_scale + in_shift), weight) + bias), optionally into `out`.

    x: (batch, in_channels, height, width), any strides; weight: (out_channels, in_channels)
    in_scale, in_shift: (in_channels,) or None (1 and 0); bias: (out_channels,) or None
    out: (batch, out_channels, height, width) of x's dtype, any strides (e.g. a channel slice
    of a bigger buffer), or None for a new NCHW tensor.
    Returns out, or with `stats=True` (out, mean, var): per-output-channel mean and biased
    variance of out over batch, height and width, float32 (float64 for float64 data).
    """
    checks.check_input(x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (out_channels, {x.shape[1]}) for x of shape {tuple(x.shape)}; got {shape}")
    checks.check_same_device_dtype((x, weight), ("x", "weight"))
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    for v, name, length in ((in_scale, "in_scale", in_channels), (in_shift, "in_shift", in_channels),
                            (bias, "bias", out_channels)):
        _check_vector(v, name, length, x)
    out_shape = (batch, out_channels, height, width)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    else:
        checks.check_out_tensor(out, out_shape, x.dtype, x.device)
    stat_dtype = stats_dtype(x.dtype)
    plane = height * width
    input_precision = input_precision_of(x.dtype)
    block_o, block_p, block_k, num_warps, num_stages = launch_config(out_channels, in_channels, x.dtype,
                                                                     input_precision, x.is_cuda)
    blocks = triton.cdiv(plane, block_p)  # pixel blocks per image
    moments = torch.empty(2, batch if stats else 1, blocks if stats else 1, out_channels if stats else 1,
                          dtype=stat_dtype, device=x.device)
    has_affine = in_scale is not None or in_shift is not None
    if has_affine:
        in_scale = torch.ones(in_channels, device=x.device) if in_scale is None else in_scale
        in_shift = torch.zeros(in_channels, device=x.device) if in_shift is None else in_shift

    def vector(v):  # read in the accumulator's type; an absent one gets a dummy pointer
        return moments if v is None else v.to(stat_dtype).contiguous()

    if batch * plane > 0:
        grid = (blocks, triton.cdiv(out_channels, block_o), batch)
        with device_guard(x):
            _conv1x1_kernel[grid](
                x, weight, out, vector(bias), vector(in_scale), vector(in_shift), moments,
                plane, width, in_channels, out_channels,
                *x.stride(), *weight.stride(), *out.stride(),
                HAS_BIAS=bias is not None, **act_constexprs(act), HAS_IN_AFFINE=has_affine,
                **act_constexprs(in_act, "IN_"), STATS=stats, ACC_FP64=x.dtype == torch.float64,
                INPUT_PRECISION=input_precision, X_PLANES=pixels_contiguous(x), OUT_PLANES=pixels_contiguous(out),
                BLOCK_O=block_o, BLOCK_P=block_p, BLOCK_K=block_k, num_warps=num_warps,
                num_stages=num_stages,
            )
    if stats:
        return (out, *_merge_tile_moments(moments, plane, block_p))
    return out


def _merge_tile_moments(moments: torch.Tensor, plane: int, block_p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel from the tiles' (mean, sum of squared deviations), moments
    (2, images, pixel blocks per image, channels): var * count = sum of the tiles' M2 + sum of
    count_i * (mean_i - mean)^2, in float64."""
    _, batch, blocks, channels = moments.shape
    if batch * plane == 0:  # no tiles
        return moments.new_zeros(channels), moments.new_zeros(channels)
    tile_means, tile_m2 = moments.double().flatten(1, 2)
    counts = torch.full((blocks, 1), float(block_p), dtype=torch.float64, device=moments.device)
    counts[-1] = plane - (blocks - 1) * block_p  # each image's last block
    counts = counts.repeat(batch, 1)
    pixels = batch * plane
    mean = (counts * tile_means).sum(0) / pixels
    var = (tile_m2.sum(0) + (counts * (tile_means - mean) ** 2).sum(0)) / pixels
    return mean.to(moments.dtype), var.to(moments.dtype)
