"""Activation numerics against ATen: NaN and +-inf through every activation, forward and
derivative, in every kernel; BatchNorm running statistics with a NaN input; the Winograd 3x3
with an inf; LeakyReLU's slope carried through; the `act` submodule read at forward time."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import csp_kernels
from csp_kernels import backend, checks, reference
from csp_kernels.ops.batch_norm_act import scale_shift_act
from csp_kernels.ops.conv3x3 import conv3x3_winograd
from csp_kernels.ops.routing import winograd_usable
from csp_kernels.ops.dense import bn_act_backward_accumulate
from helpers import assert_matches_reference, rel_error

TRITON = backend.triton_usable(torch.device("cpu"))[0]
if TRITON:
    from triton_helpers import triton_act

INF, NAN = float("inf"), float("nan")
# The special values, then ordinary ones, so that the kernels' vector loops see them all.
SPECIAL = [NAN, INF, -INF, 0.0, -0.0, -3.0, 3.0, 20.0, 20.5, 25.0, -100.0, 100.0, -88.5, 88.5, 1e30, -1e30]
# (kernels' name, the ATen module it must match)
ACTS = [("relu", nn.ReLU()), ("leaky_relu", nn.LeakyReLU(checks.LEAKY_RELU_SLOPE)),
        ("leaky_relu:0.01", nn.LeakyReLU(0.01)), ("silu", nn.SiLU()), ("mish", nn.Mish()),
        ("hardswish", nn.Hardswish()), ("identity", nn.Identity())]
ACT_IDS = [name for name, _ in ACTS]


def _values(dtype):
    return torch.cat([torch.tensor(SPECIAL, dtype=dtype), torch.linspace(-6, 6, 48, dtype=dtype)])


def _aten(module, u):
    """ATen's act(u) and act'(u) (autograd with a gradient of ones)."""
    u = u.clone().requires_grad_()
    y = module(u)
    y.backward(torch.ones_like(y))
    return y.detach(), u.grad


def _assert_same(out, ref, name):
    """Same NaN and inf positions, same values elsewhere (float32: the exp polynomial's ulps;
    the atol covers silu and mish of u < -87, which underflow to -0.0 or a denormal)."""
    tol = 1e-5 if out.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=1e-30, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act,module", ACTS, ids=ACT_IDS)
def test_cpu_kernels_match_aten_at_nan_and_inf(act, module, dtype):
    u = _values(dtype)
    y_ref, d_ref = _aten(module, u)
    x = u.reshape(1, 1, 1, -1)
    ones, zeros = torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype)
    _assert_same(scale_shift_act(x, ones, zeros, act).flatten(), y_ref, f"{act} forward")
    # grad_acc += weight * grad_a * act'(weight * (x - mean) * invstd + bias): act' itself.
    grad_acc = torch.zeros_like(x)
    bn_act_backward_accumulate(torch.ones_like(x), x, zeros, ones, ones, zeros, act, grad_acc)
    _assert_same(grad_acc.flatten(), d_ref, f"{act} derivative")


@pytest.mark.parametrize("act,module", ACTS, ids=ACT_IDS)
def test_cpu_gemm_epilogue_and_prologue_keep_nan_and_inf(act, module):
    """The 1x1 GEMM's activation epilogue and its normalize-on-load prologue (the dense layers'
    BN + ReLU: relu(NaN) was 0 there, which kept the next BatchNorm's statistics finite)."""
    from csp_kernels.ops.conv1x1 import conv1x1_fused
    u = _values(torch.float64).reshape(1, 1, 1, -1)
    y = conv1x1_fused(u, torch.ones(1, 1, 1, 1, dtype=torch.float64), bias=torch.zeros(1, dtype=torch.float64),
                      act=act)
    _assert_same(y.flatten(), module(u).flatten(), f"{act} epilogue")
    ones, zeros = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    y = conv1x1_fused(u, torch.ones(1, 1, 1, 1, dtype=torch.float64), in_scale=ones, in_shift=zeros, in_act=act)
    _assert_same(y.flatten(), module(u).flatten(), f"{act} prologue")


