"""Fused drop-in modules: same __init__ signature and state_dict as `csp_kernels.reference`."""
from .dense import DenseBlock, PartialDenseBlock
from .maxout import ExactFusion, Maxout, maxout, maxout_pyramid
from .pooling import MaxPool2d
from .stages import (Bottleneck, BottleneckBlock, C2f, C3, C3k, C3k2, CrossStage, CrossStage3, DarkBlock,
                     DarkStage)
from .transition import ConvBNAct

__all__ = ["ConvBNAct", "PartialDenseBlock", "DenseBlock", "Maxout", "ExactFusion", "maxout", "maxout_pyramid",
           "Bottleneck", "C2f", "C3", "C3k", "C3k2", "BottleneckBlock", "DarkBlock", "CrossStage", "CrossStage3",
           "DarkStage", "MaxPool2d"]
