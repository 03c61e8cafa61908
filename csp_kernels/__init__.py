"""csp_kernels: fused, memory-efficient CSPNet blocks for PyTorch.

Drop-in modules (same signatures and state_dict as `csp_kernels.reference`):
  ConvBNAct, PartialDenseBlock, DenseBlock, Maxout, ExactFusion; functions maxout, maxout_pyramid;
  the CSP stages Bottleneck, C2f, C3, C3k, C3k2 (ultralytics) and BottleneckBlock, DarkBlock,
  CrossStage, CrossStage3, DarkStage (timm).
Models: `convert(model)` swaps them into ultralytics / timm / torchvision models, `revert(model)` undoes it.
Models: `models.create(name)` (cspresnet50, cspresnext50, cspdarknet53, cspdensenet121/201).
Distributed: `distributed.convert_sync_batchnorm(model)` synchronizes BatchNorm statistics (CPU too).
Backends: `use_backend("cpu" | "cuda" | "triton" | "reference" | "auto")` or $CSP_KERNELS_BACKEND.
"""
from . import distributed, models, reference
from .backend import BackendUnavailable, ReferenceFallbackWarning, available_backends, use_backend
from .convert import ConversionReport, convert, revert
from .extension import build_info
from .nn import ConvBNAct, DenseBlock, ExactFusion, Maxout, PartialDenseBlock, maxout, maxout_pyramid
from .nn import (Bottleneck, BottleneckBlock, C2f, C3, C3k, C3k2, CrossStage, CrossStage3, DarkBlock,
                 DarkStage, MaxPool2d)

__all__ = [
    "ConvBNAct", "PartialDenseBlock", "DenseBlock", "Maxout", "ExactFusion", "maxout", "maxout_pyramid",
    "Bottleneck", "C2f", "C3", "C3k", "C3k2", "BottleneckBlock", "DarkBlock", "CrossStage", "CrossStage3", "DarkStage",
    "MaxPool2d", "reference", "use_backend", "available_backends", "BackendUnavailable", "ReferenceFallbackWarning",
    "build_info", "convert", "revert", "ConversionReport", "distributed", "models",
]
__version__ = "0.1.0"
