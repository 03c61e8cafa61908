"""The CSP transition, conv -> BatchNorm -> activation, as torch.library custom ops.

Training (`conv_bn_act_train`, autograd registered):
  forward   z = conv(x, weight); per-channel batch statistics of z (from the epilogue of the
            1x1 GEMMs, Triton's or the CPU's tiled one; otherwise one `channel_stats` pass);
            y = act(BN(z)) in one `scale_shift_act` pass, written straight into `out` when one
            is given.
  saved     x, weight and z, nothing else of activation size: BN's normalized output and the
            activation's input are recomputed per element in backward. z is saved rather than
            recomputed: recomputing the conv in backward costs more time than the one activation
            it saves is worth (benchmarks/results/design-notes.md). The reference saves z and
            BN's output too.
  backward  CPU 1x1 stride-1 convs: one reduction pass, then `conv1x1_bn_act_backward`, whose
            GEMMs read the activation + BN backward's grad_z from cache; otherwise
            `bn_act_backward` (two passes, grad_z stored), then the conv's input and weight
            gradients.
The op returns the batch mean and biased variance; the module updates the running statistics,
which keeps the op functional.

Eval (`conv_bias_act`): the activation applied by the kernel that writes the output: the
Triton GEMM's or the CPU tiled GEMM's epilogue or oneDNN's fused convolution post-op (with a
weight prepacked by `prepare_eval_weight`, where measured faster), BatchNorm folded into their
weight (`fold_batch_norm`); or else `scale_shift_act` in place over the conv's output:
Winograd's (BN folded, the weight's transform computed once by `prepare_eval_weight`) or
ATen's, whose weight stays the module's own and BN's scale rides in that pass
(`eval_weight_kind`).

Which conv runs: `ops.routing` decides (`train_conv_kernel`, `eval_conv_kernel`, `runs_as_gemm`
for the fused backward), with its table of (device, dtype, layout, shape) -> kernel: the Triton
1x1 GEMM for engine "triton"; on CPU, 1x1 stride-1 convs as GEMMs (`ops.conv1x1`), 3x3 stride-1
convs by Winograd (`ops.conv3x3`), eval convs by oneDNN with the activation as a post-op where
measured faster; else ATen (oneDNN, cuDNN). The generic conv helpers (output
shape, conv, conv_backward, the BN fold) are `ops.conv`.
`*_out` variants write y into a caller's tensor (a (N, C, H, W) view with contiguous planes,
e.g. a channel slice of a concat buffer; for the Triton eval epilogue any strides; the module
copies into any other `out`, `check_out`). They mutate
`out`, so they have no autograd formula; `train_transition_recorded` gives the training one its
gradient. The modules call `train_transition`, `train_transition_recorded` and `eval_transition`,
which in eager mode run the ops' implementations without the dispatcher's cost (ops/dispatch.py).

Module: csp_kernels.nn.ConvBNAct (nn/transition.py); reference: csp_kernels.reference.ConvBNAct;
autograd: `register_autograd` and `_Train` below; synchronized BatchNorm:
ops/sync_batch_norm.py; tests: tests/test_conv_bn_act.py.
"""
from __future__ import annotations

import torch

from .. import checks
from . import dispatch, recompute, routing
from .batch_norm_act import (batch_scale_shift, bn_act_backward, channel_stats, overlaps_itself, per_channel,
                             plane_contiguous, planes_contiguous, refuse_double_backward, scale_shift_act,
                             shares_memory, stats_dtype)
from .conv import conv, conv_backward, conv_output_shape, conv_over_batch, folds_into_weight, run_conv
from .conv1x1 import check_triton_dtype, conv1x1_bn_act_backward, conv1x1_fused
from .conv3x3 import conv3x3_winograd, winograd_weight
from .inductor_fallbacks import keep_fused_in_inductor
from .stats_update import update_before_saving

# oneDNN post-ops (attrs) of torch.ops.mkldnn._convolution_pointwise. Not mish (oneDNN has none)
# and not relu: oneDNN's relu (and its leaky_relu with slope 0, +-0.0) turns a NaN into 0 where
# torch keeps it; those take the bias + act pass instead.
_ONEDNN_POST_OPS = {"identity": "none", "leaky_relu": "leaky_relu", "silu": "swish", "hardswish": "hardswish"}