@pytest.mark.skipif(not TRITON, reason="Triton is not usable (no GPU, TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act,module", ACTS, ids=ACT_IDS)
def test_triton_activations_match_aten_at_nan_and_inf(act, module, dtype):
    u = _values(dtype)
    y, d = triton_act(u, act, torch.ones_like(u))
    y_ref, d_ref = _aten(module, u)
    _assert_same(y, y_ref, f"{act} forward")
    _assert_same(d, d_ref, f"{act} derivative")


def _state_from(ref, fused):
    fused.load_state_dict(ref.state_dict())
    return fused


def test_conv_bn_act_running_stats_with_nan_input():
    ref = reference.ConvBNAct(4, 6, 1, act="relu").double().train()
    fused = _state_from(ref, csp_kernels.ConvBNAct(4, 6, 1, act="relu").double().train())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x[1, 2, 3, 1] = NAN
    with backend.use_backend("cpu"):
        y = fused(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    torch.testing.assert_close(fused.bn.running_mean, ref.bn.running_mean, equal_nan=True)
    torch.testing.assert_close(fused.bn.running_var, ref.bn.running_var, equal_nan=True)
    assert ref.bn.running_mean.isnan().all()


@pytest.mark.parametrize("fusion", ["last", "csp"])
def test_partial_dense_block_running_stats_with_nan_input(fusion):
    ref = reference.PartialDenseBlock(6, 2, 3, fusion=fusion, act="leaky_relu").double().train()
    fused = _state_from(ref, csp_kernels.PartialDenseBlock(6, 2, 3, fusion=fusion, act="leaky_relu").double().train())
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    x[0, 4, 1, 2] = NAN  # a part-2 channel: through the dense layers
    with backend.use_backend("cpu"):
        y = fused(x)
    torch.testing.assert_close(y, ref(x), equal_nan=True)
    for (name, bn_ref), bn in zip(ref.named_modules(), fused.modules()):
        if isinstance(bn_ref, nn.BatchNorm2d):
            torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, equal_nan=True, msg=name)
            torch.testing.assert_close(bn.running_var, bn_ref.running_var, equal_nan=True, msg=name)


@pytest.mark.skipif(not winograd_usable(torch.empty(0)), reason="Winograd needs an AVX-512 CPU")
def test_winograd_keeps_inf_where_direct_convolution_does():
    x = torch.randn(2, 5, 8, 9)
    weight = torch.randn(4, 5, 3, 3)
    x[1, 3, 4, 4] = INF
    x[0, 1, 2, 7] = -INF
    y, ref = conv3x3_winograd(x, weight), F.conv2d(x, weight, padding=1)
    assert ref.isinf().any() and not ref.isnan().any()
    torch.testing.assert_close(y, ref, equal_nan=True)
    # A NaN spreads over its 3x3 neighbourhood, as in the direct convolution.
    x[1, 3, 4, 4] = NAN
    torch.testing.assert_close(conv3x3_winograd(x, weight), F.conv2d(x, weight, padding=1), equal_nan=True)


