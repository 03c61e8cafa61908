"""The Triton 1x1-conv GEMM (csp_kernels.triton.conv1x1) against plain PyTorch: prologue,
epilogue, batch statistics, strided and sliced inputs, out= slices, and the activation helpers."""
import pytest
import torch
import torch.nn.functional as F

from csp_kernels import backend, checks
from helpers import DEVICES, rel_error

TRITON_DEVICES = [d for d in DEVICES if backend.triton_usable(torch.device(d))[0]]
pytestmark = [pytest.mark.skipif(not TRITON_DEVICES, reason="Triton is not usable (no GPU, TRITON_INTERPRET unset)"),
              pytest.mark.usefixtures("full_float32_precision")]

if TRITON_DEVICES:
    from csp_kernels.triton.conv1x1 import conv1x1, input_precision_of
    from triton_helpers import triton_act

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ACTS = checks.ACTIVATIONS


def torch_act(u: torch.Tensor, act: str) -> torch.Tensor:
    return checks.activation_module(act)(u)


def expected(x, weight, in_scale=None, in_shift=None, in_act="identity", bias=None, act="identity"):
    """(output, pre-activation output) in float64."""
    a = x.double()
    if in_scale is not None:
        a = a * in_scale.double()[:, None, None]
    if in_shift is not None:
        a = a + in_shift.double()[:, None, None]
    a = torch_act(a, in_act)
    pre = F.conv2d(a, weight.double()[:, :, None, None], None if bias is None else bias.double())
    return torch_act(pre, act), pre


def assert_close(out, ref, name="out"):
    err = rel_error(out, ref)
    assert err <= TOL[out.dtype], f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ACTS)
def test_bias_and_activation_epilogue(device, dtype, act):
    x = torch.randn(2, 5, 4, 5, dtype=dtype, device=device)
    weight = torch.randn(7, 5, dtype=dtype, device=device)
    bias = torch.randn(7, dtype=dtype, device=device)
    out = conv1x1(x, weight, bias=bias, act=act)
    assert out.shape == (2, 7, 4, 5) and out.is_contiguous()
    assert_close(out, expected(x, weight, bias=bias, act=act)[0])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("in_act", ACTS)
def test_normalize_on_load_prologue(device, dtype, in_act):
    x = torch.randn(2, 19, 3, 5, dtype=dtype, device=device)
    weight = torch.randn(6, 19, dtype=dtype, device=device)
    in_scale = torch.rand(19, device=device) + 0.5
    in_shift = torch.randn(19, device=device)
    out = conv1x1(x, weight, in_scale=in_scale, in_shift=in_shift, in_act=in_act)
    assert_close(out, expected(x, weight, in_scale, in_shift, in_act)[0])


