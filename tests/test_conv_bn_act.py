"""csp_kernels.ConvBNAct against reference.ConvBNAct (run in float64) on every fused backend:
forward, backward, running statistics, eval folding and its cache, out= writes, the custom ops
(gradcheck, opcheck, torch.compile) and bad inputs."""
import pickle

import pytest
import torch
from torch import nn

import csp_kernels
from csp_kernels import checks, reference
from csp_kernels.ops import transition as ops
from csp_kernels.ops.routing import eval_conv_kernel, winograd_usable
from helpers import (DEVICES, assert_matches_reference, device_backend_params, fused_backends, randomize_,
                     requires_cuda)

ACTS = checks.ACTIVATIONS
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CPU_DTYPES = [torch.float64, torch.float32]
# (kernel_size, stride)
CONVS = [(1, 1), (1, 2), (3, 1), (3, 2)]


@pytest.fixture(autouse=True)
def _full_float32_precision(monkeypatch):
    """On a GPU, float32 convolutions and the Triton GEMM follow this switch (TF32 would miss
    the float32 tolerance); no effect on CPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_pair(cin, cout, kernel_size=1, stride=1, act="relu", dtype=torch.float64, device="cpu"):
    """(float64 reference, fused module in `dtype`) with identical parameters and buffers."""
    ref = randomize_(reference.ConvBNAct(cin, cout, kernel_size, stride, act=act)).to(device, torch.float64)
    fused = csp_kernels.ConvBNAct(cin, cout, kernel_size, stride, act=act).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.detach().to(dtype or x.dtype).requires_grad_()


def assert_close(fused: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert_matches_reference(fused, ref, tol=TOL[fused.dtype], name=name)


def assert_state_matches(fused: nn.Module, ref: nn.Module) -> None:
    for (name, f), (_, r) in zip(fused.state_dict().items(), ref.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(f, r), name
        else:
            assert_close(f, r, name)


def assert_grads_match(fused: nn.Module, ref: nn.Module, x: torch.Tensor, x_ref: torch.Tensor) -> None:
    assert_close(x.grad, x_ref.grad, "x.grad")
    for (name, f), (_, r) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(f.grad, r.grad, f"{name}.grad")


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kernel_size,stride", CONVS)
def test_train_matches_reference(device, backend_name, dtype, act, kernel_size, stride):
    ref, fused = make_pair(5, 7, kernel_size, stride, act, dtype, device)
    for _ in range(2):  # the second step checks the running-statistics average
        x_ref = torch.randn(2, 5, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
        x = leaf(x_ref, dtype)
        y_ref = ref(x_ref)
        grad = torch.randn_like(y_ref)
        with csp_kernels.use_backend(backend_name):
            y = fused(x)
        assert y.dtype == dtype and y.shape == y_ref.shape
        assert_close(y, y_ref, "y")
        y_ref.backward(grad)
        y.backward(grad.to(dtype))
        assert_grads_match(fused, ref, x, x_ref)
        fused.zero_grad(), ref.zero_grad()
    assert_state_matches(fused, ref)


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kernel_size,stride", CONVS)
def test_eval_matches_reference(device, backend_name, dtype, act, kernel_size, stride):
    ref, fused = make_pair(5, 7, kernel_size, stride, act, dtype, device)
    ref.eval(), fused.eval()
    x_ref = torch.randn(2, 5, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    x = leaf(x_ref, dtype)
    with torch.no_grad(), csp_kernels.use_backend(backend_name):
        assert_close(fused(x), ref(x_ref), "y (no_grad)")
        assert_close(fused(x), ref(x_ref), "y (no_grad, cached fold)")
    # With grad mode on, the fold runs through autograd: gradients reach the BN parameters too.
    y_ref = ref(x_ref)
    grad = torch.randn_like(y_ref)
    with csp_kernels.use_backend(backend_name):
        y = fused(x)
    assert_close(y, y_ref, "y (grad mode)")
    y_ref.backward(grad)
    y.backward(grad.to(dtype))
    assert_grads_match(fused, ref, x, x_ref)
    assert_state_matches(fused, ref)


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("shape", [(1, 5, 3, 4), (3, 5, 7, 1), (2, 5, 1, 9)])
@pytest.mark.parametrize("training", [True, False])
def test_odd_shapes_and_batch_one(device, backend_name, shape, training):
    ref, fused = make_pair(5, 11, 1, 1, "silu", torch.float64, device)
    ref.train(training), fused.train(training)
    x_ref = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    x = leaf(x_ref)
    y_ref = ref(x_ref)
    with csp_kernels.use_backend(backend_name):
        y = fused(x)
    assert_close(y, y_ref, "y")
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad), y.backward(grad)
    assert_grads_match(fused, ref, x, x_ref)
    assert_state_matches(fused, ref)


@pytest.mark.parametrize("device,backend_name", device_backend_params())
def test_more_channels_than_one_block(device, backend_name):
    """Channel counts past one 16/32/64 block of the kernels, and not a multiple of one."""
    ref, fused = make_pair(37, 70, 1, 1, "hardswish", torch.float64, device)
    x_ref = torch.randn(2, 37, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    x = leaf(x_ref)
    with csp_kernels.use_backend(backend_name):
        y = fused(x)
    y_ref = ref(x_ref)
    assert_close(y, y_ref, "y")
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad), y.backward(grad)
    assert_grads_match(fused, ref, x, x_ref)


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_channels_last_input(device, backend_name, kernel_size):
    ref, fused = make_pair(5, 7, kernel_size, 1, "leaky_relu", torch.float64, device)
    x_ref = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    x = leaf(x_ref.contiguous(memory_format=torch.channels_last))
    for training in (True, False):
        ref.train(training), fused.train(training)
        with csp_kernels.use_backend(backend_name):
            y = fused(x)
        y_ref = ref(x_ref)
        assert_close(y, y_ref, f"y (training={training})")
        grad = torch.randn_like(y_ref)
        y_ref.backward(grad), y.backward(grad)
        assert_grads_match(fused, ref, x, x_ref)
        x.grad = x_ref.grad = None
        fused.zero_grad(), ref.zero_grad()


@pytest.mark.parametrize("device,backend_name", device_backend_params())
def test_momentum_none_is_cumulative_average(device, backend_name):
    ref, fused = make_pair(5, 7, 1, 1, "relu", torch.float64, device)
    ref.bn.momentum = fused.bn.momentum = None
    for _ in range(3):
        x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device)
        ref(x)
        with csp_kernels.use_backend(backend_name):
            fused(x)
    assert int(fused.bn.num_batches_tracked) == 3
    assert_state_matches(fused, ref)


def _out_buffer(batch, channels, height, width, dtype, device, channels_last=False):
    buf = torch.full((batch, channels, height, width), 7.0, dtype=dtype, device=device)
    return buf.contiguous(memory_format=torch.channels_last) if channels_last else buf


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("kernel_size,stride", [(1, 1), (3, 2)])
def test_out_slice_train_gradient_flows_through_buffer(device, backend_name, dtype, kernel_size, stride):
    ref, fused = make_pair(5, 6, kernel_size, stride, "mish", dtype, device)
    x_ref = torch.randn(2, 5, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    x = leaf(x_ref, dtype)
    y_ref = ref(x_ref)
    n, c, h, w = y_ref.shape
    buf = _out_buffer(n, c + 4, h, w, dtype, device)
    prefix = torch.randn(n, 2, h, w, dtype=dtype, device=device)
    buf[:, :2] = prefix
    with csp_kernels.use_backend(backend_name):
        y = fused(x, out=buf[:, 2:2 + c])
    assert y.data_ptr() == buf[:, 2:].data_ptr(), "out= must return the slice itself"
    assert_close(buf[:, 2:2 + c], y_ref, "buf slice")
    assert torch.equal(buf[:, :2], prefix) and torch.all(buf[:, 2 + c:] == 7.0), "out= wrote outside its slice"
    # A consumer of the whole buffer: its gradient must reach x and the parameters.
    weight = torch.randn_like(buf)
    (buf * weight).sum().backward()
    (y_ref * weight[:, 2:2 + c].double()).sum().backward()
    assert_grads_match(fused, ref, x, x_ref)
    assert_state_matches(fused, ref)


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ["leaky_relu", "mish"])  # mish has no oneDNN post-op
def test_out_slice_no_grad(device, backend_name, dtype, training, act):
    ref, fused = make_pair(5, 6, 1, 1, act, dtype, device)
    ref.train(training), fused.train(training)
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device)
    buf = _out_buffer(2, 9, 4, 5, dtype, device)
    with torch.no_grad(), csp_kernels.use_backend(backend_name):
        y = fused(x.to(dtype), out=buf[:, 3:])
        y_ref = ref(x)
    assert y.data_ptr() == buf[:, 3:].data_ptr()
    assert_close(buf[:, 3:], y_ref, "buf slice")
    assert torch.all(buf[:, :3] == 7.0)
    assert_state_matches(fused, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_out_any_strides_on_the_triton_eval_path(device):
    """The Triton epilogue stores through out's strides, so a channels_last slice works."""
    if "triton" not in fused_backends(device):
        pytest.skip("Triton is not usable here")
    ref, fused = make_pair(5, 6, 1, 1, "silu", torch.float64, device)
    ref.eval(), fused.eval()
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device)
    buf = _out_buffer(2, 9, 4, 5, torch.float64, device, channels_last=True)
    with torch.no_grad(), csp_kernels.use_backend("triton"):
        fused(x, out=buf[:, 3:])
    assert_close(buf[:, 3:], ref(x), "buf slice")


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_eval_fold_cache_follows_parameter_changes(device, backend_name, kernel_size):
    """kernel_size 1: BN folded into the weight (the GEMM's epilogue); 3 (float64): ATen's conv
    with the module's own weight and BN's scale in the act pass."""
    ref, fused = make_pair(5, 7, kernel_size, 1, "leaky_relu", torch.float64, device)
    ref.eval(), fused.eval()
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device)
    changes = [
        lambda m: m.conv.weight.mul_(1.5),
        lambda m: m.conv.weight.data.mul_(0.5),  # bumps no version counter
        lambda m: m.bn.running_var.data.add_(0.5),
        lambda m: m.bn.weight.add_(0.25),
        lambda m: m.bn.bias.sub_(0.5),
        lambda m: m.bn.running_mean.add_(1.0),
        lambda m: m.bn.running_var.mul_(3.0),
        lambda m: m.conv.weight.copy_(torch.randn_like(m.conv.weight)),
    ]
    with torch.no_grad(), csp_kernels.use_backend(backend_name):
        before = fused(x)
        for change in changes:
            change(fused)
            ref.load_state_dict(fused.state_dict())
            after = fused(x)
            assert not torch.allclose(after, before)
            assert_close(after, ref(x), "y after a parameter change")
            before = after
        # load_state_dict copies in place (version bump); assigning .data swaps the storage.
        fresh = randomize_(reference.ConvBNAct(5, 7, kernel_size, 1, act="leaky_relu")).to(device, torch.float64).eval()
        fused.load_state_dict(fresh.state_dict())
        assert_close(fused(x), fresh(x), "y after load_state_dict")
        fused.conv.weight.data = torch.randn_like(fused.conv.weight)
        fresh.conv.weight.data = fused.conv.weight.data.clone()
        assert_close(fused(x), fresh(x), "y after assigning weight.data")


