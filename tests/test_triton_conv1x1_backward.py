"""The Triton dense-layer conv1 backward (csp_kernels.triton.conv1x1_backward) against autograd
in float64: the weight gradient with the normalize-on-load prologue, and the input gradient fed
into the BN + act backward accumulation, on NCHW, sliced and channels_last tensors."""
import pytest
import torch
import torch.nn.functional as F

from csp_kernels import backend, checks
from helpers import DEVICES, rel_error

TRITON_DEVICES = [d for d in DEVICES if backend.triton_usable(torch.device(d))[0]]
pytestmark = [pytest.mark.skipif(not TRITON_DEVICES, reason="Triton is not usable (no GPU, TRITON_INTERPRET unset)"),
              pytest.mark.usefixtures("full_float32_precision")]

if TRITON_DEVICES:
    from csp_kernels.triton.conv1x1_backward import dgrad_bn_accumulate, weight_grad

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x as given, as a channel slice of a wider buffer, or channels_last (same values)."""
    if kind == "slice":
        buf = torch.randn(x.shape[0], x.shape[1] + 5, *x.shape[2:], dtype=x.dtype, device=x.device)
        buf[:, 3: 3 + x.shape[1]] = x
        return buf[:, 3: 3 + x.shape[1]]
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def bn_act_conv(x, mean, invstd, bn_w, bn_b, act, weight):
    """conv1x1(act(BN(x))) with given statistics, in float64 (the forward whose backward the
    ops compute)."""
    xhat = (x - mean[:, None, None]) * invstd[:, None, None]
    return F.conv2d(checks.activation_module(act)(bn_w[:, None, None] * xhat + bn_b[:, None, None]), weight)


def bn_params(channels, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    make = lambda lo, hi: (torch.rand(channels, generator=g, dtype=torch.float64) * (hi - lo) + lo)  # noqa: E731
    return [t.to(device) for t in (torch.randn(channels, generator=g, dtype=torch.float64), make(0.5, 1.5),
                                   make(0.5, 1.5), torch.randn(channels, generator=g, dtype=torch.float64))]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["nchw", "slice", "channels_last"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_weight_grad_with_prologue(device, dtype, kind, act):
    # 2 images of 81 pixels (a full and a partial 64-pixel block each); 35 x 21 channels (partial
    # channel blocks).
    x64 = torch.randn(2, 21, 9, 9, dtype=torch.float64, device=device)
    grad_z64 = torch.randn(2, 35, 9, 9, dtype=torch.float64, device=device)
    mean, invstd, bn_w, bn_b = bn_params(21, dtype, device)
    weight = torch.randn(35, 21, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
    bn_act_conv(x64, mean, invstd, bn_w, bn_b, act, weight).backward(grad_z64)
    scale = bn_w * invstd
    got = weight_grad(layout(grad_z64.to(dtype), kind), layout(x64.to(dtype), kind), in_scale=scale,
                      in_shift=bn_b - mean * scale, in_act=act)
    assert got.shape == (35, 21, 1, 1) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_error(got, weight.grad) <= TOL[dtype]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_weight_grad_without_prologue_or_with_parts_of_it(device):
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64, device=device)
    grad_z = torch.randn(3, 7, 4, 6, dtype=torch.float64, device=device)
    expected = torch.einsum("nohw,nihw->oi", grad_z, x)[:, :, None, None]
    assert rel_error(weight_grad(grad_z, x), expected) <= 1e-12
    # a scale alone (shift 0) and a shift alone (scale 1)
    scale, shift = torch.rand(5, dtype=torch.float64, device=device), torch.randn(5, dtype=torch.float64, device=device)
    scaled = torch.einsum("nohw,nihw->oi", grad_z, x * scale[:, None, None])[:, :, None, None]
    shifted = torch.einsum("nohw,nihw->oi", grad_z, x + shift[:, None, None])[:, :, None, None]
    assert rel_error(weight_grad(grad_z, x, in_scale=scale), scaled) <= 1e-12
    assert rel_error(weight_grad(grad_z, x, in_shift=shift), shifted) <= 1e-12


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["nchw", "slice", "channels_last"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "mish"])
def test_dgrad_bn_accumulate(device, dtype, kind, act):
    x64 = torch.randn(2, 21, 9, 9, dtype=torch.float64, device=device)
    grad_z64 = torch.randn(2, 35, 9, 9, dtype=torch.float64, device=device)
    weight = torch.randn(35, 21, 1, 1, dtype=torch.float64, device=device)
    mean, invstd, bn_w, bn_b = bn_params(21, dtype, device)
    # Through autograd: the gradient of the pre-activation (dpre) and BN's affine gradients.
    xhat = ((x64 - mean[:, None, None]) * invstd[:, None, None]).requires_grad_()
    pre = bn_w[:, None, None] * xhat + bn_b[:, None, None]
    pre.retain_grad()
    F.conv2d(checks.activation_module(act)(pre), weight).backward(grad_z64)
    dpre = pre.grad
    acc64 = torch.randn_like(x64)
    grad_acc = layout(acc64.to(dtype, copy=True), kind)  # the op writes it in place
    sum_dpre, sum_dpre_xhat = dgrad_bn_accumulate(grad_z64.to(dtype), weight.to(dtype), layout(x64.to(dtype), kind),
                                                  mean, invstd, bn_w, bn_b, act, grad_acc)
    assert rel_error(grad_acc, acc64 + bn_w[:, None, None] * dpre) <= TOL[dtype]
    assert rel_error(sum_dpre, dpre.sum((0, 2, 3))) <= TOL[dtype]
    assert rel_error(sum_dpre_xhat, (dpre * xhat).sum((0, 2, 3))) <= TOL[dtype]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty_batch(device):
    x = torch.randn(0, 4, 3, 3, device=device)
    grad_z = torch.randn(0, 6, 3, 3, device=device)
    assert torch.equal(weight_grad(grad_z, x), torch.zeros(6, 4, 1, 1, device=device))
    vectors = [torch.ones(4, device=device)] * 4
    sums = dgrad_bn_accumulate(grad_z, torch.randn(6, 4, 1, 1, device=device), x, *vectors, "relu", torch.zeros_like(x))
    assert all(torch.equal(s, torch.zeros(4, device=device)) for s in sums)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("batch", [2, 0])
def test_unwritten_buffers_never_reach_the_result(device, batch, monkeypatch):
    """The weight gradient's partials and the per-block sums start as torch.empty: poisoned
    with NaN here, every element must be written (or, with no pixels, zeros)."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x = torch.randn(batch, 21, 9, 9, dtype=torch.float64, device=device)
    grad_z = torch.randn(batch, 35, 9, 9, dtype=torch.float64, device=device)
    vectors = [torch.rand(21, dtype=torch.float64, device=device) + 0.5 for _ in range(4)]
    monkeypatch.setattr(torch, "empty", poisoned)
    assert torch.isfinite(weight_grad(grad_z, x, in_scale=vectors[0], in_act="relu")).all()
    sums = dgrad_bn_accumulate(grad_z, torch.randn(35, 21, 1, 1, dtype=torch.float64, device=device), x, *vectors,
                               "relu", torch.zeros_like(x))
    assert all(torch.isfinite(s).all() for s in sums)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_half_precision_within_twice_the_plain_error(device):
    # flash-attention's rule against float64; "plain" is the same math in float32 from the
    # 16-bit inputs, its result rounded to 16 bits (a 16-bit GEMM accumulating in float32).
    # bfloat16 on a GPU only: the interpreter's tl.dot misreads it (test_triton_conv1x1.py).
    dtypes = [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float16]
    x64 = torch.randn(2, 37, 9, 9, dtype=torch.float64, device=device)
    grad_z64 = torch.randn(2, 35, 9, 9, dtype=torch.float64, device=device)
    weight64 = torch.randn(35, 37, 1, 1, dtype=torch.float64, device=device) / 6
    mean, invstd, bn_w, bn_b = bn_params(37, torch.float64, device)
    scale = bn_w * invstd

    def reference(x, grad_z, weight, dtype):
        """(weight gradient, grad_acc, sum dpre) of the layer, computed in dtype."""
        x, grad_z = x.to(dtype, copy=True).requires_grad_(), grad_z.to(dtype)
        weight = weight.to(dtype, copy=True).requires_grad_()
        xhat = (x - mean.to(dtype)[:, None, None]) * invstd.to(dtype)[:, None, None]
        pre = bn_w.to(dtype)[:, None, None] * xhat + bn_b.to(dtype)[:, None, None]
        pre.retain_grad()
        F.conv2d(torch.relu(pre), weight).backward(grad_z)
        return weight.grad, bn_w.to(dtype)[:, None, None] * pre.grad, pre.grad.sum((0, 2, 3))

    ref = reference(x64, grad_z64, weight64, torch.float64)
    for dtype in dtypes:
        x, grad_z, weight = x64.to(dtype), grad_z64.to(dtype), weight64.to(dtype)
        plain = [t.to(dtype) for t in reference(x.float(), grad_z.float(), weight.float(), torch.float32)]
        got_w = weight_grad(grad_z, x, in_scale=scale, in_shift=bn_b - mean * scale, in_act="relu")
        grad_acc = torch.zeros_like(x)
        sum_dpre, _ = dgrad_bn_accumulate(grad_z, weight, x, mean, invstd, bn_w, bn_b, "relu", grad_acc)
        for name, got, expected, plain_value in (("weight grad", got_w, ref[0], plain[0]),
                                                 ("grad_acc", grad_acc, ref[1], plain[1]),
                                                 ("sum dpre", sum_dpre, ref[2], plain[2])):
            assert rel_error(got, expected) <= 2 * rel_error(plain_value, expected) + 1e-6, (dtype, name)
