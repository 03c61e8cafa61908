"""Fused ConvBNAct: the CSP transition, conv -> BatchNorm -> activation, in as few passes as
possible (ops/transition.py), with an `out=` that writes into a caller's buffer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend, checks, reference
from ..ops import transition as ops
from ..ops.batch_norm_act import update_running_stats


class ConvBNAct(reference.ConvBNAct):
    """Drop-in for `reference.ConvBNAct`: same arguments, same state_dict (timm's ConvNormAct,
    ultralytics' Conv keys), same outputs, gradients and running-statistics updates.

    forward(x, out=None)
      x: (batch, in_channels, height, width) -> (batch, out_channels, height', width').
      out: optional tensor of that shape and of the computed dtype (x's, or autocast's) whose
      (height, width) planes are contiguous — typically a channel slice `buf[:, a:b]` of a
      bigger NCHW buffer. The result is written there and `out` is returned: with no copy in
      training (gradients reach it through the buffer, as for any in-place write into a view)
      and in eval under no_grad.

    Training: one custom op (batch statistics fused with the conv's output pass where the
    backend can), saving only x, the weight and the conv output for backward. Eval: BatchNorm
    folded into the conv weight and bias, cached until any of conv.weight, bn.weight, bn.bias,
    bn.running_mean, bn.running_var changes (tensor version counter or storage), and the
    activation fused into the conv's output. Eval with gradients (parameters or x requiring
    grad while grad mode is on) folds through autograd instead of the cache.

    Configurations the fused kernels do not cover (a non-"zeros" padding_mode, string padding,
    BatchNorm without affine parameters or running statistics) run the reference, with a
    `ReferenceFallbackWarning` naming the reason.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, groups: int = 1, act: str = "relu"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        self.act_name = act
        self._folded = None  # (key, weight, bias, transform) of the eval fold; see _folded_params

    def __getstate__(self):
        # The eval cache is derived data, and a oneDNN-prepacked weight cannot be pickled.
        return {**self.__dict__, "_folded": None}

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        checks.check_module_input(x, self)
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        name = backend.resolve_backend(x.device)
        conv = self.conv
        unfusable = "" if name == "reference" else self._unfusable_reason()
        fused = name != "reference" and not unfusable
        engine = "triton" if fused and name == "triton" and ops.triton_eligible(
            conv.kernel_size, conv.padding, conv.groups) else "aten"
        if out is not None and not isinstance(conv.padding, str):  # else the reference's copy_ checks
            shape = ops.conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
            ops.check_out(out, shape, x.dtype, x.device,
                          any_strides=not fused or (engine == "triton" and not self.bn.training))
        if not fused:
            if unfusable:
                backend.warn_reference_fallback(self, unfusable)
            y = super().forward(x)
            return y if out is None else out.copy_(y)
        if self.bn.training:
            return self._forward_train(x, out, engine)
        return self._forward_eval(x, out, engine)

    def _unfusable_reason(self) -> str:
        """What the fused kernels do not model here, or "" when they cover the module."""
        conv, bn = self.conv, self.bn
        if tracing := backend.tracing_reason():
            return tracing
        if conv.padding_mode != "zeros":
            return f"conv.padding_mode={conv.padding_mode!r} (the fused kernels pad with zeros)"
        if isinstance(conv.padding, str):
            return f"conv.padding={conv.padding!r} (a string; the fused kernels take explicit padding)"
        if not bn.affine:
            return "bn.affine=False"
        if not bn.track_running_stats or bn.num_batches_tracked is None:
            return "bn.track_running_stats=False"
        return ""

    def _conv_args(self) -> tuple:
        conv = self.conv
        return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups

    def _forward_train(self, x: torch.Tensor, out: torch.Tensor | None, engine: str) -> torch.Tensor:
        bn = self.bn
        args = (x, self.conv.weight.to(x.dtype), bn.weight, bn.bias, *self._conv_args(), bn.eps, self.act_name,
                engine)
        if out is None:
            y, _, mean, var = ops.conv_bn_act_train(*args)
        elif torch.is_grad_enabled() and self._needs_grad(x) and torch.compiler.is_compiling():
            # AOTAutograd's trace of an autograd.Function writing into a view trips an internal
            # autograd assert (torch 2.14), so a compiled graph writes y and copies it.
            y, _, mean, var = ops.conv_bn_act_train(*args)
            y = out.copy_(y)
        elif torch.is_grad_enabled() and self._needs_grad(x):
            y, mean, var = ops.conv_bn_act_train_into(*args, out)
        else:
            _, mean, var = ops.conv_bn_act_train_out(*args, out)
            y = out
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            # momentum=None is nn.BatchNorm2d's cumulative average; a tensor keeps a compiled
            # graph whole.
            momentum = bn.momentum if bn.momentum is not None else \
                bn.num_batches_tracked.to(bn.running_mean.dtype).reciprocal()
            update_running_stats(bn.running_mean, bn.running_var, mean, var, y.numel() // y.shape[1], momentum)
        return y

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _forward_eval(self, x: torch.Tensor, out: torch.Tensor | None, engine: str) -> torch.Tensor:
        if torch.is_grad_enabled() and self._needs_grad(x):
            weight, bias = self._fold()
            y = self.act(F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), *self._conv_args()))
            return y if out is None else out.copy_(y)
        if torch.compiler.is_compiling():
            weight, bias = self._fold()  # traced into the graph, which folds it once
            weight, bias, transform = weight.to(x.dtype), bias.to(ops.stats_dtype(x.dtype)), None
        else:
            weight, bias, transform = self._folded_params(x, engine)
        args = (x, weight, bias, *self._conv_args(), self.act_name, engine)
        if out is None:
            return ops.conv_bias_act(*args, transform)
        ops.conv_bias_act_out(*args, out, transform)
        return out

    def _fold(self):
        bn = self.bn
        return ops.fold_batch_norm(self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)

    def _folded_params(self, x: torch.Tensor, engine: str):
        """The cached eval fold for x's dtype and `engine`: (weight, bias, Winograd transform or
        None), prepared for the kernel that will run inputs like x (ops.prepare_eval_weight, for
        the shape of the x that filled the cache)."""
        bn = self.bn
        sources = (self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        kind = ops.eval_weight_kind(x, self.conv.weight, *self._conv_args(), engine)
        key = (tuple((t._version, t.data_ptr()) for t in sources), bn.eps, x.dtype, x.device, engine, kind)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                weight, bias = self._fold()
                weight, transform = ops.prepare_eval_weight(x, weight.to(x.dtype), *self._conv_args(), engine, kind)
            self._folded = (key, weight, bias.to(ops.stats_dtype(x.dtype)), transform)
        return self._folded[1:]
