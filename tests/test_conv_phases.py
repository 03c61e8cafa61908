"""The input gradient of a 3x3 stride-2 convolution by phases (csp_kernels.ops.conv_phases):
against float64 autograd on even, odd, one-pixel and non-square maps, within 2x ATen's float32
error; non-finite gradients; the route through conv_backward and a training ConvBNAct."""
import pytest
import torch
import torch.nn.functional as F

import csp_kernels
from csp_kernels import reference
from csp_kernels.ops import conv as conv_ops
from csp_kernels.ops import conv_choice, conv_phases
from helpers import rel_error


def input_grad(x_shape, weight, grad_z):
    """ATen's gradient of conv2d(x, weight, stride=2, padding=1) with respect to x."""
    x = torch.zeros(x_shape, dtype=grad_z.dtype, requires_grad=True)
    F.conv2d(x, weight.to(grad_z.dtype), stride=2, padding=1).backward(grad_z)
    return x.grad


@pytest.mark.parametrize("x_shape, out_channels", [
    ((2, 8, 12, 12), 16),   # even sides: phase 1 reads a zero row past grad_z's last
    ((2, 5, 13, 9), 7),     # odd sides: phase 1 has a row and a column fewer than phase 0
    ((1, 3, 1, 1), 4),      # one pixel: phases 1 are empty
    ((3, 6, 2, 7), 5),      # two rows, odd width
    ((1, 130, 11, 4), 3),   # more input channels than output channels
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_within_twice_atens_error(x_shape, out_channels, dtype):
    weight = torch.randn(out_channels, x_shape[1], 3, 3, dtype=dtype)
    grad_z = torch.randn(x_shape[0], out_channels, (x_shape[2] + 1) // 2, (x_shape[3] + 1) // 2, dtype=dtype)
    ref = input_grad(x_shape, weight.double(), grad_z.double())
    got = conv_phases.conv3x3_stride2_input_grad(grad_z, weight, x_shape)
    assert got.shape == x_shape and got.dtype == dtype and got.is_contiguous()
    plain_err = rel_error(input_grad(x_shape, weight, grad_z), ref)
    assert rel_error(got, ref) <= 2 * plain_err + 2 * torch.finfo(dtype).eps, (rel_error(got, ref), plain_err)


def test_non_finite_gradients_land_where_atens_do():
    x_shape = (1, 2, 6, 5)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    grad_z = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    grad_z[0, 0, 1, 2], grad_z[0, 2, 2, 0] = float("nan"), float("inf")
    got = conv_phases.conv3x3_stride2_input_grad(grad_z, weight, x_shape)
    ref = input_grad(x_shape, weight, grad_z)
    torch.testing.assert_close(got, ref, equal_nan=True)


@pytest.mark.parametrize("pinned", ["phases", "onednn"])
def test_conv_backward_routes_by_the_pin(monkeypatch, pinned):
    monkeypatch.setattr(conv_choice, "_PINNED_STRIDE2", pinned)
    ran = []
    real = conv_phases.conv3x3_stride2_input_grad
    monkeypatch.setattr(conv_ops, "conv3x3_stride2_input_grad", lambda *a: ran.append(1) or real(*a))
    x, weight = torch.randn(2, 6, 9, 8), torch.randn(5, 6, 3, 3)
    grad_z = torch.randn(2, 5, 5, 4)
    grad_x, grad_weight = conv_ops.conv_backward(grad_z, x, weight, [2, 2], [1, 1], [1, 1], 1, True, True)
    assert bool(ran) == (pinned == "phases")
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    F.conv2d(x64, w64, stride=2, padding=1).backward(grad_z.double())
    assert rel_error(grad_x, x64.grad) <= 2e-6 and rel_error(grad_weight, w64.grad) <= 2e-6


def test_other_geometries_keep_atens_backward(monkeypatch):
    monkeypatch.setattr(conv_choice, "_PINNED_STRIDE2", "phases")
    monkeypatch.setattr(conv_ops, "conv3x3_stride2_input_grad", lambda *a: pytest.fail("phases ran"))
    x, grad_z = torch.randn(2, 6, 9, 8), torch.randn(2, 5, 5, 4)
    for weight, stride, padding, groups in [(torch.randn(5, 6, 3, 3), [2, 2], [0, 0], 1),  # no padding
                                            (torch.randn(4, 3, 3, 3), [2, 2], [1, 1], 2),  # groups
                                            (torch.randn(5, 6, 1, 1), [2, 2], [0, 0], 1)]:  # 1x1
        z = F.conv2d(x, weight, None, stride, padding, 1, groups)
        conv_ops.conv_backward(torch.randn_like(z), x, weight, stride, padding, [1, 1], groups, True, False)
    conv_ops.conv_backward(grad_z.double(), x.double(), torch.randn(5, 6, 3, 3, dtype=torch.float64), [2, 2],
                           [1, 1], [1, 1], 1, True, False)  # float64: ATen's


def test_measurement_times_both_and_is_remembered(monkeypatch):
    monkeypatch.setattr(conv_choice, "_PINNED_STRIDE2", "")
    monkeypatch.setattr(conv_choice, "_verdicts", {})
    verdict = conv_choice.phases_input_grad_chosen((2, 8, 12, 12), (16, 8, 3, 3))
    assert conv_choice.measured_verdicts() == {("3x3 stride-2 input grad", (2, 8, 12, 12), (16, 8, 3, 3)): verdict}
    monkeypatch.setattr(conv_choice, "_phases_faster", lambda *shapes: pytest.fail("measured twice"))
    assert conv_choice.phases_input_grad_chosen((2, 8, 12, 12), (16, 8, 3, 3)) == verdict


def test_training_conv_bn_act_with_stride_2_matches_float64():
    """A CSP stage's conv_down as a fused ConvBNAct, its input gradient by phases (pinned)."""
    ref = reference.ConvBNAct(6, 10, 3, stride=2, padding=1, act="leaky_relu").double()
    fused = csp_kernels.ConvBNAct(6, 10, 3, stride=2, padding=1, act="leaky_relu")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 11, 10)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    grad = torch.randn(2, 10, 6, 5)
    fused(x32).backward(grad)
    ref(x64).backward(grad.double())
    assert rel_error(x32.grad, x64.grad) <= 1e-5
    assert rel_error(fused.conv.weight.grad, ref.conv.weight.grad) <= 1e-5
