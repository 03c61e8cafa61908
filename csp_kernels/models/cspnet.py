"""CSPNet classifiers and backbones built from the library's modules: the `CSPNet` container
(stem -> stages -> head) and timm's cspresnet50, cspresnext50 and cspdarknet53.

The timm models are timm.models.cspnet's configurations (model_cfgs) rebuilt from the stage
twins: the fused stages of csp_kernels.nn with fused=True, the plain-PyTorch ones of
csp_kernels.reference with fused=False. Module names are timm's (stem.conv1, stem.pool,
stages.<i>, head.fc), so `model.load_state_dict(timm.create_model(name).state_dict())` loads
with strict=True and the model computes what timm's does. timm itself is not needed.

Shapes are written (batch, channels, height, width).
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import checks, reference
from .. import nn as fused_nn
from ..reference.timm_stages import TIMM_LEAKY_RELU_SLOPE


def library(fused: bool):
    """The namespace the models take their CSP modules from: csp_kernels.nn (fused kernels) or
    csp_kernels.reference (plain PyTorch). Both have the same classes, arguments and keys."""
    return fused_nn if fused else reference


def classifier_head(in_features: int, num_classes: int) -> nn.Sequential:
    """timm's ClassifierHead with pool_type "avg" and no dropout: global average pool, flatten,
    Linear; its only parameters are fc.weight and fc.bias, as timm's. num_classes=0, as in timm,
    leaves out the Linear (fc is nn.Identity): the head returns the pooled features.

    x: (batch, in_features, height, width) -> (batch, num_classes or in_features)
    """
    if isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool) and num_classes <= 0:
        if num_classes < 0:
            raise ValueError(f"num_classes must be a positive int, or 0 for the pooled features without a classifier; "
                             f"got {num_classes}")
        fc = nn.Identity()
    else:
        fc = nn.Linear(in_features, checks.check_positive_int(num_classes, "num_classes"))
    return nn.Sequential(OrderedDict(global_pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1), fc=fc))


def init_weights(model: nn.Module, zero_init_last: bool) -> nn.Module:
    """timm's CSPNet initialization (_init_weights): convolutions He-normal (fan_out, relu),
    Linear weights N(0, 0.01) and zero bias, BatchNorms PyTorch's ones and zeros; with
    zero_init_last, the last BatchNorm weight of every residual block zero, so each residual
    block starts as its shortcut."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            nn.init.zeros_(module.bias)
    if zero_init_last:
        with torch.no_grad():
            for module in model.modules():
                # The fused blocks subclass these reference twins.
                if isinstance(module, reference.BottleneckBlock):
                    module.conv3.bn.weight.zero_()
                elif isinstance(module, reference.DarkBlock):
                    module.conv2.bn.weight.zero_()
    return model


