"""Fused PartialDenseBlock and DenseBlock: the drop-in twins of `reference.PartialDenseBlock`
and `reference.DenseBlock` (same __init__ signature, state_dict, forward, backward and
running-statistics updates), computed by `csp_kernels.ops.dense` (one concat buffer, statistics
once per channel, a recomputing backward; see that module's docstring). A DenseBlock is the op's
dense part without a transition (fusion NO_TRANSITION): its output is the concat buffer itself.
Both share everything below through `_FusedDense`.

Which path runs follows the BatchNorms' own `training` flags, as the reference's numbers do
(the block's mode matters only through them):
- all training: the `csp_kernels::partial_dense_block` op, then the running statistics of
  every BatchNorm updated from the statistics it returns, exactly as nn.BatchNorm2d would (also
  under torch.no_grad). All training nn.SyncBatchNorms over one process group of more than one
  process (`sync_group`), on any device: `ops.sync_dense`, the op's computation with every
  statistic and backward sum over the group's batch, running statistics as nn.SyncBatchNorm's.
- all in eval, without autograd recording (torch.no_grad / inference_mode, or nothing requires
  grad): the folded inference forward (`ops.dense_eval`); the folded parameters are cached and
  refolded when eps or the value of any tensor the fold reads changes (compared with a copy
  at each call, so edits through `.data` count too).
- the reference math (`super().forward`) for the "reference" backend, on the CPU for maps
  of at most `ops.routing.SMALL_MAP_PIXELS` pixels (faster there: `ops.routing.eager_is_faster`), and, with a
  `ReferenceFallbackWarning` naming the reason, for what the fused op does not model: eval
  while autograd records (e.g. frozen BatchNorms under fine-tuning), some BatchNorms frozen
  and others training, BatchNorms that differ from the defaults the op assumes (affine,
  tracking running statistics, one shared eps, all synchronized over one process group or none:
  a layer's statistics are every later layer's; alone in its group a SyncBatchNorm is
  BatchNorm2d), and convolutions or BatchNorms replaced or changed (a
  bias, another geometry or padding_mode, another module type, hooks, on the dense layers
  too), and torchvision `_DenseLayer`s (which `csp_kernels.convert` puts into a
  DenseBlock) with dropout in training or memory_efficient checkpointing in a training step
  (`torchvision_layer_reason`).
Input in any memory format (channels_last included) is copied once into the NCHW concat
buffer; the output has the reference's memory format (channels_last for a channels_last x).

Under autocast (`torch.autocast(device_type, dtype)`) the fused block computes in x's dtype, not
the autocast dtype: the reference's concat holds x's own channels in x's dtype (torch.cat
promotes the 16-bit new features to it), so its BatchNorms read float32 data, and their batch
statistics and normalization are exact where a 16-bit buffer would round x first (badly so
for an input with a large mean). So the fused block is at least as precise as the reference under autocast; it
returns the dtype the reference returns: the autocast dtype, except for fusion "last" and the
DenseBlock, whose final concat of x's channels with the 16-bit rest promotes (x's dtype). For
16-bit compute, convert the block and its input (`block.to(torch.bfloat16)`).

Reference: csp_kernels.reference.PartialDenseBlock, DenseBlock (reference/blocks.py); op,
autograd and kernels: ops/dense.py (training; its docstring names the C++ and Triton kernels),
ops/dense_eval.py (eval), ops/sync_dense.py (synchronized); tests:
tests/test_partial_dense_block.py, tests/test_dense_block.py.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from .. import backend, checks, reference
from ..ops import dense as dense_ops
from ..ops import dense_eval, routing, stats_update, sync_dense
from ..ops.batch_norm_act import as_channels_last_if, suggests_channels_last
from ..ops.fold_cache import fold_cache_hit, snapshot
from ..ops.sync_batch_norm import process_group_of, sync_group
from .transition import ConvBNAct, batch_norm_reason, conv_reason, track_batch_stats

# (kernel_size, stride, padding, dilation, groups) the fused op computes each conv with.
_CONV1X1 = ((1, 1), (1, 1), (0, 0), (1, 1), 1)
_CONV3X3 = ((3, 3), (1, 1), (1, 1), (1, 1), 1)


# The dense layer classes the op computes, by (module, qualified name): a subclass may compute
# something else; torchvision's is matched by name so that torchvision is not imported.
_DENSE_LAYERS = {(reference.DenseLayer.__module__, "DenseLayer"), ("torchvision.models.densenet", "_DenseLayer")}


class _FusedDense(nn.Module):
    """What the fused dense blocks share, over their reference class (second base): fallback
    reasons, the forward, the training op's bookkeeping and the eval fold cache. A block says
    where its dense layers are (`_DENSE`: the name of its reference.DenseBlock child, "" for
    itself), its transitions (`_transition_names`), the op's (part1, fusion) (`_layout`) and
    whether its output keeps x's dtype under autocast (`_concat_promotes`)."""

    _DENSE = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_cache: tuple[tuple, tuple, dense_eval.EvalParams] | None = None  # (key, snapshot, params)

    def _transition_names(self) -> tuple[str, ...]:
        return ()

    def _layout(self) -> tuple[int, str]:
        return 0, dense_ops.NO_TRANSITION

    def _concat_promotes(self) -> bool:
        """Whether the reference's output under autocast has x's dtype: its last op concatenates
        x's own channels with the autocast-dtype rest, and torch.cat promotes."""
        return False

    @property
    def act_name(self) -> str:
        """The kernels' name for what the transitions' `act` modules compute now ("" if none)."""
        transitions = self._transitions()
        return checks.kernel_activation(*(t.act for t in transitions))[0] if transitions else ""

    def _act_reason(self) -> str:
        """Why the fused op cannot compute the activations the block holds now, or "": the
        transitions' `act` modules must compute one activation the kernels have, the dense
        layers' relu1 and relu2 ReLU (the op's DENSE_ACT)."""
        dense_act, reason = checks.kernel_activation(*(r for layer in self._layers() for r in (layer.relu1,
                                                                                                layer.relu2)))
        if not reason and dense_act != dense_ops.DENSE_ACT:
            reason = f"dense layers' activation {dense_act} (the fused op's are {dense_ops.DENSE_ACT})"
        transitions = self._transitions()
        return reason or (checks.kernel_activation(*(t.act for t in transitions))[1] if transitions else "")

    # -- the module's parameters in the op's order ---------------------------------------------

    def _dense_block(self) -> reference.DenseBlock:
        return getattr(self, self._DENSE) if self._DENSE else self

    def _records(self, x: torch.Tensor) -> bool:
        """Whether autograd records a call on x: grad mode, and x or a parameter requires grad."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def torchvision_layer_reason(self, x: torch.Tensor | None = None) -> str:
        """Why torchvision `_DenseLayer`s compute what the fused op does not on input x, or "":
        dropout of their new features (drop_rate > 0) while training, and memory_efficient
        checkpointing while autograd records with norm1 training, whose recompute in the backward
        updates norm1's running statistics a second time (the fused op updates them once). x
        None (what `csp_kernels.convert` asks): either attribute set, in any mode."""
        for index, layer in enumerate(self._layers(), 1):
            if getattr(layer, "drop_rate", 0.0) > 0 and (x is None or layer.training):
                return (f"dense layer {index} has drop_rate={layer.drop_rate} (torchvision's dropout of the new "
                        "features in training; the fused op has none)")
            if getattr(layer, "memory_efficient", False) and (x is None or (layer.norm1.training and
                                                                            self._records(x))):
                return (f"dense layer {index} has memory_efficient=True (torchvision's checkpoint recomputes norm1 in "
                        "the backward, which updates its running statistics twice per training step, the fused op "
                        "once; it saves less than the checkpoint anyway: set memory_efficient=False)")
        return ""

    def _layers(self) -> list[reference.DenseLayer]:
        return list(self._dense_block().children())

    def _transitions(self) -> list[reference.ConvBNAct]:
        return [getattr(self, name) for name in self._transition_names()]

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
        """Why the fused op cannot compute the dense layers, their container, the transitions,
        convolutions and BatchNorms the block holds now (each as dense_layer_reason,
        _part_reason, transition.conv_reason / batch_norm_reason,
        with the op's fixed geometry; one eps for all BatchNorms, channels as _channels_reason),
        or ""."""
        prefix = f"{self._DENSE}." if self._DENSE else ""
        containers = (reference.DenseBlock, DenseBlock)
        if self._DENSE and (reason := _part_reason(self._dense_block(), self._DENSE, containers)):
            return reason
        for name, layer in self._dense_block().named_children():
            if reason := dense_layer_reason(layer, prefix + name):
                return reason
            for part in ("norm1", "norm2"):
                if reason := batch_norm_reason(getattr(layer, part), f"{prefix}{name}.{part}"):
                    return reason
            for part, geometry in (("conv1", _CONV1X1), ("conv2", _CONV3X3)):
                if reason := conv_reason(getattr(layer, part), f"{prefix}{name}.{part}", geometry):
                    return reason
        for name in self._transition_names():
            t = getattr(self, name)
            if reason := (_part_reason(t, name, (reference.ConvBNAct, ConvBNAct))
                          or conv_reason(t.conv, f"{name}.conv", _CONV1X1) or batch_norm_reason(t.bn, f"{name}.bn")):
                return reason
        norms = self._norms()
        if any(bn.eps != norms[0].eps for bn in norms):
            return "BatchNorms with different eps"
        return self._channels_reason()

    def _channels_reason(self) -> str:
        """Why the dense layers' channels do not chain as the op's buffer does, or "": layer j
        reads in_channels + j * growth_rate channels and adds growth_rate, all through one
        bottleneck width (layers replaced or built elsewhere may not)."""
        dense, layers = self._dense_block(), self._layers()
        bottleneck = layers[0].conv1.out_channels
        for j, layer in enumerate(layers):
            c = dense.in_channels + j * dense.growth_rate
            channels = (layer.norm1.num_features, layer.conv1.in_channels, layer.conv1.out_channels,
                        layer.norm2.num_features, layer.conv2.in_channels, layer.conv2.out_channels)
            expected = (c, c, bottleneck, bottleneck, bottleneck, dense.growth_rate)
            if channels != expected:
                return (f"dense layer {j + 1}'s (norm1, conv1 in, conv1 out, norm2, conv2 in, conv2 out) channels are "
                        f"{channels}, not {expected} (the fused op's concat buffer and bottleneck)")
        return ""

    def fusion_reason(self) -> str:
        """Why the fused op cannot compute the modules this block holds, in any mode, or "" (what
        `csp_kernels.convert` checks before it swaps a block in)."""
        return self._module_reason() or self._act_reason() or self.torchvision_layer_reason()

    def _unfusable_reason(self, x: torch.Tensor) -> str:
        """Why this call runs the reference, or "" when the fused op covers it: the modules it
        models (_module_reason), all BatchNorms in one mode (batch statistics for all: the
        training op; running statistics for all: the eval op, inference-only, so only while
        autograd does not record)."""
        if reason := backend.mode_reason():
            return reason
        if reason := self._module_reason():
            return reason
        norms = self._norms()
        if any(bn.training != norms[0].training for bn in norms):
            return ("BatchNorms in both train and eval mode (frozen BatchNorms in a training block; the fused op "
                    "normalizes all with batch statistics or all with running statistics)")
        if reason := self._sync_reason():
            return reason
        if reason := self.torchvision_layer_reason(x):
            return reason
        if not norms[0].training and self._records(x):
            return ("BatchNorms in eval mode with autograd recording (the fused eval is inference-only: run it "
                    "under torch.no_grad(), or freeze the parameters and input)")
        return ""

    def _sync_reason(self) -> str:
        """Why the BatchNorms would not normalize over one set of processes, or "": all
        synchronize over one process group (`sync_group`: training SyncBatchNorms in a group of
        more than one process) or none does. The op's statistics are shared between layers."""
        names = {id(m): name for name, m in self.named_modules()}
        norms = self._norms()
        groups = [sync_group(bn) for bn in norms]
        for bn, group in zip(norms[1:], groups[1:]):
            if group == groups[0]:
                continue
            if group is not None and groups[0] is not None:
                return f"{names[id(norms[0])]} and {names[id(bn)]} are SyncBatchNorms over different process groups"
            synced, other = (norms[0], bn) if group is None else (bn, norms[0])
            return (f"{names[id(synced)]} is a SyncBatchNorm over {dist.get_world_size(process_group_of(synced))} "
                    f"processes but {names[id(other)]} ({type(other).__name__}) does not synchronize: convert the "
                    "whole block with csp_kernels.distributed.convert_sync_batchnorm")
        return ""

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.check_input(x, channels=self.in_channels)
        checks.check_module_input(x, self)
        name = backend.resolve_backend(x.device)
        if x.numel() == 0 and (group := sync_group(self._norms()[0])) is not None:
            raise ValueError(f"a synchronized dense block needs at least one sample on every rank of its process "
                             f"group ({dist.get_world_size(group)} processes); this rank's batch is empty")
        if name == "reference" or x.numel() == 0:  # (an empty x: nn.BatchNorm2d's bookkeeping, nothing to compute)
            return super().forward(x)
        reason = self._unfusable_reason(x) or self._act_reason()
        if reason:
            backend.warn_reference_fallback(self, reason)
            return super().forward(x)
        norms = self._norms()
        if norms[0].training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return super().forward(x)  # one value per channel: the BatchNorm's error, after its bookkeeping
        if name == "cpu" and routing.eager_is_faster(x) and not any(type(bn) is nn.SyncBatchNorm for bn in norms):
            # (not with SyncBatchNorms: torch's refuses CPU tensors in training once a process group
            # exists, even a group of one, where the fused op computes plain BatchNorm)
            return super().forward(x)
        norm = norms[0]  # (one eps and one mode for all: _unfusable_reason)
        checks.check_batch_norm_eps(norm.eps, norm.training)
        for bn in norms:
            checks.check_batch_norm_dtypes(x.dtype, bn, "a BatchNorm")
        engine = routing.dense_engine(name)
        autocast = checks.autocast_enabled(x.device.type)
        # Under autocast the op computes in x's dtype (module docstring), autocast off inside it.
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if norm.training:  # all BatchNorms alike (_unfusable_reason); the block's own mode is moot
                out = self._train_forward(x, engine)
            else:
                out = dense_eval.partial_dense_block_eval(x, self._eval_params(x.dtype), *self._layout(),
                                                          self.act_name, engine)
        if autocast and not self._concat_promotes():
            out = out.to(checks.autocast_dtype(x))
        # The op's buffer is NCHW; the reference's convolutions and cats keep a channels_last x's format.
        return as_channels_last_if(out, suggests_channels_last(x))

    def _train_forward(self, x: torch.Tensor, engine: str) -> torch.Tensor:
        """The training op on x in its compute dtype; the convolutions' weights cast to it
        (differentiably, as autocast casts them), the BatchNorms' parameters as they are."""
        eps = self._norms()[0].eps
        dense_params = [p.to(x.dtype) if p.dim() == 4 else p for p in self.dense_params()]
        transition_params = [p.to(x.dtype) if p.dim() == 4 else p for p in self.transition_params()]
        args = (x, dense_params, transition_params, *self._layout(), self.act_name, eps, engine)
        # Where autograd records (in eager mode), the op's node updates the running statistics
        # before it saves anything, as nn.BatchNorm2d does (ops/stats_update.py); else after it.
        compiling = torch.compiler.is_compiling()
        with contextlib.nullcontext() if compiling else stats_update.before_saving(self._track_batch_stats) as pending:
            if (group := sync_group(self._norms()[0])) is not None:  # every BatchNorm's (_sync_reason)
                outputs, count = sync_dense.partial_dense_block_sync(*args, group)
            else:
                outputs, count = dense_ops.partial_dense_block(*args), x.shape[0] * x.shape[2] * x.shape[3]
        if pending is None or not pending.done:
            self._track_batch_stats(outputs, count)
        return outputs[0]

    def _track_batch_stats(self, outputs: tuple, count: int | torch.Tensor) -> None:
        """Every BatchNorm's running-statistics update from the training op's `outputs` (batch
        statistics over `count` values per channel)."""
        _out, _buf, _z_first, _z_last, dense_mean, dense_var, bottleneck_mean, bottleneck_var, t_mean, t_var = outputs
        dense = self._dense_block()
        for j, layer in enumerate(self._layers()):
            c = dense.in_channels + j * dense.growth_rate
            track_batch_stats(layer.norm1, dense_mean[:c], dense_var[:c], count)
            track_batch_stats(layer.norm2, bottleneck_mean[j], bottleneck_var[j], count)
        start = 0
        for t in self._transitions():
            stop = start + t.bn.num_features
            track_batch_stats(t.bn, t_mean[start:stop], t_var[start:stop], count)
            start = stop

    def _eval_params(self, dtype: torch.dtype) -> dense_eval.EvalParams:
        """The folded parameters for data of `dtype` (x's)."""
        if torch.compiler.is_compiling():
            # Traced into the graph (torch.compile, torch.export), whose inputs the parameters are:
            # it refolds at every call, Winograd transforms included.
            return self._fold(dtype)
        sources = self._fold_sources()
        key = (self._norms()[0].eps, dtype)
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


def _part_reason(part: nn.Module, name: str, kinds: tuple[type, ...]) -> str:
    """Why the fused op cannot compute the block's `part` (called `name`: a transition, or the
    container of the dense layers) inside itself, or "": one of `kinds` by exact class (a
    subclass may compute something else), its forward neither replaced on the instance nor
    hooked."""
    if type(part) not in kinds:
        expected = " or ".join(f"csp_kernels.{'reference.' if kind.__module__.startswith(reference.__name__) else ''}"
                               f"{kind.__qualname__}" for kind in kinds)
        return f"{name} is {type(part).__qualname__} (the fused op computes it as {expected})"
    return checks.bypass_reason(part, name, "the fused op computes it inside the block")


def dense_layer_reason(layer: nn.Module, name: str) -> str:
    """Why the fused op cannot compute dense layer `layer` (called `name`) as a whole, or "": a
    DenseLayer or torchvision _DenseLayer (by exact class), its forward neither replaced on the
    instance nor hooked (the fused op would not run either)."""
    if (type(layer).__module__, type(layer).__qualname__) not in _DENSE_LAYERS:
        return f"{name} is {type(layer).__qualname__} (the fused op computes DenseLayer and torchvision's _DenseLayer)"
    return checks.bypass_reason(layer, name, "the fused op would not run it")


class PartialDenseBlock(_FusedDense, reference.PartialDenseBlock):
    __doc__ = reference.PartialDenseBlock.__doc__

    _DENSE = "dense"

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, part_ratio: float = 0.5,
                 bn_size: int = 4, fusion: str = "last", act: str = "relu", out_channels: int | None = None):
        super().__init__(in_channels, num_layers, growth_rate, part_ratio, bn_size, fusion, act, out_channels)

    def _transition_names(self) -> tuple[str, ...]:
        return ("transition1", "transition2") if self.fusion == "csp" else ("transition",)

    def _layout(self) -> tuple[int, str]:
        return self.part1, self.fusion

    def _concat_promotes(self) -> bool:
        return self.fusion == "last"


class DenseBlock(_FusedDense, reference.DenseBlock):
    __doc__ = reference.DenseBlock.__doc__

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, bn_size: int = 4):
        super().__init__(in_channels, num_layers, growth_rate, bn_size)

    def _concat_promotes(self) -> bool:
        return True
