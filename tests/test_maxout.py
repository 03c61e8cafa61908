"""Fused Maxout / Maxout pyramid / ExactFusion against the reference: values (bitwise: Maxout
selects an element), gradients (ties included), gradcheck, opcheck, determinism, bad input."""
import pytest
import torch

import csp_kernels
from csp_kernels import backend, reference
from csp_kernels.ops import maxout as maxout_ops
from csp_kernels.profiling import TrafficCounter
from helpers import DEVICES, assert_matches_reference, device_backend_params, requires_cuda

GROUPINGS = ("interleaved", "contiguous")

# (input shapes, output size, out_channels): identity, integer and non-integer up/down ratios,
# odd sizes, 1-4 inputs of different channel counts, batch 1.
PYRAMIDS = [
    pytest.param([(2, 6, 7, 5)], (7, 5), 3, id="maxout-7x5"),
    pytest.param([(2, 6, 7, 5)], (3, 4), 2, id="down-7x5-3x4"),
    pytest.param([(1, 4, 3, 3)], (8, 7), 2, id="up-3x3-8x7"),
    pytest.param([(2, 3, 20, 20), (2, 5, 40, 40)], (40, 40), 4, id="up2x-identity-40"),
    pytest.param([(2, 3, 20, 20), (2, 5, 40, 40)], (20, 20), 2, id="down2x-identity-20"),
    pytest.param([(2, 2, 9, 11), (2, 4, 5, 6), (2, 6, 17, 3)], (7, 8), 3, id="three-mixed-7x8"),
    pytest.param([(1, 3, 4, 4), (1, 5, 8, 8), (1, 1, 2, 2), (1, 3, 13, 13)], (8, 8), 4, id="four-batch1"),
]
PYRAMID_DEVICE_BACKEND = device_backend_params()