def _onednn_post_op(act: str) -> tuple[str, list] | None:
    """(attr, scalars) of activation `act` as a oneDNN post-op, or None where it has none."""
    name, slope = checks.parse_activation(act)
    attr = _ONEDNN_POST_OPS.get(name)
    if attr is None or (name == "leaky_relu" and slope == 0):
        return None
    return attr, [slope] if name == "leaky_relu" else []

def check_out(out, shape, dtype: torch.dtype, device: torch.device, any_strides: bool, x: torch.Tensor,
              recording: bool) -> bool:
    """Raise, as ATen's out= does, unless `out` is a (shape, dtype) tensor on `device` with no
    two elements in one place and, while autograd records (`recording`), no memory shared with
    `x`, which the backward reads. Returns whether the caller computes into a new tensor and
    copies it into `out`: where `out` overlaps x (the kernels would read what they overwrite), or
    has no contiguous (height, width) planes for kernels that write whole planes (unless
    `any_strides`: the Triton GEMM's eval epilogue, the reference's copy). Under torch.compile
    the overlap with `x` is not checked (storage pointers do not trace)."""
    checks.check_out_tensor(out, shape, dtype, device)
    if overlaps_itself(out):
        raise ValueError("out must not have two elements in one place (as an expand() has); got strides "
                         f"{out.stride()}")
    if torch.compiler.is_compiling() or not shares_memory(out, x):
        # (not written=True, which would test the overlap again)
        return not any_strides and not planes_contiguous(out)
    if recording:
        raise ValueError("out must not overlap x while autograd records (the backward reads x); write into "
                         "another buffer, or run under torch.no_grad()")
    return True


def _triton_conv1x1(x, weight, stride, **kwargs):
    from ..triton.conv1x1 import conv1x1  # Triton is imported only when it runs
    check_triton_dtype(x)
    return conv1x1(x[:, :, ::stride[0], ::stride[1]], weight.flatten(1), **kwargs)


def _batch_stats_conv(x, weight, stride, padding, dilation, groups, kernel: str):
    """z = conv(x, weight) by `kernel` (`routing.train_conv_kernel`'s) and z's per-channel
    batch mean and biased variance."""
    if kernel == "triton":
        return _triton_conv1x1(x, weight, stride, stats=True)
    if kernel == "gemm":
        return conv1x1_fused(x, weight, stats=True)  # the statistics from the GEMM's epilogue
    z = run_conv(kernel, x, weight, stride, padding, dilation, groups)
    return (z, *channel_stats(z))


def _train_forward(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine, out,
                   kernel: str = ""):
    kernel = kernel or routing.train_conv_kernel(x, weight, stride, padding, dilation, groups, engine)
    z, mean, var = _batch_stats_conv(x, weight, stride, padding, dilation, groups, kernel)
    if z.numel() <= z.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.shape}")
    y = scale_shift_act(z, *batch_scale_shift(mean, var, bn_weight, bn_bias, eps), act, out=out)
    return y, z, mean, var


