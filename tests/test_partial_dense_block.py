"""The fused PartialDenseBlock (csp_kernels/nn/dense.py, csp_kernels/ops/dense.py) against the
reference: forward, gradients, running statistics, eval, the custom ops, memory saved."""

import copy

import pytest
import torch
from torch import nn

from csp_kernels import backend, reference
from csp_kernels.nn import PartialDenseBlock
from csp_kernels.ops import dense as dense_ops
from csp_kernels.ops import conv1x1 as conv1x1_ops
from csp_kernels.ops import dense_eval, routing
from csp_kernels.profiling import SavedTensorsMeter
from helpers import (DEVICES, assert_matches_reference, device_backend_params, fused_backends, rel_error,
                     requires_cuda)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FUSIONS = ["last", "first", "csp"]
# (in_channels, part_ratio): part 1 of 2 / 4 / 6 of 8 channels, and 3 of 10 (ratio 0.3).
SPLITS = [(8, 0.25), (8, 0.5), (8, 0.75), (10, 0.3)]


def block_cases():
    """(device, backend, fusion, in_channels, part_ratio, num_layers): every combination on the
    compiled backends; the Triton interpreter (slow) gets the odd split with 1 and 3 layers."""
    cases = []
    for param in device_backend_params():
        device, name = param.values
        for fusion in FUSIONS:
            for in_channels, part_ratio in SPLITS:
                for num_layers in (1, 3):
                    if name == "triton" and device == "cpu" and in_channels != 10:
                        continue
                    cases.append(pytest.param(device, name, fusion, in_channels, part_ratio, num_layers,
                                              id=f"{param.id}-{fusion}-{in_channels}x{part_ratio}-L{num_layers}"))
    return cases


def randomize(module: nn.Module) -> nn.Module:
    """BN affine parameters and running statistics away from their defaults, so that a wrong
    scale, shift, statistic or fold cannot pass unnoticed."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module


def make_pair(*args, dtype=torch.float64, device="cpu", **kwargs):
    """(reference block, fused block) with the same randomized state."""
    ref = randomize(reference.PartialDenseBlock(*args, **kwargs)).to(device, dtype)
    fused = PartialDenseBlock(*args, **kwargs).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def train_step(module, x, grad_y):
    """Training forward + backward; returns (output, input grad, parameter grads)."""
    module.train()
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = module(x)
    y.backward(grad_y)
    return y, x.grad, [p.grad for p in module.parameters()]


def assert_train_matches(ref, fused, x, device, name, tol):
    n, _, h, w = x.shape
    grad_y = torch.randn(n, ref.out_channels, h, w, dtype=x.dtype, device=device)
    y_ref, gx_ref, gp_ref = train_step(ref, x, grad_y)
    with backend.use_backend(name):
        y, gx, gp = train_step(fused, x, grad_y)
    assert y.shape == y_ref.shape and y.stride() == y_ref.stride()  # the reference's memory format
    assert_matches_reference(y, y_ref, tol=tol, name="output")
    if x.requires_grad:
        assert_matches_reference(gx, gx_ref, tol=tol, name="input grad")
    for (pname, _), g, g_ref in zip(ref.named_parameters(), gp, gp_ref):
        assert_matches_reference(g, g_ref, tol=tol, name=f"grad of {pname}")
    for (bname, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        if bname.endswith("num_batches_tracked"):
            assert torch.equal(b, b_ref), bname
        else:
            assert_matches_reference(b, b_ref, tol=tol, name=bname)


def assert_eval_matches(ref, fused, x, name, tol):
    ref.eval()
    fused.eval()
    with torch.no_grad():
        expected = ref(x.to(next(ref.parameters()).dtype))
        with backend.use_backend(name):
            out = fused(x)
    assert_matches_reference(out, expected, tol=tol, name="eval output")
    assert out.stride() == expected.stride()  # the reference's memory format


@pytest.mark.parametrize("device,name,fusion,in_channels,part_ratio,num_layers", block_cases())
def test_train_and_eval_match_reference_float64(device, name, fusion, in_channels, part_ratio, num_layers):
    ref, fused = make_pair(in_channels, num_layers, 3, part_ratio, bn_size=2, fusion=fusion, device=device)
    x = torch.randn(2, in_channels, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert_train_matches(ref, fused, x, device, name, TOL[torch.float64])
    assert_eval_matches(ref, fused, x, name, TOL[torch.float64])


@pytest.fixture
def no_tf32():
    """float32 convolutions in full precision on a GPU (cuDNN and the Triton GEMM follow
    cudnn.allow_tf32), so that 1e-5 against float64 is a fair bound."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device,name", device_backend_params())
