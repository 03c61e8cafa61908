"""The reference stage twins against the upstream modules they copy (ultralytics' Bottleneck, C2f,
C3, C3k, C3k2; timm's CSPNet blocks and stages): upstream's weights load strictly into the twin,
which then computes the same outputs, input and parameter gradients and running statistics, in
training and in eval. The twins run upstream's operations in upstream's order, so the tolerance
is 0 in every dtype."""
from dataclasses import asdict

import pytest
import timm
import torch
from timm.models import cspnet
from torch import nn
from ultralytics.nn.modules import block as yolo_block
from ultralytics.nn.modules.conv import Conv as YoloConv
from ultralytics.nn.tasks import DetectionModel

from csp_kernels import reference
from helpers import randomize_

DTYPES = [pytest.param(torch.float64, 0.0, id="float64"), pytest.param(torch.float32, 0.0, id="float32")]
TIMM_ACTS = ("leaky_relu", "relu", "silu", "mish")
TIMM_STAGE_LAYERS = dict(act_layer="leaky_relu", norm_layer="batchnorm", aa_layer=None, attn_layer=None)


pytestmark = pytest.mark.usefixtures("single_thread")


def assert_same(actual, expected, tol, name):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def assert_twin_matches(upstream: nn.Module, twin: nn.Module, in_channels: int, dtype, tol, size: int = 8):
    """Load upstream's (randomized) state into the twin; then a training step and an eval pass
    give both the same outputs, gradients and state."""
    upstream = randomize_(upstream.to(dtype))
    twin = twin.to(dtype)
    assert list(twin.state_dict()) == list(upstream.state_dict())
    twin.load_state_dict(upstream.state_dict(), strict=True)
    for training in (True, False):
        upstream.train(training)
        twin.train(training)
        x = torch.randn(2, in_channels, size, size, dtype=dtype, requires_grad=True)
        x_twin = x.detach().clone().requires_grad_()
        out, out_twin = upstream(x), twin(x_twin)
        mode = "train" if training else "eval"
        assert_same(out_twin, out, tol, f"{mode} output")
        grad = torch.randn_like(out)
        out.backward(grad)
        out_twin.backward(grad)
        assert_same(x_twin.grad, x.grad, tol, f"{mode} input gradient")
        params = dict(upstream.named_parameters())
        for name, param in twin.named_parameters():
            assert_same(param.grad, params[name].grad, tol, f"{mode} gradient of {name}")
        state = upstream.state_dict()
        for name, value in twin.state_dict().items():
            assert_same(value, state[name], tol, f"{mode} state {name}")
        upstream.zero_grad()
        twin.zero_grad()