@torch.library.custom_op("csp_kernels::conv_bn_act_train", mutates_args=())
def conv_bn_act_train(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                      stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float,
                      act: str, engine: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training act(BatchNorm2d(conv2d(x, weight))) with batch statistics.

    x: (batch, in_channels, height, width); weight: (out_channels, in_channels / groups, kh, kw)
    bn_weight, bn_bias: (out_channels,). Returns (y, z, mean, var): y the output, z the conv
    output (returned so autograd can save it), mean and biased var of z per channel.
    """
    return _train_forward(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine, None)


@torch.library.custom_op("csp_kernels::conv_bn_act_train_out", mutates_args=("out",))
def conv_bn_act_train_out(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                          stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float,
                          act: str, engine: str, out: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`conv_bn_act_train` writing y into `out`; returns (z, mean, var)."""
    _, z, mean, var = _train_forward(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act,
                                     engine, out)
    return z, mean, var


def _train_fakes(x, weight, stride, padding, dilation):
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    stats = x.new_empty(shape[1], dtype=stats_dtype(x.dtype))
    return torch.empty(shape, dtype=x.dtype, device=x.device), stats, torch.empty_like(stats)


@conv_bn_act_train.register_fake
@keep_fused_in_inductor
def _(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine):
    z, mean, var = _train_fakes(x, weight, stride, padding, dilation)
    return torch.empty_like(z), z, mean, var


@conv_bn_act_train_out.register_fake
def _(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine, out):
    return _train_fakes(x, weight, stride, padding, dilation)


def _save_for_backward(ctx, x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, z, mean, var,
                       kernel: str, recomputed: recompute.ConvOutput | None = None):
    """Saves what `_train_backward` reads: z, or with `recomputed` None in its place, and how
    the backward runs, from the forward's conv `kernel` (`routing.backward_runs_as_gemm`)."""
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.gemm_backward = routing.backward_runs_as_gemm(kernel, x, weight, stride, padding, groups)
    ctx.act = act
    ctx.recomputed = recomputed
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, None if recomputed else z, mean, torch.rsqrt(var + eps))


