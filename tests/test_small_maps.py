"""The CPU's routes for small maps. In training (ops.routing.training_eager_is_faster): a training
ConvBNAct or CSP stage on maps of at most SMALL_TRAINING_MAP_PIXELS pixels runs its reference
forward, plain PyTorch, without a warning, and computes the reference's numbers exactly; larger
maps, eval, and synchronized BatchNorms keep the fused ops. Without autograd
(ops.routing.eval_stage_unbuffered_is_faster): a CSP stage on maps of at most
SMALL_EVAL_STAGE_PIXELS pixels runs its reference forward with its ConvBNActs fused. The other
tests pin the fused ops (conftest.py) because they draw tiny maps; these unpin the routes."""
import warnings

import pytest
import torch

import csp_kernels
from csp_kernels.ops import routing
from csp_kernels.nn import stages
from csp_kernels.ops import transition as transition_ops
from helpers import randomize_
from test_stages import make_pair

# 8x8 is the largest square map the route takes; 9x8 the smallest map it leaves fused.
SIDES = {"8x8": ((8, 8), False), "9x8": ((9, 8), True)}


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """The route unpinned, and the training ConvBNActs' fused op calls recorded."""
    monkeypatch.setattr(routing, "_SMALL_MAPS", "eager")
    calls = []
    recorded = transition_ops.train_transition_recorded
    monkeypatch.setattr(transition_ops, "train_transition_recorded",
                        lambda *args: calls.append(args[0].shape) or recorded(*args))
    return calls


def _train_step(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[output, x's gradient, parameter gradients..., state_dict values...] of one training step."""
    x = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", csp_kernels.ReferenceFallbackWarning)
        y = module(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype))
    return [y, x.grad, *(p.grad for p in module.parameters()), *module.state_dict().values()]


def _assert_route(fused_calls: list, ref, fused, x: torch.Tensor, fused_runs: bool) -> None:
    expected, actual = _train_step(ref, x), _train_step(fused, x)
    assert bool(fused_calls) == fused_runs, fused_calls
    for a, e in zip(actual, expected, strict=True):
        if fused_runs:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        else:  # the reference's own ops: the same numbers, bit for bit
            assert torch.equal(a, e)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_conv_bn_act_on_small_maps_trains_as_the_reference(fused_calls, side, kernel_size):
    (height, width), fused_runs = SIDES[side]
    assert (height * width <= routing.SMALL_TRAINING_MAP_PIXELS) != fused_runs
    ref = randomize_(csp_kernels.reference.ConvBNAct(6, 8, kernel_size, act="silu")).double()
    fused = csp_kernels.ConvBNAct(6, 8, kernel_size, act="silu").double()
    fused.load_state_dict(ref.state_dict())
    _assert_route(fused_calls, ref, fused, torch.randn(3, 6, height, width, dtype=torch.float64), fused_runs)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", ["c2f", "c3k2-c3k", "timm-resnet"])
def test_stage_on_small_maps_trains_as_the_reference(fused_calls, side, case):
    (height, width), fused_runs = SIDES[side]
    ref, fused, channels = make_pair(case)
    _assert_route(fused_calls, ref, fused, torch.randn(2, channels, height, width, dtype=torch.float64),
                  fused_runs)


def test_eval_on_small_maps_stays_fused(monkeypatch):
    """The route is for training: eval's fused path (BN folded, its fold cached) keeps its kernels."""
    monkeypatch.setattr(routing, "_SMALL_MAPS", "eager")
    calls = []
    evaluated = transition_ops.eval_transition
    monkeypatch.setattr(transition_ops, "eval_transition", lambda *args: calls.append(1) or evaluated(*args))
    ref = randomize_(csp_kernels.reference.ConvBNAct(6, 8, 3)).double().eval()
    fused = csp_kernels.ConvBNAct(6, 8, 3).double().eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)
    assert calls



@pytest.mark.parametrize("case", ["timm-resnext", "timm-darknet"])
def test_fused_stage_with_small_maps_after_its_stride_trains_as_the_reference(fused_calls, case):
    """A stride-2 stage on 16x16 runs its buffered forward; past conv_down its ConvBNActs see 8x8
    and run their reference forwards, writing into the stage's buffer slots by copy."""
    ref, fused, channels = make_pair(case)
    x = torch.randn(2, channels, 16, 16, dtype=torch.float64)
    expected, actual = _train_step(ref, x), _train_step(fused, x)
    assert [tuple(shape[2:]) for shape in fused_calls] == [(16, 16)], fused_calls  # conv_down alone fused
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# 16x16 is the largest square map the eval stage route takes; 17x16 the smallest it leaves buffered.
EVAL_SIDES = {"16x16": ((16, 16), False), "17x16": ((17, 16), True)}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-mode"])  # train-mode: BN statistics
@pytest.mark.parametrize("side", EVAL_SIDES)
@pytest.mark.parametrize("case", ["c2f", "c3k2-c3k", "timm-resnet", "timm-darknet"])
def test_stage_without_autograd_on_small_maps_runs_unbuffered(monkeypatch, side, case, training):
    """Without autograd (ops.routing.eval_stage_unbuffered_is_faster), a stage on maps of at most
    SMALL_EVAL_STAGE_PIXELS pixels runs its reference forward, chunk and cat, its ConvBNActs
    still fused, without a warning; larger maps, and calls that autograd records, fill the
    buffer. Either way the reference's numbers and running statistics."""
    (height, width), buffered = EVAL_SIDES[side]
    assert (height * width <= routing.SMALL_EVAL_STAGE_PIXELS) != buffered
    monkeypatch.setattr(routing, "_SMALL_MAPS", "eager")
    buffers = []
    real_slot = stages.slot
    monkeypatch.setattr(stages, "slot", lambda buf, *bounds: buffers.append(buf.shape) or real_slot(buf, *bounds))
    units = []
    for name in ("eval_transition", "train_transition"):
        real = getattr(transition_ops, name)
        monkeypatch.setattr(transition_ops, name, lambda *args, real=real: units.append(1) or real(*args))
    ref, fused, channels = make_pair(case)
    ref.train(training), fused.train(training)
    x = torch.randn(2, channels, height, width, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", csp_kernels.ReferenceFallbackWarning)
        y, expected = fused(x), ref(x)
    assert bool(buffers) == buffered and units  # the ConvBNActs fused either way
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    for (key, value), expected_value in zip(fused.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(value, expected_value, rtol=1e-10, atol=1e-10, msg=key)
    buffers.clear()
    fused(x.requires_grad_())  # autograd records: the buffer, for the memory it saves in backward
    assert buffers
