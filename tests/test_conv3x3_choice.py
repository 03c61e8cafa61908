"""The measured choice between Winograd and oneDNN for float32 CPU 3x3 convolutions
(csp_kernels/ops/conv3x3_choice.py), and the modules' numbers whichever way it goes."""
import os
import subprocess
import sys

import pytest
import torch

import csp_kernels
from csp_kernels import reference
from csp_kernels.ops import conv3x3_choice
from csp_kernels.ops.conv3x3 import winograd_usable

from helpers import assert_matches_reference

needs_winograd = pytest.mark.skipif(not winograd_usable(torch.empty(0)), reason="needs an AVX-512 CPU")


@pytest.fixture
def measuring(monkeypatch):
    """The choice as an unpinned process makes it, with a fresh verdict table."""
    monkeypatch.setattr(conv3x3_choice, "_PINNED", "")
    monkeypatch.setattr(conv3x3_choice, "_verdicts", {})


def test_each_shape_is_measured_once_and_remembered(measuring, monkeypatch):
    calls = []

    def fake_measure(x_shape, weight_shape, cached):
        calls.append((x_shape, weight_shape, cached))
        return x_shape[2] > 4

    monkeypatch.setattr(conv3x3_choice, "_winograd_faster", fake_measure)
    small, large, weight = (2, 8, 4, 4), (2, 8, 16, 16), (8, 8, 3, 3)
    assert [conv3x3_choice.winograd_chosen(s, weight, c) for s in (small, large, small, large) for c in (False, True)
            ] == [False, False, True, True] * 2
    assert len(calls) == 4  # one per (shape, cached), the repeats looked up
    assert conv3x3_choice.measured_verdicts()[(large, weight, True)] is True


@needs_winograd
def test_measurement_runs_both_kernels(measuring):
    verdict = conv3x3_choice.winograd_chosen((2, 16, 8, 8), (16, 16, 3, 3), transform_cached=False)
    assert isinstance(verdict, bool)
    assert conv3x3_choice.measured_verdicts() == {((2, 16, 8, 8), (16, 16, 3, 3), False): verdict}


def test_unmeasured_shapes_under_compile_follow_the_map_size(measuring, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    side = conv3x3_choice._UNMEASURED_MIN_SIDE
    assert conv3x3_choice.winograd_chosen((2, 8, side, side), (8, 8, 3, 3), True)
    assert not conv3x3_choice.winograd_chosen((2, 8, side - 1, side + 5), (8, 8, 3, 3), True)
    assert conv3x3_choice.measured_verdicts() == {}  # nothing timed inside a trace


@pytest.mark.parametrize("pinned", ["winograd", "onednn"])
@pytest.mark.parametrize("train", [True, False])
def test_conv_bn_act_matches_the_reference_either_way(monkeypatch, pinned, train):
    monkeypatch.setattr(conv3x3_choice, "_PINNED", pinned)
    ref = reference.ConvBNAct(6, 5, 3, act="silu").double()
    fused = csp_kernels.ConvBNAct(6, 5, 3, act="silu")
    fused.load_state_dict(ref.state_dict())
    ref.train(train), fused.train(train)
    x = torch.randn(2, 6, 9, 7)
    x64 = x.double().requires_grad_(train)
    expected = ref(x64)
    if train:
        x.requires_grad_()
        y = fused(x)
        grad = torch.randn_like(y)
        y.backward(grad)
        expected.backward(grad.double())
        assert_matches_reference(x.grad, x64.grad, name="x grad")
        assert_matches_reference(fused.conv.weight.grad, ref.conv.weight.grad, name="weight grad")
    else:
        with torch.no_grad():
            y = fused(x)
    assert_matches_reference(y, expected)


def test_a_bad_pin_is_ignored_with_a_warning():
    code = "import csp_kernels.ops.conv3x3_choice as c; assert c._PINNED == ''"
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CSP_KERNELS_CPU_CONV3X3": "fastest"})
    assert run.returncode != 0 and "CSP_KERNELS_CPU_CONV3X3 must be one of" in run.stderr
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "CSP_KERNELS_CPU_CONV3X3": "fastest"})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("pinned", ["winograd", "onednn"])
@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (3, 2), (5, 1), (1, 2)])
def test_eval_output_is_nchw_whatever_kernel_runs(monkeypatch, pinned, kernel_size, stride):
    """Every eval conv returns NCHW-contiguous output for NCHW input (oneDNN's fused
    convolution returned its channels_last result for k x k stride-2 convs)."""
    monkeypatch.setattr(conv3x3_choice, "_PINNED", pinned)
    ref = reference.ConvBNAct(8, 8, kernel_size, stride=stride, act="leaky_relu").eval()
    fused = csp_kernels.ConvBNAct(8, 8, kernel_size, stride=stride, act="leaky_relu").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 15, 15)
    with torch.no_grad():
        y, expected = fused(x), ref(x)
    assert y.is_contiguous() and y.stride() == expected.stride()
    assert_matches_reference(y, expected.double())
