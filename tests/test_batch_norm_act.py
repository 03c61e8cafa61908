"""The BatchNorm + activation kernels (csrc/*/batch_norm_act.*) against plain PyTorch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from csp_kernels.checks import ACTIVATIONS, activation_module
from csp_kernels.ops import batch_norm_act as bna
from csp_kernels.ops.conv1x1 import conv1x1_fused
from helpers import DEVICES, assert_matches_reference

TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def plain_bn_act(z, weight, bias, eps, act):
    return activation_module(act)(F.batch_norm(z, None, None, weight, bias, training=True, eps=eps))


def layouts(n, c, h, w, dtype, device):
    """The same values as NCHW, as a channel slice of a wider buffer, and as channels_last."""
    base = torch.randn(n, c, h, w, dtype=dtype, device=device) * 2 + 3
    wide = torch.randn(n, c + 5, h, w, dtype=dtype, device=device)
    wide[:, 2:2 + c] = base
    return {"nchw": base, "slice": wide[:, 2:2 + c], "channels_last": base.to(memory_format=torch.channels_last)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "slice", "channels_last"])
def test_channel_stats(device, dtype, layout):
    x = layouts(3, 7, 5, 9, dtype, device)[layout]
    mean, var = bna.channel_stats(x)
    ref = x.double()
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches_reference(mean, ref.mean((0, 2, 3)), tol=TOL[dtype])
    assert_matches_reference(var, ref.var((0, 2, 3), unbiased=False), tol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_channel_stats_large_mean_keeps_variance(device):
    # |mean| >> std: a naive E[x^2] - E[x]^2 in float32 would lose every digit of the variance.
    x = torch.randn(4, 3, 16, 16, device=device) * 1e-2 + 1e4
    _, var = bna.channel_stats(x)
    ref = x.double().var((0, 2, 3), unbiased=False)
    assert_matches_reference(var, ref, tol=1e-3)


def test_cpu_float32_statistics_round_once():
    """The CPU statistics (`channel_stats`, and the 1x1 GEMM's epilogue) accumulate in double:
    against the float64 moments of the same float32 values, mean and variance are off by one
    float32 rounding at most. Sums shifted by one sample in float32 were 5.6e-7 off here."""
    x = (torch.randn(2, 3, 6, 12, dtype=torch.float64) * 3 + 5).float()
    mean, var = bna.channel_stats(x)
    eps = torch.finfo(torch.float32).eps
    assert ((mean.double() - x.double().mean((0, 2, 3))).abs() <= eps * mean.double().abs()).all()
    exact_var = x.double().var((0, 2, 3), unbiased=False)
    assert ((var.double() - exact_var).abs() <= eps * exact_var).all()
    out, mean, var = conv1x1_fused(x, torch.eye(3).view(3, 3, 1, 1) * 2, stats=True)
    exact_var = out.double().var((0, 2, 3), unbiased=False)
    assert ((var.double() - exact_var).abs() <= eps * exact_var).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nchw", "slice", "channels_last"])
def test_scale_shift_act(device, dtype, act, layout):
    x = layouts(2, 6, 4, 7, dtype, device)[layout]
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.randn(6, dtype=sdtype, device=device)
    shift = torch.randn(6, dtype=sdtype, device=device)
    ref = activation_module(act)(x.double() * scale.double()[:, None, None] + shift.double()[:, None, None])
    assert_matches_reference(bna.scale_shift_act(x, scale, shift, act), ref, tol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_scale_shift_act_writes_into_a_channel_slice_only(device):
    x = torch.randn(2, 3, 5, 5, device=device)
    buf = torch.full((2, 8, 5, 5), 7.0, device=device)
    scale, shift = torch.rand(3, device=device), torch.randn(3, device=device)
    bna.scale_shift_act(x, scale, shift, "relu", out=buf[:, 4:7])
    torch.testing.assert_close(buf[:, 4:7], torch.relu(x * scale[:, None, None] + shift[:, None, None]))
    assert (buf[:, :4] == 7).all() and (buf[:, 7:] == 7).all()


@pytest.mark.parametrize("device", DEVICES)
def test_scale_shift_act_in_place(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    expected = F.silu(x * 2 + 1)
    bna.scale_shift_act(x, torch.full((3,), 2.0, device=device), torch.ones(3, device=device), "silu", out=x)
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_batch_norm_act_forward_backward(device, dtype, act):
    z = (torch.randn(3, 5, 6, 7, dtype=dtype, device=device) * 1.5 + 0.5).requires_grad_()
    weight = (torch.rand(5, dtype=dtype, device=device) + 0.5).requires_grad_()
    bias = torch.randn(5, dtype=dtype, device=device).requires_grad_()
    grad = torch.randn(3, 5, 6, 7, dtype=dtype, device=device)
    y, mean, var = bna.batch_norm_act(z, weight, bias, 1e-5, act)
    y.backward(grad)

    z64, w64, b64 = (t.detach().double().requires_grad_() for t in (z, weight, bias))
    y64 = plain_bn_act(z64, w64, b64, 1e-5, act)
    y64.backward(grad.double())
    assert_matches_reference(y, y64, tol=TOL[dtype] * 10)
    assert_matches_reference(mean, z64.detach().mean((0, 2, 3)), tol=TOL[dtype])
    assert_matches_reference(var, z64.detach().var((0, 2, 3), unbiased=False), tol=TOL[dtype])
    for got, want, name in [(z.grad, z64.grad, "grad z"), (weight.grad, w64.grad, "grad weight"),
                            (bias.grad, b64.grad, "grad bias")]:
        assert_matches_reference(got, want, tol=TOL[dtype] * 50, name=name)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_batch_norm_act_gradcheck(act):
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, w, b: bna.batch_norm_act(z, w, b, 1e-5, act)[0], (z, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("update", ["track_running_stats", "update_running_stats"])
def test_running_stats_update_matches_batchnorm(device, dtype, update):
    """The one-op update (the common case) and the tensor-op one (torch.compile, tensor counts)
    give nn.BatchNorm2d's running statistics: both compute its formula in float64, as its CPU
    kernel does (there to the last bit but for the unbiased variance's rounding)."""
    z = torch.randn(4, 3, 5, 5, dtype=dtype, device=device) * 3 + 1
    bn = torch.nn.BatchNorm2d(3, momentum=0.3).to(device, dtype)
    randomize = torch.rand(3, dtype=dtype, device=device)
    bn.running_mean.copy_(randomize), bn.running_var.copy_(randomize + 1)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    tracked = torch.tensor(5, device=device)
    bn(z)
    mean, var = bna.channel_stats(z)
    if update == "track_running_stats":
        bna.track_running_stats(tracked, running_mean, running_var, mean, var, unbias=100 / 99, momentum=0.3)
        assert tracked.item() == 6
    else:
        bna.update_running_stats(running_mean, running_var, mean, var, unbias=100 / 99, momentum=0.3)
    tol = TOL[dtype]
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(running_var, bn.running_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_scale_shift_is_bn_scale_shift(device, dtype):
    """The training kernels' one-op (scale, shift) against the ATen-op formula, weight and bias of
    another dtype or strided (a slice, an expand) included."""
    mean, var = torch.randn(6, dtype=dtype, device=device), torch.rand(6, dtype=dtype, device=device)
    params = torch.randn(2, 12, dtype=dtype, device=device)
    cases = [(params[0, :6], params[1, :6]), (params[0, ::2], params[1, ::2]),
             (params[0, :1].expand(6), params[1, 6:]), (params[0, :6].to(torch.bfloat16), params[1, :6].half())]
    for weight, bias in cases:
        got, expected = bna.batch_scale_shift(mean, var, weight, bias, 1e-3), bna.bn_scale_shift(mean, var, weight,
                                                                                                 bias, 1e-3)
        for g, e in zip(got, expected):
            assert g.dtype == dtype and g.is_contiguous()
            torch.testing.assert_close(g, e, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.bfloat16])
def test_track_running_stats_in_the_running_dtype(device, running_dtype):
    """Running statistics of a 16-bit BatchNorm: computed in float64, rounded once to their dtype."""
    mean, var = torch.randn(5, device=device), torch.rand(5, device=device)
    running_mean = torch.randn(5, device=device).to(running_dtype)
    running_var = (torch.rand(5, device=device) + 1).to(running_dtype)
    expected_mean = (mean.double() * 0.1 + running_mean.double() * 0.9).to(running_dtype)
    expected_var = (var.double() * (10 / 9) * 0.1 + running_var.double() * 0.9).to(running_dtype)
    bna.track_running_stats(torch.tensor(0, device=device), running_mean, running_var, mean, var, 10 / 9, 0.1)
    assert torch.equal(running_mean, expected_mean) and torch.equal(running_var, expected_var)


def test_batch_norm_act_refuses_one_value_per_channel():
    z = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bna.batch_norm_act(z, torch.ones(3), torch.zeros(3), 1e-5, "relu")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_compiled_ops(device):
    z = torch.randn(2, 4, 3, 5, device=device)
    grad = torch.randn_like(z)
    mean, var = bna.channel_stats(z)
    invstd = torch.rsqrt(var + 1e-5)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    s1, s2 = torch.ops.csp_kernels.bn_act_backward_reduce(grad, z, mean, invstd, w, b, "silu")
    out = torch.empty(2, 4, 3, 5, device=device)
    cases = [
        (torch.ops.csp_kernels.channel_stats.default, (z,)),
        (torch.ops.csp_kernels.scale_shift_act.default, (z, w, b, "mish")),
        (torch.ops.csp_kernels.scale_shift_act_out.default, (z, w, b, "relu", out)),
        (torch.ops.csp_kernels.bn_act_backward_reduce.default, (grad, z, mean, invstd, w, b, "silu")),
        (torch.ops.csp_kernels.bn_act_backward_apply.default, (grad, z, mean, invstd, w, b, s1, s2, "silu")),
        (torch.ops.csp_kernels.bn_scale_shift.default, (mean, var, w, b, 1e-5)),
        (torch.ops.csp_kernels.bn_track_running_stats_.default,
         (torch.tensor(3, device=device), torch.zeros(4, device=device), torch.ones(4, device=device), mean, var,
          1.5, 0.1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_opcheck_batch_norm_act():
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(bna.batch_norm_act, (z, w, b, 1e-5, "hardswish"))


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.csp_kernels.channel_stats(torch.randn(3, 4)), "must be 4-D"),
    (lambda: torch.ops.csp_kernels.channel_stats(torch.randn(2, 3, 4, 5).transpose(2, 3)), "contiguous"),
    (lambda: torch.ops.csp_kernels.scale_shift_act(torch.randn(2, 3, 4, 4), torch.ones(4), torch.ones(3), "relu"),
     "scale must be a contiguous 1-D tensor of 3"),
    (lambda: torch.ops.csp_kernels.scale_shift_act(torch.randn(2, 3, 4, 4), torch.ones(3), torch.ones(3), "gelu"),
     "act must be one of"),
    (lambda: torch.ops.csp_kernels.scale_shift_act(torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.ones(3),
                                                   torch.ones(3), "relu"), "scale must be Double"),
    (lambda: torch.ops.csp_kernels.bn_scale_shift(torch.zeros(3, 1), torch.ones(3, 1), torch.ones(3), torch.ones(3),
                                                  1e-5), "mean must be 1-D"),
    (lambda: torch.ops.csp_kernels.bn_scale_shift(torch.zeros(3), torch.ones(3), torch.ones(4), torch.ones(3), 1e-5),
     "weight must have mean's shape"),
    (lambda: torch.ops.csp_kernels.bn_track_running_stats_(torch.tensor(0), torch.zeros(3), torch.ones(3),
                                                           torch.zeros(3), torch.ones(2), 1.5, 0.1),
     "var must have mean's shape"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_cpu_baseline_rows():
    """CSP_KERNELS_CPU_ROWS=baseline (read once, hence a subprocess): the per-element loops'
    baseline copies (csrc/cpu/isa.h), which AVX-512 machines otherwise never run, through this
    file's tests, the activation numerics (NaN, inf) and the dense block's backward; an
    unknown value warns."""
    env = {**os.environ, "CSP_KERNELS_CPU_ROWS": "baseline"}
    here = os.path.dirname(__file__)
    tests = [__file__, os.path.join(here, "test_activation_numerics.py"), os.path.join(here, "test_dense_block.py")]
    # -k, not --deselect (whose node ids are rootdir-relative): this test must not run itself.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                             "not test_cpu_baseline_rows", *tests], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " 0 passed" not in result.stdout
    warned = subprocess.run([sys.executable, "-W", "error", "-c", "import csp_kernels"],
                            env={**os.environ, "CSP_KERNELS_CPU_ROWS": "avx1024"}, capture_output=True, text=True)
    assert warned.returncode != 0 and "CSP_KERNELS_CPU_ROWS must be one of" in warned.stderr
