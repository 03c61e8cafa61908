"""The fake (meta) kernels of every C++ op, in csrc/ops.cpp's order, so that a schema there and
its output shapes here read side by side (the kernels: csrc/cpu/*.cpp, csrc/cuda/*.cu; the Python
wrappers: the ops module named in each section). torch.compile and torch.export run these on
fake tensors. The `csp_kernels.ops` package imports this module, so every op module sees them
registered. The Python custom ops (`@torch.library.custom_op`) keep their fake kernel next to
their body, as torch.library's decorator wants.
"""
from __future__ import annotations

import torch

from .. import extension
from .batch_norm_act import stats_dtype
from .inductor_fallbacks import keep_fused_in_inductor

if extension._C is not None:
    # -- BatchNorm + activation family (ops/batch_norm_act.py) ------------------------------------
    @torch.library.register_fake("csp_kernels::channel_stats")
    @keep_fused_in_inductor
    def _(x):
        c = x.shape[1]
        return x.new_empty(c, dtype=stats_dtype(x.dtype)), x.new_empty(c, dtype=stats_dtype(x.dtype))

    @torch.library.register_fake("csp_kernels::scale_shift_act")
    @keep_fused_in_inductor
    def _(x, scale, shift, act):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake("csp_kernels::scale_shift_act_out")
    def _(x, scale, shift, act, out):
        return None

    @torch.library.register_fake("csp_kernels::bn_act_backward_reduce")
    def _(grad_y, z, mean, invstd, weight, bias, act):
        return torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("csp_kernels::bn_act_backward_apply")
    def _(grad_y, z, mean, invstd, weight, bias, sum_dpre, sum_dpre_xhat, act):
        return torch.empty(z.shape, dtype=z.dtype, device=z.device)

    @torch.library.register_fake("csp_kernels::bn_scale_shift")
    def _(mean, var, weight, bias, eps):
        return torch.empty_like(mean, memory_format=torch.contiguous_format), torch.empty_like(
            mean, memory_format=torch.contiguous_format)

    @torch.library.register_fake("csp_kernels::bn_track_running_stats_")
    def _(num_batches_tracked, running_mean, running_var, mean, var, unbias, momentum):
        return None

    # -- convolutions (ops/conv3x3.py, ops/conv1x1.py) --------------------------------------------
    @torch.library.register_fake("csp_kernels::winograd_weight")
    def _(weight):
        return weight.new_empty(16, weight.shape[0], weight.shape[1])

    @torch.library.register_fake("csp_kernels::conv3x3_winograd_out")
    def _(x, weight, out, conv_weight=None):
        return None

    @torch.library.register_fake("csp_kernels::conv3x3_winograd_weight_grad")
    def _(x, grad_y):
        return x.new_empty(grad_y.shape[1], x.shape[1], 3, 3)

    @torch.library.register_fake("csp_kernels::conv1x1_fused_out")
    def _(x, weight, in_scale, in_shift, in_act, bias, act, stats, out):
        channels = out.shape[1] if stats else 0
        sdtype = stats_dtype(x.dtype)
        return x.new_empty(channels, dtype=sdtype), x.new_empty(channels, dtype=sdtype)

    @torch.library.register_fake("csp_kernels::conv1x1_bn_act_backward")
    def _(grad_y, z, mean, invstd, weight_bn, bias_bn, sum_dpre, sum_dpre_xhat, act, x, weight, input_grad,
          weight_grad):
        grad_x = torch.empty_like(x) if input_grad else x.new_empty(0)
        return grad_x, x.new_empty(weight.shape if weight_grad else (0, *weight.shape[1:]))

    # -- dense-block family (ops/dense.py) --------------------------------------------------------
    @torch.library.register_fake("csp_kernels::bn_act_backward_accumulate")
    def _(grad_a, x, mean, invstd, weight, bias, act, grad_acc):
        return torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("csp_kernels::dense_conv1_backward")
    def _(grad_b, z, mean2, invstd2, weight2, bias2, sum_dpre2, sum_dpre_xhat2, x, mean1, invstd1, weight1, bias1,
          act, weight, grad_acc):
        return weight.new_empty(weight.shape), torch.empty_like(mean1), torch.empty_like(mean1)

    @torch.library.register_fake("csp_kernels::bn_grad_correct")
    def _(grad_acc, x, mean, invstd, sum_grad, sum_grad_xhat, grad_x):
        return None

    # -- Maxout pyramid family (ops/maxout.py) ----------------------------------------------------
    @torch.library.register_fake("csp_kernels::maxout_pyramid_forward")
    @keep_fused_in_inductor
    def _(features, out_h, out_w, out_channels, interleaved):
        first = features[0]
        return first.new_empty((first.shape[0], out_channels, out_h, out_w))

    @torch.library.register_fake("csp_kernels::maxout_pyramid_backward")
    def _(grad_out, features, out_channels, interleaved):
        return [torch.empty(f.shape, dtype=f.dtype, device=f.device) for f in features]