def half_dtypes(device: str) -> list:
    """16-bit types the Triton kernels can be checked in on `device`. The interpreter's tl.dot
    misreads bfloat16 (a 16x16 product off by 2e10), so bfloat16 is checked on a GPU only."""
    return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float16]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_half_precision_within_twice_the_plain_error(device):
    # flash-attention's rule: the fused error at most 2x that of plain PyTorch in the same dtype
    # (input rounded to it, GEMM in float32, rounded once), both against float64.
    x64 = torch.randn(2, 37, 9, 9, dtype=torch.float64, device=device)
    w64 = torch.randn(35, 37, dtype=torch.float64, device=device) / 6
    scale, shift = torch.rand(37, device=device) + 0.5, torch.randn(37, device=device)
    bias = torch.randn(35, device=device)
    ref, _ = expected(x64, w64, scale, shift, "relu", bias, "silu")
    for dtype in half_dtypes(device):
        x, w = x64.to(dtype), w64.to(dtype)
        plain = expected(x.float(), w.float(), scale, shift, "relu", bias, "silu")[0].to(dtype)
        out, mean, var = conv1x1(x, w, in_scale=scale, in_shift=shift, in_act="relu", bias=bias, act="silu",
                                 stats=True)
        assert out.dtype == dtype and mean.dtype == torch.float32
        assert rel_error(out, ref) <= 2 * rel_error(plain, ref), dtype
        assert rel_error(mean, ref.mean((0, 2, 3))) <= 2 * rel_error(plain.double().mean((0, 2, 3)),
                                                                      ref.mean((0, 2, 3))) + 1e-6, dtype


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_prologue_parts_alone(device):
    """Scale without shift, shift without scale, an activation alone: the missing parts are
    1, 0 and identity, and padding lanes of the tiles stay zero."""
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, device=device)
    weight = torch.randn(4, 5, dtype=torch.float64, device=device)
    scale, shift = torch.rand(5, dtype=torch.float64, device=device), torch.randn(5, dtype=torch.float64, device=device)
    assert_close(conv1x1(x, weight, in_scale=scale), expected(x, weight, in_scale=scale)[0])
    assert_close(conv1x1(x, weight, in_shift=shift), expected(x, weight, in_shift=shift)[0])
    assert_close(conv1x1(x, weight, in_act="hardswish"), expected(x, weight, in_act="hardswish")[0])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_statistics_epilogue(device, dtype):
    # 81 pixels per image: with 64-pixel blocks, a full and a partial block in each of 3 images.
    x = torch.randn(3, 21, 9, 9, dtype=dtype, device=device) + torch.arange(3.0, dtype=dtype, device=device)[:, None,
                                                                                                            None, None]
    weight = torch.randn(35, 21, dtype=dtype, device=device)  # a partial channel block
    bias = torch.randn(35, dtype=dtype, device=device)
    scale = torch.rand(21, device=device)
    out, mean, var = conv1x1(x, weight, in_scale=scale, in_act="relu", bias=bias, act="silu", stats=True)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == stat_dtype and mean.shape == var.shape == (35,)
    ref, _ = expected(x, weight, scale, None, "relu", bias, "silu")
    assert_close(out, ref)
    assert_close(mean, ref.mean((0, 2, 3)), "mean")
    assert_close(var, ref.var((0, 2, 3), unbiased=False), "variance")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_statistics_keep_the_variance_when_the_mean_dominates(device):
    # |mean| / std ~ 1e3: float32 E[z^2] - E[z]^2 would lose every digit; per-tile moments keep them.
    x = torch.randn(2, 4, 9, 7, device=device) * 1e-2 + 10
    weight = torch.full((3, 4), 0.25, device=device)
    _, mean, var = conv1x1(x, weight, stats=True)
    ref = expected(x, weight)[0]
    assert rel_error(mean, ref.mean((0, 2, 3))) <= 1e-6
    assert rel_error(var, ref.var((0, 2, 3), unbiased=False)) <= 1e-3


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_statistics_of_an_empty_batch_are_zeros(device):
    out, mean, var = conv1x1(torch.randn(0, 3, 4, 4, device=device), torch.randn(5, 3, device=device), stats=True)
    assert out.shape == (0, 5, 4, 4)
    assert torch.equal(mean, torch.zeros(5, device=device)) and torch.equal(var, torch.zeros(5, device=device))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["channel_slice", "channels_last", "spatial_stride", "transposed_weight"])
def test_strided_inputs(device, layout):
    kw = dict(dtype=torch.float64, device=device)
    buf = torch.randn(2, 24, 6, 9, **kw)
    weight = torch.randn(7, 11, **kw)
    if layout == "channel_slice":
        x = buf[:, 5:16]
    elif layout == "channels_last":
        x = buf[:, 5:16].contiguous(memory_format=torch.channels_last)
    elif layout == "spatial_stride":
        x = buf[:, 5:16, ::2, ::3]
    else:
        x = buf[:, 5:16]
        weight = torch.randn(11, 7, **kw).t()
    assert_close(conv1x1(x, weight, act="leaky_relu"), expected(x, weight, act="leaky_relu")[0])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_out_channel_slice(device, channels_last):
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 6, 3, 4, **kw)
    weight = torch.randn(5, 6, **kw)
    buf = torch.full((2, 12, 3, 4), 7.0, **kw)
    if channels_last:
        buf = buf.contiguous(memory_format=torch.channels_last)
    out, mean, _ = conv1x1(x, weight, act="mish", out=buf[:, 4:9], stats=True)
    assert out.data_ptr() == buf[:, 4:9].data_ptr()
    ref, _ = expected(x, weight, act="mish")
    assert_close(buf[:, 4:9], ref)
    assert_close(mean, ref.mean((0, 2, 3)), "mean")
    assert torch.all(buf[:, :4] == 7.0) and torch.all(buf[:, 9:] == 7.0)