@pytest.mark.parametrize("fusion", FUSIONS)
def test_float32_matches_float64_reference(device, name, fusion, no_tf32):
    size = (2, 8, 4, 4) if name == "triton" else (3, 12, 9, 11)
    ref, fused = make_pair(size[1], 2 if name == "triton" else 4, 4, 0.5, fusion=fusion, device=device)
    fused.float()
    x = torch.randn(*size, dtype=torch.float64, device=device)
    grad_y = torch.randn(size[0], ref.out_channels, *size[2:], dtype=torch.float64, device=device)
    xr, xf = x.clone().requires_grad_(), x.float().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(grad_y)
    with backend.use_backend(name):
        y = fused(xf)
        y.backward(grad_y.float())
    assert y.dtype == torch.float32
    assert_matches_reference(y, y_ref, tol=TOL[torch.float32])
    assert_matches_reference(xf.grad, xr.grad, tol=TOL[torch.float32], name="input grad")
    for (pname, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_matches_reference(p.grad, p_ref.grad, tol=TOL[torch.float32], name=f"grad of {pname}")
    assert_eval_matches(ref, fused, x.float(), name, TOL[torch.float32])


@pytest.mark.parametrize("device,name", device_backend_params())
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("out_channels", [7, 19], ids=["narrower", "wider"])
def test_out_channels_batch1_odd_size(device, name, fusion, out_channels):
    """Outputs narrower and wider than the 12-channel concat buffer (eval writes a wider one
    in place over the buffer)."""
    ref, fused = make_pair(6, 2, 3, 0.5, bn_size=2, fusion=fusion, out_channels=out_channels, device=device)
    x = torch.randn(1, 6, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert_train_matches(ref, fused, x, device, name, TOL[torch.float64])
    assert_eval_matches(ref, fused, x, name, TOL[torch.float64])
    assert_eval_matches(ref, fused, torch.randn(3, 6, 3, 5, dtype=torch.float64, device=device), name,
                        TOL[torch.float64])


@pytest.mark.parametrize("device,name", device_backend_params())
@pytest.mark.parametrize("fusion", ["csp", "last"])
@pytest.mark.parametrize("out_channels", [None, 5], ids=["same_width", "narrower"])
def test_eval_transitions_run_whole_batches(device, name, fusion, out_channels, monkeypatch):
    """Every 1x1 GEMM of the eval block takes the whole batch: the CPU GEMM writes the
    transitions over their inputs (in place, as it always did), the other engines (Triton, CUDA's
    bmm passes) compute into a separate tensor in one call each, never one sample at a time."""
    num_layers, batch = 2, 5
    ref, fused = make_pair(8, num_layers, 4, 0.5, fusion=fusion, out_channels=out_channels, device=device)
    x = torch.randn(batch, 8, 4, 4, dtype=torch.float64, device=device)
    calls, launches = [], []
    real_fused, real_passes = dense_eval.conv1x1_fused, conv1x1_ops._conv1x1_passes

    def fused_call(inp, *args, **kwargs):
        calls.append((inp.shape[0], kwargs.get("in_place", False), kwargs.get("in_scale") is None))
        return real_fused(inp, *args, **kwargs)

    def passes_call(inp, *args):
        launches.append(inp.shape[0])
        return real_passes(inp, *args)

    monkeypatch.setattr(dense_eval, "conv1x1_fused", fused_call)
    monkeypatch.setattr(conv1x1_ops, "_conv1x1_passes", passes_call)
    assert_eval_matches(ref, fused, x, name, TOL[torch.float64])
    transitions = [in_place for _, in_place, is_transition in calls if is_transition]
    assert len(calls) == num_layers + len(transitions) and len(transitions) == (2 if fusion == "csp" else 1)
    assert all(n == batch for n, _, _ in calls)
    engine = routing.dense_engine(name)
    cpu_gemm = routing.conv1x1_writes_over_input(x, engine, scaled=False)
    assert cpu_gemm == (device == "cpu" and name == "cpu")
    # In place exactly where the CPU GEMM writes the output over the buffer (a narrower output
    # goes to a new tensor, as before); the other engines' launches are one per call.
    assert transitions == [cpu_gemm and (i == 0 and fusion == "csp" or out_channels is None)
                           for i in range(len(transitions))]
    assert launches == ([] if cpu_gemm else [batch] * len(calls))


@pytest.mark.parametrize("device,name", device_backend_params())
def test_channels_last_input_and_activation(device, name):
    ref, fused = make_pair(8, 2, 4, 0.5, fusion="csp", act="leaky_relu", device=device)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, device=device).to(memory_format=torch.channels_last)
    assert_train_matches(ref, fused, x.requires_grad_(), device, name, TOL[torch.float64])
    assert_eval_matches(ref, fused, x, name, TOL[torch.float64])


def test_momentum_none_and_several_steps():
    ref, fused = make_pair(8, 2, 4, 0.5, fusion="first")
    for m in [*ref.modules(), *fused.modules()]:
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    for _ in range(3):
        x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
        assert_train_matches(ref, fused, x, "cpu", "cpu", TOL[torch.float64])


def test_eval_cache_follows_weight_and_stat_changes():
    ref, fused = make_pair(8, 2, 4, 0.5, fusion="csp")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert_eval_matches(ref, fused, x, "cpu", TOL[torch.float64])
    for module in (ref, fused):  # in-place updates, as an optimizer step or a BN update makes
        with torch.no_grad():
            module.dense.denselayer2.conv1.weight.mul_(1.5)
            module.dense.denselayer1.norm2.running_var.add_(0.5)
            module.transition2.bn.bias.add_(0.25)
    assert_eval_matches(ref, fused, x, "cpu", TOL[torch.float64])


def test_eval_with_autograd_recording_is_differentiable():
    ref, fused = make_pair(8, 2, 4, 0.5, fusion="last")
    ref.eval()
    fused.eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    (gx_ref,) = torch.autograd.grad(ref(x).square().sum(), x)
    with pytest.warns(backend.ReferenceFallbackWarning, match="eval mode with autograd recording"):
        y = fused(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    assert_matches_reference(gx, gx_ref, tol=TOL[torch.float64])


def test_training_under_no_grad_updates_running_stats():
    ref, fused = make_pair(8, 3, 4, 0.5, fusion="csp")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y_ref, y = ref(x), fused(x)
    assert not y.requires_grad
    assert_matches_reference(y, y_ref, tol=TOL[torch.float64])
    for (bname, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        assert_matches_reference(b.double(), b_ref.double(), tol=TOL[torch.float64], name=bname)


def test_input_without_grad_still_trains_parameters():
    ref, fused = make_pair(8, 2, 4, 0.5, fusion="first")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert_train_matches(ref, fused, x, "cpu", "cpu", TOL[torch.float64])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_block_used_twice_in_one_graph(fusion):
    ref, fused = make_pair(8, 2, 4, 0.5, fusion=fusion, out_channels=8)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for module in (ref, fused):
        xi = x.detach().clone().requires_grad_()
        y = module(module(xi) * 0.5)
        y.backward(torch.ones_like(y))
        grads.append((y, xi.grad, [p.grad.clone() for p in module.parameters()]))
    (y_ref, gx_ref, gp_ref), (y, gx, gp) = grads
    assert_matches_reference(y, y_ref, tol=TOL[torch.float64])
    assert_matches_reference(gx, gx_ref, tol=TOL[torch.float64], name="input grad")
    for g, g_ref in zip(gp, gp_ref):
        assert_matches_reference(g, g_ref, tol=TOL[torch.float64], name="parameter grad")


def test_double_backward_is_refused():
    _, fused = make_pair(8, 2, 4, 0.5)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)


def test_unusual_batch_norms_run_the_reference_math():
    ref, fused = make_pair(8, 2, 4, 0.5)
    for module in (ref, fused):
        module.dense.denselayer1.norm1.eps = 1e-3  # one eps differs: the shared-statistics op cannot
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(backend.ReferenceFallbackWarning, match="different eps"):
        assert_train_matches(ref, fused, x, "cpu", "cpu", TOL[torch.float64])


def test_bad_input_is_rejected():
    _, fused = make_pair(8, 2, 4, 0.5)
    with pytest.raises(ValueError, match="8 channels"):
        fused(torch.randn(2, 6, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 8, 1, 1, dtype=torch.float64))


def test_torchvision_dense_block_weights_give_the_same_features():
    densenet = pytest.importorskip("torchvision.models.densenet")
    part1, part2, layers, growth, bn_size = 3, 5, 3, 4, 2
    tv_block = randomize(densenet._DenseBlock(layers, part2, bn_size, growth, drop_rate=0.0)).double()
    fused = PartialDenseBlock(part1 + part2, layers, growth, part1 / (part1 + part2), bn_size).double()
    fused.dense.load_state_dict(tv_block.state_dict())
    x = torch.randn(2, part1 + part2, 6, 5, dtype=torch.float64)
    buf = dense_ops.partial_dense_block(x, fused.dense_params(), fused.transition_params(), part1, "last",
                                        "relu", 1e-5, "aten")[1]
    tv_block.train()
    assert_matches_reference(buf[:, part1:], tv_block(x[:, part1:]), tol=TOL[torch.float64], name="dense features")
    tv_block.eval()  # its training forward moved its running statistics: load them again
    fused.dense.load_state_dict(tv_block.state_dict())
    fused.eval()
    ref = reference.PartialDenseBlock(part1 + part2, layers, growth, part1 / (part1 + part2), bn_size).double().eval()
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert_matches_reference(fused(x), ref(x), tol=TOL[torch.float64], name="eval output")
        assert_matches_reference(ref.dense(x[:, part1:]), tv_block(x[:, part1:]), tol=TOL[torch.float64])


# -- the custom ops --------------------------------------------------------------------------

def op_args(fusion, dtype=torch.float64, requires_grad=True):
    _, fused = make_pair(5, 2, 2, 0.4, bn_size=2, fusion=fusion, dtype=dtype)
    x = torch.randn(2, 5, 3, 3, dtype=dtype)
    params = [p.detach().clone() for p in fused.dense_params()]
    tparams = [p.detach().clone() for p in fused.transition_params()]
    for t in [x, *params, *tparams]:
        t.requires_grad_(requires_grad)
    return x, params, tparams, fused.part1, fusion, "silu", 1e-5, "aten"


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradcheck_partial_dense_block(fusion):
    x, params, tparams, *rest = op_args(fusion)

    def block(x, *flat):
        return dense_ops.partial_dense_block(x, list(flat[: len(params)]), list(flat[len(params):]), *rest)[0]

    assert torch.autograd.gradcheck(block, (x, *params, *tparams), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_opcheck_partial_dense_block(fusion):
    # The backward refuses create_graph, so the double-backward-based autograd check is left out.
    torch.library.opcheck(dense_ops.partial_dense_block, op_args(fusion),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("device", DEVICES)
def test_bn_act_backward_accumulate_and_grad_correct_ops(device):
    n, c, h, w = 2, 5, 3, 4
    torch.set_default_device(device)
    try:
        check_accumulate_and_correct(n, c, h, w)
    finally:
        torch.set_default_device(None)


def check_accumulate_and_correct(n, c, h, w):
    buf = torch.randn(n, c + 3, h, w, dtype=torch.float64)
    x = buf[:, 1: 1 + c]  # a channel slice, as the block passes the buffer's prefix
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)
    weight, bias = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    grad_a = torch.randn(n, c, h, w, dtype=torch.float64)
    acc_buf = torch.randn(n, c + 2, h, w, dtype=torch.float64)
    acc_before = acc_buf.clone()
    sum_dpre, sum_dpre_xhat = dense_ops.bn_act_backward_accumulate(grad_a, x, mean, invstd, weight, bias, "relu",
                                                                   acc_buf[:, :c])
    xhat = (x - mean[:, None, None]) * invstd[:, None, None]
    dpre = grad_a * ((weight[:, None, None] * xhat + bias[:, None, None]) > 0)
    assert_matches_reference(acc_buf[:, :c], acc_before[:, :c] + weight[:, None, None] * dpre, tol=1e-14)
    assert torch.equal(acc_buf[:, c:], acc_before[:, c:])
    assert_matches_reference(sum_dpre, dpre.sum((0, 2, 3)), tol=1e-13)
    assert_matches_reference(sum_dpre_xhat, (dpre * xhat).sum((0, 2, 3)), tol=1e-13)

    # The correction turns the accumulated gradient of xhat into the gradient of x: compare
    # with autograd through batch_norm (weight 1, bias 0), starting from a nonzero grad_x.
    g = torch.randn(n, c, h, w, dtype=torch.float64)
    grad_x = torch.randn(n, c, h, w, dtype=torch.float64)
    expected = grad_x.clone()
    xr = x.detach().clone().requires_grad_()
    torch.nn.functional.batch_norm(xr, None, None, training=True, eps=1e-5).backward(g)
    expected += xr.grad
    dense_ops.bn_grad_correct(g, x, mean, invstd, g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3)), grad_x)
    assert_matches_reference(grad_x, expected, tol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        dense_ops.bn_grad_correct(g, x[:, :2], mean[:2], invstd[:2], mean[:2], mean[:2], grad_x[:, :2].clone()[:1])


def accumulator_cases():
    """(device, how, dtype): the C++ accumulate op on every device, and Triton's dgrad epilogue
    where usable (bfloat16 on a GPU only: the interpreter's tl.dot misreads it)."""
    cases = []
    for device in DEVICES:
        for dtype in (torch.float16, torch.bfloat16):
            cases.append(pytest.param(device, "op", dtype, id=f"{device}-op-{dtype}"))
            if backend.triton_usable(torch.device(device))[0] and (device == "cuda" or dtype == torch.float16):
                cases.append(pytest.param(device, "triton", dtype, id=f"{device}-triton-{dtype}"))
    return cases


@pytest.mark.parametrize("device,how,dtype", accumulator_cases())
def test_float32_accumulator_of_16_bit_data(device, how, dtype):
    """The BN1 accumulator in float32 for 16-bit data (the GPU engines':
    routing.dense_grad_acc_dtype): twenty layers' contributions, each under half a 16-bit ulp
    of the running sum, all kept (a 16-bit accumulator keeps none); the correction reads the
    float32 sums and rounds once, to the input gradient's dtype."""
    n, c, h, w = 2, 3, 4, 4
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    mean, var = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)
    ones, zeros = torch.ones(c, device=device), torch.zeros(c, device=device)
    grad_a = torch.full((n, c, h, w), 1e-4, device=device).to(dtype)  # dpre = grad_a (identity, weight 1)

    def accumulate(grad_acc):
        if how == "op":
            dense_ops.bn_act_backward_accumulate(grad_a, x, mean, invstd, ones, zeros, "identity", grad_acc)
        else:
            from csp_kernels.triton.conv1x1_backward import dgrad_bn_accumulate
            eye = torch.eye(c, device=device).to(dtype)[:, :, None, None]  # conv input gradient = grad_a
            dgrad_bn_accumulate(grad_a, eye, x, mean, invstd, ones, zeros, "identity", grad_acc)

    acc32, acc16 = torch.ones(n, c, h, w, device=device), torch.ones(n, c, h, w, device=device, dtype=dtype)
    for _ in range(20):
        accumulate(acc32)
        accumulate(acc16)
    assert acc32.dtype == torch.float32
    assert rel_error(acc32, 1 + 20 * grad_a.double()) <= 1e-6
    assert torch.equal(acc16, torch.ones_like(acc16))  # every contribution rounded away

    g = torch.randn(n, c, h, w, device=device)  # float32 sums, finer than 16 bits
    xhat = (x.double() - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    grad_x = torch.zeros(n, c, h, w, device=device, dtype=dtype)
    dense_ops.bn_grad_correct(g, x, mean, invstd, g.sum((0, 2, 3)), (g.double() * xhat).sum((0, 2, 3)).float(),
                              grad_x)
    gd = g.double()
    expected = invstd.double()[:, None, None] * (gd - gd.mean((0, 2, 3), keepdim=True)
                                                 - xhat * (gd * xhat).mean((0, 2, 3), keepdim=True))
    assert grad_x.dtype == dtype
    assert rel_error(grad_x, expected) <= torch.finfo(dtype).eps  # one rounding to dtype
    with pytest.raises(TypeError, match="grad_acc"):
        dense_ops.bn_grad_correct(g.double(), x, mean, invstd, mean, mean, grad_x)


def low_precision_block_cases():
    """(device, backend, dtype) for every fused backend here, with the BN1 accumulator's dtype
    routing.dense_grad_acc_dtype gives: float32 on the GPU engines, the data's on the CPU one."""
    cases = []
    for param in device_backend_params():
        device, name = param.values
        for dtype in (torch.float16, torch.bfloat16):
            if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
                continue  # refused: the interpreter's tl.dot misreads bfloat16
            cases.append(pytest.param(device, name, dtype, id=f"{param.id}-{dtype}"))
    return cases


@pytest.mark.parametrize("device,name,dtype", low_precision_block_cases())
def test_16_bit_bn1_accumulator_dtype_and_input_gradient(device, name, dtype, monkeypatch):
    """The dense backward's BN1 accumulator is float32 for 16-bit data on the GPU engines (Triton,
    CUDA), unchanged (the data's dtype) on the CPU one; the input gradient keeps flash-attention's
    rule: at most 2x plain PyTorch's error in the same dtype, both against float64."""
    seen = []
    real_correct = dense_ops.bn_grad_correct
    monkeypatch.setattr(dense_ops, "bn_grad_correct",
                        lambda grad_acc, *args: seen.append(grad_acc.dtype) or real_correct(grad_acc, *args))
    ref64, fused = make_pair(8, 4, 4, 0.5, fusion="csp", device=device)
    plain = copy.deepcopy(ref64).to(dtype)
    fused.to(dtype)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, device=device)
    grad_y = torch.randn(4, ref64.out_channels, 6, 6, dtype=torch.float64, device=device)
    grads = []
    for module, dtype_in, backend_name in ((ref64, torch.float64, "reference"), (plain, dtype, "reference"),
                                           (fused, dtype, name)):
        xi = x.to(dtype_in).detach().requires_grad_()  # a leaf of its own, also for float64
        with backend.use_backend(backend_name):
            module(xi).backward(grad_y.to(dtype_in))
        grads.append(xi.grad)
    gx64, gx_plain, gx_fused = grads
    gpu_engine = name == "triton" or device == "cuda"
    assert seen and set(seen) == {torch.float32 if gpu_engine else dtype}
    assert gx_fused.dtype == dtype
    assert_matches_reference(gx_fused, gx64, plain=gx_plain, name="input grad")


def test_custom_ops_opcheck():
    n, c = 2, 3
    x = torch.randn(n, c + 1, 4, 4)[:, 1:]
    vec = lambda: torch.rand(c) + 0.5  # noqa: E731
    torch.library.opcheck(torch.ops.csp_kernels.bn_act_backward_accumulate.default,
                          (torch.randn(n, c, 4, 4), x, vec(), vec(), vec(), vec(), "relu", torch.zeros(n, c, 4, 4)))
    torch.library.opcheck(torch.ops.csp_kernels.bn_grad_correct.default,
                          (torch.randn(n, c, 4, 4), x, vec(), vec(), vec(), vec(), torch.zeros(n, c, 4, 4)))


# -- memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", FUSIONS)
def test_saved_bytes_at_most_a_fifth_of_eager(fusion):
    # pdb-cpu's block (docs/benchmarks.md) at 8x8: every saved tensor of both is (batch,
    # channels, height, width), so the ratio is pdb-cpu's at any resolution.
    ref, fused = make_pair(128, 6, 32, 0.5, fusion=fusion, dtype=torch.float32)
    x = torch.randn(2, 128, 8, 8, requires_grad=True)
    saved = {}
    for label, module in (("eager", ref), ("fused", fused)):
        with SavedTensorsMeter() as meter:
            module(x)
        saved[label] = meter.bytes_excluding([*module.parameters(), *module.buffers()])
    assert saved["fused"] <= 0.2 * saved["eager"], saved
    # Exactly what the design saves: the concat buffer and the transitions' pre-BN outputs
    # (fusion "csp": both), plus per-channel statistics.
    transition_channels = sum(t.conv.out_channels for t in fused._transitions())
    per_channel = 2 * 8 * 8 * 4
    assert saved["fused"] <= per_channel * (64 + 64 + 6 * 32 + transition_channels) + 16384, saved


def test_reference_backend_runs_the_reference():
    ref, fused = make_pair(8, 2, 4, 0.5)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    with backend.use_backend("reference"):
        y = fused(x)
    assert rel_error(y, ref(x)) == 0.0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(training):
    # aot_eager traces the ops through their fake kernels and registered autograd, as inductor
    # would, without its slow code generation.
    ref, fused = make_pair(8, 2, 4, 0.5, fusion="csp")
    ref.train(training)
    fused.train(training)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=training)
    with torch.set_grad_enabled(training):
        y, y_ref = compiled(x), ref(x)
    assert_matches_reference(y, y_ref, tol=TOL[torch.float64])
    if training:
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
        assert_matches_reference(gx, gx_ref, tol=TOL[torch.float64], name="input grad")
        for (bname, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
            assert_matches_reference(b.double(), b_ref.double(), tol=TOL[torch.float64], name=bname)


@requires_cuda
@pytest.mark.parametrize("name", fused_backends("cuda"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_gpu(name, dtype):
    ref64, fused = make_pair(32, 3, 16, 0.5, fusion="csp", device="cuda")
    plain = copy.deepcopy(ref64).to(dtype)
    fused.to(dtype)
    x = torch.randn(4, 32, 14, 14, dtype=torch.float64, device="cuda")
    grad_y = torch.randn(4, ref64.out_channels, 14, 14, dtype=torch.float64, device="cuda")
    results = []
    for module, dtype_in, backend_name in ((ref64, torch.float64, "reference"), (plain, dtype, "reference"),
                                           (fused, dtype, name)):
        xi = x.to(dtype_in).detach().requires_grad_()  # a leaf of its own, also for float64
        with backend.use_backend(backend_name):
            y = module(xi)
        y.backward(grad_y.to(dtype_in))
        results.append((y, xi.grad))
    (y64, gx64), (y_plain, gx_plain), (y_fused, gx_fused) = results
    assert_matches_reference(y_fused, y64, plain=y_plain)
    assert_matches_reference(gx_fused, gx64, plain=gx_plain, name="input grad")


@pytest.mark.parametrize("side, fused_op_runs", [(4, False), (5, True)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_small_cpu_maps_run_as_plain_pytorch(monkeypatch, side, fused_op_runs, training):
    """The CPU route by default (the tests pin the fused op, conftest.py): maps of at most
    SMALL_MAP_PIXELS pixels run the reference math, without a warning, larger ones the fused ops."""
    monkeypatch.setattr(routing, "_SMALL_MAPS", "eager")
    assert (side * side <= routing.SMALL_MAP_PIXELS) != fused_op_runs
    calls = []
    for module, name in ((dense_ops, "partial_dense_block"), (dense_eval, "partial_dense_block_eval")):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, op=op: calls.append(op) or op(*args))
    ref, fused = make_pair(6, 2, 4, 0.5, fusion="csp")
    ref.train(training), fused.train(training)
    x = torch.randn(3, 6, side, side, dtype=torch.float64)
    with backend.use_backend("cpu"), torch.no_grad():
        y, y_ref = fused(x), ref(x)
    assert bool(calls) == fused_op_runs
    if fused_op_runs:
        assert_matches_reference(y, y_ref, tol=1e-12)
    else:
        assert torch.equal(y, y_ref)
        for key, value in ref.state_dict().items():
            assert torch.equal(fused.state_dict()[key], value), key