# ultralytics ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("c1, c2, shortcut, g, k, e", [
    (16, 16, True, 1, (3, 3), 0.5),
    (16, 16, False, 2, ((1, 1), (3, 3)), 1.0),
    (16, 32, True, 1, (3, 3), 0.5),  # c1 != c2: no residual whatever shortcut says
])
def test_bottleneck(c1, c2, shortcut, g, k, e, dtype, tol):
    upstream = yolo_block.Bottleneck(c1, c2, shortcut, g, k, e)
    assert_twin_matches(upstream, reference.Bottleneck(c1, c2, shortcut, g, k, e), c1, dtype, tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("shortcut", [False, True])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("name", ["C2f", "C3"])
def test_c2f_and_c3(name, n, shortcut, g, dtype, tol):
    upstream = getattr(yolo_block, name)(16, 32, n, shortcut, g, 0.5)
    assert_twin_matches(upstream, getattr(reference, name)(16, 32, n, shortcut, g, 0.5), 16, dtype, tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("n, shortcut, g, k", [(1, True, 1, 3), (2, False, 2, 3), (2, True, 1, 5)])
def test_c3k(n, shortcut, g, k, dtype, tol):
    upstream = yolo_block.C3k(16, 32, n, shortcut, g, 0.5, k)
    assert_twin_matches(upstream, reference.C3k(16, 32, n, shortcut, g, 0.5, k), 16, dtype, tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("c3k", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_c3k2(n, c3k, shortcut, g, dtype, tol):
    upstream = yolo_block.C3k2(16, 32, n, c3k, 0.5, False, g, shortcut)
    assert_twin_matches(upstream, reference.C3k2(16, 32, n, c3k, 0.5, False, g, shortcut), 16, dtype, tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("act, negative_slope, upstream_act", [
    ("relu", 0.1, nn.ReLU()),
    ("leaky_relu", 0.1, nn.LeakyReLU(0.1)),
    ("leaky_relu", 0.01, nn.LeakyReLU()),
    ("mish", 0.1, nn.Mish()),
    ("hardswish", 0.1, nn.Hardswish()),
])
@pytest.mark.parametrize("name", ["C2f", "C3k2"])
def test_yolo_activation(monkeypatch, name, act, negative_slope, upstream_act, dtype, tol):
    # A model yaml's `activation:` sets ultralytics' Conv.default_act for every Conv built after it.
    monkeypatch.setattr(YoloConv, "default_act", upstream_act)
    upstream = getattr(yolo_block, name)(16, 32, 2)
    twin = getattr(reference, name)(16, 32, 2, act=act, negative_slope=negative_slope)
    assert_twin_matches(upstream, twin, 16, dtype, tol)


def yolo_twin(module: nn.Module) -> nn.Module:
    """The twin of an ultralytics C2f or C3k2 with the arguments read back from its submodules."""
    c1, c2, n = module.cv1.conv.in_channels, module.cv2.conv.out_channels, len(module.m)
    inner = module.m[0]
    if isinstance(module, yolo_block.C3k2):
        c3k = isinstance(inner, yolo_block.C3k)
        bottleneck = inner.m[0] if c3k else inner
        return reference.C3k2(c1, c2, n, c3k, module.c / c2, False, bottleneck.cv2.conv.groups, bottleneck.add)
    return reference.C2f(c1, c2, n, inner.add, inner.cv2.conv.groups, module.c / c2)


@pytest.mark.parametrize("yaml, kind, expected", [
    ("yolo11n.yaml", yolo_block.C3k2, 8),
    ("yolov8n.yaml", yolo_block.C2f, 8),
])
def test_detection_model_stages_load_into_twins(yaml, kind, expected):
    model = DetectionModel(yaml, verbose=False)
    stages = [m for m in model.modules() if type(m) is kind]
    assert len(stages) == expected
    if kind is yolo_block.C3k2:  # yolo11n has both kinds of inner block
        assert {isinstance(stage.m[0], yolo_block.C3k) for stage in stages} == {False, True}
    for stage in stages:
        twin = yolo_twin(stage)
        # ultralytics' initialize_weights sets every BatchNorm's eps and momentum, which are not in
        # the state_dict: whoever converts a model copies them.
        upstream_norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
        assert {(bn.eps, bn.momentum) for bn in upstream_norms} == {(1e-3, 0.03)}
        for bn, upstream_bn in zip([m for m in twin.modules() if isinstance(m, nn.BatchNorm2d)], upstream_norms):
            bn.eps, bn.momentum = upstream_bn.eps, upstream_bn.momentum
        assert_twin_matches(stage, twin, stage.cv1.conv.in_channels, torch.float32, 0.0)


def test_yolo_rejects_what_it_does_not_model():
    with pytest.raises(ValueError, match="attn=True"):
        reference.C3k2(16, 32, 1, attn=True)
    with pytest.raises(ValueError, match=r"k\[1\] must be an int or a square"):
        reference.Bottleneck(16, 16, k=(3, (1, 3)))
    with pytest.raises(ValueError, match="k must be a pair"):
        reference.Bottleneck(16, 16, k=3)
    with pytest.raises(ValueError, match="0 hidden channels"):
        reference.C2f(16, 1, e=0.5)


# timm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("act_layer", TIMM_ACTS)
@pytest.mark.parametrize("dilation, bottle_ratio, groups", [(1, 0.25, 1), (2, 0.5, 4), (1, 1.0, 8)])
@pytest.mark.parametrize("name", ["BottleneckBlock", "DarkBlock"])
def test_timm_blocks(name, dilation, bottle_ratio, groups, act_layer, dtype, tol):
    kwargs = dict(dilation=dilation, bottle_ratio=bottle_ratio, groups=groups, act_layer=act_layer)
    upstream = getattr(cspnet, name)(32, 32, **kwargs)
    assert_twin_matches(upstream, getattr(reference, name)(32, 32, **kwargs), 32, dtype, tol)


# (stage, block, constructor arguments); the first three are the stages of cspresnet50,
# cspresnext50 and cspdarknet53 at small widths.
TIMM_STAGES = {
    "resnet": ("CrossStage", "BottleneckBlock",
               dict(in_chs=16, out_chs=32, stride=1, dilation=1, depth=2, expand_ratio=2.0, bottle_ratio=0.5,
                    cross_linear=True)),
    "resnext": ("CrossStage", "BottleneckBlock",
                dict(in_chs=16, out_chs=32, stride=2, dilation=1, depth=2, groups=4, block_ratio=0.5,
                     cross_linear=True)),
    "darknet-first": ("CrossStage", "DarkBlock",
                      dict(in_chs=16, out_chs=32, stride=2, dilation=1, depth=1, expand_ratio=2.0, bottle_ratio=0.5,
                           down_growth=True)),
    "darknet": ("CrossStage", "DarkBlock",
                dict(in_chs=16, out_chs=32, stride=2, dilation=1, depth=2, block_ratio=0.5, down_growth=True)),
    "cross-dilated": ("CrossStage", "BottleneckBlock",
                      dict(in_chs=16, out_chs=32, stride=1, dilation=2, first_dilation=1, depth=1, expand_ratio=2.0,
                           bottle_ratio=0.5, groups=2, block_dpr=[0.0])),
    "cross-no-down": ("CrossStage", "DarkBlock",
                      dict(in_chs=16, out_chs=32, stride=1, dilation=1, depth=1, block_ratio=0.5)),
    "cs3": ("CrossStage3", "DarkBlock",
            dict(in_chs=16, out_chs=32, stride=2, dilation=1, depth=2, block_ratio=0.5, down_growth=True)),
    "cs3-dilated": ("CrossStage3", "BottleneckBlock",
                    dict(in_chs=16, out_chs=32, stride=1, dilation=2, first_dilation=1, depth=1, block_ratio=0.5,
                         bottle_ratio=0.5, groups=2)),
    "dark": ("DarkStage", "DarkBlock", dict(in_chs=16, out_chs=32, stride=2, dilation=1, depth=2, bottle_ratio=0.5)),
    "dark-stride1": ("DarkStage", "BottleneckBlock",
                     dict(in_chs=16, out_chs=32, stride=1, dilation=2, depth=1, groups=4, block_ratio=1.0)),
}


def build_stage(module, stage: str, block: str, kwargs: dict, act_layer: str) -> nn.Module:
    """Stage `stage` of `module` (timm.models.cspnet or csp_kernels.reference) with its `block`."""
    layers = {**TIMM_STAGE_LAYERS, "act_layer": act_layer}
    return getattr(module, stage)(**kwargs, block_fn=getattr(module, block), **layers)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("config", TIMM_STAGES)
def test_timm_stages(config, dtype, tol):
    stage, block, kwargs = TIMM_STAGES[config]
    upstream = build_stage(cspnet, stage, block, kwargs, "leaky_relu")
    twin = build_stage(reference, stage, block, kwargs, "leaky_relu")
    assert_twin_matches(upstream, twin, kwargs["in_chs"], dtype, tol)


@pytest.mark.parametrize("config", TIMM_STAGES)
def test_timm_stages_answer_upstreams_memory_format(config):
    """A channels_last input gives the twin's output upstream's memory format (CrossStage's
    .contiguous() before its cat makes its result NCHW), with the same values."""
    stage, block, kwargs = TIMM_STAGES[config]
    upstream = randomize_(build_stage(cspnet, stage, block, kwargs, "leaky_relu")).eval()
    twin = build_stage(reference, stage, block, kwargs, "leaky_relu").eval()
    twin.load_state_dict(upstream.state_dict())
    x = torch.randn(2, kwargs["in_chs"], 8, 8).to(memory_format=torch.channels_last)
    out, out_twin = upstream(x), twin(x)
    assert out_twin.is_contiguous() == out.is_contiguous()
    assert out_twin.stride() == out.stride()
    assert_same(out_twin, out, 0.0, "output")


@pytest.mark.parametrize("act_layer", TIMM_ACTS)
def test_timm_stage_activation(act_layer):
    stage, block, kwargs = TIMM_STAGES["darknet-first"]
    upstream = build_stage(cspnet, stage, block, kwargs, act_layer)
    twin = build_stage(reference, stage, block, kwargs, act_layer)
    assert_twin_matches(upstream, twin, kwargs["in_chs"], torch.float64, 0.0)


def timm_stage_twins(name: str) -> list[nn.Module]:
    """Twins of the stages timm.create_model(name) builds, from its config as create_csp_stages
    reads it (output stride 32: every stage undilated)."""
    cfg = cspnet.model_cfgs[name]
    columns = asdict(cfg.stages)
    in_chs = cfg.stem.out_chs if isinstance(cfg.stem.out_chs, int) else cfg.stem.out_chs[-1]
    twins = []
    for values in zip(*columns.values()):
        args = dict(zip(columns, values))
        stage = {"csp": reference.CrossStage, "cs3": reference.CrossStage3, "dark": reference.DarkStage}[
            args.pop("stage_type")]
        block = {"bottle": reference.BottleneckBlock, "dark": reference.DarkBlock}[args.pop("block_type")]
        args.pop("attn_kwargs")
        if stage is reference.DarkStage:
            for cross_only in ("expand_ratio", "cross_linear", "down_growth"):
                args.pop(cross_only)
        twins.append(stage(in_chs, **args, dilation=1, first_dilation=1, block_fn=block, act_layer=cfg.act_layer,
                           norm_layer=cfg.norm_layer, aa_layer=cfg.aa_layer))
        in_chs = args["out_chs"]
    return twins


@pytest.mark.parametrize("name", ["cspresnet50", "cspresnext50", "cspdarknet53"])
def test_timm_model_stages_load_into_twins(name):
    model = timm.create_model(name, pretrained=False).eval()
    twins = timm_stage_twins(name)
    assert len(twins) == len(model.stages)
    with torch.no_grad():
        x = model.stem(torch.randn(2, 3, 16, 16))
    for index, (stage, twin) in enumerate(zip(model.stages, twins)):
        state = randomize_(stage).state_dict()
        assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in state.items()}
        twin.load_state_dict(state, strict=True)
        twin.eval()
        with torch.no_grad():
            x, x_twin = stage(x), twin(x)
        assert_same(x_twin, x, 0.0, f"{name} stage {index}")


@pytest.mark.parametrize("kwargs, message", [
    (dict(attn_layer="se"), "attn_layer='se' is not modeled"),
    (dict(aa_layer="avg"), "aa_layer='avg' is not modeled"),
    (dict(avg_down=True), "avg_down=True is not modeled"),
    (dict(block_dpr=[0.1, 0.0]), r"block_dpr=\[0.1, 0.0\] \(drop path\) is not modeled"),
    (dict(act_layer="gelu"), "act_layer must be one of timm's names"),
    (dict(norm_layer="layernorm"), "norm_layer must be BatchNorm2d"),
    (dict(block_fn=cspnet.BottleneckBlock), "block_fn must be one of csp_kernels.reference.BottleneckBlock, "
                                            r"csp_kernels.reference.DarkBlock; got <class 'timm"),
    (dict(expand_ratio=1.5, out_chs=30), "round.out_chs . expand_ratio. = 45 must be even"),
    (dict(block_ratio=0.5), r"in_chs \(32\) must equal out_chs \(16\)"),
])
def test_timm_rejects_what_it_does_not_model(kwargs, message):
    args = dict(in_chs=16, out_chs=32, stride=2, dilation=1, depth=1, expand_ratio=2.0, block_fn=reference.DarkBlock)
    with pytest.raises(ValueError, match=message):
        reference.CrossStage(**{**args, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop_path=0.1), "drop_path=0.1 is not modeled"),
    (dict(drop_block=nn.Identity), "drop_block=.* is not modeled"),
    (dict(out_chs=16), r"in_chs \(32\) must equal out_chs \(16\)"),
    (dict(bottle_ratio=0.01), r"round\(out_chs \* bottle_ratio\) = 0"),
])
@pytest.mark.parametrize("block", ["BottleneckBlock", "DarkBlock"])
def test_timm_blocks_reject_what_they_do_not_model(block, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(reference, block)(**{"in_chs": 32, "out_chs": 32, **kwargs})
