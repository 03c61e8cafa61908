"""The specification: CSPNet building blocks in plain PyTorch, written to be read.

Every fused module of csp_kernels must match these in forward, backward, running-statistics
updates and state_dict keys (docs/semantics.md, "Semantics"). Names follow the ecosystem so
that real weights load unchanged: ConvBNAct has timm's ConvNormAct / ultralytics' Conv keys,
DenseLayer and DenseBlock have torchvision DenseNet's keys.

The CSP stages users train are here too, built on ConvBNAct with upstream's constructor
arguments, forward and state_dict keys: ultralytics' Bottleneck, C2f, C3, C3k, C3k2
(yolo_stages) and timm's CSPNet BottleneckBlock, DarkBlock, CrossStage, CrossStage3, DarkStage
(timm_stages).

Shapes are written (batch, channels, height, width).
"""
from .blocks import ConvBNAct, DenseBlock, DenseLayer, ExactFusion, Maxout, PartialDenseBlock, maxout, maxout_pyramid
from .timm_stages import BottleneckBlock, CrossStage, CrossStage3, DarkBlock, DarkStage
from .yolo_stages import C2f, C3, C3k, C3k2, Bottleneck

__all__ = [
    "ConvBNAct", "DenseLayer", "DenseBlock", "PartialDenseBlock", "maxout", "Maxout", "maxout_pyramid", "ExactFusion",
    "Bottleneck", "C2f", "C3", "C3k", "C3k2",
    "BottleneckBlock", "DarkBlock", "CrossStage", "CrossStage3", "DarkStage",
]