def test_eval_aten_route_keeps_no_weight_copy():
    """Where ATen runs the eval conv (float64 3x3 on the CPU, a map of a GEMM panel's pixels or
    more), the module's weight is used as it is: the eval cache holds, and compares at each
    call, BN's vectors only."""
    _, fused = make_pair(5, 7, 3, 1, "relu", torch.float64, "cpu")
    fused.eval()
    with torch.no_grad():
        fused(torch.randn(2, 5, 8, 8, dtype=torch.float64))
    _key, kept, weight, _bias, transform, scale = fused._folded
    assert weight is None and transform is None and scale is not None
    assert [t.shape for t in kept] == [torch.Size([7])] * 4


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_eval_caches_follow_geometry_and_dtype_edits(device, backend_name, kernel_size):
    """Edits between eval calls that change which kernel runs, or how: the conv's dilation and
    padding (a 3x3 that Winograd or a 1x1 that the GEMM ran in float32 must run dilated), its
    stride, and the module moved to float64 and back. The kernel the module asked routing for,
    and its fold, must follow each (a stale one gave the undilated conv's numbers)."""
    ref, fused = make_pair(8, 6, kernel_size, 1, "silu", torch.float32, device)
    ref.eval(), fused.eval()
    x = torch.randn(2, 8, 10, 10, device=device)

    def dilate(m):
        m.conv.dilation, m.conv.padding = (2, 2), (kernel_size - 1, kernel_size - 1)

    edits = [("dilation", dilate, torch.float32),
             ("stride", lambda m: setattr(m.conv, "stride", (2, 2)), torch.float32),
             ("float64", lambda m: m.double(), torch.float64), ("float32", lambda m: m.float(), torch.float32)]
    with torch.no_grad(), csp_kernels.use_backend(backend_name):
        assert_close(fused(x), ref(x.double()), "y")
        for name, edit, dtype in edits:
            edit(fused)
            if name in ("dilation", "stride"):
                edit(ref)
            assert_close(fused(x.to(dtype)), ref(x.double()), f"y after the {name} edit")


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_eval_fold_cache_follows_the_input_layout(device, backend_name, kernel_size):
    """One module, NCHW and channels_last inputs in turn (float32: on the CPU the 1x1 GEMM or
    Winograd for NCHW, oneDNN with a prepacked weight for channels_last), each way round: the
    cached weight is the one the input's kernel takes. It crashed when a prepacked weight
    cached for channels_last met an NCHW input."""
    ref, fused = make_pair(8, 6, kernel_size, 1, "silu", torch.float32, device)
    ref.eval(), fused.eval()
    x = torch.randn(2, 8, 9, 9, device=device)
    layouts = [x, x.contiguous(memory_format=torch.channels_last)]
    with torch.no_grad(), csp_kernels.use_backend(backend_name):
        for first, second in (layouts, layouts[::-1]):
            fused._folded = None
            for xi in (first, second, first):
                assert_close(fused(xi), ref(xi.double()), "y")


