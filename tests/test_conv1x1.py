"""The fused 1x1 convolution (csp_kernels.ops.conv1x1) against plain PyTorch in float64: the
forward on every engine (prologue, epilogue, batch statistics, several tiles per plane, channel
slices, in-place runs), the CPU backward ops against their unfused passes, and the C++ ops'
argument checks and opcheck."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from csp_kernels import backend, checks
from csp_kernels.ops import dense, routing
from csp_kernels.ops.batch_norm_act import bn_act_backward
from csp_kernels.ops.conv1x1 import (conv1x1_bn_act_backward, conv1x1_fused, conv1x1_input_grad,
                                    conv1x1_weight_grad)
from helpers import DEVICES, rel_error, requires_cuda

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def engines():
    """(device, engine): the C++ CPU op, cuBLAS passes on a GPU, and Triton where usable
    (through the interpreter here, so its shapes stay tiny)."""
    params = [pytest.param(d, "aten", id=f"{d}-aten") for d in DEVICES]
    return params + [pytest.param(d, "triton", id=f"{d}-triton") for d in DEVICES
                     if backend.triton_usable(torch.device(d))[0]]


def expected(x, weight, in_scale=None, in_shift=None, in_act="identity", bias=None, act="identity"):
    a = x.double()
    if in_scale is not None:
        a = checks.activation_module(in_act)(a * in_scale.double()[:, None, None] + in_shift.double()[:, None, None])
    pre = F.conv2d(a, weight.double(), None if bias is None else bias.double())
    return checks.activation_module(act)(pre)


def shape_for(engine):
    """CPU: 300 channels make the tile narrower (208 pixels) than a 15x15 plane, so each plane
    runs as a full and a partial tile."""
    return (2, 5, 3, 4) if engine == "triton" else (3, 300, 15, 15)


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("device,engine", engines())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", checks.ACTIVATIONS)
def test_prologue_and_epilogue(device, engine, dtype, act):
    n, c, h, w = shape_for(engine)
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    weight = torch.randn(7, c, 1, 1, dtype=dtype, device=device) / c ** 0.5
    sd = stats_dtype(dtype)
    scale, shift = torch.rand(c, dtype=sd, device=device) + 0.5, torch.randn(c, dtype=sd, device=device)
    bias = torch.randn(7, dtype=sd, device=device)
    out = conv1x1_fused(x, weight, in_scale=scale, in_shift=shift, in_act=act, bias=bias, act=act, engine=engine)
    assert out.shape == (n, 7, h, w) and out.dtype == dtype
    err = rel_error(out, expected(x, weight, scale, shift, act, bias, act))
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("device,engine", engines())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_statistics_of_the_output(device, engine, dtype):
    n, c, h, w = shape_for(engine)
    # |mean| >> std: the statistics must not come from a cancelling E[x^2] - E[x]^2 per tile.
    x = torch.randn(n, c, h, w, dtype=dtype, device=device) * 0.1 + 30
    weight = torch.randn(6, c, 1, 1, dtype=dtype, device=device) / c
    out, mean, var = conv1x1_fused(x, weight, stats=True, engine=engine)
    ref = expected(x, weight)
    assert rel_error(out, ref) <= TOL[dtype]
    assert rel_error(mean, ref.mean((0, 2, 3))) <= TOL[dtype]
    # The variance is ~1e-3 of mean^2 here: float32 rounding of the outputs themselves costs
    # ~1e3 ulps of it, in the float64 reference's inputs too.
    assert rel_error(var, ref.var((0, 2, 3), unbiased=False)) <= 1e3 * TOL[dtype]


@pytest.mark.parametrize("device,engine", engines())
def test_reads_and_writes_channel_slices(device, engine):
    n, c, h, w = shape_for(engine)
    buf = torch.randn(n, c + 6, h, w, dtype=torch.float64, device=device)
    dest = torch.randn(n, 12, h, w, dtype=torch.float64, device=device)
    before = dest.clone()
    x, out = buf[:, 2: 2 + c], dest[:, 3:8]
    weight = torch.randn(5, c, 1, 1, dtype=torch.float64, device=device)
    bias = torch.randn(5, dtype=torch.float64, device=device)
    conv1x1_fused(x, weight, bias=bias, act="leaky_relu", out=out, engine=engine)
    assert rel_error(out, expected(x, weight, bias=bias, act="leaky_relu")) <= TOL[torch.float64]
    assert torch.equal(dest[:, :3], before[:, :3]) and torch.equal(dest[:, 8:], before[:, 8:])


@pytest.mark.parametrize("device,engine", engines())
@pytest.mark.parametrize("layout", ["same_channels", "wider_output_over_the_buffer"])
def test_in_place(device, engine, layout):
    """The eval dense block's two in-place uses on the CPU GEMM: csp's first transition over the
    dense part, and the last transition writing the output over the concat buffer it reads
    (wider per sample). The other engines cannot write over their input and refuse in_place
    (the dense block gives them a separate tensor: tests/test_partial_dense_block.py)."""
    n, c, h, w = shape_for(engine)
    out_channels = c if layout == "same_channels" else c + 4
    store = torch.randn(n, out_channels, h, w, dtype=torch.float64, device=device)
    x = store[:, :c]
    weight = torch.randn(out_channels, c, 1, 1, dtype=torch.float64, device=device) / c ** 0.5
    bias = torch.randn(out_channels, dtype=torch.float64, device=device)
    ref = expected(x, weight, bias=bias, act="relu")
    can = routing.conv1x1_writes_over_input(x, engine, scaled=False)
    assert can == (device == "cpu" and engine == "aten")
    if not can:
        before = store.clone()
        with pytest.raises(ValueError, match="in_place"):
            conv1x1_fused(x, weight, bias=bias, act="relu", out=store, engine=engine, in_place=True)
        assert torch.equal(store, before)
        return
    conv1x1_fused(x, weight, bias=bias, act="relu", out=store, engine=engine, in_place=True)
    assert rel_error(store, ref) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_only_the_cpu_gemm_writes_over_its_input(dtype):
    """The routing of in_place: the CPU GEMM (float32/float64 CPU data, no output scale) alone."""
    x = torch.zeros(1, 2, 2, 2, dtype=dtype)
    cpu_kernel = dtype == torch.float32
    assert routing.conv1x1_writes_over_input(x, "aten", scaled=False) == cpu_kernel
    assert not routing.conv1x1_writes_over_input(x, "aten", scaled=True)
    assert not routing.conv1x1_writes_over_input(x, "triton", scaled=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "normalize_on_load"])
def test_weight_gradient(device, dtype, prologue):
    n, c, h, w = shape_for("aten")
    buf = torch.randn(n, c + 3, h, w, dtype=dtype, device=device)
    x = buf[:, 1: 1 + c]  # a channel slice, as the dense block's prefix
    grad = torch.randn(n, 9, h, w, dtype=dtype, device=device)
    sd = stats_dtype(dtype)
    kwargs = dict(in_scale=torch.randn(c, dtype=sd, device=device), in_shift=torch.randn(c, dtype=sd, device=device),
                  in_act="relu") if prologue else {}
    a = x.double()
    if prologue:
        a = torch.relu(a * kwargs["in_scale"].double()[:, None, None] + kwargs["in_shift"].double()[:, None, None])
    ref = torch.einsum("nohw,nchw->oc", grad.double(), a)[:, :, None, None]
    got = conv1x1_weight_grad(grad, x, **kwargs)
    assert got.shape == (9, c, 1, 1) and got.dtype == dtype
    assert rel_error(got, ref) <= 10 * TOL[dtype]  # a 675-pixel reduction


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_gradient_rounds_once(dtype):
    """Two samples whose (out, in) products nearly cancel: rounding each to 16 bits before the
    sum would leave an error of their size, not the sum's; cuDNN's 16-bit weight gradient
    (plain PyTorch) accumulates in float32 and rounds once."""
    device = "cuda"
    x1 = torch.randn(1, 16, 8, 8, device=device)
    grad1 = torch.randn(1, 12, 8, 8, device=device)
    x = torch.cat([x1, x1]).to(dtype)
    grad = torch.cat([grad1, -grad1 + 0.01 * torch.randn_like(grad1)]).to(dtype)
    ref = torch.einsum("nohw,nchw->oc", grad.double(), x.double())[:, :, None, None]
    plain = torch.nn.grad.conv2d_weight(x, (12, 16, 1, 1), grad)
    got = conv1x1_weight_grad(grad, x)
    assert got.dtype == dtype
    assert rel_error(got, ref) <= 2 * rel_error(plain, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_dense_layer_conv1_backward(dtype, act):
    """The CPU op (grad_z, the normalized prefix and its gradient only in cache) against the
    passes: BN2 backward, the weight gradient against BN1 + act of the prefix, the input
    gradient into `bn_act_backward_accumulate`; the prefix and the accumulator are slices, and
    the last tile of each plane is partial."""
    n, c, h, w = shape_for("aten")
    sd = stats_dtype(dtype)

    def bn(channels):
        return (torch.randn(channels, dtype=sd), torch.rand(channels, dtype=sd) + 0.5, torch.randn(channels, dtype=sd),
                torch.randn(channels, dtype=sd))

    bn1, bn2 = bn(c), bn(9)
    grad_b, z = torch.randn(n, 9, h, w, dtype=dtype), torch.randn(n, 9, h, w, dtype=dtype)
    x = torch.randn(n, c + 2, h, w, dtype=dtype)[:, 2:]
    weight = torch.randn(9, c, 1, 1, dtype=dtype) / c ** 0.5
    acc = torch.randn(n, c + 1, h, w, dtype=dtype)
    expected_acc = acc.clone()

    grad_z, grad_bn2_w, grad_bn2_b = bn_act_backward(grad_b, z, *bn2, act)
    a = checks.activation_module(act)((x.double() - bn1[0].double()[:, None, None]) * (bn1[1] * bn1[2]).double()[
        :, None, None] + bn1[3].double()[:, None, None])
    grad_weight = torch.einsum("nohw,nchw->oc", grad_z.double(), a)[:, :, None, None]
    sums1 = dense.bn_act_backward_accumulate(conv1x1_input_grad(grad_z, weight), x, *bn1, act, expected_acc[:, 1:])
    expected = (grad_weight, grad_bn2_w, grad_bn2_b, *sums1)

    got = dense.dense_conv1_backward(grad_b, z, bn2, x, bn1, act, weight, acc[:, 1:])
    for name, g, e in zip(["grad_weight", "grad_bn2_weight", "grad_bn2_bias", "sum_dpre1", "sum_dpre_xhat1"], got,
                          expected):
        assert g.shape == e.shape, name
        assert rel_error(g, e) <= 10 * TOL[dtype], name
    assert rel_error(acc, expected_acc) <= 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["leaky_relu", "mish"])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "input", "weight"])
def test_conv_bn_act_backward(dtype, act, needs):
    """The CPU op (grad_z only in cache) against the passes: `bn_act_backward`, then the
    GEMMs, with x a channel slice and a partial last tile; what is not asked for is None."""
    n, c, h, w = shape_for("aten")
    x = torch.randn(n, c + 2, h, w, dtype=dtype)[:, :c]
    weight = torch.randn(9, c, 1, 1, dtype=dtype) / c ** 0.5
    z, grad_y = torch.randn(n, 9, h, w, dtype=dtype), torch.randn(n, 9, h, w, dtype=dtype)
    sd = stats_dtype(dtype)
    mean, invstd = torch.randn(9, dtype=sd), torch.rand(9, dtype=sd) + 0.5
    bn_w, bn_b = torch.randn(9, dtype=sd), torch.randn(9, dtype=sd)
    grad_z, grad_bn_w, grad_bn_b = bn_act_backward(grad_y, z, mean, invstd, bn_w, bn_b, act)
    expected = (conv1x1_input_grad(grad_z, weight), conv1x1_weight_grad(grad_z, x), grad_bn_w, grad_bn_b)
    got = conv1x1_bn_act_backward(grad_y, z, mean, invstd, bn_w, bn_b, act, x, weight, *needs)
    for name, g, e, needed in zip(["grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"], got, expected,
                                  [*needs, True, True]):
        if not needed:
            assert g is None, name
            continue
        assert g.shape == e.shape, name
        assert rel_error(g, e) <= 10 * TOL[dtype], name


@pytest.mark.parametrize("in_channels,out_channels,side", [(100, 130, 24), (300, 97, 7), (1, 1, 5)],
                         ids=["wide_tile", "long_reduction", "single_channel"])
def test_cpu_float32_gemm_block_edges(in_channels, out_channels, side):
    """The CPU float32 tile GEMMs (`sgemm_avx512` where the CPU has AVX-512, else BLAS) across
    their block edges: more output channels than a packed block of A (96) and not a multiple
    of the micro-kernel's 6 rows, tiles wider than a packed block of B (512; 100 channels give
    576-pixel tiles) and not a multiple of its 64 columns, reductions longer than a k-block
    (256), in all three GEMM forms: forward, input gradient, weight gradient."""
    x = torch.randn(2, in_channels, side, side)
    weight = torch.randn(out_channels, in_channels, 1, 1) / in_channels ** 0.5
    assert rel_error(conv1x1_fused(x, weight), expected(x, weight)) <= TOL[torch.float32]
    z, grad_y = torch.randn(2, out_channels, side, side), torch.randn(2, out_channels, side, side)
    mean, invstd = torch.randn(out_channels), torch.rand(out_channels) + 0.5
    bn_w, bn_b = torch.randn(out_channels), torch.randn(out_channels)
    grad_x, grad_weight, _, _ = conv1x1_bn_act_backward(grad_y, z, mean, invstd, bn_w, bn_b, "relu", x, weight)
    grad_z, _, _ = bn_act_backward(grad_y.double(), z.double(), mean.double(), invstd.double(), bn_w.double(),
                                   bn_b.double(), "relu")
    assert rel_error(grad_x, conv1x1_input_grad(grad_z, weight.double())) <= 10 * TOL[torch.float32]
    assert rel_error(grad_weight, conv1x1_weight_grad(grad_z, x.double())) <= 10 * TOL[torch.float32]


def test_cpu_float32_gemm_on_torchs_blas():
    """CSP_KERNELS_CPU_SGEMM=blas (read once, hence a subprocess): the float32 GEMMs on torch's
    BLAS and the 3x3 convolutions on oneDNN, through the block-edge and backward tests; an
    unknown value warns."""
    env = {**os.environ, "CSP_KERNELS_CPU_SGEMM": "blas"}
    check = "import csp_kernels; assert csp_kernels.build_info()['cpu_sgemm'] == 'blas'"
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    tests = [f"{__file__}::test_cpu_float32_gemm_block_edges", f"{__file__}::test_conv_bn_act_backward",
             os.path.join(os.path.dirname(__file__), "test_conv3x3.py")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    warned = subprocess.run([sys.executable, "-W", "error", "-c", "import csp_kernels"],
                            env={**os.environ, "CSP_KERNELS_CPU_SGEMM": "fast"}, capture_output=True, text=True)
    assert warned.returncode != 0 and "CSP_KERNELS_CPU_SGEMM must be one of" in warned.stderr


def test_cpu_bfloat16_runs_as_passes():
    """The C++ op is float32/float64; other CPU dtypes take the unfused passes."""
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    weight = torch.randn(5, 4, 1, 1, dtype=torch.bfloat16)
    out = conv1x1_fused(x, weight, act="relu")
    assert out.dtype == torch.bfloat16
    assert rel_error(out, expected(x, weight, act="relu")) <= 1e-2


def test_cpu_op_rejects_what_it_cannot_run():
    x = torch.randn(2, 4, 3, 3)
    weight = torch.randn(5, 4, 1, 1)
    with pytest.raises(TypeError, match="float32 and float64"):
        torch.ops.csp_kernels.conv1x1_fused_out(x.half(), weight.half().flatten(1), None, None, "identity", None,
                                                "identity", False, torch.empty(2, 5, 3, 3, dtype=torch.half))
    with pytest.raises(ValueError, match="out must have shape"):
        conv1x1_fused(x, weight, out=torch.empty(2, 6, 3, 3))
    with pytest.raises(ValueError, match="in_act needs in_scale"):
        conv1x1_fused(x, weight, in_act="relu")
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.csp_kernels.conv1x1_fused_out(x, torch.randn(5, 3), None, None, "identity", None, "identity", False,
                                                torch.empty(2, 5, 3, 3))
    with pytest.raises(ValueError, match="act must be one of"):
        conv1x1_fused(x, weight, act="gelu")
    with pytest.raises(ValueError, match="z must be"):
        torch.ops.csp_kernels.conv1x1_bn_act_backward(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4),
                                                      *[torch.ones(5)] * 6, "relu", x, torch.randn(5, 4), True, True)


def test_cpu_op_opcheck():
    x = torch.randn(2, 4, 3, 5)
    weight = torch.randn(6, 4)
    scale, shift, bias = torch.rand(4), torch.randn(4), torch.randn(6)
    torch.library.opcheck(torch.ops.csp_kernels.conv1x1_fused_out.default,
                          (x, weight, scale, shift, "relu", bias, "silu", True, torch.empty(2, 6, 3, 5)))
    torch.library.opcheck(torch.ops.csp_kernels.conv1x1_fused_out.default,
                          (x, weight, None, None, "identity", None, "identity", False, torch.empty(2, 6, 3, 5)))
    stats = [torch.randn(6), torch.rand(6) + 0.5, torch.randn(6), torch.randn(6), torch.randn(6), torch.randn(6)]
    torch.library.opcheck(torch.ops.csp_kernels.conv1x1_bn_act_backward.default,
                          (torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3, 5), *stats, "silu", x, weight, True, True))
    torch.library.opcheck(torch.ops.csp_kernels.dense_conv1_backward.default,
                          (torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3, 5), *stats, x, torch.randn(4),
                           torch.rand(4) + 0.5, torch.randn(4), torch.randn(4), "relu", weight,
                           torch.zeros(2, 4, 3, 5)))
