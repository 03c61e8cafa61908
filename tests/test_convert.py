"""csp_kernels.convert / revert on real models (ultralytics YOLO11n and YOLO11s, timm cspresnet50,
cspresnext50, cspdarknet53, torchvision densenet121 and mobilenet_v3_small), on a small model
holding one unit of every kind the converters know, on one holding every CSP stage and on
torchvision DenseNet blocks.

Numerics rule: original and converted models run in float64 from the same (randomized) weights;
every output, input gradient, parameter gradient and state_dict entry of the converted model must
satisfy ||converted - original|| <= 1e-9 ||original|| + 1e-12. The absolute term is for gradients
that vanish mathematically (a BatchNorm bias whose output another BatchNorm normalizes is rounding
noise of ~1e-13 in both); the others compared are of norm 1e-3 to 1e3. In float32 (one test), the
converted model's relative error against the float64 original must be at most 2.5x the float32
original's, plus 1e-7 (outputs; in training also the input and parameter gradients and the
running statistics). conftest turns a ReferenceFallbackWarning into an error, so every comparison
runs the fused kernels wherever a unit was swapped."""
import collections
import contextlib
import copy
import io
import os
import re

import pytest
import timm
import torch
import torchvision
from timm.layers import ConvNormAct, SEModule, get_act_layer
from timm.models import cspnet
from torch import nn
from torchvision.models import densenet
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics checks nothing online when building models
from ultralytics.nn.modules import block as yolo  # noqa: E402
from ultralytics.nn.modules.conv import Conv as YoloConv  # noqa: E402
from ultralytics.nn.modules.conv import DWConv as YoloDWConv  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

import csp_kernels  # noqa: E402
from csp_kernels import ConvBNAct, DenseBlock, ReferenceFallbackWarning  # noqa: E402
from csp_kernels.convert import CONVERTERS, class_key  # noqa: E402
from csp_kernels.nn import dense, pooling, stages  # noqa: E402
from helpers import DEVICES, randomize_, rel_error  # noqa: E402

TOL64 = 1e-9
ATOL64 = 1e-12
SIZE = 64  # input height and width

BUILDERS = {
    "yolo11n": lambda: DetectionModel("yolo11n.yaml", verbose=False),
    "yolo11s": lambda: DetectionModel("yolo11s.yaml", verbose=False),
    "cspresnet50": lambda: timm.create_model("cspresnet50", pretrained=False),
    "cspresnext50": lambda: timm.create_model("cspresnext50", pretrained=False),
    "cspdarknet53": lambda: timm.create_model("cspdarknet53", pretrained=False),
    "densenet121": lambda: torchvision.models.densenet121(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
}
# What convert swaps in each model, and the modules with tensors that no converter knows. DenseNet's
# layers are BatchNorm -> ReLU -> conv (pre-activation, no conv-BN-act unit): its 4 _DenseBlocks
# (6, 12, 24, 16 layers) are swapped whole; the stem, transitions and final norm5 stay.
# YOLO11n and YOLO11s (the same graph, other widths): 8 C3k2, those of layers 6, 8 and 22 with a C3k
# of 2 Bottlenecks, the 5 others with 1 Bottleneck (C2PSA, SPPF and Detect are no stages: their Convs
# are swapped one by one). A MaxPool2d (cspresnet's stem, YOLO's SPPF, DenseNet's pool0) becomes
# csp_kernels.MaxPool2d, which saves its input's recipe.
CSP_RESNET = {"ConvNormAct -> ConvBNAct": 55, "BottleneckBlock -> BottleneckBlock": 13,
              "CrossStage -> CrossStage": 4, "MaxPool2d -> MaxPool2d": 1}  # stages of 3, 3, 5 and 2 blocks
YOLO11 = ({"Conv -> ConvBNAct": 75, "DWConv -> ConvBNAct": 6, "C3k2 -> C3k2": 8, "C3k -> C3k": 3,
           "Bottleneck -> Bottleneck": 3 * 2 + 5, "MaxPool2d -> MaxPool2d": 1}, {"Conv2d": 7})  # 7: Detect's and DFL's
EXPECTED = {
    "yolo11n": YOLO11,
    "yolo11s": YOLO11,
    "cspresnet50": (CSP_RESNET, {"Linear": 1}),
    "cspresnext50": (CSP_RESNET, {"Linear": 1}),
    "cspdarknet53": ({"ConvNormAct -> ConvBNAct": 67, "DarkBlock -> DarkBlock": 1 + 2 + 8 + 8 + 4,
                      "CrossStage -> CrossStage": 5}, {"Linear": 1}),
    "densenet121": ({"_DenseBlock -> DenseBlock": 4, "MaxPool2d -> MaxPool2d": 1},
                    {"BatchNorm2d": 5, "Conv2d": 4, "Linear": 1}),
    "mobilenet_v3_small": ({"Conv2dNormActivation -> ConvBNAct": 34}, {"Conv2d": 18, "Linear": 2}),  # SE, head
}


pytestmark = pytest.mark.usefixtures("single_thread")


_built = {}


def build(name: str, dtype=torch.float64) -> nn.Module:
    """A fresh copy of model `name` with random weights and non-trivial BatchNorm statistics
    (built once per session: building costs more than copying)."""
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = randomize_(BUILDERS[name]())
    return copy.deepcopy(_built[name]).to(dtype)


def small_model() -> nn.Sequential:
    """One unit of every kind CONVERTERS knows: 3 x 16 x 16 -> 8 x 8 x 8."""
    return randomize_(nn.Sequential(
        YoloConv(3, 8, 3, 2),
        YoloDWConv(8, 8, 3),
        ConvNormAct(8, 12, 3, act_layer="silu"),
        Conv2dNormActivation(12, 12, 1, activation_layer=nn.Hardswish),
        Conv2dNormActivation(12, 8, 3, groups=4, activation_layer=None),
        # 3x3 with zero padding: after a unit without activation, a 1x1 conv + BatchNorm would
        # normalize its BatchNorm bias away (a gradient of rounding noise, nothing to compare)
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.2)),
    ))


SMALL_SWAPPED = {"Conv -> ConvBNAct": 1, "DWConv -> ConvBNAct": 1, "ConvNormAct -> ConvBNAct": 1,
                 "Conv2dNormActivation -> ConvBNAct": 2, "Sequential -> ConvBNAct": 1}


def small_input(dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, dtype=dtype, device=device)


def tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output, in order (YOLO returns tuples, lists and dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [t for value in values for t in tensors(value)]


def loss_of(outputs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    return sum((o * w).sum() for o, w in zip(outputs, weights))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    error, scale = (actual - expected).norm().item(), expected.norm().item()
    assert error <= TOL64 * scale + ATOL64, f"{name}: error {error:.3g} against a norm of {scale:.3g}"


def assert_outputs_close(actual, expected, what: str) -> None:
    actual, expected = tensors(actual), tensors(expected)
    assert len(actual) == len(expected) > 0
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, f"{what} output {i}")


def assert_state_close(actual: nn.Module, expected: nn.Module, what: str) -> None:
    state, expected_state = actual.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state), f"{what}: state_dict keys differ"
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, expected_state[key]), f"{what}: {key}"
        else:
            assert_close(value, expected_state[key], f"{what}: {key}")


def assert_step_matches(original: nn.Module, converted: nn.Module, x: torch.Tensor, what: str) -> None:
    """One forward and backward of both models on x: the same outputs, input gradient and
    parameter gradients."""
    x_original, x_converted = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks (mobilenet_v3_small's classifier)
    out_original = tensors(original(x_original))
    torch.manual_seed(1)
    out_converted = tensors(converted(x_converted))
    assert_outputs_close(out_converted, out_original, what)
    weights = [torch.randn_like(o) for o in out_original]
    loss_of(out_original, weights).backward()
    loss_of(out_converted, weights).backward()
    assert_close(x_converted.grad, x_original.grad, f"{what} input gradient")
    names = [name for name, _ in original.named_parameters()]
    pairs = list(zip(original.parameters(), converted.parameters()))
    assert len(pairs) == len(names) == len(list(converted.parameters()))
    for name, (p, q) in zip(names, pairs):
        assert (p.grad is None) == (q.grad is None), name  # YOLO's DFL conv is frozen
        if p.grad is not None:
            assert_close(q.grad, p.grad, f"{what} gradient of {name}")
    original.zero_grad(), converted.zero_grad()


def fused_count(model: nn.Module) -> int:
    return sum(type(m) is ConvBNAct for m in model.modules())


def fused_stages(model: nn.Module) -> collections.Counter:
    """{class name: count} of the csp_kernels.nn.stages, nn.dense and nn.pooling modules in model."""
    return collections.Counter(type(m).__name__ for m in model.modules()
                               if type(m).__module__ in (stages.__name__, dense.__name__, pooling.__name__))


def split_swaps(swapped: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(ConvBNAct swaps, {fused stage class: swaps}) of an expected report.swapped_by_class()."""
    to = collections.Counter()
    for key, count in swapped.items():
        to[key.split(" -> ")[1]] += count
    return to.pop("ConvBNAct", 0), dict(to)


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def assert_revert_loads_into(converted: nn.Module, fresh: nn.Module, x: torch.Tensor) -> nn.Module:
    """Reverts `converted`, loads its state_dict strictly into `fresh` (a newly built original)
    and compares them in eval on x: the reverted model exactly, the converted one within the
    float64 tolerance. Returns the reverted model."""
    reverted = csp_kernels.revert(converted)
    fresh.load_state_dict(reverted.state_dict(), strict=True)
    fresh.eval(), converted.eval(), reverted.eval()
    with torch.no_grad():
        assert torch.equal(reverted(x), fresh(x))
        assert_outputs_close(converted(x), fresh(x), "converted against the reverted weights")
    return reverted


# --- acceptance on real models -------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_converted_model_matches_original(name):
    original = build(name)
    converted, report = csp_kernels.convert(original)
    swapped, unknown = EXPECTED[name]
    assert report.swapped_by_class() == swapped
    assert report.left == [] and report.unknown == unknown and report.already_fused == 0
    units, stage_swaps = split_swaps(swapped)
    assert fused_count(converted) == units and fused_stages(converted) == stage_swaps  # the swapped stages run
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    original.eval(), converted.eval()
    with torch.no_grad():  # inference: the fused modules' cached BatchNorm fold
        assert_outputs_close(converted(x), original(x), "eval (no_grad)")
    with eval_with_autograd_warns(converted):
        assert_step_matches(original, converted, x, "eval")
    original.train(), converted.train()
    assert_step_matches(original, converted, x, "train")
    assert_state_close(converted, original, "after the training step")  # running statistics


def eval_with_autograd_warns(model: nn.Module):
    """The context of an eval step with gradients: a fused dense block runs the reference math
    there, saying so (its fused eval is inference-only)."""
    if any(isinstance(m, dense._FusedDense) for m in model.modules()):
        return pytest.warns(ReferenceFallbackWarning, match="eval mode with autograd recording")
    return contextlib.nullcontext()


def assert_float32_within_rounding(fused, plain, expected, what: str) -> None:
    """The 2.5x rule of the module docstring, for one float32 tensor against its float64 value."""
    plain_err, fused_err = rel_error(plain, expected), rel_error(fused, expected)
    assert fused_err <= 2.5 * plain_err + 1e-7, f"{what}: fused {fused_err:.3g}, original {plain_err:.3g}"


def parameter_gradients(model: nn.Module) -> torch.Tensor:
    """Every parameter gradient of model, flattened into one float64 vector."""
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["yolo11n", "densenet121"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_float32_error_within_float32_rounding(name, training):
    models = [build(name), build(name, torch.float32), csp_kernels.convert(build(name, torch.float32))[0]]
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    inputs, outputs = [], []
    for model in models:
        model.train(training)
        inputs.append(x.detach().to(next(model.parameters()).dtype).requires_grad_(training))
        with torch.set_grad_enabled(training):  # eval: inference, the fused modules' BatchNorm fold
            outputs.append(tensors(model(inputs[-1])))
    for i, (e, p, f) in enumerate(zip(*outputs)):
        assert_float32_within_rounding(f, p, e, f"output {i}")
    if not training:
        return
    weights = [torch.randn_like(o) for o in outputs[0]]
    for out in outputs:
        loss_of(out, [w.to(o.dtype) for w, o in zip(weights, out)]).backward()
    expected, plain, fused = models
    assert_float32_within_rounding(inputs[2].grad, inputs[1].grad, inputs[0].grad, "input gradient")
    # The parameters' gradients as one vector: that of a single small tensor (the stem
    # BatchNorm's: a sum over the batch and the map, with cancellation) varies by 2x and more
    # with the summation order alone; the float64 test compares each one.
    assert_float32_within_rounding(*map(parameter_gradients, (fused, plain, expected)), "parameter gradients")
    for (key, e), p, f in zip(expected.named_buffers(), plain.buffers(), fused.buffers()):
        if e.is_floating_point():
            assert_float32_within_rounding(f, p, e, key)


def test_yolo_sgd_steps_then_revert_loads_into_a_fresh_model():
    original = build("yolo11n")
    converted, _ = csp_kernels.convert(original)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (original, converted)]
    for _ in range(3):
        x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
        for model, optimizer in zip((original, converted), optimizers):
            optimizer.zero_grad()
            sum(o.square().mean() for o in tensors(model(x))).backward()
            optimizer.step()
    assert_state_close(converted, original, "after 3 SGD steps")

    reverted = csp_kernels.revert(converted)
    assert module_types(reverted) == module_types(original) and fused_count(converted) == 81
    assert all(getattr(a, "f", None) == getattr(b, "f", None) and getattr(a, "i", None) == getattr(b, "i", None)
               for a, b in zip(reverted.model, original.model))  # what DetectionModel's forward reads
    fresh = DetectionModel("yolo11n.yaml", verbose=False).double()
    fresh.load_state_dict(reverted.state_dict(), strict=True)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    fresh.eval(), converted.eval(), reverted.eval()
    with torch.no_grad():
        assert_outputs_close(fresh(x), converted(x), "fresh model with the reverted weights")
        assert_outputs_close(reverted(x), fresh(x), "reverted model")


@pytest.mark.parametrize("name", ["cspdarknet53", "cspresnext50", "mobilenet_v3_small", "densenet121"])
def test_revert_round_trip(name):
    original = build(name)
    reverted = csp_kernels.revert(csp_kernels.convert(original)[0])
    assert module_types(reverted) == module_types(original)
    assert_state_close(reverted, original, "reverted")  # the same values, hence exactly
    fresh = BUILDERS[name]().double()
    fresh.load_state_dict(reverted.state_dict(), strict=True)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    original.eval(), reverted.eval()
    with torch.no_grad():
        assert torch.equal(reverted(x), original(x))


# --- what is converted, what is left ---------------------------------------------------------


def test_small_model_swaps_every_kind_of_unit():
    model = small_model()
    converted, report = csp_kernels.convert(model)
    assert report.swapped_by_class() == SMALL_SWAPPED and not report.left and not report.unknown
    assert [s.name for s in report.swapped] == [str(i) for i in range(6)]
    assert all(type(m) is ConvBNAct for m in converted)
    assert [(m.in_channels, m.out_channels) for m in converted] == [(3, 8), (8, 8), (8, 12), (12, 12), (12, 8),
                                                                    (8, 8)]
    assert [type(m.act) for m in converted] == [nn.SiLU, nn.SiLU, nn.SiLU, nn.Hardswish, nn.Identity, nn.LeakyReLU]
    assert type(converted[2].bn) is nn.BatchNorm2d  # timm's BatchNormAct2d, as nn.BatchNorm2d


def test_timm_batch_norm_shares_the_parameter_and_buffer_tensors():
    unit = randomize_(ConvNormAct(4, 6, 3, act_layer="leaky_relu"))
    fused, _ = csp_kernels.convert(unit, inplace=True)
    assert fused.conv is unit.conv and fused.act is unit.bn.act
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(fused.bn, name) is getattr(unit.bn, name), name
    assert (fused.bn.eps, fused.bn.momentum) == (unit.bn.eps, unit.bn.momentum)


def _gelu_yolo_model():
    model = DetectionModel("yolo11n.yaml", verbose=False)
    model.model[23].cv2[0][0].act = nn.GELU()
    return model


def _fused_by_ultralytics():
    unit = YoloConv(4, 6, 3)
    unit.conv = nn.Conv2d(4, 6, 3, padding=1)  # what ultralytics' fuse() leaves: BatchNorm folded into a bias
    del unit.bn
    unit.forward = unit.forward_fuse
    return nn.Sequential(unit)


def _hooked_dense_layer():
    block = densenet._DenseBlock(2, 4, 2, 3, drop_rate=0.0)
    block.denselayer2.register_forward_pre_hook(lambda *_: None)
    return nn.Sequential(block)


class _Subclass(densenet._DenseLayer):
    """A _DenseLayer subclass: it may compute something else, so it is not matched."""


def _subclassed_dense_layer():
    block = densenet._DenseBlock(2, 4, 2, 3, drop_rate=0.0)
    block.denselayer1 = _Subclass(4, 3, 2, 0.0)
    return nn.Sequential(block)


def _hooked_conv():
    unit = YoloConv(4, 6, 3)
    unit.register_forward_hook(lambda *_: None)
    return nn.Sequential(unit)


def _backward_hooked(module: nn.Module, path: str, register: str):
    def make():
        model = nn.Sequential(module)
        getattr(model.get_submodule(path), register)(lambda *_: None)
        return model
    return make


# (model builder, qualified name of the unit left, class, words of the reason)
LEFT_CASES = {
    "unsupported activation": (_gelu_yolo_model, "model.23.cv2.0.0", "Conv", "GELU"),
    "conv bias": (lambda: nn.Sequential(nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU())),
                  "0", "Sequential", "conv.bias"),
    "reflect padding": (lambda: nn.Sequential(Conv2dNormActivation(4, 6, 3)).apply(
        lambda m: setattr(m, "padding_mode", "reflect") if isinstance(m, nn.Conv2d) else None),
        "0", "Conv2dNormActivation", "padding_mode"),
    "no BatchNorm": (lambda: nn.Sequential(Conv2dNormActivation(4, 6, 3, norm_layer=None)),
                     "0", "Conv2dNormActivation", "no BatchNorm"),
    "FrozenBatchNorm2d": (lambda: nn.Sequential(Conv2dNormActivation(4, 6, 3, norm_layer=FrozenBatchNorm2d)),
                          "0", "Conv2dNormActivation", "norm layer is FrozenBatchNorm2d"),
    "BatchNorm without affine": (lambda: nn.Sequential(nn.Sequential(
        nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6, affine=False), nn.SiLU())), "0", "Sequential", "affine"),
    "timm dropout": (lambda: nn.Sequential(ConvNormAct(4, 6, 3, drop_layer=nn.Dropout2d)),
                     "0", "ConvNormAct", "bn.drop"),
    "timm anti-aliasing": (lambda: nn.Sequential(ConvNormAct(4, 6, 3, stride=2, aa_layer="avg")),
                           "0", "ConvNormAct", "aa"),
    "timm GroupNorm": (lambda: nn.Sequential(ConvNormAct(4, 32, 3, norm_layer=nn.GroupNorm)),
                       "0", "ConvNormAct", "GroupNormAct"),
    "ultralytics fuse()": (_fused_by_ultralytics, "0", "Conv", "forward is replaced"),
    "forward hook": (_hooked_conv, "0", "Conv", "forward hook"),
    "backward hook on a unit": (_backward_hooked(YoloConv(4, 6, 3), "0", "register_full_backward_hook"), "0",
                                "Conv", "backward hook on it"),
    "backward pre-hook on a conv": (_backward_hooked(YoloConv(4, 6, 3), "0.conv", "register_full_backward_pre_hook"),
                                    "0", "Conv", "backward hook on conv"),
    "DenseNet dropout": (lambda: nn.Sequential(densenet._DenseBlock(2, 4, 2, 3, drop_rate=0.2)),
                         "0", "_DenseBlock", "drop_rate=0.2"),
    "DenseNet memory_efficient": (lambda: nn.Sequential(densenet._DenseBlock(2, 4, 2, 3, 0.0, memory_efficient=True)),
                                  "0", "_DenseBlock", "memory_efficient=True"),
    "DenseNet layer hook": (_hooked_dense_layer, "0", "_DenseBlock", "forward hook on denselayer2"),
    "DenseNet layer subclass": (_subclassed_dense_layer, "0", "_DenseBlock", "denselayer1 is _Subclass"),
}


def test_a_module_under_two_names_stays_one_module():
    unit = YoloConv(4, 4, 3)
    model = nn.Sequential(unit, unit)
    x = torch.randn(2, 4, 8, 8)
    expected = model.eval()(x)
    converted, report = csp_kernels.convert(model)
    assert converted[0] is converted[1] and type(converted[0]) is ConvBNAct
    assert [item.name for item in report.swapped] == ["0"]
    assert torch.allclose(converted(x), expected, rtol=1e-5, atol=1e-6)
    reverted = csp_kernels.revert(converted)
    assert reverted[0] is reverted[1] and type(reverted[0]) is YoloConv


def test_backward_hooks_fire_after_convert():
    """A module carrying a backward hook, or whose conv does, is left (its children converted),
    so that the hooks fire as before."""
    model = nn.Sequential(yolo.C2f(8, 8, 1), YoloConv(8, 8, 3))
    calls = []
    model[0].register_full_backward_hook(lambda *_: calls.append("C2f"))
    model[1].conv.register_full_backward_pre_hook(lambda *_: calls.append("conv"))
    converted, report = csp_kernels.convert(model)
    assert {item.name for item in report.left} == {"0", "1"}
    assert type(converted[0].cv1) is ConvBNAct
    converted(torch.randn(2, 8, 8, 8, requires_grad=True)).sum().backward()
    assert sorted(calls) == ["C2f", "conv"]


@pytest.mark.parametrize("case", list(LEFT_CASES))
def test_unit_the_kernels_cannot_compute_is_left_and_reported(case):
    make, name, cls, words = LEFT_CASES[case]
    model = make()
    left_before = dict(model.named_modules())[name]
    converted, report = csp_kernels.convert(model)
    assert [(item.name, item.from_class) for item in report.left] == [(name, cls)]
    assert words in report.left[0].reason and f"{name} " in str(report) and words in str(report)
    assert module_types(dict(converted.named_modules())[name]) == module_types(left_before)


def test_left_unit_runs_as_before_in_a_converted_model():
    model = randomize_(_gelu_yolo_model()).eval()
    converted, report = csp_kernels.convert(model)
    assert len(report.swapped) == 80 + 22 + 1 and fused_count(converted) == 80  # 22 stages, SPPF's pool
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for a, b in zip(tensors(converted(x)), tensors(model(x))):
            assert rel_error(a, b) < 1e-5


def test_sequential_that_is_not_a_unit_is_walked_into_and_counted():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4),  # two layers: no unit
                          nn.Sequential(YoloConv(4, 4), nn.ReLU()))
    converted, report = csp_kernels.convert(model)
    assert [s.name for s in report.swapped] == ["2.0"] and type(converted[2][0]) is ConvBNAct
    assert report.unknown == {"Conv2d": 1, "BatchNorm2d": 1} and not report.left


def test_report_prints_a_table_with_counts():
    model = nn.Sequential(YoloConv(3, 4), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()),
                          nn.Linear(4, 4))
    _, report = csp_kernels.convert(model)
    assert report.counts() == {"swapped": 1, "left": 1, "unknown": 1, "already_fused": 0}
    lines = str(report).splitlines()
    assert lines[0] == ("csp_kernels.convert: 1 swapped, 1 left as is, 0 already fused; modules with parameters "
                        "or buffers that no converter knows: 1 (Linear 1)")
    assert lines[1].split() == ["swapped", "from", "->", "to"] and lines[2].split() == ["0", "Conv", "->", "ConvBNAct"]
    assert lines[3].split()[:4] == ["left", "as", "is", "class"] and lines[4].split()[:3] == ["1", "Sequential",
                                                                                           "conv.bias"]


def test_registry_keys_are_the_upstream_classes():
    for cls in (YoloConv, YoloDWConv, ConvNormAct, Conv2dNormActivation, nn.Sequential, yolo.Bottleneck, yolo.C2f,
                yolo.C3, yolo.C3k, yolo.C3k2, cspnet.BottleneckBlock, cspnet.DarkBlock, cspnet.CrossStage,
                cspnet.CrossStage3, cspnet.DarkStage, densenet._DenseBlock):
        assert class_key(cls) in CONVERTERS


def test_reference_conv_bn_act_converts_and_reverts():
    model = randomize_(nn.Sequential(csp_kernels.reference.ConvBNAct(3, 4, 3, act="mish"))).double()
    converted, report = csp_kernels.convert(model)
    assert report.swapped_by_class() == {"ConvBNAct -> ConvBNAct": 1} and type(converted[0]) is ConvBNAct
    x = small_input(torch.float64)
    assert_step_matches(model, converted, x, "train")
    reverted = csp_kernels.revert(converted)
    assert module_types(reverted) == module_types(model)
    assert (reverted[0].in_channels, reverted[0].out_channels) == (3, 4)


def test_convert_twice_converts_once_and_shared_units_stay_shared():
    shared = YoloConv(4, 4, 3)
    model = nn.Sequential(shared, nn.Sequential(shared, YoloConv(4, 4)))
    converted, report = csp_kernels.convert(model)
    assert len(report.swapped) == 2 and converted[0] is converted[1][0]
    again, report = csp_kernels.convert(converted)
    assert report.counts() == {"swapped": 0, "left": 0, "unknown": 0, "already_fused": 2}
    assert module_types(again) == module_types(converted)
    reverted = csp_kernels.revert(again)
    assert type(reverted[0]) is YoloConv and reverted[0] is reverted[1][0]


def test_the_model_itself_as_a_unit():
    unit = randomize_(YoloConv(4, 6, 3, 2))
    fused, report = csp_kernels.convert(unit)
    assert type(fused) is ConvBNAct and [s.name for s in report.swapped] == [""]
    assert "(the model itself)" in str(report)
    back = csp_kernels.revert(fused)
    assert type(back) is YoloConv and list(back.state_dict()) == list(unit.state_dict())
    x = torch.randn(2, 4, 8, 8)
    unit.eval(), fused.eval(), back.eval()
    with torch.no_grad():
        assert rel_error(fused(x), unit(x)) < 1e-5 and torch.equal(back(x), unit(x))


# --- torchvision DenseNet blocks -------------------------------------------------------------


def dense_block_model() -> nn.Sequential:
    """torchvision's _DenseBlock of 3 layers (growth 3, bn_size 2): 4 x H x W -> 13 x H x W."""
    return randomize_(nn.Sequential(densenet._DenseBlock(3, 4, 2, 3, drop_rate=0.0))).double()


def dense_block_input() -> torch.Tensor:
    return torch.randn(2, 4, 6, 5, dtype=torch.float64)


def test_densenet_block_holds_its_layers_matches_and_reverts():
    original = dense_block_model()
    model = copy.deepcopy(original)
    layers = list(model[0].children())
    converted, report = csp_kernels.convert(model, inplace=True)
    assert report.swapped_by_class() == {"_DenseBlock -> DenseBlock": 1} and not report.left and not report.unknown
    block = converted[0]
    assert type(block) is DenseBlock and all(a is b for a, b in zip(block.children(), layers))  # no copy
    assert (block.in_channels, block.num_layers, block.growth_rate, block.out_channels) == (4, 3, 3, 13)
    assert list(converted.state_dict()) == list(original.state_dict())
    assert_model_matches(original, converted, dense_block_input())

    reverted = assert_revert_loads_into(converted, dense_block_model(), dense_block_input())
    assert module_types(reverted) == module_types(original)
    assert [(layer.drop_rate, layer.memory_efficient) for layer in reverted[0].children()] == [(0.0, False)] * 3


def test_densenet_dropout_set_after_conversion_runs_torchvision_layers():
    original = dense_block_model()
    converted, _ = csp_kernels.convert(original)
    for model in (original, converted):
        model[0].denselayer2.drop_rate = 0.5
    x = dense_block_input()
    torch.manual_seed(1)
    expected = original(x)
    torch.manual_seed(1)
    with pytest.warns(ReferenceFallbackWarning, match="dense layer 2 has drop_rate=0.5"):
        out = converted(x)
    assert torch.equal(out, expected)  # torchvision's own layers, dropout masks included
    original.eval(), converted.eval()
    with torch.no_grad():  # no dropout in eval: the fused block runs
        assert_outputs_close(converted(x), original(x), "eval")


def test_densenet_memory_efficient_set_after_conversion_keeps_torchvision_statistics():
    """torchvision's checkpoint recomputes norm1 in the backward, updating its running statistics
    twice per step: a recorded training step runs torchvision's layers; one under no_grad, which
    torchvision does not checkpoint, runs fused."""
    original = dense_block_model()
    converted, _ = csp_kernels.convert(original)
    for model in (original, converted):
        model[0].denselayer3.memory_efficient = True
    original.train(), converted.train()
    x = dense_block_input()
    with pytest.warns(ReferenceFallbackWarning, match="dense layer 3 has memory_efficient=True"):
        assert_step_matches(original, converted, x, "train")
    assert converted[0].denselayer3.norm1.num_batches_tracked.item() == 2
    assert_state_close(converted, original, "after the checkpointed step")
    with torch.no_grad():
        assert_outputs_close(converted(x), original(x), "no_grad train")
    assert_state_close(converted, original, "after the step under no_grad")


# --- CSP stages -------------------------------------------------------------------------------

TIMM_LAYERS = dict(act_layer=get_act_layer("leaky_relu"), norm_layer=nn.BatchNorm2d)


def stage_model() -> nn.Sequential:
    """Every CSP stage convert knows, built by ultralytics and timm: 3 x 16 x 16 -> 32 x 4 x 4."""
    return randomize_(nn.Sequential(
        yolo.C2f(3, 16, n=2, shortcut=True),
        yolo.C3(16, 16, n=2),
        yolo.C3k2(16, 16, n=1, c3k=True),
        yolo.C3k2(16, 16, n=1),
        cspnet.CrossStage3(16, 32, 2, 1, 2, block_ratio=0.5, bottle_ratio=0.5, block_fn=cspnet.BottleneckBlock,
                           **TIMM_LAYERS),
        cspnet.DarkStage(32, 32, 1, 1, 2, bottle_ratio=0.5, block_fn=cspnet.DarkBlock, **TIMM_LAYERS),
        cspnet.CrossStage(32, 32, 2, 1, 1, expand_ratio=2.0, block_fn=cspnet.DarkBlock, **TIMM_LAYERS),
    ))


STAGE_SWAPS = {"Bottleneck -> Bottleneck": 2 + 2 + 2 + 1, "C2f -> C2f": 1, "C3 -> C3": 1, "C3k -> C3k": 1,
               "C3k2 -> C3k2": 2, "BottleneckBlock -> BottleneckBlock": 2, "CrossStage3 -> CrossStage3": 1,
               "DarkBlock -> DarkBlock": 2 + 1, "DarkStage -> DarkStage": 1, "CrossStage -> CrossStage": 1}


def stage_input() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, dtype=torch.float64)


def assert_model_matches(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """Eval (no_grad and with gradients) and a training step: outputs, gradients, running statistics."""
    original.eval(), converted.eval()
    with torch.no_grad():
        assert_outputs_close(converted(x), original(x), "eval (no_grad)")
    with eval_with_autograd_warns(converted):
        assert_step_matches(original, converted, x, "eval")
    original.train(), converted.train()
    assert_step_matches(original, converted, x, "train")
    assert_state_close(converted, original, "after the training step")


def test_every_stage_is_swapped_matches_and_reverts():
    original = stage_model().double()
    converted, report = csp_kernels.convert(original)
    swapped = report.swapped_by_class()
    assert {key: n for key, n in swapped.items() if "ConvBNAct" not in key} == STAGE_SWAPS
    assert not report.left and not report.unknown
    assert fused_count(converted) == sum(swapped.values()) - sum(STAGE_SWAPS.values())
    assert fused_stages(converted) == split_swaps(STAGE_SWAPS)[1]
    assert [type(m).__module__ for m in converted] == [stages.__name__] * len(original)
    # children first: a stage's units and blocks are reported before the stage
    names = [s.name for s in report.swapped]
    assert names.index("0.m.0") < names.index("0") and names.index("6.blocks.0") < names.index("6")
    assert list(converted.state_dict()) == list(original.state_dict())
    assert_model_matches(original, converted, stage_input())

    reverted = assert_revert_loads_into(converted, stage_model().double(), stage_input())
    assert module_types(reverted) == module_types(original)  # timm's Identity attn and drop_path back too
    assert reverted[0].c == original[0].c and reverted[6].expand_chs == original[6].expand_chs


def test_reference_twins_convert_to_the_fused_stages_and_back():
    twins = csp_kernels.reference
    model = randomize_(nn.Sequential(
        twins.C3k2(3, 8, 1, c3k=True),
        twins.CrossStage(8, 16, 2, 1, 1, expand_ratio=2.0, block_fn=twins.BottleneckBlock, act_layer="silu"),
    )).double()
    converted, report = csp_kernels.convert(model)
    assert fused_stages(converted) == {"C3k2": 1, "C3k": 1, "Bottleneck": 2, "CrossStage": 1, "BottleneckBlock": 1}
    assert not report.left
    assert_model_matches(model, converted, stage_input())
    assert module_types(csp_kernels.revert(converted)) == module_types(model)


def _with_gelu(module: nn.Module, path: str) -> nn.Module:
    dict(module.named_modules())[path].act = nn.GELU()
    return module


def _hooked_stage():
    stage = yolo.C2f(3, 8)
    stage.register_forward_hook(lambda *_: None)
    return stage


# (stage builder, stage swaps left in the report as (qualified name, class, words of the reason),
# stage classes still swapped)
STAGE_CASES = {
    "C2f with a GELU cv2": (lambda: _with_gelu(yolo.C2f(3, 8, shortcut=True), "cv2"),
                            [("0.cv2", "Conv", "GELU"), ("0", "C2f", "cv2 is Conv")], {"Bottleneck": 1}),
    # C3 calls cv1 as a plain module: a left cv1 does not keep it from being swapped
    "C3 with a GELU cv1": (lambda: _with_gelu(yolo.C3(3, 8), "cv1"), [("0.cv1", "Conv", "GELU")],
                           {"C3": 1, "Bottleneck": 1}),
    "C3k2 with attention": (lambda: yolo.C3k2(3, 16, 1, attn=True),
                            [("0", "C3k2", "m.0 is Sequential")], {"Bottleneck": 1}),
    "C2f with a forward hook": (_hooked_stage, [("0", "C2f", "forward hook")], {"Bottleneck": 1}),
    "timm drop path": (lambda: cspnet.BottleneckBlock(3, 3, drop_path=0.1, **TIMM_LAYERS),
                       [("0", "BottleneckBlock", "drop_path is DropPath")], {}),
    "timm attention": (lambda: cspnet.DarkStage(3, 8, 2, 1, 1, block_fn=cspnet.DarkBlock, attn_layer=SEModule,
                                                **TIMM_LAYERS),
                       [("0.blocks.0", "DarkBlock", "attn is SEModule"), ("0", "DarkStage", "blocks.0 is DarkBlock")],
                       {}),
    "timm CrossStage3 without conv_down": (
        lambda: cspnet.CrossStage3(3, 8, 1, 1, 1, block_ratio=0.5, block_fn=cspnet.DarkBlock, **TIMM_LAYERS),
        [("0", "CrossStage3", "no submodule conv_down")], {"DarkBlock": 1}),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_stage_with_a_child_or_feature_the_twin_lacks_is_left(case):
    make, expected_left, expected_stages = STAGE_CASES[case]
    original = randomize_(nn.Sequential(make())).double()
    converted, report = csp_kernels.convert(original)
    left = [(item.name, item.from_class) for item in report.left]
    assert left == [(name, cls) for name, cls, _ in expected_left], report
    for item, (_, _, words) in zip(report.left, expected_left):
        assert words in item.reason and words in str(report)
    assert fused_stages(converted) == expected_stages
    assert fused_count(converted) > 0 and list(converted.state_dict()) == list(original.state_dict())
    if case != "timm CrossStage3 without conv_down":  # upstream's own forward calls None
        assert_model_matches(original, converted, stage_input())
    assert module_types(csp_kernels.revert(converted)) == module_types(original)


# --- what the conversion keeps ---------------------------------------------------------------


def test_inplace_false_leaves_the_original_untouched():
    model = small_model()
    types, state = module_types(model), copy.deepcopy(model.state_dict())
    converted, _ = csp_kernels.convert(model)
    assert not set(map(id, converted.parameters())) & set(map(id, model.parameters()))
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(small_input()).square().mean().backward()
    optimizer.step()
    assert module_types(model) == types
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_model_torch_cannot_deep_copy_says_to_convert_in_place():
    """torch.nn.utils.prune leaves a non-leaf weight, which copy.deepcopy refuses."""
    import torch.nn.utils.prune as prune
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    prune.l1_unstructured(model[0], "weight", 0.5)
    with pytest.raises(RuntimeError, match=r"csp_kernels.convert\(model\) with inplace=False .*graph leaves.* "
                                           r"Pass inplace=True"):
        csp_kernels.convert(model)
    _, report = csp_kernels.convert(model, inplace=True)  # left: prune's weight is recomputed by a pre-hook
    assert report.counts()["left"] == 1 and "conv.weight is not a registered parameter" in report.left[0].reason


def test_inplace_shares_tensors_and_keeps_requires_grad_and_optimizer():
    model = small_model()
    params = dict(model.named_parameters())
    model[2].conv.weight.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion
    converted, _ = csp_kernels.convert(model, inplace=True)
    assert converted is model and all(type(m) is ConvBNAct for m in model)
    assert [id(p) for p in converted.parameters()] == [id(p) for p in params.values()]
    assert not converted[2].conv.weight.requires_grad
    before = [p.detach().clone() for p in converted.parameters()]
    converted(small_input()).square().mean().backward()
    optimizer.step()
    for (name, p), b in zip(converted.named_parameters(), before):
        assert torch.equal(b, p) != p.requires_grad, name
    assert converted[2].conv.weight.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_dtype_and_modes_are_kept(device, dtype):
    model = small_model().to(device, dtype)
    model[3].eval()  # the unit in eval inside a training model
    model[4][1].eval()  # a frozen BatchNorm inside a training unit
    converted, _ = csp_kernels.convert(model)
    assert [m.training for m in converted] == [True, True, True, False, True, True]
    assert not converted[4].bn.training and converted[4].conv.training
    assert {(t.device.type, t.dtype) for t in converted.state_dict().values() if t.is_floating_point()} == {
        (torch.device(device).type, dtype)}
    x = small_input(dtype, device)
    if dtype == torch.float64:
        assert_outputs_close(converted(x), model(x), "mixed modes")
    converted.eval()
    reverted = csp_kernels.revert(converted)
    assert not any(m.training for m in reverted.modules())
    assert {t.dtype for t in reverted.state_dict().values() if t.is_floating_point()} == {dtype}


def test_sequential_units_keep_the_upstream_state_dict_keys():
    model = small_model()
    converted, _ = csp_kernels.convert(model)
    assert list(converted.state_dict()) == list(model.state_dict())
    assert "3.0.weight" in model.state_dict() and "3.conv.weight" in dict(converted.named_parameters())
    fresh = small_model()
    converted.load_state_dict(fresh.state_dict(), strict=True)  # the upstream keys load into it
    model.load_state_dict(converted.state_dict(), strict=True)  # and its keys into the upstream model
    converted.load_state_dict(dict(converted.named_parameters()) | dict(converted.named_buffers()), strict=True)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]) and torch.equal(value, model.state_dict()[key]), key


def test_missing_keys_are_named_as_state_dict_names_them():
    """A checkpoint without a renamed unit's entry: load_state_dict reports the key by the name
    state_dict() and the upstream model use ("3.0.weight"), not the fused module's own."""
    model = small_model()
    converted, _ = csp_kernels.convert(model)
    partial = {k: v for k, v in model.state_dict().items() if k != "3.0.weight"}
    expected = model.load_state_dict(partial, strict=False).missing_keys
    assert expected == ["3.0.weight"]
    assert converted.load_state_dict(partial, strict=False).missing_keys == expected
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "3.0.weight"'):
        converted.load_state_dict(partial)


def test_size_mismatches_are_named_as_state_dict_names_them():
    """A checkpoint whose renamed unit's weight has another shape: the error names the key as
    state_dict() and the upstream model do ("3.0.weight"), as the upstream model's error does."""
    model = small_model()
    converted, _ = csp_kernels.convert(model)
    wrong = dict(model.state_dict())
    wrong["3.0.weight"] = wrong["3.0.weight"][:1].clone()
    errors = []
    for m in (model, converted):
        with pytest.raises(RuntimeError, match="size mismatch for 3.0.weight: copying a param with shape") as err:
            m.load_state_dict(wrong)
        errors.append(str(err.value).split("\n")[1:])
    assert errors[0] == errors[1]


def _train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.zero_grad()
    return model


@pytest.mark.parametrize("route", ["deepcopy", "torch.save", "state_dict"])
def test_copied_saved_and_loaded_models_compute_the_same(route):
    converted, _ = csp_kernels.convert(small_model().double())
    x = small_input(torch.float64)
    _train_step(converted, x)
    converted.eval()
    if route == "deepcopy":
        copied = copy.deepcopy(converted)
        assert not set(map(id, copied.parameters())) & set(map(id, converted.parameters()))
    elif route == "torch.save":
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        copied = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    else:
        buffer = io.BytesIO()
        torch.save(converted.state_dict(), buffer)
        copied = csp_kernels.convert(small_model().double())[0].eval()
        copied.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())), strict=True)
    assert module_types(copied) == module_types(converted)
    with torch.no_grad():
        assert_outputs_close(copied(x), converted(x), route)
    copied.train(), converted.train()
    assert_step_matches(converted, copied, x, f"{route} train")
    reverted = csp_kernels.revert(copied)
    assert module_types(reverted) == module_types(small_model())
    assert_state_close(reverted, converted, f"{route}, reverted")


