"""Fused PartialDenseBlock: the drop-in twin of `reference.PartialDenseBlock` (same __init__
signature, state_dict, forward, backward and running-statistics updates), computed by
`csp_kernels.ops.dense` (one concat buffer, statistics once per channel, a recomputing
backward; see that module's docstring).

Which path runs follows the BatchNorms' own `training` flags, as the reference's numbers do
(the block's mode matters only through them):
- all training: the `csp_kernels::partial_dense_block` op, then the running statistics of
  every BatchNorm updated from the statistics it returns, exactly as nn.BatchNorm2d would (also
  under torch.no_grad).
- all in eval, without autograd recording (torch.no_grad / inference_mode, or nothing requires
  grad): the folded inference forward (`ops.dense_eval`); the folded parameters are cached and
  refolded when eps or the value of any tensor the fold reads changes (compared with a copy
  at each call, so edits through `.data` count too).
- the reference math (`super().forward`) for the "reference" backend, on the CPU for maps
  of at most `ops.dense.SMALL_MAP_PIXELS` pixels (faster there: `ops.dense.eager_is_faster`), and, with a
  `ReferenceFallbackWarning` naming the reason, for what the fused op does not model: eval
  while autograd records (e.g. frozen BatchNorms under fine-tuning), some BatchNorms frozen
  and others training, BatchNorms that differ from the defaults the op assumes (affine,
  tracking running statistics, one shared eps, not a training SyncBatchNorm in a process group
  of more than one process: the op computes its statistics inside, unsynchronized; alone in its
  group a SyncBatchNorm is BatchNorm2d), and convolutions or BatchNorms replaced or changed (a
  bias, another geometry or padding_mode, another module type, forward hooks).
Input in any memory format (channels_last included) is copied once into the NCHW concat
buffer; outputs are NCHW-contiguous.

Under autocast (`torch.autocast(device_type, dtype)`) the fused block runs in the autocast dtype,
as autocast runs the reference's convolutions: x and the convolutions' weights cast to it at
entry (one rounding each), BatchNorm parameters and statistics in float32 (eval folds them as
for a float16/bfloat16 module, `ops.dense_eval`). It returns the dtype the reference returns
under autocast: the autocast dtype, except for fusion "last", whose concat of the untouched
part 1 with the transition's output promotes (float32 for a float32 x), part 1 passed through
exactly.
"""
from __future__ import annotations

import torch

from .. import backend, checks, reference
from ..ops import dense as dense_ops
from ..ops import dense_eval
from ..ops.fold_cache import fold_cache_hit, fold_key, snapshot
from .transition import batch_norm_reason, conv_reason, track_batch_stats

# (kernel_size, stride, padding, dilation, groups) the fused op computes each conv with.
_CONV1X1 = ((1, 1), (1, 1), (0, 0), (1, 1), 1)
_CONV3X3 = ((3, 3), (1, 1), (1, 1), (1, 1), 1)


