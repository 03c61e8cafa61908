"""float16/bfloat16 on every backend here: the fused modules' error against a float64 reference
at most 2x the error of the plain-PyTorch module (`csp_kernels.reference`) run in that same
dtype (tests/helpers.assert_matches_reference), for outputs (training and eval) and input
gradients. Parameter gradients are not held to the rule: one activation whose sign differs in
16-bit math moves a BatchNorm weight gradient by percents, in the plain module as much as in
the fused one, so the ratio of two such errors measures luck, not rounding."""
import copy

import pytest
import torch

import csp_kernels
from csp_kernels import reference
from helpers import assert_matches_reference, fused_backends, randomize_, rel_error

LOW = [torch.float16, torch.bfloat16]
CPU_BACKENDS = [b for b in fused_backends("cpu") if b != "triton"]
TRITON_HERE = "triton" in fused_backends("cpu")  # the Triton interpreter (no GPU here)


def _conv_bn_act(kernel_size, act, channels=16):
    """(plain-PyTorch class, fused class, constructor arguments)."""
    return reference.ConvBNAct, csp_kernels.ConvBNAct, dict(in_channels=channels, out_channels=24,
                                                            kernel_size=kernel_size, act=act)


def _dense(fusion, channels=16):
    return reference.PartialDenseBlock, csp_kernels.PartialDenseBlock, dict(
        in_channels=channels, num_layers=2, growth_rate=8, fusion=fusion)


def _instances(ref_cls, fused_cls, kwargs, dtype):
    """(float64 reference, plain module in dtype, fused module in dtype), one randomized state."""
    ref64 = randomize_(ref_cls(**kwargs)).double()
    plain = copy.deepcopy(ref64).to(dtype)
    fused = fused_cls(**kwargs)
    fused.load_state_dict(ref64.state_dict())
    return ref64, plain, fused.to(dtype)


def check_low_precision(ref_cls, fused_cls, kwargs, dtype, backend_name, x_shape, training):
    torch.manual_seed(0)
    ref64, plain, fused = _instances(ref_cls, fused_cls, kwargs, dtype)
    x64 = torch.randn(*x_shape, dtype=torch.float64)
    for m in (ref64, plain, fused):
        m.train(training)
    if not training:
        with torch.no_grad():
            y64, y_plain = ref64(x64), plain(x64.to(dtype))
            with csp_kernels.use_backend(backend_name):
                y = fused(x64.to(dtype))
        assert y.dtype == dtype
        assert_matches_reference(y, y64, plain=y_plain, name="eval output")
        return
    results = []
    grad_y = None
    for module, name in ((ref64, "reference"), (plain, "reference"), (fused, backend_name)):
        x = x64.detach().to(next(module.parameters()).dtype).requires_grad_()
        with csp_kernels.use_backend(name):
            y = module(x)
        if grad_y is None:
            grad_y = torch.randn_like(y)
        y.backward(grad_y.to(y.dtype))
        results.append((y, x.grad))
    (y64, gx64), (y_plain, gx_plain), (y, gx) = results
    assert y.dtype == gx.dtype == dtype
    assert_matches_reference(y, y64, plain=y_plain, name="training output")
    assert_matches_reference(gx, gx64, plain=gx_plain, name="input gradient")


CASES = [pytest.param(*_conv_bn_act(k, act), id=f"ConvBNAct-{k}x{k}-{act}")
         for k in (1, 3) for act in ("relu", "silu", "leaky_relu", "hardswish")]
CASES += [pytest.param(*_dense(fusion), id=f"PartialDenseBlock-{fusion}") for fusion in ("last", "csp")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize(("ref_cls", "fused_cls", "kwargs"), CASES)
def test_within_twice_the_plain_error(ref_cls, fused_cls, kwargs, backend_name, dtype, training):
    check_low_precision(ref_cls, fused_cls, kwargs, dtype, backend_name, (8, 16, 32, 32), training)


EVAL_CASES = [pytest.param(*_conv_bn_act(k, "silu"), id=f"ConvBNAct-{k}x{k}") for k in (1, 3)]
EVAL_CASES += [pytest.param(*_dense(fusion), id=f"PartialDenseBlock-{fusion}") for fusion in ("last", "first", "csp")]


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize(("ref_cls", "fused_cls", "kwargs"), EVAL_CASES)
def test_eval_rounds_no_more_than_plain(ref_cls, fused_cls, kwargs, backend_name, seed, dtype):
    """Eval ConvBNAct and PartialDenseBlock round each conv's output and each BN + act output,
    a subset of the plain module's roundings (conv, BN, act), so their error is no larger: a BN
    folded into a 16-bit weight adds a rounding of every weight (1.4-2.05x the plain error over
    seeds for ConvBNAct, up to 8x for small dense blocks)."""
    torch.manual_seed(seed)
    ref64, plain, fused = _instances(ref_cls, fused_cls, kwargs, dtype)
    x64 = torch.randn(4, 16, 12, 12, dtype=torch.float64)
    for m in (ref64, plain, fused):
        m.eval()
    with torch.no_grad(), csp_kernels.use_backend(backend_name):
        y64, y_plain, y = ref64(x64), plain(x64.to(dtype)), fused(x64.to(dtype))
    assert rel_error(y, y64) <= 1.05 * rel_error(y_plain, y64)


TRITON_CASES = [pytest.param(*_conv_bn_act(1, act, channels=8), id=f"ConvBNAct-1x1-{act}") for act in ("relu", "silu")]
TRITON_CASES += [pytest.param(*_dense(fusion, channels=8), id=f"PartialDenseBlock-{fusion}")
                 for fusion in ("last", "csp")]
requires_interpreter = pytest.mark.skipif(not TRITON_HERE, reason="Triton's interpreter is not available here")


@requires_interpreter
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("ref_cls", "fused_cls", "kwargs"), TRITON_CASES)
def test_triton_interpreter_float16(ref_cls, fused_cls, kwargs, training):
    check_low_precision(ref_cls, fused_cls, kwargs, torch.float16, "triton", (8, 8, 16, 16), training)


@requires_interpreter
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("ref_cls", "fused_cls", "kwargs"), TRITON_CASES)
def test_triton_interpreter_refuses_bfloat16(ref_cls, fused_cls, kwargs, training):
    """The interpreter's tl.dot misreads bfloat16 (tests/test_triton_conv1x1.py): a clear error,
    not wrong numbers."""
    _, _, fused = _instances(ref_cls, fused_cls, kwargs, torch.bfloat16)
    fused.train(training)
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with torch.no_grad(), csp_kernels.use_backend("triton"), pytest.raises(
            TypeError, match=r"(?i)bfloat16.*interpreter|interpreter.*bfloat16"):
        fused(x)
