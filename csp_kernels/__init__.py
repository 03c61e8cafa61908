"""csp_kernels: fused, memory-efficient CSPNet blocks for PyTorch.

Drop-in modules (same signatures and state_dict as `csp_kernels.reference`):
  ConvBNAct, PartialDenseBlock, Maxout, ExactFusion; functions maxout, maxout_pyramid.
Backends: `use_backend("cpu" | "cuda" | "triton" | "reference" | "auto")` or $CSP_KERNELS_BACKEND.
"""
from . import reference
from .backend import BackendUnavailable, ReferenceFallbackWarning, available_backends, use_backend
from .extension import build_info
from .nn import ConvBNAct, ExactFusion, Maxout, PartialDenseBlock, maxout, maxout_pyramid

__all__ = [
    "ConvBNAct", "PartialDenseBlock", "Maxout", "ExactFusion", "maxout", "maxout_pyramid",
    "reference", "use_backend", "available_backends", "BackendUnavailable", "ReferenceFallbackWarning",
    "build_info",
]
__version__ = "0.1.0"