def make_features(shapes, device, dtype, requires_grad=True):
    return [torch.randn(s, device=device, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def distinct_features(shapes, device, dtype=torch.float64):
    """Inputs whose values are all different (no ties anywhere): gradcheck's finite differences
    then never cross a tie."""
    total = sum(torch.Size(s).numel() for s in shapes)
    values = torch.randperm(total, dtype=dtype, device=device) / total
    features, start = [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        features.append(values[start:start + n].view(s).clone().requires_grad_(True))
        start += n
    return features


def run(fn, backend_name, *args):
    with backend.use_backend(backend_name):
        return fn(*args)


def grads(out, features, grad_out):
    return torch.autograd.grad(out, features, grad_out)


@pytest.mark.parametrize("device,backend_name", PYRAMID_DEVICE_BACKEND)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shapes,size,out_channels", PYRAMIDS)
def test_pyramid_matches_reference(shapes, size, out_channels, grouping, dtype, device, backend_name):
    features = make_features(shapes, device, dtype)
    ref = reference.maxout_pyramid(features, size, out_channels, grouping)
    out = run(csp_kernels.maxout_pyramid, backend_name, features, size, out_channels, grouping)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref)
    grad_out = torch.randn_like(ref)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for g, g_ref in zip(grads(out, features, grad_out), grads(ref, features, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("source, target", [(45, 129), (42, 133), (50, 135)])
def test_float64_resize_where_aten_picks_in_double(source, target):
    """For float64 on the CPU ATen computes some nearest ratios in double, picking other source
    pixels than its float32 arithmetic, which the kernels use: those pyramids run the reference,
    with a warning naming the resize; float32 runs fused and equals the reference."""
    for dtype in (torch.float64, torch.float32):
        features = [torch.randn(2, 4, source, 5, dtype=dtype), torch.randn(2, 2, 3, 3, dtype=dtype)]
        size = (target, 9)
        ref = reference.maxout_pyramid(features, size, 2)
        if dtype == torch.float64:
            with pytest.warns(csp_kernels.ReferenceFallbackWarning, match=f"height {source} -> {target}"):
                out = csp_kernels.maxout_pyramid(features, size, 2)
            ramp = torch.arange(source, dtype=dtype).view(1, 1, source, 1)
            picks = [torch.nn.functional.interpolate(ramp.to(d), size=(target, 1)).double()
                     for d in (dtype, torch.float32)]
            assert not torch.equal(*picks)  # the case is one: ATen's double arithmetic differs here
        else:
            out = csp_kernels.maxout_pyramid(features, size, 2)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_pyramid_low_precision(grouping, dtype, device):
    shapes, size, out_channels = [(2, 4, 5, 6), (2, 2, 9, 11), (2, 6, 3, 3)], (7, 8), 4
    features = make_features(shapes, device, dtype)
    features64 = [f.detach().double().requires_grad_(True) for f in features]
    ref = reference.maxout_pyramid(features, size, out_channels, grouping)
    ref64 = reference.maxout_pyramid(features64, size, out_channels, grouping)
    out = csp_kernels.maxout_pyramid(features, size, out_channels, grouping)
    assert torch.equal(out, ref)  # selection: exact in every dtype
    grad_out = torch.randn_like(ref)
    fused_grads = grads(out, features, grad_out)
    plain_grads = grads(ref, features, grad_out)
    ref64_grads = grads(ref64, features64, grad_out.double())
    for i, (g, g_plain, g64) in enumerate(zip(fused_grads, plain_grads, ref64_grads)):
        assert_matches_reference(g, g64, plain=g_plain, name=f"grad features[{i}]")


@pytest.mark.parametrize("device,backend_name", PYRAMID_DEVICE_BACKEND)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("out_channels", [1, 3, 12])
def test_maxout_matches_reference(out_channels, grouping, device, backend_name):
    x = torch.randn(2, 12, 5, 7, device=device, dtype=torch.float64, requires_grad=True)
    ref = reference.Maxout(out_channels, grouping)(x)
    fused_module = csp_kernels.Maxout(out_channels, grouping)
    assert repr(fused_module) == repr(reference.Maxout(out_channels, grouping))
    out = run(fused_module, backend_name, x)
    assert torch.equal(out, ref)
    grad_out = torch.randn_like(ref)
    assert torch.equal(grads(out, [x], grad_out)[0], grads(ref, [x], grad_out)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("constant", [True, False], ids=["constant", "few-values"])
def test_ties_go_to_lowest_channel(constant, grouping, device):
    shapes, size = [(2, 4, 6, 6), (2, 2, 3, 3), (2, 6, 9, 9)], (6, 6)
    if constant:
        features = [torch.ones(s, device=device, dtype=torch.float64, requires_grad=True) for s in shapes]
    else:  # many ties among three values
        features = [torch.randint(0, 3, s, device=device).double().requires_grad_(True) for s in shapes]
    ref = reference.maxout_pyramid(features, size, 3, grouping)
    out = csp_kernels.maxout_pyramid(features, size, 3, grouping)
    assert torch.equal(out, ref)
    # Small integer gradients: every sum is exact, so the gradients must agree to the bit.
    grad_out = torch.randint(-4, 5, ref.shape, device=device).double()
    for g, g_ref in zip(grads(out, features, grad_out), grads(ref, features, grad_out)):
        assert torch.equal(g, g_ref)
    if constant and grouping == "interleaved":  # each group's first member is in features[0]
        g0, g1, g2 = grads(csp_kernels.maxout_pyramid(features, size, 3, grouping), features, torch.ones_like(out))
        assert (g0[:, :3] == 1).all() and (g0[:, 3] == 0).all() and not g1.any() and not g2.any()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_wins_only_as_first_member(device):
    x = torch.zeros(1, 4, 2, 2, device=device)
    x[:, 0, 0, 0] = float("nan")  # group 0's first member: NaN stays
    x[:, 3, 1, 1] = float("nan")  # group 1's last member: never replaces
    ref = reference.maxout(x, 2)
    out = csp_kernels.maxout(x, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert out[0, 0, 0, 0].isnan() and not out[0, 1].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_gradcheck(grouping, device):
    features = distinct_features([(1, 2, 3, 5), (1, 3, 7, 4), (1, 1, 5, 5)], device)

    def fn(*fs):
        return csp_kernels.maxout_pyramid(list(fs), (5, 6), 3, grouping)

    assert torch.autograd.gradcheck(fn, tuple(features))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    features = make_features([(2, 2, 3, 5), (2, 4, 7, 4)], device, torch.float32)
    out_args = (features, 5, 6, 3, True)
    torch.library.opcheck(torch.ops.csp_kernels.maxout_pyramid_forward.default, out_args)
    grad_out = torch.randn(2, 3, 5, 6, device=device)
    plain = [f.detach() for f in features]
    torch.library.opcheck(torch.ops.csp_kernels.maxout_pyramid_backward.default, (grad_out, plain, 3, False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    features = make_features([(2, 4, 5, 5), (2, 4, 10, 10)], device, torch.float32)
    compiled = torch.compile(lambda a, b: csp_kernels.maxout_pyramid([a, b], (7, 7), 4), fullgraph=True)
    out = compiled(*features)
    ref = reference.maxout_pyramid(features, (7, 7), 4)
    assert torch.equal(out, ref)
    grad_out = torch.randn_like(ref)
    for g, g_ref in zip(grads(out, features, grad_out), grads(ref, features, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused(device):
    features = make_features([(1, 2, 3, 3), (1, 2, 6, 6)], device, torch.float64)
    out = csp_kernels.maxout_pyramid(features, 6, 2)
    (g,) = torch.autograd.grad(out.square().sum(), features[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    features = make_features([(2, 8, 5, 5), (2, 8, 10, 10)], device, torch.float32)  # 5 -> 20: 16 terms
    out = csp_kernels.maxout_pyramid(features, 20, 4)
    grad_out = torch.randn_like(out)
    first = grads(out, features, grad_out)
    for _ in range(3):
        again = grads(csp_kernels.maxout_pyramid(features, 20, 4), features, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """channels_last inputs, a channel slice and a non-contiguous upstream gradient."""
    base = torch.randn(2, 10, 6, 6, device=device, dtype=torch.float64, requires_grad=True)
    small = torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64).to(memory_format=torch.channels_last)
    small.requires_grad_(True)
    features, inputs = [small, base[:, 3:7]], [small, base]
    ref = reference.maxout_pyramid(features, (6, 6), 4, "contiguous")
    out = csp_kernels.maxout_pyramid(features, (6, 6), 4, "contiguous")
    assert torch.equal(out, ref)
    grad_out = torch.randn(2, 6, 6, 4, device=device, dtype=torch.float64).permute(0, 3, 1, 2)
    for g, g_ref in zip(grads(out, inputs, grad_out), grads(ref, inputs, grad_out)):
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_runs_one_op(device):
    features = make_features([(2, 3, 4, 4), (2, 3, 8, 8)], device, torch.float32)
    with backend.use_backend("cpu" if device == "cpu" else "cuda"), TrafficCounter() as counter:
        csp_kernels.maxout_pyramid(features, 8, 3)
    assert list(counter.per_op) == ["csp_kernels.maxout_pyramid_forward.default"]
    out_bytes = 2 * 3 * 8 * 8 * 4
    assert counter.total == sum(f.numel() * 4 for f in features) + out_bytes


@pytest.mark.parametrize("device,backend_name", PYRAMID_DEVICE_BACKEND)
@pytest.mark.parametrize("transition", [False, True])
def test_exact_fusion_matches_reference(transition, device, backend_name):
    in_channels, sizes = [6, 2, 4], [(10, 9), (5, 5), (3, 2)]
    torch.manual_seed(1)
    ref_module = reference.ExactFusion(in_channels, 2, transition=transition).to(device, torch.float64)
    torch.manual_seed(1)
    fused_module = csp_kernels.ExactFusion(in_channels, 2, transition=transition).to(device, torch.float64)
    ref_state, fused_state = ref_module.state_dict(), fused_module.state_dict()
    assert list(ref_state) == list(fused_state)
    assert all(torch.equal(ref_state[k], fused_state[k]) for k in ref_state)  # seeded init matches
    features = [torch.randn(3, c, h, w, device=device, dtype=torch.float64, requires_grad=True)
                for c, (h, w) in zip(in_channels, sizes)]
    refs = ref_module(features)
    outs = run(fused_module, backend_name, features)
    grad_outs = [torch.randn_like(r) for r in refs]
    ref_params, fused_params = list(ref_module.parameters()), list(fused_module.parameters())
    ref_grads = torch.autograd.grad(refs, features + ref_params, grad_outs)
    fused_grads = torch.autograd.grad(outs, features + fused_params, grad_outs)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(fused_grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)
    ref_buffers = dict(ref_module.named_buffers())
    for name, buf in fused_module.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_runs_reference(device):
    features = make_features([(1, 2, 3, 3), (1, 2, 5, 5)], device, torch.float32)
    with backend.use_backend("reference"), TrafficCounter() as counter:
        csp_kernels.maxout_pyramid(features, 4, 2)
    assert not any(name.startswith("csp_kernels") for name in counter.per_op)


def _bad_pyramid_calls():
    f = torch.randn(2, 3, 4, 4)
    return [
        pytest.param(lambda m: m([f, torch.randn(2, 2, 4, 4)], 4, 2), ValueError, "divisible by out_channels",
                     id="channels-not-divisible"),
        pytest.param(lambda m: m([f, torch.randn(3, 3, 4, 4)], 4, 3), ValueError, "same batch size", id="batch"),
        pytest.param(lambda m: m([f, torch.randn(2, 3, 4, 4, dtype=torch.float64)], 4, 3), ValueError,
                     "same dtype", id="dtype"),
        pytest.param(lambda m: m([f, torch.randn(2, 3, 4, 4, device="meta")], 4, 3), ValueError, "same device",
                     id="device"),
        pytest.param(lambda m: m([torch.randn(2, 3, 4)], 4, 3), ValueError, r"features\[0\] must be 4-D", id="3d"),
        pytest.param(lambda m: m([f.long()], 4, 3), TypeError, "dtype in", id="int-dtype"),
        pytest.param(lambda m: m([], 4, 3), ValueError, "non-empty list", id="empty"),
        pytest.param(lambda m: m(f, 4, 3), TypeError, "non-empty list", id="not-a-list"),
        pytest.param(lambda m: m([f], 0, 3), ValueError, "size must be a positive int", id="size-0"),
        pytest.param(lambda m: m([f], (4,), 3), ValueError, "size must be an int or", id="size-1d"),
        pytest.param(lambda m: m([f], (4, 2.5), 3), TypeError, r"size\[1\] must be a positive int", id="size-float"),
        pytest.param(lambda m: m([f], 4, 0), ValueError, "out_channels must be a positive int", id="out-0"),
        pytest.param(lambda m: m([f], 4, 3, "depth"), ValueError, "grouping must be one of", id="grouping"),
    ]


@pytest.mark.parametrize("call,error,match", _bad_pyramid_calls())
def test_bad_pyramid_input(call, error, match):
    """The fused function rejects what the reference rejects, with the same words."""
    messages = []
    for fn in (reference.maxout_pyramid, csp_kernels.maxout_pyramid):
        with pytest.raises(error, match=match) as info:
            call(fn)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("args,error,match", [
    pytest.param((torch.randn(1, 5, 2, 2), 2), ValueError, r"x channels \(5\) must be divisible", id="divisible"),
    pytest.param((torch.randn(5, 2, 2), 5), ValueError, "x must be 4-D", id="3d"),
    pytest.param(([1.0], 1), TypeError, "x must be a torch.Tensor", id="not-tensor"),
    pytest.param((torch.randn(1, 4, 2, 2), 2, "rows"), ValueError, "grouping must be one of", id="grouping"),
])
def test_bad_maxout_input(args, error, match):
    for fn in (reference.maxout, csp_kernels.maxout):
        with pytest.raises(error, match=match):
            fn(*args)


def test_bad_exact_fusion_input():
    module = csp_kernels.ExactFusion([4, 4], 4)
    with pytest.raises(ValueError, match="a list of 2 tensors"):
        module([torch.randn(1, 4, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\] must have 4 channels"):
        module([torch.randn(1, 4, 4, 4), torch.randn(1, 3, 2, 2)])
    with pytest.raises(ValueError, match="must be divisible by out_channels"):
        csp_kernels.ExactFusion([4, 3], 4)


def test_compiled_op_rejects_bad_arguments():
    """The C++ op's own checks (callers that bypass the Python validation)."""
    op = torch.ops.csp_kernels.maxout_pyramid_forward
    with pytest.raises(ValueError, match=r"total channels \(3\) must be a positive multiple of out_channels"):
        op([torch.randn(1, 3, 2, 2)], 2, 2, 2, True)
    with pytest.raises(ValueError, match=r"total channels \(0\) must be a positive multiple of out_channels"):
        op([torch.randn(1, 0, 2, 2)], 2, 2, 2, True)
    with pytest.raises(ValueError, match=r"features\[1\] must have contiguous \(height, width\) planes"):
        op([torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2).transpose(2, 3)], 2, 2, 2, True)
    with pytest.raises(ValueError, match="positive height and width"):
        op([torch.randn(1, 2, 0, 2)], 2, 2, 2, True)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.csp_kernels.maxout_pyramid_backward(torch.randn(1, 3, 2, 2), [torch.randn(1, 4, 2, 2)], 2, True)


def test_empty_batch():
    features = [torch.randn(0, 2, 3, 3, requires_grad=True), torch.randn(0, 2, 6, 6, requires_grad=True)]
    out = csp_kernels.maxout_pyramid(features, 6, 2)
    assert out.shape == (0, 2, 6, 6)
    assert [g.shape for g in grads(out, features, torch.ones_like(out))] == [f.shape for f in features]


@pytest.mark.parametrize("shape", [(2, 8, 0, 5), (2, 8, 5, 0), (0, 8, 3, 3)])
def test_maxout_of_an_empty_map_or_batch(shape):
    """An empty input gives the reference's empty output, and its (empty) gradient."""
    x = torch.randn(shape, requires_grad=True)
    out = csp_kernels.maxout(x, 4)
    assert out.shape == reference.maxout(x, 4).shape == (shape[0], 4, *shape[2:])
    assert grads(out, [x], torch.ones_like(out))[0].shape == x.shape


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu_bitwise(dtype):
    """Same selection and the same order of additions on both devices."""
    shapes = [(2, 8, 10, 10), (2, 8, 20, 20), (2, 8, 40, 40)]
    cpu = make_features(shapes, "cpu", dtype)
    cuda = [f.detach().cuda().requires_grad_(True) for f in cpu]
    out_cpu = csp_kernels.maxout_pyramid(cpu, 20, 8)
    out_cuda = csp_kernels.maxout_pyramid(cuda, 20, 8)
    assert torch.equal(out_cuda.cpu(), out_cpu)
    grad_out = torch.randn_like(out_cpu)
    for g_cuda, g_cpu in zip(grads(out_cuda, cuda, grad_out.cuda()), grads(out_cpu, cpu, grad_out)):
        assert torch.equal(g_cuda.cpu(), g_cpu)


@requires_cuda
def test_cuda_input_limit():
    features = [torch.randn(1, 1, 2, 2, device="cuda") for _ in range(9)]
    with pytest.raises(ValueError, match="at most 8 features"):
        maxout_ops.maxout_pyramid(features, (2, 2), 3, True)


def test_torch_func_transforms_run_the_reference():
    """The pyramid op has no functorch rules: under vmap or grad maxout and maxout_pyramid run
    the reference, saying so, where they raised PyTorch-internal errors."""
    x = torch.randn(3, 2, 6, 5, 5, dtype=torch.float64)
    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="csp_kernels.maxout runs .*torch.func"):
        got = torch.func.vmap(lambda t: csp_kernels.maxout(t, 3))(x)
    torch.testing.assert_close(got, torch.func.vmap(lambda t: reference.maxout(t, 3))(x), rtol=0, atol=0)

    def loss(module, t):
        return module.maxout_pyramid([t, t[:, :, ::2, ::2]], 5, 4).square().sum()

    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="csp_kernels.maxout_pyramid runs .*torch.func"):
        got = torch.func.grad(lambda t: loss(csp_kernels, t))(x[0])
    torch.testing.assert_close(got, torch.func.grad(lambda t: loss(reference, t))(x[0]), rtol=0, atol=0)
