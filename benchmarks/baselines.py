"""The implementations measured side by side: eager reference, checkpointed reference,
torch.compile(reference), the fused csp_kernels modules (on a GPU also pinned to the "cuda"
backend: CUDA kernels around cuBLAS/cuDNN instead of the Triton GEMMs) and torch.compile of the
fused modules, all with the same weights."""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import csp_kernels
from csp_kernels import reference

from .configs import Workload

VARIANTS = ("eager", "checkpoint", "compile", "compile-max-autotune", "fused", "compile-fused", "fused-cuda")


@dataclasses.dataclass
class Variant:
    """callable: what a step calls; module: the nn.Module whose mode, parameters and buffers the
    step uses (the compiled wrapper's original module for compile variants)."""
    name: str
    callable: nn.Module
    module: nn.Module


class CheckpointedDenseBlock(nn.Module):
    """A reference DenseBlock run as torchvision's DenseNet(memory_efficient=True) runs it: each
    layer's concat + norm1 + relu1 + conv1 under torch.utils.checkpoint (non-reentrant), so only
    the layer inputs are saved and the bottleneck is recomputed in backward. Like torchvision,
    the recomputation updates norm1's running statistics a second time.

    x: (batch, in_channels, height, width) -> (batch, in_channels + num_layers * growth_rate, ...)
    """

    def __init__(self, dense: reference.DenseBlock):
        super().__init__()
        self.layers = nn.ModuleList(dense.children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            bottleneck = checkpoint(_bottleneck, layer, *features, use_reentrant=False)
            features.append(layer.conv2(layer.relu2(layer.norm2(bottleneck))))
        return torch.cat(features, 1)


class PinnedBackend(nn.Module):
    """`module` run with csp_kernels backend `backend` (its backward follows: the fused ops
    carry their engine from the forward)."""

    def __init__(self, module: nn.Module, backend: str):
        super().__init__()
        self.module, self.backend = module, backend

    def forward(self, *args):
        with csp_kernels.use_backend(self.backend):
            return self.module(*args)


def _bottleneck(layer: reference.DenseLayer, *features: torch.Tensor) -> torch.Tensor:
    return layer.conv1(layer.relu1(layer.norm1(torch.cat(features, 1))))


def make_reference(workload: Workload, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = getattr(reference, workload.family.class_name)(**workload.kwargs)
    return module.to(device=device, dtype=workload.dtype)


def available_variants(workload: Workload, device: torch.device) -> list[str]:
    """The variants that apply: checkpoint only to dense blocks, max-autotune and the fused
    module's "cuda" backend (against the default, Triton) only on GPU."""
    names = ["eager"]
    if workload.family.name == "pdb":
        names.append("checkpoint")
    names.append("compile")
    if device.type == "cuda":
        names.append("compile-max-autotune")
    names += ["fused", "compile-fused"]
    if device.type == "cuda":
        names.append("fused-cuda")
    return names


def build_variant(name: str, ref: nn.Module, workload: Workload, device: torch.device) -> Variant:
    """Variant `name` with the weights of `ref`. Raises LookupError when csp_kernels has no
    fused module of this family yet."""
    if name == "eager":
        return Variant(name, ref, ref)
    if name == "checkpoint":
        module = copy.deepcopy(ref)
        module.dense = CheckpointedDenseBlock(module.dense)
        return Variant(name, module, module)
    if name in ("compile", "compile-max-autotune"):
        module = copy.deepcopy(ref)
        mode = "max-autotune" if name == "compile-max-autotune" else None
        return Variant(name, torch.compile(module, mode=mode), module)
    if name in ("fused", "compile-fused", "fused-cuda"):
        cls = getattr(csp_kernels, workload.family.class_name, None)
        if cls is None:
            raise LookupError(f"csp_kernels has no {workload.family.class_name} yet")
        module = cls(**workload.kwargs).to(device=device, dtype=workload.dtype)
        module.load_state_dict(ref.state_dict())
        if name == "compile-fused":
            return Variant(name, torch.compile(module), module)
        return Variant(name, PinnedBackend(module, "cuda") if name == "fused-cuda" else module, module)
    raise ValueError(f"variant must be one of {VARIANTS}; got {name!r}")