@pytest.mark.parametrize("settings,precision", [
    (dict(conv="ieee"), "ieee"), (dict(conv="tf32"), "tf32"), (dict(conv="none", cudnn="tf32"), "tf32"),
    (dict(conv="none", cudnn="none", generic="tf32"), "tf32"),
    (dict(conv="none", cudnn="none", generic="none"), "ieee"),
])
def test_float32_dot_precision_follows_torchs_new_tf32_switches(settings, precision):
    """Convolutions' fp32_precision, else cuDNN's, else the global one, as torch resolves
    them; the legacy torch.backends.cudnn.allow_tf32 raises once conv and RNN differ."""
    # Set and restored by hand, as conftest.full_float32_precision says why.
    switches = dict(conv=torch.backends.cudnn.conv, cudnn=torch.backends.cudnn, generic=torch.backends)
    saved = {name: switch.fp32_precision for name, switch in switches.items()}
    try:
        for name, value in settings.items():
            switches[name].fp32_precision = value
        assert input_precision_of(torch.float32) == precision
        assert input_precision_of(torch.float64) == "ieee"
    finally:
        for name, value in saved.items():
            switches[name].fp32_precision = value


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_bad_arguments(device):
    x = torch.randn(2, 6, 3, 4, device=device)
    weight = torch.randn(5, 6, device=device)
    with pytest.raises(ValueError, match=r"weight must be \(out_channels, 6\)"):
        conv1x1(x, torch.randn(5, 7, device=device))
    with pytest.raises(ValueError, match=r"weight must be \(out_channels, 6\)"):
        conv1x1(x, torch.randn(5, 6, 1, 1, device=device))
    with pytest.raises(ValueError, match="must have the same dtype"):
        conv1x1(x, weight.double())
    with pytest.raises(ValueError, match=r"in_scale must have shape \(6,\)"):
        conv1x1(x, weight, in_scale=torch.ones(5, device=device))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        conv1x1(x, weight, bias=torch.ones(6, device=device))
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(2, 5, 3, 4\)"):
        conv1x1(x, weight, out=torch.empty(2, 5, 3, 5, device=device))
    with pytest.raises(ValueError, match="act must be one of"):
        conv1x1(x, weight, act="gelu")
    with pytest.raises(ValueError, match="x must be 4-D"):
        conv1x1(x[0], weight)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ACTS)
def test_activation_helpers_match_torch(device, dtype, act):
    """act_forward / act_grad against torch's modules and autograd, kinks included (relu'(0) = 0,
    hardswish'(+-3)), past mish's softplus threshold, and NaN / inf upstream gradients (selected
    to 0 where ATen's backward selects, not multiplied into NaN)."""

    special = torch.tensor([0.0, -3.0, 3.0, 20.0, 20.5, -20.5, -30.0, 30.0], dtype=dtype)
    u = torch.cat([torch.linspace(-8, 8, 241, dtype=dtype), special, special]).to(device)
    dy = torch.randn(u.shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    dy[-len(special):] = torch.tensor([float("nan"), float("inf"), float("-inf")] * 3, dtype=dtype)[:len(special)]
    y, d = triton_act(u, act, dy)
    u_ref = u.detach().clone().requires_grad_()
    y_ref = torch_act(u_ref, act)
    y_ref.backward(dy)
    tol = TOL[dtype] * 10
    assert_close_abs = lambda a, b, name: torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=name)  # noqa: E731
    assert_close_abs(y, y_ref.detach(), "forward")
    assert_close_abs(d, u_ref.grad, "gradient")