class PartialDenseBlock(reference.PartialDenseBlock):
    __doc__ = reference.PartialDenseBlock.__doc__

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, part_ratio: float = 0.5,
                 bn_size: int = 4, fusion: str = "last", act: str = "relu", out_channels: int | None = None):
        super().__init__(in_channels, num_layers, growth_rate, part_ratio, bn_size, fusion, act, out_channels)
        self._eval_cache: tuple[tuple, tuple, dense_eval.EvalParams] | None = None  # (key, snapshot, params)

    @property
    def act_name(self) -> str:
        """The kernels' name for what the transitions' `act` modules compute now ("" if none)."""
        return checks.kernel_activation(*(t.act for t in self._transitions()))[0]

    def _act_reason(self) -> str:
        """Why the fused op cannot compute the activations the block holds now, or "": the
        transitions' `act` modules must compute one activation the kernels have, the dense
        layers' relu1 and relu2 ReLU (the op's DENSE_ACT)."""
        dense_act, reason = checks.kernel_activation(*(r for layer in self._layers() for r in (layer.relu1,
                                                                                                layer.relu2)))
        if not reason and dense_act != dense_ops.DENSE_ACT:
            reason = f"dense layers' activation {dense_act} (the fused op's are {dense_ops.DENSE_ACT})"
        return reason or checks.kernel_activation(*(t.act for t in self._transitions()))[1]

    # -- the module's parameters in the op's order ---------------------------------------------

    def _layers(self) -> list[reference.DenseLayer]:
        return list(self.dense.children())

    def _transitions(self) -> list[reference.ConvBNAct]:
        if self.fusion == "csp":
            return [self.transition1, self.transition2]
        return [self.transition]

    def _norms(self) -> list[torch.nn.BatchNorm2d]:
        return [bn for layer in self._layers() for bn in (layer.norm1, layer.norm2)] + [
            t.bn for t in self._transitions()]

    def dense_params(self) -> list[torch.Tensor]:
        """The dense layers' parameters in the order `ops.dense.partial_dense_block` takes them."""
        return [p for layer in self._layers() for p in (layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                                                        layer.norm2.weight, layer.norm2.bias, layer.conv2.weight)]

    def transition_params(self) -> list[torch.Tensor]:
        """The transitions' parameters in the order `ops.dense.partial_dense_block` takes them."""
        return [p for t in self._transitions() for p in (t.conv.weight, t.bn.weight, t.bn.bias)]

    def _module_reason(self) -> str:
        """Why the fused op cannot compute the convolutions and BatchNorms the block holds now
        (each as transition.conv_reason / batch_norm_reason, with the op's fixed geometry), or ""."""
        for name, layer in self.dense.named_children():
            for part in ("norm1", "norm2"):
                if reason := batch_norm_reason(getattr(layer, part), f"dense.{name}.{part}"):
                    return reason
            for part, geometry in (("conv1", _CONV1X1), ("conv2", _CONV3X3)):
                if reason := conv_reason(getattr(layer, part), f"dense.{name}.{part}", geometry):
                    return reason
        for name in ("transition1", "transition2") if self.fusion == "csp" else ("transition",):
            t = getattr(self, name)
            if reason := conv_reason(t.conv, f"{name}.conv", _CONV1X1) or batch_norm_reason(t.bn, f"{name}.bn"):
                return reason
        return ""

    def _unfusable_reason(self, x: torch.Tensor) -> str:
        """Why this call runs the reference, or "" when the fused op covers it: the modules it
        models (_module_reason), all BatchNorms in one mode (batch statistics for all: the
        training op; running statistics for all: the eval op, inference-only, so only while
        autograd does not record) with one eps."""
        if tracing := backend.tracing_reason():
            return tracing
        if reason := self._module_reason():
            return reason
        norms = self._norms()
        if any(bn.training != norms[0].training for bn in norms):
            return ("BatchNorms in both train and eval mode (frozen BatchNorms in a training block; the fused op "
                    "normalizes all with batch statistics or all with running statistics)")
        if any(bn.eps != norms[0].eps for bn in norms):
            return "BatchNorms with different eps"
        if not norms[0].training and torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return ("BatchNorms in eval mode with autograd recording (the fused eval is inference-only: run it "
                    "under torch.no_grad(), or freeze the parameters and input)")
        return ""

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        checks.check_module_input(x, self)
        name = backend.resolve_backend(x.device)
        if name == "reference":
            return super().forward(x)
        reason = self._unfusable_reason(x) or self._act_reason()
        if reason:
            backend.warn_reference_fallback(self, reason)
            return super().forward(x)
        if name == "cpu" and dense_ops.eager_is_faster(x):
            return super().forward(x)
        engine = "triton" if name == "triton" else "aten"
        data = x
        if checks.autocast_enabled(x.device.type):
            data = x.to(torch.get_autocast_dtype(x.device.type))
        if self._norms()[0].training:  # all BatchNorms alike (_unfusable_reason); the block's own mode is moot
            out = self._train_forward(data, engine)
        else:
            out = dense_eval.partial_dense_block_eval(data, self._eval_params(data.dtype), self.part1, self.fusion,
                                                      self.act_name, engine)
        if self.fusion == "last" and data.dtype != x.dtype:
            # The reference's torch.cat promotes its exact part 1 and the autocast-dtype rest.
            return torch.cat([x[:, :self.part1], out[:, self.part1:]], 1)
        return out

    def _train_forward(self, x: torch.Tensor, engine: str) -> torch.Tensor:
        """The training op on x in its compute dtype; the convolutions' weights cast to it
        (differentiably, as autocast casts them), the BatchNorms' parameters as they are."""
        eps = self._norms()[0].eps
        dense_params = [p.to(x.dtype) if p.dim() == 4 else p for p in self.dense_params()]
        transition_params = [p.to(x.dtype) if p.dim() == 4 else p for p in self.transition_params()]
        (out, _buf, _z_first, _z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var, t_mean, t_var
         ) = dense_ops.partial_dense_block(x, dense_params, transition_params, self.part1, self.fusion, self.act_name,
                                           eps, engine)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        for j, layer in enumerate(self._layers()):
            c = self.part2 + j * self.dense.growth_rate
            track_batch_stats(layer.norm1, dense_mean[:c], dense_var[:c], count)
            track_batch_stats(layer.norm2, bottleneck_mean[j], bottleneck_var[j], count)
        start = 0
        for t in self._transitions():
            stop = start + t.bn.num_features
            track_batch_stats(t.bn, t_mean[start:stop], t_var[start:stop], count)
            start = stop
        return out

    def _eval_params(self, dtype: torch.dtype) -> dense_eval.EvalParams:
        """The folded parameters for data of `dtype` (the parameters' own, or autocast's)."""
        if torch.compiler.is_compiling():
            # Traced into the graph (torch.compile, torch.export), whose inputs the parameters are:
            # it refolds at every call, Winograd transforms included.
            return self._fold(dtype)
        sources = self._fold_sources()
        key = (fold_key(sources), self._norms()[0].eps, dtype)
        cache = self._eval_cache  # read once: another thread may replace it meanwhile
        if not fold_cache_hit(cache, key, sources):
            cache = (key, snapshot(sources), self._fold(dtype))
            self._eval_cache = cache
        return cache[2]

    def _fold_sources(self) -> list[torch.Tensor]:
        """Every tensor `_fold` reads."""
        return [*self.dense_params(), *self.transition_params(),
                *(t for bn in self._norms() for t in (bn.running_mean, bn.running_var))]

    def _fold(self, dtype: torch.dtype) -> dense_eval.EvalParams:
        dense_running = [(layer.norm1.running_mean, layer.norm1.running_var, layer.norm2.running_mean,
                          layer.norm2.running_var) for layer in self._layers()]
        transition_running = [(t.bn.running_mean, t.bn.running_var) for t in self._transitions()]
        return dense_eval.fold_eval_params(self.dense_params(), dense_running, self.transition_params(),
                                           transition_running, self._norms()[0].eps, dtype)
