"""Fused PartialDenseBlock: the drop-in twin of `reference.PartialDenseBlock` (same __init__
signature, state_dict, forward, backward and running-statistics updates), computed by
`csp_kernels.ops.dense` (one concat buffer, statistics once per channel, a recomputing
backward; see that module's docstring).

Which path runs:
- training: the `csp_kernels::partial_dense_block` op, then the running statistics of every
  BatchNorm updated from the statistics it returns, exactly as nn.BatchNorm2d would (also under
  torch.no_grad).
- eval without autograd recording (torch.no_grad / inference_mode, or nothing requires grad):
  the folded inference forward (`ops.dense_eval`); the folded parameters are cached and
  refolded when any parameter or buffer changes (version counters).
- the reference math (`super().forward`) for the "reference" backend, and, with a
  `ReferenceFallbackWarning` naming the reason, for what the fused op does not model: eval
  while autograd records (e.g. frozen BatchNorms under fine-tuning), autocast (which mixes
  dtypes per op), and BatchNorms that differ from the defaults the op assumes (affine,
  tracking running statistics, one shared eps).
Input in any memory format (channels_last included) is copied once into the NCHW concat
buffer; outputs are NCHW-contiguous.
"""
from __future__ import annotations

import torch

from .. import backend, checks, reference
from ..ops import batch_norm_act as bna
from ..ops import dense as dense_ops
from ..ops import dense_eval


class PartialDenseBlock(reference.PartialDenseBlock):
    __doc__ = reference.PartialDenseBlock.__doc__

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, part_ratio: float = 0.5,
                 bn_size: int = 4, fusion: str = "last", act: str = "relu", out_channels: int | None = None):
        super().__init__(in_channels, num_layers, growth_rate, part_ratio, bn_size, fusion, act, out_channels)
        self.act_name = checks.check_activation(act)
        self._eval_cache: tuple[tuple, dense_eval.EvalParams] | None = None

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

    def _unfusable_reason(self, x: torch.Tensor) -> str:
        """Why this call runs the reference, or "" when the fused op covers it: every BatchNorm
        affine, tracking running statistics, all with one eps; no autocast; eval only under
        no_grad (the fused eval is inference-only)."""
        norms = self._norms()
        if tracing := backend.tracing_reason():
            return tracing
        if not all(bn.affine for bn in norms):
            return "a BatchNorm with affine=False"
        if not all(bn.track_running_stats and bn.running_mean is not None for bn in norms):
            return "a BatchNorm with track_running_stats=False"
        if any(bn.eps != norms[0].eps for bn in norms):
            return "BatchNorms with different eps"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast is enabled (the fused block computes in its input's dtype; cast instead)"
        if not self.training and torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return ("eval mode with autograd recording (the fused eval is inference-only: run it under "
                    "torch.no_grad(), or freeze the parameters and input)")
        return ""

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        checks.check_module_input(x, self)
        name = backend.resolve_backend(x.device)
        if name == "reference":
            return super().forward(x)
        reason = self._unfusable_reason(x)
        if reason:
            backend.warn_reference_fallback(self, reason)
            return super().forward(x)
        engine = "triton" if name == "triton" else "aten"
        if self.training:
            return self._train_forward(x, engine)
        return dense_eval.partial_dense_block_eval(x, self._eval_params(), self.part1, self.fusion, self.act_name,
                                                  engine)

    def _train_forward(self, x: torch.Tensor, engine: str) -> torch.Tensor:
        eps = self._norms()[0].eps
        (out, _buf, _z_first, _z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var, t_mean, t_var
         ) = dense_ops.partial_dense_block(x, self.dense_params(), self.transition_params(), self.part1,
                                           self.fusion, self.act_name, eps, engine)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        for j, layer in enumerate(self._layers()):
            c = self.part2 + j * self.dense.growth_rate
            _track(layer.norm1, dense_mean[:c], dense_var[:c], count)
            _track(layer.norm2, bottleneck_mean[j], bottleneck_var[j], count)
        start = 0
        for t in self._transitions():
            stop = start + t.bn.num_features
            _track(t.bn, t_mean[start:stop], t_var[start:stop], count)
            start = stop
        return out

    def _eval_params(self) -> dense_eval.EvalParams:
        if torch.compiler.is_compiling():
            return self._fold()  # traced into the graph (torch.compile, torch.export), which folds it once
        tensors = [*self.parameters(), *self.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, self._fold())
        return self._eval_cache[1]

    def _fold(self) -> dense_eval.EvalParams:
        dense_running = [(layer.norm1.running_mean, layer.norm1.running_var, layer.norm2.running_mean,
                          layer.norm2.running_var) for layer in self._layers()]
        transition_running = [(t.bn.running_mean, t.bn.running_var) for t in self._transitions()]
        return dense_eval.fold_eval_params(self.dense_params(), dense_running, self.transition_params(),
                                           transition_running, self._norms()[0].eps)


def _track(bn: torch.nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """nn.BatchNorm2d's training-time bookkeeping, from batch statistics computed elsewhere."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bna.update_running_stats(bn.running_mean, bn.running_var, mean, var, count, momentum)
