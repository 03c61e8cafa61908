"""The 3x3 convolution (csp_kernels.ops.conv3x3): the Winograd F(2x2, 3x3) C++ ops (forward and
weight gradient) against float64 on odd and tiny planes, channel slices and empty shapes, within
2.5x the error of ATen's float32; the backward against autograd; non-finite inputs; argument
checks; opcheck."""
import threading

import pytest
import torch
import torch.nn.functional as F

from csp_kernels.ops.conv import conv3x3_into, conv_backward
from csp_kernels.ops.conv3x3 import conv3x3_winograd, conv3x3_winograd_weight_grad, winograd_weight
from csp_kernels.ops.routing import winograd_usable
from helpers import rel_error

needs_winograd = pytest.mark.skipif(not winograd_usable(torch.empty(0)),
                                    reason="Winograd runs where csp_kernels' AVX-512 GEMM does (x86-64 AVX-512 CPUs)")


def errors_against_float64(x, weight):
    """(Winograd's, ATen float32's) relative errors against float64 conv2d."""
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    return rel_error(conv3x3_winograd(x, weight), ref), rel_error(F.conv2d(x, weight, padding=1), ref)


@needs_winograd
@pytest.mark.parametrize("shape,out_channels", [
    ((8, 128, 14, 14), 32),   # the dense layer's shape, smaller plane
    ((2, 5, 7, 9), 3),        # odd height and width: partial last tiles
    ((1, 3, 1, 1), 2),        # one pixel: a single tile, mostly padding
    ((3, 17, 1, 13), 6),      # one row
    ((2, 7, 11, 1), 130),     # one column; more output channels than a GEMM row block (96)
    ((1, 300, 6, 150), 9),    # a reduction longer than a GEMM k-block; tile rows wider than a block
    ((2, 6, 21, 27), 5),      # blocks of 64 tiles starting and ending inside tile rows; odd sides
    ((2, 4, 5, 32), 3),       # tile rows of exactly one run of 16 tiles
    ((2, 4, 6, 33), 3),       # tile rows of 17 tiles: a run of 16 and a run of one
])
def test_winograd_matches_float64(shape, out_channels):
    """2.5x, not flash-attention's 2x: the input and output transforms add a rounding of their
    own on each side of the GEMMs, which is F(2x2, 3x3)'s known cost; measured 1.1-2.1x here,
    the most with the 300-channel reduction. Plus two float32 epsilons: on a one-pixel plane
    the reduction is three products, whose error is a rounding or two either way."""
    x = torch.randn(shape)
    weight = torch.randn(out_channels, shape[1], 3, 3) / (9 * shape[1]) ** 0.5
    err, plain_err = errors_against_float64(x, weight)
    assert err <= 2.5 * plain_err + 2 * torch.finfo(torch.float32).eps, (err, plain_err)


@needs_winograd
def test_winograd_reads_and_writes_channel_slices():
    buf = torch.randn(2, 12, 9, 8)
    weight = torch.randn(4, 5, 3, 3)
    out = torch.full((2, 10, 9, 8), float("nan"))
    torch.ops.csp_kernels.conv3x3_winograd_out(buf[:, 3:8], winograd_weight(weight), out[:, 2:6])
    ref = F.conv2d(buf[:, 3:8].double(), weight.double(), padding=1)
    assert rel_error(out[:, 2:6], ref) <= 1e-6
    assert out[:, :2].isnan().all() and out[:, 6:].isnan().all(), "wrote outside its channel slice"


@needs_winograd
def test_winograd_empty_shapes():
    assert conv3x3_winograd(torch.randn(0, 4, 5, 5), torch.randn(3, 4, 3, 3)).shape == (0, 3, 5, 5)
    assert conv3x3_winograd(torch.randn(2, 4, 5, 5), torch.randn(0, 4, 3, 3)).shape == (2, 0, 5, 5)
    zeros = conv3x3_winograd(torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3))
    assert zeros.shape == (2, 3, 5, 5) and (zeros == 0).all()