def test_torch_compile_eval_forward_and_train_step():
    torch._dynamo.reset()
    model = small_model()
    converted, _ = csp_kernels.convert(model)
    compiled = torch.compile(converted, fullgraph=True)  # fullgraph: the conversion adds no graph break
    x = small_input()
    model.eval(), converted.eval()
    with torch.no_grad():
        assert rel_error(compiled(x), model(x)) < 1e-5
    model.train(), converted.train()
    out_model, out_compiled = model(x), compiled(x)
    assert rel_error(out_compiled, out_model) < 1e-5
    out_model.square().mean().backward()
    out_compiled.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), converted.parameters()):
        assert rel_error(q.grad, p.grad) < 1e-4, name
    for key, value in converted.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert rel_error(value, model.state_dict()[key]) < 1e-5, key



@pytest.mark.parametrize("order", ["convert, then synchronize", "timm synchronizes, then convert"])
def test_revert_keeps_timm_batch_norms_synchronized(order):
    """A synchronized ConvNormAct reverts to timm's SyncBatchNormAct (it came back as a plain
    BatchNormAct2d: ranks' running statistics drifted apart), and one that timm synchronized
    converts (it was left)."""
    from timm.layers import convert_sync_batchnorm as timm_sync
    from timm.layers.norm_act import SyncBatchNormAct
    from csp_kernels.distributed import convert_sync_batchnorm
    torch.manual_seed(0)
    upstream = timm.create_model("cspresnet50", pretrained=False).eval()
    if order.startswith("convert"):
        model, report = csp_kernels.convert(upstream)
        convert_sync_batchnorm(model)
    else:
        model, report = csp_kernels.convert(timm_sync(copy.deepcopy(upstream)))
    assert not report.left and sum(type(m) is nn.SyncBatchNorm for m in model.modules()) == 55
    reverted = csp_kernels.revert(model)
    norms = [m for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 55 and all(type(m) is SyncBatchNormAct for m in norms)
    assert list(reverted.state_dict()) == list(upstream.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # in eval a SyncBatchNorm needs no process group
        torch.testing.assert_close(reverted(x), upstream(x), rtol=1e-5, atol=1e-5)


# --- what a swap would lose or split: left, with the reason -----------------------------------

def _extra_parameter():
    model = small_model()
    model[0].gamma = nn.Parameter(torch.ones(1))
    return model


def _extra_buffer():
    model = small_model()
    model[2].bn.register_buffer("extra", torch.ones(1))  # on timm's BatchNormAct2d, which becomes a BatchNorm2d
    return model


def _extra_submodule():
    model = small_model()
    model[0].aux = nn.Linear(2, 2)
    return model


def _state_dict_hook():
    model = small_model()
    model[0].register_state_dict_post_hook(lambda module, sd, prefix, meta: sd.__setitem__(prefix + "extra", 1))
    return model


def _shared_norm():
    model = randomize_(nn.Sequential(ConvNormAct(3, 8, 3, act_layer="silu"), ConvNormAct(8, 8, 1, act_layer="silu")))
    model[1].bn = model[0].bn  # timm's BatchNormAct2d shared by two units
    return model


KEPT_STATE = {
    "parameter on the unit": (_extra_parameter, ["0"], "gamma is a tensor of its own"),
    "buffer on a replaced BatchNormAct2d": (_extra_buffer, ["2"], "bn.extra is a tensor of its own"),
    "submodule on the unit": (_extra_submodule, ["0"], "aux.weight is a tensor of its own"),
    "state_dict hook": (_state_dict_hook, ["0"], "has state_dict_hooks"),
    "BatchNormAct2d shared": (_shared_norm, ["0", "1"], r"bn \(BatchNormAct2d\) is also used elsewhere in the model"),
}


@pytest.mark.parametrize("case", KEPT_STATE)
def test_units_holding_more_than_the_fused_module_are_left(case):
    """A swap would drop (a parameter, buffer or submodule registered on the unit, a state_dict
    hook) or split (a BatchNorm used elsewhere: each unit would get its own, whose modes then go
    apart) what the unit holds: the unit is left, named."""
    build_model, left, reason = KEPT_STATE[case]
    model = build_model()
    converted, report = csp_kernels.convert(model)
    assert [item.name for item in report.left] == left
    assert all(re.search(reason, item.reason) for item in report.left)
    assert all(type(converted[int(i)]) is type(model[int(i)]) for i in left)
    assert csp_kernels.revert(converted).state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_class_forward_patched_is_left():
    """A forward replaced on the upstream class (not on the instance) computes what the fused
    twin does not: the units are left, the patch named."""
    original = YoloConv.forward
    try:
        YoloConv.forward = lambda self, x: self.act(self.conv(x))  # no BatchNorm
        converted, report = csp_kernels.convert(small_model())
    finally:
        YoloConv.forward = original
    left = {item.name: item.reason for item in report.left}
    assert set(left) == {"0", "1"}  # Conv, and DWConv, which runs Conv's forward
    assert "Conv.forward is replaced on the class" in left["0"]


def test_revert_names_a_sequential_unit_as_it_was():
    """A plain nn.Sequential unit with named layers comes back with those names (revert named
    them 0, 1, 2: its state_dict no longer loaded into the original), an Identity act too."""
    model = nn.Sequential(
        nn.Sequential(collections.OrderedDict(conv=nn.Conv2d(4, 4, 3, padding=1, bias=False), bn=nn.BatchNorm2d(4),
                                  relu=nn.ReLU())),
        nn.Sequential(collections.OrderedDict(c=nn.Conv2d(4, 4, 1, bias=False), b=nn.BatchNorm2d(4), a=nn.Identity())))
    converted, report = csp_kernels.convert(model)
    assert len(report.swapped) == 2
    reverted = csp_kernels.revert(converted)
    assert [list(unit._modules) for unit in reverted] == [["conv", "bn", "relu"], ["c", "b", "a"]]
    model.load_state_dict(reverted.state_dict(), strict=True)


@pytest.mark.parametrize("call", [lambda: csp_kernels.convert(None), lambda: csp_kernels.convert(YoloConv),
                                  lambda: csp_kernels.revert(torch.zeros(1)),
                                  lambda: csp_kernels.distributed.convert_sync_batchnorm([nn.BatchNorm2d(2)]),
                                  lambda: csp_kernels.distributed.check_sync_batch_norm("model")])
def test_a_model_that_is_no_module_instance_is_named(call):
    with pytest.raises(TypeError, match="model must be an nn.Module instance"):
        call()


def test_a_flag_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match="inplace must be a bool; got str 'yes'"):
        csp_kernels.convert(small_model(), inplace="yes")
    with pytest.raises(TypeError, match="inplace must be a bool"):
        csp_kernels.revert(small_model(), inplace=1)


def test_revert_after_timm_froze_the_batch_norms():
    """timm's freeze_batch_norm_2d on a converted model (fine-tuning) puts torchvision's
    FrozenBatchNorm2d in the fused units; revert gives timm's ConvNormAct holding the
    FrozenBatchNormAct2d that freezing the original makes (revert raised AttributeError), with the
    same numbers and state_dict; a bn that no timm norm + activation module can hold is named."""
    from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d
    torch.manual_seed(0)
    upstream = timm.create_model("cspresnet50", pretrained=False).eval()
    model, _ = csp_kernels.convert(upstream)
    frozen = freeze_batch_norm_2d(model)
    reverted = csp_kernels.revert(frozen)
    units = [m for m in reverted.modules() if isinstance(m, ConvNormAct)]
    assert len(units) == 55 and all(type(m.bn) is FrozenBatchNormAct2d for m in units)
    frozen_upstream = freeze_batch_norm_2d(copy.deepcopy(upstream))
    assert list(reverted.state_dict()) == list(frozen_upstream.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), frozen_upstream(x), rtol=1e-5, atol=1e-5)

    model, _ = csp_kernels.convert(timm.create_model("cspresnet50", pretrained=False))
    model.stem.conv1.bn = nn.GroupNorm(4, 64)
    with pytest.raises(TypeError, match="holds a bn of type GroupNorm"):
        csp_kernels.revert(model)