def _train_backward(ctx, grad_y, needs_x: bool, needs_weight: bool):
    """(grad_x, grad_weight, grad_bn_weight, grad_bn_bias) of the training forward."""
    x, weight, bn_weight, bn_bias, z, mean, invstd = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    if z is None:
        z = ctx.recomputed.compute()
        ctx.recomputed.release()
    bn_params = (mean, invstd, per_channel(bn_weight, mean.dtype), per_channel(bn_bias, mean.dtype), ctx.act)
    if ctx.gemm_backward:
        grad_x, grad_weight, grad_bn_weight, grad_bn_bias = conv1x1_bn_act_backward(
            grad_y, z, *bn_params, x, weight, needs_x, needs_weight)
    else:
        grad_z, grad_bn_weight, grad_bn_bias = bn_act_backward(grad_y, z, *bn_params)
        grad_x, grad_weight = conv_backward(grad_z, x, weight, stride, padding, dilation, groups, needs_x,
                                             needs_weight)
    return grad_x, grad_weight, grad_bn_weight.to(bn_weight.dtype), grad_bn_bias.to(bn_bias.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine = inputs
    _, z, mean, var = output
    # Without these, autograd would fill a zero gradient the size of z for every backward.
    ctx.mark_non_differentiable(z, mean, var)
    ctx.set_materialize_grads(False)
    kernel = routing.train_conv_kernel(x, weight, stride, padding, dilation, groups, engine)
    _save_for_backward(ctx, x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, z, mean, var,
                       kernel)


def _backward(ctx, grad_y, _grad_z, _grad_mean, _grad_var):
    refuse_double_backward("csp_kernels::conv_bn_act_train (a training csp_kernels.ConvBNAct)")
    if grad_y is None:
        return (None,) * 11
    grads = _train_backward(ctx, grad_y, *ctx.needs_input_grad[:2])
    return (*grads, None, None, None, None, None, None, None)


conv_bn_act_train.register_autograd(_backward, setup_context=_setup_context)


def train_transition(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine,
                     out=None, kernel: str = ""):
    """The training transition as the modules call it outside a graph: (y, z, mean, var), y
    written into `out` when given, without autograd; the custom op where `dispatch.through_op`
    says, else its implementation, which runs `kernel` when the caller has asked
    `routing.train_conv_kernel` for these arguments already (the op asks it itself)."""
    args = (x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine)
    if not dispatch.through_op(x, weight, bn_weight, bn_bias, out):
        return _train_forward(*args, out, kernel)
    if out is None:
        return conv_bn_act_train(*args)
    return (out, *conv_bn_act_train_out(*args, out))


class _Train(torch.autograd.Function):
    """`train_transition` with autograd, in eager mode: one Function instead of the custom op's
    registered formula (which costs more per call than a small convolution). With `out`, `out`
    is marked dirty, so a buffer that `out` is a view of carries y's gradient back here
    (autograd's CopySlices), with no copy of y. Autograd's rules for a Function that writes into
    a view: the view is its first input (CopySlices rewires input 0) and its only output, so z
    (or what recomputes it) and the batch statistics come back through the list `side_outputs`:
    tensors made with autograd off, which nothing differentiates."""

    @staticmethod
    def forward(ctx, out, x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine,
                side_outputs):
        conv_args = (stride, padding, dilation, groups)
        kernel = routing.train_conv_kernel(x, weight, *conv_args, engine)
        y, z, mean, var = train_transition(x, weight, bn_weight, bn_bias, *conv_args, eps, act, engine, out, kernel)
        x_recipe = recompute.rebuilt_recipe(x)
        z_kernel = routing.recomputed_conv_kernel(x, weight, z, groups, kernel, x_recipe is not None)
        recomputed = None if z_kernel is None else recompute.ConvOutput(x, weight, conv_args, z_kernel, x_recipe)
        side_outputs.extend((recomputed or z, mean, var))
        update_before_saving(mean, var, y.numel() // y.shape[1])
        if out is not None:
            ctx.mark_dirty(out)
        ctx.set_materialize_grads(False)
        _save_for_backward(ctx, x, weight, bn_weight, bn_bias, *conv_args, eps, act, z, mean, var, kernel, recomputed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward("csp_kernels::conv_bn_act_train (a training csp_kernels.ConvBNAct)")
        if grad_y is None:
            return (None,) * 13
        grads = _train_backward(ctx, grad_y, *ctx.needs_input_grad[1:3])
        # The old contents of `out` were overwritten: their gradient is zero, and must be a
        # tensor. Autograd's CopySlices, which routes the buffer's gradient through here,
        # drops the whole buffer's gradient (an earlier writer's included) for a None.
        overwritten = grad_y.new_zeros(()).expand_as(grad_y) if ctx.needs_input_grad[0] else None
        return (overwritten, *grads, None, None, None, None, None, None, None, None)


def train_transition_recorded(x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine,
                              out=None):
    """`train_transition` with autograd (eager mode; under a trace, `conv_bn_act_train`'s
    registered formula): (y, z, mean, var), z the conv output its backward saves, or the
    `recompute.ConvOutput` it recomputes it from (`routing.recomputed_conv_kernel`)."""
    side_outputs = []
    y = _Train.apply(out, x, weight, bn_weight, bn_bias, stride, padding, dilation, groups, eps, act, engine,
                     side_outputs)
    return (y, *side_outputs)


def eval_weight_kind(dtype: torch.dtype, kernel: str) -> str:
    """How an eval transition takes its weight for data of `dtype` whose conv runs by `kernel`
    (`routing.eval_conv_kernel`): "scaled" (the conv's own weight, BN's scale applied to the
    conv's output: float16/bfloat16 (`folds_into_weight`), and ATen's conv, which is followed by
    the bias + act pass anyway, so the scale costs nothing and no weight is copied, cached or
    compared per call), else BN folded into a weight that `prepare_eval_weight` prepares once:
    "onednn" (prepacked), "winograd" (with its transform) or "folded" (as it is). A cache of
    prepared weights must be keyed on it: the same module meets NCHW and channels_last inputs."""
    if not folds_into_weight(dtype) or kernel == "aten":
        return "scaled"
    return kernel if kernel in ("onednn", "winograd") else "folded"


def prepare_eval_weight(x, weight, stride, padding, dilation, groups, kind: str):
    """(weight, transform) that `conv_bias_act` runs fastest with for inputs like `x`, given
    their `eval_weight_kind`: oneDNN's blocked layout where oneDNN runs the conv (saves a weight
    reorder per call); the Winograd transform where Winograd does (a cache spares its cost per
    call); else the weight as it is."""
    if kind == "onednn":
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), padding, stride, dilation, groups,
                                                         list(x.shape)), None
    return weight, winograd_weight(weight) if kind == "winograd" else None


def _eval_forward(x, weight, bias, stride, padding, dilation, groups, act, engine, out, transform=None, scale=None,
                  kernel: str = ""):
    if scale is not None:  # BN not folded (eval_weight_kind "scaled")
        if routing.scaled_eval_conv_kernel(engine) == "triton":
            z = _triton_conv1x1(x, weight, stride)
        else:
            z = run_conv("aten", x, weight, stride, padding, dilation, groups)
        return scale_shift_act(z, scale, bias, act, out=z if out is None else out)
    kernel = kernel or routing.eval_conv_kernel(x, weight, stride, padding, dilation, groups, engine)
    if kernel == "triton":
        return _triton_conv1x1(x, weight, stride, bias=bias, act=act, out=out)
    if kernel == "gemm":
        return conv1x1_fused(x, weight, bias=bias, act=act, out=out)
    if kernel == "gemm over the batch":
        return conv_over_batch(x, weight, bias, stride, padding, dilation, act, out)
    if kernel == "onednn":
        post_op = _onednn_post_op(act)
        attr, scalars = post_op or ("none", [])
        z = torch.ops.mkldnn._convolution_pointwise(x, weight, bias if post_op else None, padding, stride,
                                                    dilation, groups, attr, scalars, None)
        if post_op:
            # oneDNN hands back its channels_last output; the op's result is NCHW, as its fake
            # kernel says and as every other engine writes it: one copy, into `out` if given.
            return z.contiguous() if out is None else out.copy_(z)
        z = plane_contiguous(z)
    elif kernel == "winograd":
        z = conv3x3_winograd(x, weight, transform)
    else:
        z = conv(x, weight, stride, padding, dilation, groups, training=False)
    # The bias rides in the activation pass: y = act(z * 1 + bias), in place unless `out`.
    return scale_shift_act(z, torch.ones_like(bias), bias, act, out=z if out is None else out)


def eval_transition(x, weight, bias, stride, padding, dilation, groups, act, engine, out=None, transform=None,
                    scale=None, kernel: str = "") -> torch.Tensor:
    """The eval transition as the modules call it: `conv_bias_act`, or `conv_bias_act_out` into
    `out` when given (returned), the custom op where `dispatch.through_op` says, else its
    implementation, which runs `kernel` when the caller has asked `routing.eval_conv_kernel`
    for these arguments already (the op asks it itself)."""
    if not dispatch.through_op(x, weight, out):
        return _eval_forward(x, weight, bias, stride, padding, dilation, groups, act, engine, out, transform, scale,
                             kernel)
    if out is None:
        return conv_bias_act(x, weight, bias, stride, padding, dilation, groups, act, engine, transform, scale)
    conv_bias_act_out(x, weight, bias, stride, padding, dilation, groups, act, engine, out, transform, scale)
    return out


@torch.library.custom_op("csp_kernels::conv_bias_act", mutates_args=())
def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, act: str, engine: str,
                  transform: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv2d(x, weight) + bias): the eval transition with BatchNorm folded in.

    x: (batch, in_channels, height, width); weight: (out_channels, in_channels / groups, kh, kw),
    x's dtype (or, on CPU float32, a oneDNN-prepacked weight); bias: (out_channels,), float32
    (float64 for float64 data); transform: None, or the Winograd transform of
    `prepare_eval_weight`;
    scale: None, or (out_channels,) float32, BN's scale for an unfolded weight: act(conv2d(x,
    weight) * scale + bias) (`folds_into_weight`).
    """
    return _eval_forward(x, weight, bias, stride, padding, dilation, groups, act, engine, None, transform, scale)


@torch.library.custom_op("csp_kernels::conv_bias_act_out", mutates_args=("out",))
def conv_bias_act_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, act: str, engine: str,
                      out: torch.Tensor, transform: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None) -> None:
    """`conv_bias_act` writing into `out`."""
    _eval_forward(x, weight, bias, stride, padding, dilation, groups, act, engine, out, transform, scale)


@conv_bias_act.register_fake
@keep_fused_in_inductor
def _(x, weight, bias, stride, padding, dilation, groups, act, engine, transform=None, scale=None):
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device)


@conv_bias_act_out.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, act, engine, out, transform=None, scale=None):
    return None