@pytest.mark.parametrize("device,backend_name", device_backend_params())
def test_pickle_after_eval_forward(device, backend_name):
    """The eval cache (on float32 CPU a oneDNN-prepacked weight, which cannot be pickled) is
    left out of the pickle and rebuilt."""
    _, fused = make_pair(5, 7, 3, 1, "relu", torch.float32, device)
    fused.eval()
    x = torch.randn(2, 5, 4, 5, device=device)
    with torch.no_grad(), csp_kernels.use_backend(backend_name):
        y = fused(x)
        restored = pickle.loads(pickle.dumps(fused))
        assert torch.equal(restored(x), y)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_and_unfusable_configs_run_the_reference(device):
    ref, fused = make_pair(5, 7, 3, 1, "relu", torch.float64, device)
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device)
    buf = torch.zeros(2, 9, 4, 5, dtype=torch.float64, device=device)
    with csp_kernels.use_backend("reference"):
        y = fused(x, out=buf[:, 2:])
    y_ref = ref(x)
    assert y.data_ptr() == buf[:, 2:].data_ptr() and torch.equal(y, y_ref) and torch.all(buf[:, :2] == 0)
    with csp_kernels.use_backend("reference"), pytest.raises(ValueError, match="out must be a torch.float64 tensor"):
        fused(x, out=buf[:, 3:])
    ref.conv.padding_mode = fused.conv.padding_mode = "reflect"
    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="padding_mode='reflect'"):
        y = fused(x)
    assert_close(y, ref(x), "reflect padding")
    assert_state_matches(fused, ref)


