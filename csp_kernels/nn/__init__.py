"""Fused drop-in modules: same __init__ signature and state_dict as `csp_kernels.reference`."""
from .dense import PartialDenseBlock
from .maxout import ExactFusion, Maxout, maxout, maxout_pyramid
from .transition import ConvBNAct

__all__ = ["ConvBNAct", "PartialDenseBlock", "Maxout", "ExactFusion", "maxout", "maxout_pyramid"]
