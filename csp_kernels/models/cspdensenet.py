"""CSPDenseNet-121 and -201 after the CSPNet paper (Wang et al. 2019, arXiv 1911.11929, Sec. 3.1
and Fig. 3b): DenseNet-121 / -201 with every dense block made a partial dense block.

  stem     conv1: 7x7/2 ConvBNAct 3 -> 64 (ReLU), pool: 3x3/2 max pool           (DenseNet's)
  stage i  [transition: 1x1 ConvBNAct halving the channels, pool: 2x2/2 avg pool] (stages 1-3)
           block: PartialDenseBlock(part_ratio 0.5, growth 32, bn_size 4, fusion "csp")
  head     global average pool, flatten, fc                                       (as CSPNet's)

Layer counts per stage are DenseNet's, (6, 12, 24, 16) and (6, 12, 48, 32), and the stage widths
are DenseNet's too: a partial dense block outputs in + num_layers * growth channels, as a dense
block (121: 256, 512, 1024, 1024; 201: 256, 512, 1792, 1920), and the transitions halve them.
Half of each stage's input bypasses the dense layers, so the dense part computes about half
DenseNet's features and the gradient paths of the two parts stay apart: the paper's point.

Fusion "csp", a transition before and after the concat (transition2(cat(part 1,
transition1(dense(part 2))))), is the paper's CSPDenseNet (Fig. 3b). "first" and "last" are the
ablations of Fig. 3c/3d: "last" saves computation at a small accuracy cost, "first" reuses the
gradients of the two parts and loses more; the models here reproduce the architecture the
paper's CSPDenseNet results are for. The transitions' activation is ReLU, DenseNet's.

Unlike DenseNet's pre-activation transitions (BN-ReLU-conv), every transition here is the
library's conv-BN-act, so the stage output is already normalized and activated and the head
needs no final BatchNorm. The models are the library's own: no published weights exist for them.

Shapes are written (batch, channels, height, width).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from .cspnet import CSPNet, init_weights, library

DENSE_CONFIGS = {"cspdensenet121": (6, 12, 24, 16), "cspdensenet201": (6, 12, 48, 32)}  # layers per stage
STEM_CHANNELS = 64
GROWTH_RATE = 32
BN_SIZE = 4
PART_RATIO = 0.5
FUSION = "csp"


def cspdensenet(name: str, *, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
                out_indices: Sequence[int] | None = None) -> CSPNet:
    """The CSPDenseNet `name` (a key of DENSE_CONFIGS), with timm's CSPNet initialization (see
    init_weights); its stage i has reduction 4 * 2**i. See CSPNet for the arguments and shapes."""
    lib = library(fused)
    stem = nn.Sequential(OrderedDict(conv1=lib.ConvBNAct(3, STEM_CHANNELS, 7, 2, 3, act="relu"),
                                     pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
    stages, channels = [], []
    in_chs = STEM_CHANNELS
    for i, num_layers in enumerate(DENSE_CONFIGS[name]):
        layers = OrderedDict()
        if i:
            layers["transition"] = lib.ConvBNAct(in_chs, in_chs // 2, act="relu")
            layers["pool"] = nn.AvgPool2d(kernel_size=2, stride=2)
            in_chs //= 2
        layers["block"] = lib.PartialDenseBlock(in_chs, num_layers, GROWTH_RATE, PART_RATIO, BN_SIZE, FUSION)
        in_chs = layers["block"].out_channels
        stages.append(nn.Sequential(layers))
        channels.append(in_chs)
    reductions = [4 * 2 ** i for i in range(len(stages))]
    model = CSPNet(stem, stages, channels, reductions, num_classes, features_only, out_indices)
    return init_weights(model, zero_init_last=False)  # no residual blocks


def cspdensenet121(*, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
                   out_indices: Sequence[int] | None = None) -> CSPNet:
    """CSPDenseNet-121: partial dense stages of 6, 12, 24, 16 layers (module docstring).
    x: (batch, 3, height, width) -> (batch, num_classes), height and width at least 32 (the last
    transition's 2x2 pool needs 2x2 maps); see CSPNet."""
    return cspdensenet("cspdensenet121", num_classes=num_classes, fused=fused, features_only=features_only,
                       out_indices=out_indices)


def cspdensenet201(*, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
                   out_indices: Sequence[int] | None = None) -> CSPNet:
    """CSPDenseNet-201: partial dense stages of 6, 12, 48, 32 layers (module docstring).
    x: (batch, 3, height, width) -> (batch, num_classes), height and width at least 32; see
    CSPNet."""
    return cspdensenet("cspdensenet201", num_classes=num_classes, fused=fused, features_only=features_only,
                       out_indices=out_indices)