@pytest.mark.parametrize("device,backend_name", device_backend_params())
@pytest.mark.parametrize("act", ["silu", "leaky_relu"])
def test_timm_conv_norm_act_state_dict_loads(device, backend_name, act):
    layers = pytest.importorskip("timm.layers")
    act_kwargs = {"negative_slope": checks.LEAKY_RELU_SLOPE} if act == "leaky_relu" else None
    timm_module = layers.ConvNormAct(6, 10, 3, stride=2, act_layer=act, act_kwargs=act_kwargs)
    timm_module = randomize_(timm_module).to(device, torch.float64)
    fused = csp_kernels.ConvBNAct(6, 10, 3, stride=2, act=act).to(device, torch.float64)
    fused.load_state_dict(timm_module.state_dict())
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64, device=device)
    with csp_kernels.use_backend(backend_name):
        for training in (True, False):
            timm_module.train(training), fused.train(training)
            with torch.no_grad():
                assert_close(fused(x), timm_module(x), f"y (training={training})")
    assert_state_matches(fused, timm_module)


@pytest.mark.parametrize("device,backend_name", device_backend_params())
def test_train_needs_more_than_one_value_per_channel(device, backend_name):
    _, fused = make_pair(5, 7, 1, 1, "relu", torch.float64, device)
    with csp_kernels.use_backend(backend_name), pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 5, 1, 1, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device,backend_name", device_backend_params())
