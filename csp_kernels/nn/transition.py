"""Fused ConvBNAct: the CSP transition, conv -> BatchNorm -> activation, in as few passes as
possible, with an `out=` that writes into a caller's buffer.

Reference: csp_kernels.reference.ConvBNAct (reference/blocks.py), which this subclasses; ops and
autograd: ops/transition.py (its docstring names the kernels; which one runs: ops/routing.py);
synchronized BatchNorm: ops/sync_batch_norm.py; tests: tests/test_conv_bn_act.py."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import backend, checks, reference
from ..ops import conv as conv_ops
from ..ops import recompute, routing, stats_update
from ..ops import transition as ops
from ..ops.batch_norm_act import (as_channels_last_if, suggests_channels_last,
                                  track_running_stats, update_running_stats)
from ..ops.fold_cache import fold_cache_hit, snapshot
from ..ops.sync_batch_norm import conv_bn_act_train_sync, sync_group


class ConvBNAct(reference.ConvBNAct):
    """Drop-in for `reference.ConvBNAct`: same arguments, same state_dict (timm's ConvNormAct,
    ultralytics' Conv keys), same outputs, gradients and running-statistics updates.

    forward(x, out=None)
      x: (batch, in_channels, height, width) -> (batch, out_channels, height', width'), in
      the memory format F.conv2d gives (channels_last for a channels_last x or conv weight:
      the kernels compute NCHW, and a copy converts).
      out: optional tensor of that shape and of the computed dtype (x's, or autocast's), any
      strides without two elements in one place — typically a channel slice `buf[:, a:b]` of
      a bigger NCHW buffer. The result is written there and `out` is returned: where its
      (height, width) planes are contiguous, with no copy in training (gradients reach it
      through the buffer, as for any in-place write into a view) and in eval under no_grad;
      into any other `out` (channels_last, say) by a copy.

    Training (`bn.training`, which may differ from the module's own mode, as for a frozen
    BatchNorm in a training model): one custom op (batch statistics fused with the conv's
    output pass where the backend can), saving only x, the weight and the conv output for
    backward. With an nn.SyncBatchNorm `bn` and an initialized process group of more than one
    process (`bn.process_group`, else WORLD), on any device (CPU with gloo too), the batch
    statistics and BN's backward sums are synchronized as nn.SyncBatchNorm's are, with one
    all_reduce in forward and one in backward (ops/sync_batch_norm.py). On CPU maps of at most
    `ops.routing.SMALL_TRAINING_MAP_PIXELS` pixels a plain BatchNorm trains as the reference does,
    plain PyTorch being faster there (`ops.routing.training_eager_is_faster`).
    Eval: BatchNorm as a per-channel scale and shift of the conv's output, applied with the
    activation in one pass over it; where a fused kernel computes conv, BN and activation at once
    (the 1x1 GEMM's epilogue, oneDNN's post-op, Winograd with a cached weight transform), BN is
    folded into the conv's weight instead. What is derived from the parameters is cached until
    bn.eps or the value of any parameter or running statistic it was computed from changes
    (compared with a copy at each call). Eval with
    gradients (parameters or x requiring grad while grad mode is on) runs the reference's conv,
    BatchNorm and activation.

    The activation computed is the `act` submodule's at each call (replace it and the kernels
    follow): nn.ReLU, nn.LeakyReLU (any slope), nn.SiLU, nn.Mish, nn.Hardswish, nn.Identity.
    Configurations the fused kernels do not cover (another `act`, a non-"zeros" padding_mode,
    string padding, BatchNorm without affine parameters or running statistics, a conv bias,
    conv or bn replaced by another module type, hooks on conv, bn or act, forward or backward,
    or global module hooks) run the reference,
    with a `ReferenceFallbackWarning` naming the reason.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, groups: int = 1, act: str = "relu",
                 negative_slope: float = checks.LEAKY_RELU_SLOPE, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act, negative_slope,
                         dilation)
        self._folded = None  # (key, snapshot, weight, bias, transform, scale) of the eval fold; see _folded_params
        self._eval_kernel = None  # (arguments, kernel) of the last eval call's routing; see _eval_conv_kernel

    def __getstate__(self):
        # The eval caches are derived data, measured on this machine, and a oneDNN-prepacked
        # weight cannot be pickled.
        return {**self.__dict__, "_folded": None, "_eval_kernel": None}

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        checks.check_module_input(x, self)
        if (dtype := checks.autocast_dtype(x)) != x.dtype:
            x = x.to(dtype)
        name = backend.resolve_backend(x.device)
        # From the dict, not self.conv and so on: nn.Module.__getattr__ costs ~1 us a lookup.
        modules = self._modules
        conv, bn = modules["conv"], modules["bn"]
        # Plain PyTorch where it runs faster (small CPU maps in training), asked first: the
        # reference computes whatever the module holds, so the checks below would only cost time.
        # (Not with a SyncBatchNorm: torch's refuses CPU tensors in training, even alone in its group.)
        # So does a training call with one value per channel: the BatchNorm's own error (a
        # SyncBatchNorm's too), after its bookkeeping (num_batches_tracked counts the call).
        plain = name == "reference" or (bn.training and (
            (type(bn) is nn.BatchNorm2d and name == "cpu" and routing.training_eager_is_faster(x))
            or one_value_per_channel(x, conv)))
        # The kernels' name for what `self.act` computes now, and why not if they cannot.
        act_name, act_reason = ("", "") if plain else checks.kernel_activation(
            modules["act"] if "act" in modules else getattr(self, "act", None))
        # What the fused kernels do not model here, or "" when they cover the module.
        unfusable = "" if plain else (backend.mode_reason() or conv_reason(conv, "conv")
                                      or batch_norm_reason(bn, "bn") or act_reason)
        # An empty x has nothing to compute: the reference gives nn.BatchNorm2d's bookkeeping for it,
        # unless the BatchNorm is synchronized (the fused op joins the group's collectives).
        fused = not plain and not unfusable and (x.numel() > 0 or sync_group(bn) is not None)
        if fused:
            checks.check_batch_norm_eps(bn.eps, bn.training)
            checks.check_batch_norm_dtypes(x.dtype, bn)
        engine = routing.transition_engine(name, conv.kernel_size, conv.padding, conv.groups) if fused else "aten"
        if out is not None and isinstance(conv, nn.Conv2d) and geometry_in_pairs(conv):  # else the reference's copy_
            shape = conv_ops.conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
            if ops.check_out(out, shape, x.dtype, x.device,
                             any_strides=routing.out_takes_any_strides(fused, engine, bn.training), x=x,
                             recording=torch.is_grad_enabled() and self._needs_grad(x, out)):
                # out overlaps x, which the kernels read while writing out, or has planes they cannot write
                return out.copy_(self.forward(x))
        if not fused:
            if unfusable:
                backend.warn_reference_fallback(self, unfusable)
            y = super().forward(x)
            return y if out is None else out.copy_(y)
        if bn.training:
            y = self._forward_train(x, out, act_name, engine)
        else:
            y = self._forward_eval(x, out, act_name, engine, conv, bn)
        if out is not None:
            return y
        # The kernels write NCHW; F.conv2d answers channels_last for a channels_last x or weight.
        return as_channels_last_if(y, suggests_channels_last(x) or suggests_channels_last(conv._parameters["weight"]))

    def _conv_args(self) -> tuple:
        return conv_args(self.conv)

    def _forward_train(self, x: torch.Tensor, out: torch.Tensor | None, act_name: str, engine: str) -> torch.Tensor:
        bn = self.bn
        args = (x, self.conv.weight.to(x.dtype), bn.weight, bn.bias, *self._conv_args(), bn.eps, act_name, engine)
        recording = torch.is_grad_enabled() and self._needs_grad(x, out)
        # Where autograd records, the op's node updates bn's running statistics before it saves
        # anything, as nn.BatchNorm2d does (ops/stats_update.py); else the update follows the op.
        update = functools.partial(track_batch_stats, bn)
        if (group := sync_group(bn)) is not None:
            with recompute.saving_recipes(), stats_update.before_saving(update) as pending:
                y, mean, var, count = conv_bn_act_train_sync(*args, group, out)
            if not pending.done:
                update(mean, var, count)
            return y
        if recording and torch.compiler.is_compiling():
            # The op's registered autograd formula; AOTAutograd's trace of an autograd.Function
            # writing into a view trips an internal autograd assert (torch 2.14), so a compiled
            # graph writes y and copies it into `out`.
            y, _, mean, var = ops.conv_bn_act_train(*args)
            if out is not None:
                y = out.copy_(y)
        elif recording:
            with recompute.saving_recipes(), stats_update.before_saving(update) as pending:
                y, z, mean, var = ops.train_transition_recorded(*args, out)
            # y is rebuilt from z, the conv output the op saves, where a later op saves y (ops/recompute.py)
            recompute.tag(y, recompute.activation(z, mean, var, bn.weight, bn.bias, y.shape, bn.eps, act_name))
            if pending.done:
                return y
        else:
            y, _, mean, var = ops.train_transition(*args, out)
        update(mean, var, y.numel() // y.shape[1])
        return y

    def _needs_grad(self, x: torch.Tensor, out: torch.Tensor | None = None) -> bool:
        """Whether autograd must record this call (in grad mode): x, a parameter, or the `out`
        it overwrites requires grad."""
        return x.requires_grad or (isinstance(out, torch.Tensor) and out.requires_grad) or any(
            p.requires_grad for p in self.parameters())

    def _forward_eval(self, x: torch.Tensor, out: torch.Tensor | None, act_name: str, engine: str, conv: nn.Conv2d,
                      bn: nn.BatchNorm2d) -> torch.Tensor:
        args = conv_args(conv)
        if torch.is_grad_enabled() and self._needs_grad(x, out):
            # The reference's conv, BN and act: through a weight with BN folded in, BN's
            # parameter gradients would come from the (rounded) weight gradient.
            y = reference.ConvBNAct.forward(self, x)
            return y if out is None else out.copy_(y)
        if torch.compiler.is_compiling():
            # Traced into the graph: a compiled graph takes the parameters as inputs and folds at
            # each call, and the op routes at each call.
            weight, bias, scale = self._eval_fold(x.dtype, folded=conv_ops.folds_into_weight(x.dtype))
            return ops.eval_transition(x, weight, bias, *args, act_name, engine, out, None, scale)
        conv_weight = conv._parameters["weight"]
        kernel = self._eval_conv_kernel(x, conv_weight, args, engine)
        weight, bias, transform, scale = self._folded_params(x, conv_weight, bn, args, engine, kernel)
        return ops.eval_transition(x, weight, bias, *args, act_name, engine, out, transform, scale, kernel)

    def _eval_conv_kernel(self, x: torch.Tensor, weight: torch.Tensor, args: tuple, engine: str) -> str:
        """`routing.eval_conv_kernel` for x and the conv's `weight` and `args`, asked again only
        when what it reads changes: x's shape, strides, dtype and device, the weight's shape, the
        conv's geometry, the engine. (Its answer for given arguments is fixed in a process:
        measured once per shape.)"""
        arguments = (x.shape, x.stride(), x.dtype, x.device, weight.shape, args, engine)
        memo = self._eval_kernel  # read once: another thread may replace it meanwhile
        if memo is None or memo[0] != arguments:
            memo = arguments, routing.eval_conv_kernel(x, weight, *args, engine)
            self._eval_kernel = memo
        return memo[1]

    def _eval_fold(self, dtype: torch.dtype, folded: bool):
        """(weight in `dtype`, bias, scale) for `ops.conv_bias_act` (`conv_ops.eval_fold`): with
        `folded` and a finite fold, BN folded into the weight and scale None, else the weight as it
        is and BN's scale (float32 for 16-bit data) for the conv's output (ops.eval_weight_kind
        "scaled")."""
        bn = self.bn
        return conv_ops.eval_fold(self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, dtype,
                                  folded)

    def _folded_params(self, x: torch.Tensor, conv_weight: torch.Tensor, bn: nn.BatchNorm2d, args: tuple,
                       engine: str, kernel: str):
        """The cached eval fold for x's dtype and the conv's `kernel`: (weight, bias, Winograd
        transform or None, scale or None; see `_eval_fold`), prepared for that kernel
        (ops.prepare_eval_weight, for the shape of the x that filled the cache). A weight taken
        as it is ("scaled" in x's dtype) is the parameter itself, neither copied nor compared."""
        kind = ops.eval_weight_kind(x.dtype, kernel)
        live_weight = kind == "scaled" and conv_weight.dtype == x.dtype
        # From the dicts, not bn.weight and so on: nn.Module.__getattr__ costs ~0.5 us a lookup.
        params, buffers = bn._parameters, bn._buffers
        sources = (params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"]) + (
            () if live_weight else (conv_weight,))
        key = (bn.eps, x.dtype, x.device, engine, kind)
        cache = self._folded  # read once: another thread may replace it meanwhile
        if not fold_cache_hit(cache, key, sources):
            with torch.no_grad():
                weight, bias, scale = self._eval_fold(x.dtype, folded=kind != "scaled")
                # (a scale: BN not folded, by `kind` or because its fold was not finite)
                weight, transform = ops.prepare_eval_weight(x, weight, *args, kind) if scale is None else (weight, None)
            cache = (key, snapshot(sources), None if live_weight else weight, bias, transform, scale)
            self._folded = cache
        weight, bias, transform, scale = cache[2:]
        return conv_weight.detach() if live_weight else weight, bias, transform, scale


def conv_args(conv: nn.Conv2d) -> tuple:
    """(stride, padding, dilation, groups) of `conv`, as the ops take them."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def track_batch_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int | torch.Tensor) -> None:
    """nn.BatchNorm2d's training-time bookkeeping from batch statistics the fused op computed
    (mean and biased var over `count` values per channel: an int, or a 0-d tensor for a count
    summed over a process group, which stays on the device)."""
    unbias = count / (count - 1)  # nn.BatchNorm2d's running variance is the unbiased one
    if bn.momentum is not None and not isinstance(count, torch.Tensor):  # the common case, in one op
        track_running_stats(bn.num_batches_tracked, bn.running_mean, bn.running_var, mean, var, unbias, bn.momentum)
        return
    bn.num_batches_tracked.add_(1)
    # momentum=None is nn.BatchNorm2d's cumulative average; a tensor keeps a compiled graph whole.
    momentum = bn.momentum if bn.momentum is not None else \
        bn.num_batches_tracked.to(bn.running_mean.dtype).reciprocal()
    if not isinstance(count, torch.Tensor):
        update_running_stats(bn.running_mean, bn.running_var, mean, var, unbias, momentum)
        return
    # A group whose every rank had an empty batch has no batch statistics (0 / 0): the running
    # ones stay, as nn.BatchNorm2d's do for an empty batch. Chosen on the device: reading the
    # count on the host would wait for the collective at every BatchNorm.
    kept = bn.running_mean.clone(), bn.running_var.clone()
    update_running_stats(bn.running_mean, bn.running_var, mean, var, unbias, momentum)
    some_values = count > 0
    bn.running_mean.copy_(torch.where(some_values, bn.running_mean, kept[0]))
    bn.running_var.copy_(torch.where(some_values, bn.running_var, kept[1]))


def conv_reason(conv: nn.Module, name: str, geometry: tuple | None = None) -> str:
    """Why the fused kernels cannot compute `conv` (called `name` in the message) as the module
    holds it now, or "": an nn.Conv2d without bias or forward hooks that pads with zeros by
    explicit amounts and, where the fused op fixes it, has `geometry` (kernel_size, stride,
    padding, dilation, groups), its weight a registered parameter; nothing that its own call
    would run (`checks.bypass_reason`)."""
    if type(conv) is not nn.Conv2d:  # a subclass may compute something else
        return f"{name} is {type(conv).__name__} (the fused kernels compute nn.Conv2d)"
    if not isinstance(conv._parameters.get("weight"), torch.Tensor):
        return f"{name}.weight is not a registered parameter (the fused kernels read the module's own)"
    if conv.bias is not None:
        return f"{name}.bias is set (the fused kernels' convolution has none)"
    if conv.padding_mode != "zeros":
        return f"{name}.padding_mode={conv.padding_mode!r} (the fused kernels pad with zeros)"
    if isinstance(conv.padding, str):
        return f"{name}.padding={conv.padding!r} (a string; the fused kernels take explicit padding)"
    if not geometry_in_pairs(conv):
        return (f"{name} has stride={conv.stride!r}, padding={conv.padding!r}, dilation={conv.dilation!r} (set "
                "after construction; the fused kernels read the (height, width) pairs nn.Conv2d holds)")
    if geometry is not None and (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != geometry:
        return (f"{name} is {conv!r} (the fused op computes kernel_size, stride, padding, dilation, groups = "
                f"{geometry})")
    return checks.bypass_reason(conv, name, "the fused kernels would skip it")


def geometry_in_pairs(conv: nn.Conv2d) -> bool:
    """Whether conv's stride, padding and dilation are (height, width) pairs, as nn.Conv2d makes
    them (a plain int set after construction, which F.conv2d accepts, is not; nor a string
    padding)."""
    return all(isinstance(v, (tuple, list)) and len(v) == 2 for v in (conv.stride, conv.padding, conv.dilation))


def one_value_per_channel(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether conv(x) has a single value per channel (batch 1, a 1x1 output map), which a
    training BatchNorm refuses."""
    if x.shape[0] != 1 or not isinstance(conv, nn.Conv2d) or not geometry_in_pairs(conv):
        return False  # more than one sample; or the reference computes it, or says why not
    batch, _, height, width = conv_ops.conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding,
                                                         conv.dilation)
    return batch * height * width == 1


def batch_norm_reason(bn: nn.Module, name: str) -> str:
    """Why the fused kernels cannot compute `bn` (called `name`) as the module holds it now, or
    "": an nn.BatchNorm2d or nn.SyncBatchNorm (every fused module synchronizes a training one in a
    process group of more than one process; in eval, or alone in its group, it computes as
    BatchNorm2d) with affine parameters, tracked running statistics and no hooks. Whether
    it normalizes by batch or running statistics is its own `training` flag, as in nn.BatchNorm2d."""
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"{name} is {type(bn).__name__} (the fused kernels compute nn.BatchNorm2d)"
    # From the dicts, not bn.weight and so on: nn.Module.__getattr__ costs ~0.5 us a lookup, and
    # this runs at every call.
    params, buffers = bn._parameters, bn._buffers
    if not bn.affine or params.get("weight") is None or params.get("bias") is None:
        return f"{name}.affine=False"
    if (not bn.track_running_stats or buffers.get("running_mean") is None or buffers.get("running_var") is None
            or buffers.get("num_batches_tracked") is None):
        return f"{name}.track_running_stats=False"
    return checks.bypass_reason(bn, name, "the fused kernels would skip it")