class CSPNet(nn.Module):
    """A classifier, or with features_only a backbone: stem -> stages -> head.

    Submodules: `stem`, `stages` (an nn.Sequential, stage i named "i"), `head` (classifier_head;
    absent with features_only). `stage_channels[i]` and `stage_reductions[i]` are stage i's output
    channels and its total stride (input size / output size, up to the rounding of odd sizes).

    features_only=False: x (batch, 3, height, width) -> logits (batch, num_classes), or with
    num_classes=0 the pooled features (batch, stage_channels[-1]).
    features_only=True: x -> a list, for each i in out_indices (increasing stage indices, all
    stages by default), of stage i's output (batch, stage_channels[i], height / r_i, width / r_i),
    r_i = stage_reductions[i]: the feature pyramid a detector's neck reads. Such a model holds no
    head and no stage past the last index (a distributed wrapper would flag their unused
    parameters), so a classifier checkpoint loads into it with strict=False. `feature_channels`
    lists the channels of the returned maps.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], stage_channels: Sequence[int],
                 stage_reductions: Sequence[int], num_classes: int = 1000, features_only: bool = False,
                 out_indices: Sequence[int] | None = None):
        super().__init__()
        num_stages = len(stages)
        if out_indices is not None and not features_only:
            raise ValueError("out_indices selects the stages a features_only model returns; pass features_only=True")
        self.features_only = features_only
        self.out_indices = _check_out_indices(out_indices, num_stages)
        kept = self.out_indices[-1] + 1 if features_only else num_stages
        self.stage_channels = tuple(stage_channels[:kept])
        self.stage_reductions = tuple(stage_reductions[:kept])
        self.stem = stem
        self.stages = nn.Sequential(*stages[:kept])
        if not features_only:
            self.head = classifier_head(self.stage_channels[-1], num_classes)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """The channels of the maps a features_only forward returns, in its order."""
        return tuple(self.stage_channels[i] for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.stem(x)
        if not self.features_only:
            return self.head(self.stages(x))
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                features.append(x)
        return features


def _check_out_indices(out_indices: Sequence[int] | None, num_stages: int) -> tuple[int, ...]:
    """out_indices as a tuple (every stage when None): strictly increasing stage indices in
    range(num_stages)."""
    if out_indices is None:
        return tuple(range(num_stages))
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Iterable):
        raise TypeError(f"out_indices must be a sequence of stage indices (e.g. (1, 2, 3)); got {out_indices!r}")
    indices = tuple(int(i) if isinstance(i, numbers.Integral) and not isinstance(i, bool) else i
                    for i in out_indices)
    if (not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices)
            or any(not 0 <= i < num_stages for i in indices) or list(indices) != sorted(set(indices))):
        raise ValueError(f"out_indices must be strictly increasing stage indices in range({num_stages}); "
                         f"got {out_indices!r}")
    return indices


# timm's CSPNet models ---------------------------------------------------------------------

# timm.models.cspnet.model_cfgs, per stage where timm's values vary (timm repeats a short tuple's
# last value). Every stage is a CrossStage; "block" is timm's block_type.
TIMM_CONFIGS = {
    "cspresnet50": dict(
        stem=dict(out_chs=64, kernel_size=7, pool=True),
        depth=(3, 3, 5, 2), out_chs=(128, 256, 512, 1024), stride=(1, 2, 2, 2), groups=1, expand_ratio=2.0,
        bottle_ratio=0.5, block_ratio=1.0, cross_linear=True, down_growth=False, block="bottle"),
    "cspresnext50": dict(
        stem=dict(out_chs=64, kernel_size=7, pool=True),
        depth=(3, 3, 5, 2), out_chs=(256, 512, 1024, 2048), stride=(1, 2, 2, 2), groups=32, expand_ratio=1.0,
        bottle_ratio=1.0, block_ratio=0.5, cross_linear=True, down_growth=False, block="bottle"),
    "cspdarknet53": dict(
        stem=dict(out_chs=32, kernel_size=3, pool=False),
        depth=(1, 2, 8, 8, 4), out_chs=(64, 128, 256, 512, 1024), stride=(2, 2, 2, 2, 2), groups=1,
        expand_ratio=(2.0, 1.0, 1.0, 1.0, 1.0), bottle_ratio=(0.5, 1.0, 1.0, 1.0, 1.0),
        block_ratio=(1.0, 0.5, 0.5, 0.5, 0.5), cross_linear=False, down_growth=True, block="dark"),
}
TIMM_ACT = "leaky_relu"  # CspModelCfg's act_layer for all three, with timm's slope 0.01


def _timm_stem(lib, out_chs: int, kernel_size: int, pool: bool) -> tuple[nn.Sequential, int]:
    """timm's create_csp_stem for one conv: stem.conv1, a ConvNormAct (stride 2 when followed by
    the 3x3/2 max pool `stem.pool`, else 1, padded as timm: (stride - 1 + kernel_size - 1) // 2).
    Returns the stem and its reduction (4 or 1)."""
    stride = 2 if pool else 1
    layers = OrderedDict(conv1=lib.ConvBNAct(3, out_chs, kernel_size, stride, (stride - 1 + kernel_size - 1) // 2,
                                             act=TIMM_ACT, negative_slope=TIMM_LEAKY_RELU_SLOPE))
    if pool:
        layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(layers), 4 if pool else 1


def _per_stage(value, num_stages: int) -> tuple:
    return value if isinstance(value, tuple) else (value,) * num_stages


def timm_cspnet(name: str, *, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
                out_indices: Sequence[int] | None = None) -> CSPNet:
    """timm's model `name` (a key of TIMM_CONFIGS) with output_stride 32, no drop path, and
    timm's initialization (zero_init_last). See CSPNet for the arguments and shapes."""
    cfg = TIMM_CONFIGS[name]
    lib = library(fused)
    stem, reduction = _timm_stem(lib, **cfg["stem"])
    num_stages = len(cfg["depth"])
    per_stage = {key: _per_stage(cfg[key], num_stages) for key in (
        "depth", "out_chs", "stride", "groups", "expand_ratio", "bottle_ratio", "block_ratio", "cross_linear",
        "down_growth")}
    block_fn = lib.DarkBlock if cfg["block"] == "dark" else lib.BottleneckBlock
    stages, reductions, in_chs = [], [], cfg["stem"]["out_chs"]
    for i in range(num_stages):
        args = {key: values[i] for key, values in per_stage.items()}
        stages.append(lib.CrossStage(in_chs, dilation=1, first_dilation=1, block_fn=block_fn, act_layer=TIMM_ACT,
                                     **args))
        in_chs = args["out_chs"]
        reduction *= args["stride"]
        reductions.append(reduction)
    model = CSPNet(stem, stages, per_stage["out_chs"], reductions, num_classes, features_only, out_indices)
    return init_weights(model, zero_init_last=True)


def cspresnet50(*, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
                out_indices: Sequence[int] | None = None) -> CSPNet:
    """timm's cspresnet50 (21.62M parameters with 1000 classes): 7x7/2 stem + max pool, four
    CrossStages of ResNet bottlenecks (depth 3, 3, 5, 2; 128 to 1024 channels). timm's weights
    load as they are. x: (batch, 3, height, width) -> (batch, num_classes); see CSPNet."""
    return timm_cspnet("cspresnet50", num_classes=num_classes, fused=fused, features_only=features_only,
                       out_indices=out_indices)


def cspresnext50(*, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
                 out_indices: Sequence[int] | None = None) -> CSPNet:
    """timm's cspresnext50 (20.57M parameters): cspresnet50's layout with 32-group ResNeXt
    bottlenecks, 256 to 2048 channels. x: (batch, 3, height, width) -> (batch, num_classes); see
    CSPNet."""
    return timm_cspnet("cspresnext50", num_classes=num_classes, fused=fused, features_only=features_only,
                       out_indices=out_indices)


def cspdarknet53(*, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
                 out_indices: Sequence[int] | None = None) -> CSPNet:
    """timm's cspdarknet53 (27.64M parameters): 3x3 stem, five stride-2 CrossStages of DarkNet
    blocks (depth 1, 2, 8, 8, 4; 64 to 1024 channels). x: (batch, 3, height, width) -> (batch,
    num_classes); see CSPNet."""
    return timm_cspnet("cspdarknet53", num_classes=num_classes, fused=fused, features_only=features_only,
                       out_indices=out_indices)