def test_bad_inputs_raise_clear_errors(device, backend_name):
    _, fused = make_pair(5, 7, 1, 1, "relu", torch.float64, device)
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device)
    with csp_kernels.use_backend(backend_name):
        with pytest.raises(ValueError, match="x must have 5 channels"):
            fused(torch.randn(2, 6, 4, 5, dtype=torch.float64, device=device))
        with pytest.raises(ValueError, match="x must be 4-D"):
            fused(torch.randn(5, 4, 5, dtype=torch.float64, device=device))
        with pytest.raises(TypeError, match="x must have dtype"):
            fused(torch.ones(2, 5, 4, 5, dtype=torch.int64, device=device))
        with pytest.raises(ValueError, match="must have the same dtype"):
            fused(x.float())
        with pytest.raises(ValueError, match=r"out must be a torch.float64 tensor of shape \(2, 7, 4, 5\)"):
            fused(x, out=torch.empty(2, 7, 4, 6, dtype=torch.float64, device=device))
        with pytest.raises(ValueError, match="out must be a torch.float64 tensor"):
            fused(x, out=torch.empty(2, 7, 4, 5, dtype=torch.float32, device=device))
        with pytest.raises(TypeError, match="out must be a torch.Tensor"):
            fused(x, out=[1.0])
    with pytest.raises(ValueError, match="act must be one of"):
        csp_kernels.ConvBNAct(5, 7, act="gelu")


def test_autocast_runs_in_the_autocast_dtype():
    ref, fused = make_pair(8, 16, 1, 1, "silu", torch.float32, "cpu")
    plain = reference.ConvBNAct(8, 16, 1, act="silu")
    plain.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 5, 6)
    for training in (True, False):
        for m in (ref, fused, plain):
            m.train(training)
        with torch.no_grad():
            y_ref = ref(x.double())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fused(x)
                y_plain = plain(x)
        assert y.dtype == torch.bfloat16
        assert_matches_reference(y, y_ref, plain=y_plain, name=f"y (training={training})")


@pytest.mark.parametrize("device,backend_name", device_backend_params())
def test_gradcheck_training_ops(device, backend_name):
    engine = "triton" if backend_name == "triton" else "aten"
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 3, 4, **kw, requires_grad=True)
    weight = torch.randn(4, 3, 1, 1, **kw, requires_grad=True)
    bn_weight = (torch.rand(4, **kw) + 0.5).requires_grad_()
    bn_bias = torch.randn(4, **kw, requires_grad=True)
    conv_args = ([1, 1], [0, 0], [1, 1], 1, 1e-5, "silu", engine)

    def functional(x, weight, bn_weight, bn_bias):
        return ops.conv_bn_act_train(x, weight, bn_weight, bn_bias, *conv_args)[0]

    def eager_function(x, weight, bn_weight, bn_bias):  # the modules' eager path
        return ops.train_transition_recorded(x, weight, bn_weight, bn_bias, *conv_args)[0]

    def into_buffer(x, weight, bn_weight, bn_bias):
        buf = torch.zeros(2, 6, 3, 4, **kw)
        ops.train_transition_recorded(x, weight, bn_weight, bn_bias, *conv_args, buf[:, 1:5])
        return buf

    for fn in (functional, eager_function, into_buffer):
        assert torch.autograd.gradcheck(fn, (x, weight, bn_weight, bn_bias))


