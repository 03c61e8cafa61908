"""Inputs and outputs of the fused ops: `out=` buffers shared by several writers, inputs with
zero or odd strides, refused `out`s, double backward and torch.func, torch.compile of the eval
block, empty batches, padding validation and the meta device."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import csp_kernels
from csp_kernels import reference
from csp_kernels.ops.batch_norm_act import planes_contiguous, shares_memory

from helpers import assert_matches_reference, fused_backends, randomize_, rel_error

H = W = 5  # tiny: the Triton backend runs through the interpreter


def _pair(cin, cout, k, dtype=torch.float64, stride=1, **kwargs):
    """A fused ConvBNAct and its float64 reference with the same (randomized) parameters."""
    fused = csp_kernels.ConvBNAct(cin, cout, k, stride=stride, **kwargs)
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 1.5)
        fused.bn.bias.uniform_(-0.5, 0.5)
        fused.bn.running_mean.uniform_(-0.2, 0.2)
        fused.bn.running_var.uniform_(0.5, 1.5)
    ref = reference.ConvBNAct(cin, cout, k, stride=stride, **kwargs).double()
    ref.load_state_dict(fused.state_dict())
    return fused.to(dtype), ref


def _grads(module):
    return [p.grad for p in module.parameters()]


def _assert_grads_match(fused_modules, ref_modules, tol):
    for f, r in zip(fused_modules, ref_modules):
        for name, (gf, gr) in zip(("conv.weight", "bn.weight", "bn.bias"), zip(_grads(f), _grads(r))):
            assert gf is not None, f"{name}.grad is None"
            assert_matches_reference(gf, gr, tol=tol, name=name)


# -- item 9: several ConvBNActs writing one buffer -----------------------------------------------

# (kernel size, output channel range) of each writer, in the order they write.
WRITERS = {
    "readme": [(1, (0, 4)), (3, (4, 8))],
    "reversed": [(3, (4, 8)), (1, (0, 4))],
    "three": [(1, (2, 5)), (3, (5, 8)), (1, (0, 2))],
    "overwrite": [(1, (0, 5)), (3, (3, 8))],  # the second overwrites channels 3, 4 of the first
}


def _write_all(modules, spans, x, buf):
    for m, (lo, hi) in zip(modules, spans):
        m(x, out=buf[:, lo:hi])
    return buf


def _reference_buffer(refs, spans, x, channels):
    """The reference's meaning of out=: each output copied into its channels, in order."""
    buf = torch.zeros(x.shape[0], channels, H, W, dtype=torch.float64)
    for r, (lo, hi) in zip(refs, spans):
        buf[:, lo:hi] = r(x)
    return buf


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("case", sorted(WRITERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_writers_into_one_buffer_get_their_gradients(backend, case, dtype):
    spans = [span for _, span in WRITERS[case]]
    pairs = [_pair(6, hi - lo, k, dtype) for k, (lo, hi) in WRITERS[case]]
    x64 = torch.randn(2, 6, H, W, dtype=torch.float64)
    weight = torch.randn(2, 8, H, W, dtype=torch.float64)
    x = x64.to(dtype, copy=True).requires_grad_()
    buf = torch.zeros(2, 8, H, W, dtype=dtype)
    with csp_kernels.use_backend(backend):
        _write_all([f for f, _ in pairs], spans, x, buf)
    (buf * weight.to(dtype)).sum().backward()
    x_ref = x64.clone().requires_grad_()
    ref_buf = _reference_buffer([r for _, r in pairs], spans, x_ref, 8)
    (ref_buf * weight).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_matches_reference(buf, ref_buf, tol=tol)
    assert x.grad is not None
    assert_matches_reference(x.grad, x_ref.grad, tol=tol, name="x.grad")
    _assert_grads_match([f for f, _ in pairs], [r for _, r in pairs], tol)


@pytest.mark.parametrize("backend", fused_backends())
def test_buffer_read_by_a_later_module(backend):
    (left, ref_left), (right, ref_right) = _pair(6, 4, 1), _pair(6, 4, 3)
    after, ref_after = _pair(8, 3, 1)
    x64 = torch.randn(2, 6, H, W, dtype=torch.float64)
    x, x_ref = x64.clone().requires_grad_(), x64.clone().requires_grad_()
    with csp_kernels.use_backend(backend):
        buf = torch.empty(2, 8, H, W, dtype=torch.float64)
        left(x, out=buf[:, :4])
        right(x, out=buf[:, 4:])
        y = after(buf)
    y.square().sum().backward()
    ref_after(torch.cat([ref_left(x_ref), ref_right(x_ref)], 1)).square().sum().backward()
    assert_matches_reference(y, ref_after(torch.cat([ref_left(x_ref), ref_right(x_ref)], 1)), tol=1e-10)
    assert_matches_reference(x.grad, x_ref.grad, tol=1e-10, name="x.grad")
    _assert_grads_match([left, right, after], [ref_left, ref_right, ref_after], 1e-10)


def test_chain_through_one_buffer_is_refused_by_autograd():
    """A chain reading one slice of the buffer and writing the next overwrites (the version of)
    what an earlier module saved for backward: autograd refuses it, as it refuses the
    reference's meaning of out= (copy_ into the slice), instead of a wrong gradient."""
    pairs = [_pair(4, 4, 1), _pair(4, 4, 3)]
    for module in (0, 1):
        x = torch.randn(2, 4, H, W, dtype=torch.float64, requires_grad=True)
        buf = torch.empty(2, 12, H, W, dtype=torch.float64)
        buf[:, :4] = x
        for i, pair in enumerate(pairs):
            if module == 0:
                pair[0](buf[:, 4 * i: 4 * i + 4], out=buf[:, 4 * i + 4: 4 * i + 8])
            else:
                buf[:, 4 * i + 4: 4 * i + 8] = pair[1](buf[:, 4 * i: 4 * i + 4])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            buf.sum().backward()


def test_out_with_history_overwritten_by_a_frozen_module():
    """The old contents of `out` get no gradient, also when nothing else requires grad."""
    fused, ref = _pair(6, 4, 1)
    fused.requires_grad_(False)
    a = torch.randn(2, 8, H, W, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, H, W, dtype=torch.float64)
    buf = a * 2
    fused(x, out=buf[:, 2:6])
    buf.sum().backward()
    expected = torch.full_like(a, 2.0)
    expected[:, 2:6] = 0
    assert torch.equal(a.grad, expected)
    assert_matches_reference(buf[:, 2:6], ref(x), tol=1e-10)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("mode", ["train_no_grad", "eval", "eval_no_grad"])
def test_writers_into_one_buffer_without_gradients(backend, mode):
    pairs = [_pair(6, 4, 1), _pair(6, 4, 3)]
    for f, r in pairs:
        f.train(mode.startswith("train"))
        r.train(mode.startswith("train"))
    x = torch.randn(2, 6, H, W, dtype=torch.float64)
    buf = torch.empty(2, 8, H, W, dtype=torch.float64)
    with csp_kernels.use_backend(backend), torch.set_grad_enabled(not mode.endswith("no_grad")):
        _write_all([f for f, _ in pairs], [(0, 4), (4, 8)], x, buf)
    with torch.no_grad():
        assert_matches_reference(buf, torch.cat([r(x) for _, r in pairs], 1), tol=1e-10)
    for f, r in pairs:
        assert_matches_reference(f.bn.running_mean, r.bn.running_mean, tol=1e-10, name="running_mean")


# -- item 2: inputs with zero or odd strides ---------------------------------------------------

def _layouts(n, c, dtype):
    """Inputs of shape (n, c, H, W) whose strides the kernels cannot take as they are (or can)."""
    return {
        "expand_channels": lambda: torch.randn(n, 1, H, W, dtype=dtype).expand(n, c, H, W),
        "expand_batch": lambda: torch.randn(1, c, H, W, dtype=dtype).expand(n, c, H, W),
        "expand_planes": lambda: torch.randn(n, c, 1, 1, dtype=dtype).expand(n, c, H, W),
        "transposed": lambda: torch.randn(n, c, W, H, dtype=dtype).transpose(2, 3),
        "channel_step": lambda: torch.randn(n, 2 * c, H, 2 * W, dtype=dtype)[:, ::2, :, ::2],
        "channels_last": lambda: torch.randn(n, c, H, W, dtype=dtype).to(memory_format=torch.channels_last),
        "channel_slice": lambda: torch.randn(n, c + 3, H, W, dtype=dtype)[:, 2: 2 + c],
        "overlapping_channels": lambda: torch.randn(n * c * H * W, dtype=dtype).as_strided(
            (n, c, H, W), (c * H * W, W, W, 1)),
    }


LAYOUTS = sorted(_layouts(1, 1, torch.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_bn_act_on_odd_strides(layout, kernel_size, training, dtype, capfd):
    fused, ref = _pair(6, 4, kernel_size, dtype)
    fused.train(training)
    ref.train(training)
    x = _layouts(2, 6, dtype)[layout]().requires_grad_(False)
    x_fused = x.detach().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    grad = torch.randn(2, 4, H, W, dtype=torch.float64)
    y = fused(x_fused)
    y_ref = ref(x_ref)
    (y * grad.to(dtype)).sum().backward()
    (y_ref * grad).sum().backward()
    assert "Parameter" not in capfd.readouterr().err  # BLAS's complaint about a leading dimension
    if dtype == torch.float64:
        assert_matches_reference(y, y_ref, tol=1e-10)
        assert_matches_reference(x_fused.grad, x_ref.grad, tol=1e-10, name="x.grad")
        _assert_grads_match([fused], [ref], 1e-10)
        return
    # float32: behind BatchNorm the gradients cancel (an input constant over channels, over
    # planes), so they are held to 4x plain float32 PyTorch's error, itself up to 2.4e-4 here
    # (the lost weight gradient of a channel-expanded input had error 1).
    plain = reference.ConvBNAct(6, 4, kernel_size).float().train(training)
    plain.load_state_dict(ref.state_dict())
    x_plain = x.detach().requires_grad_()
    (plain(x_plain) * grad.float()).sum().backward()
    assert_matches_reference(y, y_ref, tol=1e-5)
    for name, got, want, base in [("x.grad", x_fused.grad, x_ref.grad, x_plain.grad)] + [
            (name, p.grad, r.grad, q.grad) for (name, p), r, q in zip(
                fused.named_parameters(), ref.parameters(), plain.parameters())]:
        assert got is not None, f"{name} is None"
        assert rel_error(got, want) <= max(1e-5, 4 * rel_error(base, want)), name


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_bn_act_with_upstream_gradient_of_zero_strides(kernel_size, dtype):
    """A loss like (y * per_pixel_weight).sum() hands backward a gradient expanded over batch
    and channels."""
    fused, ref = _pair(6, 4, kernel_size, dtype)
    x64 = torch.randn(2, 6, H, W, dtype=torch.float64)
    x, x_ref = x64.to(dtype, copy=True).requires_grad_(), x64.clone().requires_grad_()
    pixel_weight = torch.randn(H, W, dtype=torch.float64)
    (fused(x) * pixel_weight.to(dtype)).sum().backward()
    (ref(x_ref) * pixel_weight).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_matches_reference(x.grad, x_ref.grad, tol=tol, name="x.grad")
    _assert_grads_match([fused], [ref], tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_partial_dense_block_on_odd_strides(layout, dtype):
    fused = csp_kernels.PartialDenseBlock(6, num_layers=2, growth_rate=2, fusion="csp").to(dtype)
    ref = reference.PartialDenseBlock(6, num_layers=2, growth_rate=2, fusion="csp").double()
    ref.load_state_dict(fused.state_dict())
    x = _layouts(2, 6, dtype)[layout]()
    x_fused, x_ref = x.detach().requires_grad_(), x.detach().double().requires_grad_()
    y, y_ref = fused(x_fused), ref(x_ref)
    grad = torch.randn_like(y_ref)
    (y * grad.to(dtype)).sum().backward()
    (y_ref * grad).sum().backward()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert_matches_reference(y, y_ref, tol=tol)
    assert_matches_reference(x_fused.grad, x_ref.grad, tol=tol, name="x.grad")
    fused.eval()
    ref.eval()
    with torch.no_grad():
        assert_matches_reference(fused(x), ref(x.double()), tol=tol, name="eval output")


def test_planes_contiguous_judgement():
    buf = torch.empty(2, 8, H, W)
    assert planes_contiguous(buf[:, 2:5]) and planes_contiguous(buf[:, 2:5], written=True)
    assert planes_contiguous(buf[:1].expand(3, 8, H, W))  # read: a stride-0 batch is fine
    assert not planes_contiguous(buf[:1].expand(3, 8, H, W), written=True)
    assert not planes_contiguous(buf[:, :1].expand(2, 4, H, W))  # channel stride 0: a bad leading dimension
    assert not planes_contiguous(buf.to(memory_format=torch.channels_last))
    assert planes_contiguous(buf[:, ::2], written=True)
    assert not shares_memory(buf[:, :4], buf[:, 4:]) and shares_memory(buf[:, :5], buf[:, 4:])
    assert not shares_memory(buf[:, ::2], buf[:, 1::2]) and shares_memory(buf[:, ::2], buf[:, 2:4])


@st.composite
def _planes_in_one_storage(draw):
    """Two (N, C, H, W) tensors with contiguous planes in one storage: mostly on one grid (the
    same batch and channel strides, as channel slices of one buffer are), sometimes not."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    length = h * w
    layouts = []
    for _ in range(2):
        channels = draw(st.integers(1, 4))
        s1 = layouts[0][2] if layouts and draw(st.booleans()) else draw(st.integers(length, 3 * length))
        s0 = layouts[0][1] if layouts and draw(st.booleans()) else draw(st.integers(1, 6 * length))
        if draw(st.booleans()):
            s0 = s1 * draw(st.integers(1, 6))
        layouts.append((channels, s0, s1, draw(st.integers(0, 4 * length))))
    return n, h, w, layouts


@given(_planes_in_one_storage())
@example((2, 2, 2, [(4, 32, 4, 0), (4, 32, 4, 16)]))  # buf[:, :4] and buf[:, 4:]: planes that touch
@settings(max_examples=400, deadline=None)
def test_shares_memory_is_exact_for_contiguous_planes(case):
    """shares_memory against the elements' offsets, counted one by one."""
    n, h, w, layouts = case
    extent = max(offset + (n - 1) * s0 + (c - 1) * s1 + h * w for c, s0, s1, offset in layouts)
    index = torch.arange(extent, dtype=torch.float32)
    a, b = (index.as_strided((n, c, h, w), (s0, s1, w, 1), offset) for c, s0, s1, offset in layouts)
    assert planes_contiguous(a) and planes_contiguous(b)
    common = set(a.flatten().tolist()) & set(b.flatten().tolist())
    assert shares_memory(a, b) == bool(common) == shares_memory(b, a)


# -- item 5: out= refused as ATen refuses it ---------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_out_refused(training):
    fused, _ = _pair(6, 4, 3)
    fused.train(training)
    x = torch.randn(2, 6, H, W, dtype=torch.float64)
    cases = [
        (torch.empty(2, 1, H, W, dtype=torch.float64).expand(2, 4, H, W), "out must not have two elements"),
        (torch.empty(1, 4, H, W, dtype=torch.float64).expand(2, 4, H, W), "out must not have two elements"),
        (torch.empty(2, 4, H, W + 1, dtype=torch.float64), "out must be a torch.float64 tensor of shape"),
        (torch.empty(2, 4, H, W, dtype=torch.float32), "out must be a torch.float64 tensor of shape"),
        (torch.empty(2, 4, H, W, dtype=torch.float64, device="meta"), "out must be a torch.float64 tensor"),
    ]
    for out, match in cases:
        with pytest.raises(ValueError, match=match):
            fused(x, out=out)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        fused(x, out=[0.0])


@pytest.mark.parametrize("module", ["ConvBNAct", "C2f"])
@pytest.mark.parametrize("side", [6, 12, 20])  # the small-map routes and the fused kernels
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_out_with_any_strides_is_written(module, side, mode):
    """An `out` without contiguous planes (channels_last, a width slice) is accepted on every
    route, whatever the map size, and receives the reference's values and gradients (a copy
    where the kernels write whole planes)."""
    torch.manual_seed(0)
    if module == "ConvBNAct":
        fused, ref = _pair(6, 4, 3)
    else:
        ref = randomize_(reference.C2f(6, 4, 1)).double()
        fused = csp_kernels.C2f(6, 4, 1).double()
        fused.load_state_dict(ref.state_dict())
    fused.train(mode == "train"), ref.train(mode == "train")
    x = torch.randn(2, 6, side, side, dtype=torch.float64)
    outs = [torch.zeros(2, 4, side, side, dtype=torch.float64).to(memory_format=torch.channels_last),
            torch.zeros(2, 4, side, side + 3, dtype=torch.float64)[..., 1:side + 1]]
    for out in outs:
        x_fused, x_ref = (x.clone().requires_grad_(mode != "eval_no_grad") for _ in range(2))
        with torch.set_grad_enabled(mode != "eval_no_grad"):
            y = fused(x_fused, out=out)
            y_ref = ref(x_ref)
        assert y is out
        assert_matches_reference(out, y_ref, tol=1e-10)
        if mode != "eval_no_grad":
            grad = torch.randn_like(y_ref)
            y.backward(grad), y_ref.backward(grad)
            assert_matches_reference(x_fused.grad, x_ref.grad, tol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_out_overlapping_x(training):
    """While autograd records, an out over x is refused (the backward reads x); without it,
    the result is the reference's (the kernels would read what they already wrote)."""
    fused, ref = _pair(4, 4, 3)
    fused.train(training)
    ref.train(training)
    buf = torch.randn(2, 8, H, W, dtype=torch.float64)
    with pytest.raises(ValueError, match="out must not overlap x while autograd records"):
        fused(buf[:, 2:6], out=buf[:, :4])
    with pytest.raises(ValueError, match="out must not overlap x while autograd records"):
        fused(buf[:, :4], out=buf[:, :4])
    expected = torch.cat([buf[:, :4], buf[:, 4:]], 1)
    with torch.no_grad():
        expected[:, :4] = ref(buf[:, 2:6])
        fused(buf[:, 2:6], out=buf[:, :4])
    assert_matches_reference(buf, expected, tol=1e-10)


# -- item 6: double backward and torch.func ----------------------------------------------------

@pytest.mark.parametrize("with_out", [False, True])
def test_conv_bn_act_double_backward_refused(with_out):
    fused, ref = _pair(4, 4, 1)
    x = torch.randn(2, 4, H, W, dtype=torch.float64, requires_grad=True)
    y = fused(x, out=torch.empty(2, 4, H, W, dtype=torch.float64)) if with_out else fused(x)
    with pytest.raises(RuntimeError, match="csp_kernels::conv_bn_act_train.* does not support double backward.*"
                                           "use_backend\\('reference'\\)"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with csp_kernels.use_backend("reference"):  # what the message offers: the reference's second derivatives
        y = fused(x)
    second = []
    for module, out in ((fused, y), (ref, ref(x))):
        grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        second.append(torch.autograd.grad(grad_x.square().sum(), [x, *module.parameters()]))
    for fused_grad, ref_grad in zip(*second):
        assert_matches_reference(fused_grad, ref_grad, tol=1e-10)


@pytest.mark.parametrize("cls", [csp_kernels.PartialDenseBlock, csp_kernels.DenseBlock])
def test_dense_block_double_backward_refused(cls):
    block = cls(6, num_layers=1, growth_rate=2).double()
    x = torch.randn(2, 6, H, W, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"partial_dense_block \(a training csp_kernels.PartialDenseBlock or "
                                           r"DenseBlock\) does not support double backward"):
        torch.autograd.grad(block(x).square().sum(), x, create_graph=True)


def test_torch_func_grad_runs_the_reference():
    """In eval: training BatchNorm's running-statistics update is itself refused by torch.func."""
    fused, ref = _pair(6, 4, 3)
    block = csp_kernels.PartialDenseBlock(6, num_layers=1, growth_rate=2).double()
    block_ref = reference.PartialDenseBlock(6, num_layers=1, growth_rate=2).double()
    block_ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 6, H, W, dtype=torch.float64)
    for module, module_ref in ((fused, ref), (block, block_ref)):
        module.eval()
        module_ref.eval()
        with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="torch.func transform"):
            grad = torch.func.grad(lambda t, m=module: m(t).square().sum())(x)
        expected = torch.func.grad(lambda t, m=module_ref: m(t).square().sum())(x)
        assert_matches_reference(grad, expected, tol=1e-10, name=type(module).__name__)


def _forward_ad_cases():
    """(name, fused callable, reference callable, their modules) of every fused module and function."""
    torch.manual_seed(0)
    pairs = [(csp_kernels.ConvBNAct(6, 4, 3), reference.ConvBNAct(6, 4, 3)),
             (csp_kernels.PartialDenseBlock(6, 2, 2, fusion="csp"), reference.PartialDenseBlock(6, 2, 2, fusion="csp")),
             (csp_kernels.C2f(6, 4, 1), reference.C2f(6, 4, 1)),
             (csp_kernels.ExactFusion([6], 3, transition=True), reference.ExactFusion([6], 3, transition=True))]
    cases = []
    for fused, ref in pairs:
        randomize_(ref).double()
        fused.double().load_state_dict(ref.state_dict())
        if isinstance(fused, csp_kernels.ExactFusion):
            cases.append(("ExactFusion", lambda x, m=fused: m([x])[0], lambda x, m=ref: m([x])[0], (fused, ref)))
        else:
            cases.append((type(fused).__name__, fused, ref, (fused, ref)))
    cases.append(("maxout", lambda x: csp_kernels.maxout(x, 3), lambda x: reference.maxout(x, 3), ()))
    cases.append(("maxout_pyramid", lambda x: csp_kernels.maxout_pyramid([x, x[:, :, ::2, ::2]], 8, 4),
                  lambda x: reference.maxout_pyramid([x, x[:, :, ::2, ::2]], 8, 4), ()))
    return cases


@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_forward_ad_runs_the_reference(mode):
    """Dual tensors (torch.autograd.forward_ad): the fused ops have no jvp, and their outputs
    would carry no tangent (or, from the dense eval op, a wrong one)."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    tangent = torch.randn_like(x)
    for name, fused, ref, modules in _forward_ad_cases():
        for module in modules:
            module.train(mode == "train")
        with torch.set_grad_enabled(mode != "eval-no-grad"), fwAD.dual_level():
            with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="forward-mode AD"):
                primal, jvp = fwAD.unpack_dual(fused(fwAD.make_dual(x, tangent)))
            primal_ref, jvp_ref = fwAD.unpack_dual(ref(fwAD.make_dual(x, tangent)))
        assert jvp is not None, name
        assert_matches_reference(primal, primal_ref, tol=1e-10, name=name)
        assert_matches_reference(jvp, jvp_ref, tol=1e-10, name=f"{name} tangent")


# -- item 8: torch.compile, empty batches, padding, the meta device -----------------------------

def test_compile_eval_block_with_our_gemm():
    """fullgraph=True over the eval block where Winograd's choice asks the extension (set
    before the extension loads, hence a fresh process)."""
    code = (
        "import torch, csp_kernels\n"
        "b = csp_kernels.PartialDenseBlock(8, num_layers=2, growth_rate=4, fusion='csp').eval()\n"
        "x = torch.randn(2, 8, 6, 6)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(b, fullgraph=True, backend='eager')(x)\n"
        "    err = ((y.double() - b(x).double()).norm() / b(x).double().norm()).item()\n"
        "assert err < 1e-5, err\n"
    )
    env = {**os.environ, "CSP_KERNELS_CPU_SGEMM": "avx512"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("kernel_size, stride", [(3, 2), (1, 2), (3, 1), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch_in_eval(backend, kernel_size, stride, dtype):
    fused, ref = _pair(4, 4, kernel_size, dtype, stride=stride)
    fused.eval()
    ref.eval()
    x = torch.randn(0, 4, 8, 8, dtype=dtype)
    with csp_kernels.use_backend(backend), torch.no_grad():
        fused(torch.randn(2, 4, 8, 8, dtype=dtype))  # the eval cache filled for a non-empty batch
        y = fused(x)
        out = torch.empty(0, 4, *y.shape[2:], dtype=dtype)
        assert fused(x, out=out) is out
    assert y.shape == ref(x.double()).shape


def test_padding_validated():
    for module in (reference.ConvBNAct, csp_kernels.ConvBNAct):
        with pytest.raises(ValueError, match="padding must be non-negative"):
            module(4, 4, 3, padding=-1)
        with pytest.raises(ValueError, match="padding must be non-negative"):
            module(4, 4, 3, padding=(1, -1))
        with pytest.raises(TypeError, match="padding must be None"):
            module(4, 4, 3, padding=1.5)
        assert module(4, 4, 3, padding=(1, 0)).conv.padding == (1, 0)
        assert module(4, 4, 3, padding=0).conv.padding == (0, 0)


def test_padding_pair_matches_reference():
    fused, ref = _pair(4, 4, 3, padding=(1, 0))
    x = torch.randn(2, 4, H, W, dtype=torch.float64)
    assert_matches_reference(fused(x), ref(x), tol=1e-10)


@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
@pytest.mark.parametrize("kernel_size, padding, shape", [(3, 0, (1, 16, 1, 13)), (3, 0, (2, 16, 2, 2)),
                                                          (5, 1, (2, 16, 2, 9))])
def test_kernel_larger_than_the_input_raises_as_the_reference(mode, kernel_size, padding, shape):
    """ATen's error, whichever kernel the shape routes to (eval on tiny maps, a GEMM over the
    batch, raised F.unfold's cryptic one)."""
    errors = []
    for module in (reference.ConvBNAct(16, 7, kernel_size, padding=padding),
                   csp_kernels.ConvBNAct(16, 7, kernel_size, padding=padding)):
        module.train(mode == "train")
        with torch.set_grad_enabled(mode != "eval-no-grad"), pytest.raises(RuntimeError) as err:
            module(torch.randn(shape, requires_grad=mode != "eval-no-grad"))
        errors.append(str(err.value))
    assert "Kernel size can't be greater than actual input size" in errors[0]
    assert errors[1] == errors[0]


@pytest.mark.parametrize("training", [True, False])
def test_meta_device_runs_the_reference_shapes(training):
    pairs = [(csp_kernels.ConvBNAct(4, 6, 3, stride=2), reference.ConvBNAct(4, 6, 3, stride=2)),
             (csp_kernels.PartialDenseBlock(4, 2, 2, fusion="csp"), reference.PartialDenseBlock(4, 2, 2, fusion="csp"))]
    x = torch.randn(2, 4, 8, 8, device="meta")
    for module, ref in pairs:
        module.to("meta").train(training)
        ref.to("meta").train(training)
        with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="meta device"):
            y = module(x)
        assert y.device.type == "meta" and y.shape == ref(x).shape


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])  # the buffered forward, and the reference's + copy
@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
def test_stage_input_and_out_checked_on_every_path(backend_name, mode):
    """A stage checks x and out= as ConvBNAct does on whichever path runs the call (the reference
    path copied into any `out` that copy_ takes: an int64 one cast silently, a wrong shape
    broadcast or raised ATen's error; a non-tensor x or out raised AttributeError)."""
    stage = csp_kernels.C2f(4, 4).train(mode == "train")
    x = torch.randn(2, 4, 8, 8)
    bad_outs = [(torch.zeros(2, 4, 8, 8, dtype=torch.long), ValueError, "out must be a torch.float32 tensor"),
                (torch.zeros(2, 4, 8, 8, device="meta"), ValueError, "out must be a torch.float32 tensor"),
                (torch.zeros(1, 4, 8, 8), ValueError, r"of shape \(2, 4, 8, 8\)"),
                (torch.zeros(2, 1, 8, 8).expand(2, 4, 8, 8), ValueError, "two elements in one place"),
                ([1], TypeError, "out must be a torch.Tensor; got list")]
    with csp_kernels.use_backend(backend_name), torch.set_grad_enabled(mode == "train"):
        for bad_x in (x.numpy(), [1], None):
            with pytest.raises(TypeError, match="x must be a torch.Tensor"):
                stage(bad_x)
        for out, error, message in bad_outs:
            with pytest.raises(error, match=message):
                stage(x, out=out)
        out = torch.empty(2, 4, 8, 8)
        assert stage(x, out=out) is out