def weight_grad_float64(x, grad_y):
    weight = torch.empty(grad_y.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(grad_y.double(), x.double(), weight, None, [1, 1], [1, 1], [1, 1],
                                               False, [0, 0], 1, [False, True, False])[1]


@needs_winograd
@pytest.mark.parametrize("shape,out_channels", [
    ((8, 32, 14, 14), 16),
    ((2, 5, 7, 9), 3),        # odd height and width: partial last tiles, in x and in grad_y
    ((1, 3, 1, 1), 2),        # one pixel
    ((3, 17, 1, 13), 6),      # one row
    ((2, 7, 11, 1), 130),     # one column; more output channels than a GEMM row block
    ((5, 9, 40, 40), 7),      # several blocks per sample, summed across threads
    ((2, 6, 21, 27), 5),      # blocks starting and ending inside tile rows; odd sides
    ((2, 4, 6, 33), 3),       # tile rows of 17 tiles: a run of 16 and a run of one
])
def test_winograd_weight_grad_matches_float64(shape, out_channels):
    """Within 2.5x ATen float32's error against float64, as the forward (the same transforms)."""
    x, grad_y = torch.randn(shape), torch.randn(shape[0], out_channels, *shape[2:])
    ref = weight_grad_float64(x, grad_y)
    plain = torch.ops.aten.convolution_backward(grad_y, x, torch.empty(ref.shape), None, [1, 1], [1, 1], [1, 1],
                                                False, [0, 0], 1, [False, True, False])[1]
    ours = conv3x3_winograd_weight_grad(x, grad_y)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    err, plain_err = rel_error(ours, ref), rel_error(plain, ref)
    assert err <= 2.5 * plain_err + 2 * torch.finfo(torch.float32).eps, (err, plain_err)


@needs_winograd
def test_winograd_weight_grad_reads_channel_slices_and_empty_shapes():
    buf, grad_buf = torch.randn(2, 12, 9, 8), torch.randn(2, 10, 9, 8)
    ours = conv3x3_winograd_weight_grad(buf[:, 3:8], grad_buf[:, 2:6])
    assert rel_error(ours, weight_grad_float64(buf[:, 3:8], grad_buf[:, 2:6])) <= 1e-6
    assert (conv3x3_winograd_weight_grad(torch.randn(0, 4, 5, 5), torch.randn(0, 3, 5, 5)) == 0).all()
    assert conv3x3_winograd_weight_grad(torch.randn(2, 0, 5, 5), torch.randn(2, 3, 5, 5)).shape == (3, 0, 3, 3)


@needs_winograd
@pytest.mark.parametrize("where", ["x", "grad_y"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_winograd_weight_grad_of_non_finite_inputs_is_atens(where, value):
    """One inf would spread into NaNs through the transforms: such inputs take ATen's direct
    weight gradient, NaN and inf where it has them."""
    x, grad_y = torch.randn(2, 3, 6, 7), torch.randn(2, 4, 6, 7)
    (x if where == "x" else grad_y)[1, 2, 3, 4] = value
    expected = torch.ops.aten.convolution_backward(grad_y, x, torch.empty(4, 3, 3, 3), None, [1, 1], [1, 1], [1, 1],
                                                   False, [0, 0], 1, [False, True, False])[1]
    ours = conv3x3_winograd_weight_grad(x, grad_y)
    assert ours.isnan().any() if value != value else ours.isinf().any()
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_backward_matches_autograd(dtype, tol):
    """Winograd's input and weight gradients in float32 where usable; ATen's in float64."""
    x = torch.randn(2, 16, 11, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    F.conv2d(x, weight, padding=1).backward(grad_y)
    grad_x, grad_weight = conv_backward(grad_y.to(dtype), x.detach().to(dtype), weight.detach().to(dtype), [1, 1],
                                        [1, 1], [1, 1], 1, True, True)
    assert grad_x.shape == x.shape and grad_weight.shape == weight.shape
    assert rel_error(grad_x, x.grad) <= tol
    assert rel_error(grad_weight, weight.grad) <= tol


def test_forward_into_a_slice():
    x, weight = torch.randn(2, 6, 5, 7), torch.randn(3, 6, 3, 3)
    out = torch.zeros(2, 8, 5, 7)
    conv3x3_into(x, weight, out[:, 4:7])
    assert rel_error(out[:, 4:7], F.conv2d(x.double(), weight.double(), padding=1)) <= 1e-6
    assert (out[:, :4] == 0).all() and (out[:, 7:] == 0).all()


@needs_winograd
@pytest.mark.parametrize("layout", ["contiguous", "flipped-transposed"])
def test_winograd_weight_is_g_g_gt_rounded_once(layout):
    weight = torch.randn(5, 19, 3, 3)  # 19 inputs: one full and one partial group of 16 filters
    if layout == "flipped-transposed":  # the input gradient's weight
        weight = weight.transpose(0, 1).flip(2, 3)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    u = winograd_weight(weight)
    o, c = weight.shape[:2]
    assert u.shape == (16, o, c) and u.is_contiguous() and u.dtype == torch.float32
    w64 = weight.double()
    expected = torch.stack([g @ w64[i, j] @ g.T for i in range(o) for j in range(c)]).view(o, c, 16)
    assert torch.equal(u, expected.permute(2, 0, 1).float())  # float64 arithmetic, one rounding


@needs_winograd
def test_op_rejects_what_it_cannot_run():
    x = torch.randn(2, 4, 5, 5)
    u = winograd_weight(torch.randn(3, 4, 3, 3))
    with pytest.raises(TypeError, match="runs float32"):
        torch.ops.csp_kernels.conv3x3_winograd_out(x.double(), u.double(), torch.empty(2, 3, 5, 5, dtype=torch.double))
    with pytest.raises(ValueError, match="Winograd transform"):
        torch.ops.csp_kernels.conv3x3_winograd_out(x, u[:, :, :3], torch.empty(2, 3, 5, 5))
    with pytest.raises(ValueError, match="out must have shape"):
        torch.ops.csp_kernels.conv3x3_winograd_out(x, u, torch.empty(2, 3, 5, 4))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.csp_kernels.conv3x3_winograd_out(x[..., ::2], u, torch.empty(2, 3, 5, 3))
    with pytest.raises(TypeError, match="runs float32"):
        torch.ops.csp_kernels.winograd_weight(torch.randn(3, 4, 3, 3, dtype=torch.double))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.csp_kernels.winograd_weight(torch.randn(4, 3, 3, 3).transpose(0, 1))
    with pytest.raises(TypeError, match="runs float32"):
        conv3x3_winograd_weight_grad(x.double(), torch.randn(2, 3, 5, 5, dtype=torch.double))
    with pytest.raises(ValueError, match="grad_y must have shape"):
        conv3x3_winograd_weight_grad(x, torch.randn(2, 3, 5, 4))
    with pytest.raises(ValueError, match="contiguous"):
        conv3x3_winograd_weight_grad(x, torch.randn(2, 3, 5, 10)[..., ::2])


@needs_winograd
def test_op_opcheck():
    torch.library.opcheck(torch.ops.csp_kernels.conv3x3_winograd_out.default,
                          (torch.randn(2, 4, 5, 6), winograd_weight(torch.randn(3, 4, 3, 3)), torch.empty(2, 3, 5, 6)))
    torch.library.opcheck(torch.ops.csp_kernels.conv3x3_winograd_weight_grad.default,
                          (torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)))
    torch.library.opcheck(torch.ops.csp_kernels.winograd_weight.default, (torch.randn(3, 20, 3, 3),))


@needs_winograd
def test_threads_calling_at_once_keep_their_own_scratch():
    """The kernels keep temporary buffers per thread between calls (csrc/cpu/scratch.h): three
    Python threads running the phased (small maps) and the blocked (larger maps) paths at once
    get what one thread gets. Not bit for bit: the blocked weight gradient sums its threads'
    partials in the order they finish."""
    shapes = [((4, 64, 8, 8), 32), ((2, 32, 30, 30), 48), ((3, 128, 4, 4), 16)]
    cases = []
    for x_shape, out_channels in shapes:
        x, weight = torch.randn(x_shape), torch.randn(out_channels, x_shape[1], 3, 3)
        grad_y = torch.randn(x_shape[0], out_channels, *x_shape[2:])
        cases.append((x, weight, grad_y, conv3x3_winograd(x, weight), conv3x3_winograd_weight_grad(x, grad_y)))
    errors = []

    def run(first):
        for _ in range(10):
            for x, weight, grad_y, y, grad_weight in cases[first:] + cases[:first]:
                errors.append(max(rel_error(conv3x3_winograd(x, weight), y),
                                  rel_error(conv3x3_winograd_weight_grad(x, grad_y), grad_weight)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 90 and max(errors) < 1e-6