def _op_samples(device, engine):
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 4, 5, **kw)
    bn = (torch.rand(4, **kw) + 0.5, torch.randn(4, **kw))
    kernel = [1, 3][engine == "aten"]
    weight = torch.randn(4, 3, kernel, kernel, **kw)
    pad = [kernel // 2] * 2
    train_args = (x, weight, *bn, [1, 1], pad, [1, 1], 1, 1e-5, "mish", engine)
    eval_args = (x, weight, bn[1], [1, 1], pad, [1, 1], 1, "hardswish", engine)
    out = torch.empty(2, 6, 4, 5, **kw)[:, 1:5]
    samples = [
        (ops.conv_bn_act_train, train_args),
        (ops.conv_bn_act_train, (leaf(x), leaf(weight), leaf(bn[0]), leaf(bn[1]), *train_args[4:])),
        (ops.conv_bn_act_train_out, (*train_args, out)),
        (ops.conv_bias_act, eval_args),
        (ops.conv_bias_act_out, (*eval_args, out)),
    ]
    x32, weight32 = x.float(), weight.float()
    if engine == "aten" and winograd_usable(x32):  # float32 3x3: Winograd, with a cached transform in eval
        conv_args = ([1, 1], pad, [1, 1], 1, engine)
        kind = ops.eval_weight_kind(x32.dtype, eval_conv_kernel(x32, weight32, *conv_args))
        _, transform = ops.prepare_eval_weight(x32, weight32, *conv_args[:4], kind)
        eval32 = (x32, weight32, bn[1].float(), *eval_args[3:])
        samples += [
            (ops.conv_bn_act_train, (leaf(x32), leaf(weight32), leaf(bn[0].float()), leaf(bn[1].float()),
                                     *train_args[4:])),
            (ops.conv_bias_act, (*eval32, transform)),
            (ops.conv_bias_act_out, (*eval32, out.float(), transform)),
        ]
    return samples


@pytest.mark.parametrize("device,backend_name", device_backend_params())
def test_opcheck(device, backend_name):
    engine = "triton" if backend_name == "triton" else "aten"
    for op, args in _op_samples(device, engine):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    model = nn.Sequential(csp_kernels.ConvBNAct(4, 6, 3, act="silu"), csp_kernels.ConvBNAct(6, 5, 1, act="leaky_relu"))
    randomize_(model)
    eager = nn.Sequential(reference.ConvBNAct(4, 6, 3, act="silu"), reference.ConvBNAct(6, 5, 1, act="leaky_relu"))
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 4, 5, 6)
    with csp_kernels.use_backend("cpu"):
        y = compiled(leaf(x))
        y_eager = eager(leaf(x))
        assert_matches_reference(y, y_eager, name="train y")
        y.sum().backward()
        y_eager.sum().backward()
        for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
            assert_matches_reference(p.grad, q.grad, name=name)
        model.eval(), eager.eval()
        with torch.no_grad():
            assert_matches_reference(compiled(x), eager(x), name="eval y")
    assert_state_matches_float32(model, eager)


def test_torch_compile_out_slice_has_no_graph_break():
    """out= under torch.compile (aot_eager: the graph capture is what is checked here)."""
    torch._dynamo.reset()
    fused = randomize_(csp_kernels.ConvBNAct(4, 6, 1, act="mish"))
    eager = reference.ConvBNAct(4, 6, 1, act="mish")
    eager.load_state_dict(fused.state_dict())

    def into_buffer(x):
        buf = torch.zeros(2, 9, 5, 6)
        fused(x, out=buf[:, 3:])
        return buf

    compiled = torch.compile(into_buffer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, 6)
    x_fused, x_eager = leaf(x), leaf(x)
    with csp_kernels.use_backend("cpu"):
        for training in (True, False):
            fused.train(training), eager.train(training)
            buf, y_eager = compiled(x_fused), eager(x_eager)
            assert_matches_reference(buf[:, 3:], y_eager, name=f"y (training={training})")
            assert torch.all(buf[:, :3] == 0)
            weight = torch.randn_like(y_eager)
            (buf[:, 3:] * weight).sum().backward()
            (y_eager * weight).sum().backward()
            assert_matches_reference(x_fused.grad, x_eager.grad, name="x.grad")
            x_fused.grad = x_eager.grad = None
    assert_state_matches_float32(fused, eager)


def assert_state_matches_float32(fused: nn.Module, ref: nn.Module) -> None:
    for (name, f), (_, r) in zip(fused.state_dict().items(), ref.state_dict().items()):
        assert_matches_reference(f, r, name=name)


@requires_cuda
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_half_precision_on_gpu(backend_name, dtype, kernel_size):
    ref, fused = make_pair(32, 48, kernel_size, 1, "silu", dtype, "cuda")
    plain = reference.ConvBNAct(32, 48, kernel_size, act="silu").to("cuda", dtype)
    plain.load_state_dict(ref.state_dict())
    x_ref = torch.randn(4, 32, 20, 24, dtype=torch.float64, device="cuda", requires_grad=True)
    x, x_plain = leaf(x_ref, dtype), leaf(x_ref, dtype)
    for training in (True, False):
        for m in (ref, fused, plain):
            m.train(training)
        with csp_kernels.use_backend(backend_name):
            y = fused(x)
        y_ref, y_plain = ref(x_ref), plain(x_plain)
        assert_matches_reference(y, y_ref, plain=y_plain, name=f"y (training={training})")
        grad = torch.randn_like(y_ref)
        for out, g in ((y, grad.to(dtype)), (y_ref, grad), (y_plain, grad.to(dtype))):
            out.backward(g)
        assert_matches_reference(x.grad, x_ref.grad, plain=x_plain.grad, name="x.grad")
        for t in (x, x_ref, x_plain):
            t.grad = None