def test_timm_leaky_relu_weights_give_timm_numbers():
    timm_layers = pytest.importorskip("timm.layers")
    timm_conv = timm_layers.ConvNormAct(64, 32, 3, act_layer="leaky_relu").double()
    assert timm_conv.bn.act.negative_slope == 0.01
    conv = csp_kernels.ConvBNAct(64, 32, 3, act="leaky_relu", negative_slope=0.01).double()
    conv.load_state_dict(timm_conv.state_dict())
    x = torch.randn(2, 64, 6, 7, dtype=torch.float64)
    for train in (True, False):
        timm_conv.train(train), conv.train(train)
        x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref = timm_conv(x_ref)
        y = conv(x_fused)
        assert rel_error(y, y_ref) <= 1e-12, f"train={train}"
        if train:
            y_ref.square().sum().backward()
            y.square().sum().backward()
            assert rel_error(x_fused.grad, x_ref.grad) <= 1e-10
            torch.testing.assert_close(conv.bn.running_var, timm_conv.bn.running_var)
        with torch.no_grad():  # the folded eval path
            if not train:
                assert rel_error(conv(x), timm_conv(x)) <= 1e-12
                assert rel_error(conv.float()(x.float()), timm_conv(x)) <= 1e-5  # oneDNN's post-op
                conv.double()


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("new_act", [nn.LeakyReLU(0.2), nn.SiLU(), nn.Identity()], ids=["leaky0.2", "silu", "id"])
def test_replaced_act_module_is_honoured(kernel_size, new_act):
    ref = reference.ConvBNAct(5, 6, kernel_size, act="relu")
    fused = _state_from(ref, csp_kernels.ConvBNAct(5, 6, kernel_size, act="relu"))
    ref.act, fused.act = new_act, new_act
    ref64 = reference.ConvBNAct(5, 6, kernel_size).double()
    ref64.load_state_dict(ref.state_dict())
    ref64.act = new_act
    x = torch.randn(2, 5, 6, 6) - 0.5
    for train in (True, False):
        fused.train(train), ref64.train(train)
        with torch.no_grad():
            assert_matches_reference(fused(x), ref64(x.double()), name=f"train={train}")


def test_replaced_transition_act_is_honoured_by_partial_dense_block():
    ref = reference.PartialDenseBlock(6, 2, 3, fusion="csp").double()
    fused = _state_from(ref, csp_kernels.PartialDenseBlock(6, 2, 3, fusion="csp").double())
    for block in (ref, fused):
        block.transition1.act = nn.LeakyReLU(0.2)
        block.transition2.act = nn.LeakyReLU(0.2)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), fused.train(train)
        with torch.no_grad():
            assert rel_error(fused(x), ref(x)) <= 1e-12, f"train={train}"


def test_unsupported_act_module_runs_the_reference_with_a_warning():
    ref = reference.ConvBNAct(4, 5, 1).double()
    fused = _state_from(ref, csp_kernels.ConvBNAct(4, 5, 1).double())
    ref.act, fused.act = nn.GELU(), nn.GELU()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="GELU"):
        y = fused(x)
    torch.testing.assert_close(y, ref(x))

    block = csp_kernels.PartialDenseBlock(6, 2, 3, fusion="csp")
    block.transition1.act = nn.SiLU()  # transition2 keeps ReLU: one op applies one activation
    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="different activations"):
        block(torch.randn(2, 6, 4, 4))
    block.transition1.act = nn.ReLU()
    block.dense.denselayer1.relu2 = nn.ReLU6()
    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="ReLU6"):
        block(torch.randn(2, 6, 4, 4))


def test_activation_names():
    assert checks.kernel_activation(nn.ReLU(inplace=True)) == ("relu", "")
    assert checks.kernel_activation(nn.LeakyReLU(0.01)) == ("leaky_relu:0.01", "")
    assert checks.kernel_activation(nn.LeakyReLU(checks.LEAKY_RELU_SLOPE)) == ("leaky_relu", "")
    assert checks.parse_activation("leaky_relu:0.01") == ("leaky_relu", 0.01)
    assert checks.parse_activation("silu") == ("silu", checks.LEAKY_RELU_SLOPE)
    with pytest.raises(ValueError, match="only leaky_relu takes a slope"):
        checks.parse_activation("relu:0.5")
    with pytest.raises(ValueError, match="needs a number"):
        checks.parse_activation("leaky_relu:x")
    with pytest.raises(ValueError, match="leaky_relu:<slope>"):
        scale_shift_act(torch.randn(1, 1, 2, 2), torch.ones(1), torch.zeros(1), "leaky_relu:x")
    with pytest.raises(TypeError, match="negative_slope"):
        reference.ConvBNAct(4, 5, act="leaky_relu", negative_slope="0.01")
    assert reference.ConvBNAct(4, 5, act="leaky_relu", negative_slope=0.01).act.negative_slope == 0.01
