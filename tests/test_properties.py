"""Property tests: random configurations and inputs that the fused modules and the Maxout
pyramid accept, against the reference in float64 on every fused backend of the CPU (forward,
input and parameter gradients, running statistics, train and eval). The other test files pin
chosen shapes; these look for the combination nobody chose (odd channel splits, 1-pixel planes,
groups, strided views)."""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import csp_kernels
from csp_kernels import checks, reference
from helpers import assert_matches_reference, batch_norm_gain, fused_backends, rel_error, zero_gradient_floor

TOL = 1e-10
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.running_mean.normal_(generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
    return module.double()


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x as given (NCHW), as channels_last, or as a channel slice of a wider buffer (same values)."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "slice":
        buf = torch.randn(x.shape[0], x.shape[1] + 3, *x.shape[2:], dtype=x.dtype)
        buf[:, 2: 2 + x.shape[1]] = x
        return buf[:, 2: 2 + x.shape[1]]
    return x


def compare(ref: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor, training: bool, seed: int,
            backend_name: str, call_fused=None) -> None:
    """call_fused(module, x): how the fused module is called (default: module(x))."""
    ref.train(training)
    fused.train(training)
    grad_y = None
    results = []
    for module in (ref, fused):
        xi = x.detach().clone().requires_grad_()
        call = call_fused if module is fused and call_fused is not None else (lambda m, t: m(t))
        with csp_kernels.use_backend("reference" if module is ref else backend_name), \
                torch.set_grad_enabled(training):
            if module is ref:
                with batch_norm_gain(ref) as gain:
                    y = call(module, xi)
            else:
                y = call(module, xi)
        if grad_y is None:
            grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
        grads = []
        if training:
            y.backward(grad_y)
            grads = [xi.grad] + [p.grad for p in module.parameters()]
        results.append((y, grads))
    (y_ref, g_ref), (y, g) = results
    assert y.shape == y_ref.shape
    assert_matches_reference(y, y_ref, tol=TOL)
    for index, (a, b) in enumerate(zip(g, g_ref)):
        # Relative to the gradient, or to the noise floor of one that is zero analytically.
        scale = max(b.norm().item(), zero_gradient_floor(grad_y, gain[0]))
        assert (a - b).norm().item() <= TOL * scale, f"gradient {index}: {(a - b).norm().item():.3g} vs {scale:.3g}"
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        assert_matches_reference(b.double(), b_ref.double(), tol=TOL, name=name)


@st.composite
def conv_bn_act_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))
    kernel = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    training = draw(st.booleans())
    batch = draw(st.integers(2 if training else 1, 3))  # training BatchNorm needs 2+ values per channel
    height, width = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    return dict(cin=cin, cout=cout, kernel=kernel, stride=stride, groups=groups, shape=(batch, cin, height, width),
                act=draw(st.sampled_from(checks.ACTIVATIONS)), training=training,
                layout=draw(st.sampled_from(["nchw", "channels_last", "slice"])), into_slice=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


def into_buffer_slice(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x, out=...) into channels [2, 2 + out_channels) of a wider NCHW buffer whose other
    channels must stay untouched."""
    n, _, h, w = x.shape
    stride = module.conv.stride[0]
    buf = torch.full((n, module.conv.out_channels + 3, (h - 1) // stride + 1, (w - 1) // stride + 1), 7.0,
                     dtype=x.dtype)
    y = module(x, out=buf[:, 2: 2 + module.conv.out_channels])
    assert y.data_ptr() == buf[:, 2:].data_ptr()
    assert torch.all(buf[:, :2] == 7.0) and torch.all(buf[:, 2 + module.conv.out_channels:] == 7.0)
    return y


@pytest.mark.parametrize("backend_name", fused_backends("cpu"))
@SETTINGS
@given(case=conv_bn_act_cases())
def test_conv_bn_act_matches_reference(backend_name, case):
    args = (case["cin"], case["cout"], case["kernel"], case["stride"], None, case["groups"], case["act"])
    ref = randomized(reference.ConvBNAct(*args), case["seed"])
    fused = csp_kernels.ConvBNAct(*args).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(case["shape"], generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    compare(ref, fused, layout(x, case["layout"]), case["training"], case["seed"], backend_name,
            into_buffer_slice if case["into_slice"] else None)


@st.composite
def float32_conv_bn_act_cases(draw):
    """Shapes that cross the CPU float32 kernels' block edges: the AVX-512 GEMM's 6-row and
    64-column panels (1x1 convs), Winograd's 2x2 tiles and odd planes (3x3, stride 1)."""
    kernel = draw(st.sampled_from([1, 3]))
    training = draw(st.booleans())
    shape = (draw(st.integers(2, 3)), 0, draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    return dict(cin=draw(st.integers(1, 70)), cout=draw(st.integers(1, 70)), kernel=kernel, shape=shape,
                act=draw(st.sampled_from(checks.ACTIVATIONS)), training=training,
                layout=draw(st.sampled_from(["nchw", "slice"])), seed=draw(st.integers(0, 2 ** 16)))


def assert_float32_within_plain_error(ref64, ref32, fused, x, training, seed, traced) -> None:
    """The fused module in float32 on the CPU backend against the reference run in float32,
    both against float64: `traced(module, y, x)` lists the tensors compared, each within 2.5x
    the reference's float32 error (2.5x, not 2x: Winograd's transforms round on both sides of
    its GEMMs) plus 1e-5 (~100 float32 epsilons) for outputs that cancel: Winograd's rounding
    scales with its transformed terms, not with the output (34 channels into one on a 1x3
    plane: 1.65e-6 vs the reference's 2.0e-7)."""
    ref32.load_state_dict(ref64.state_dict())
    fused.load_state_dict(ref64.state_dict())
    grad_y = None
    results = []
    for module, name in ((ref64, "reference"), (ref32, "reference"), (fused, "cpu")):
        module.train(training)
        xi = x.to(next(module.parameters()).dtype).detach().requires_grad_()
        with csp_kernels.use_backend(name), torch.set_grad_enabled(training):
            y = module(xi)
        if grad_y is None:
            grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
        if training:
            y.backward(grad_y.to(y.dtype))
        results.append(traced(module, y, xi))
    for index, (exact, plain, got) in enumerate(zip(*results)):
        plain_err, err = rel_error(plain, exact), rel_error(got, exact)
        assert err <= 2.5 * plain_err + 1e-5, f"tensor {index}: {err:.3g} vs plain {plain_err:.3g}"


def output_only(module, y, x):
    """y alone, in training (batch statistics) and eval. Not the gradients: behind a BatchNorm
    they are projections that can cancel, where the float32 reference's own error is already
    large and any two float32 implementations differ by more than a constant factor (one
    channel of 20 values: x's gradient 2.5e-3 off vs the reference's 6.5e-4; a 1x1 conv's
    weight gradient with one input channel is zero but for eps), and a kinked activation (the
    relu inside every dense layer) flips whole elements of them (one channel 2.9e-3 off vs
    2.5e-7). The float64 property test holds every gradient to 1e-10; test_conv3x3 holds
    Winograd's input gradient to ATen's float32 accuracy on chosen shapes, and Winograd's
    convolution (the same op) to 2.5x ATen's error on random odd ones."""
    return [y]


@SETTINGS
@given(case=float32_conv_bn_act_cases())
def test_float32_conv_bn_act_within_twice_plain_error(case):
    """float32 on the CPU backend: the AVX-512 GEMM's panels and Winograd's tiles (where the
    CPU has AVX-512) on random shapes."""
    args = (case["cin"], case["cout"], case["kernel"], 1, None, 1, case["act"])
    shape = (case["shape"][0], case["cin"], *case["shape"][2:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    assert_float32_within_plain_error(randomized(reference.ConvBNAct(*args), case["seed"]),
                                      reference.ConvBNAct(*args), csp_kernels.ConvBNAct(*args),
                                      layout(x, case["layout"]), case["training"], case["seed"],
                                      output_only)


@st.composite
def dense_block_cases(draw):
    in_channels = draw(st.integers(2, 9))
    part1 = draw(st.integers(1, in_channels - 1))
    training = draw(st.booleans())
    batch = draw(st.integers(2 if training else 1, 3))
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return dict(in_channels=in_channels, part_ratio=part1 / in_channels, num_layers=draw(st.integers(1, 3)),
                growth=draw(st.integers(1, 4)), bn_size=draw(st.integers(1, 3)),
                fusion=draw(st.sampled_from(["last", "first", "csp"])), act=draw(st.sampled_from(checks.ACTIVATIONS)),
                shape=(batch, in_channels, height, width), training=training,
                layout=draw(st.sampled_from(["nchw", "channels_last", "slice"])), seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend_name", fused_backends("cpu"))
@SETTINGS
@given(case=dense_block_cases())
# Two 1-pixel samples: the transitions' BatchNorms amplify the rounding noise of the first
# one's bias gradient (zero analytically) ~2700-fold.
@example(case=dict(in_channels=2, part_ratio=0.5, num_layers=1, growth=4, bn_size=1, fusion="csp", act="identity",
                   shape=(2, 2, 1, 1), training=True, layout="nchw", seed=2798))
def test_partial_dense_block_matches_reference(backend_name, case):
    args = (case["in_channels"], case["num_layers"], case["growth"], case["part_ratio"], case["bn_size"],
            case["fusion"], case["act"])
    ref = randomized(reference.PartialDenseBlock(*args), case["seed"])
    fused = csp_kernels.PartialDenseBlock(*args).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(case["shape"], generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    compare(ref, fused, layout(x, case["layout"]), case["training"], case["seed"], backend_name)


@SETTINGS
@given(case=dense_block_cases(), wide=st.integers(0, 3))
def test_float32_partial_dense_block_within_twice_plain_error(case, wide):
    """float32 on the CPU backend: the block's output through its GEMMs and Winograd
    convolutions (the eval forward; in training, after the forward of a step that also runs the
    backward) on random geometries, with `wide` * 16 more input channels to cross the GEMM's
    panels and 8 more pixels a side, so that every BatchNorm averages 16+ values."""
    in_channels = case["in_channels"] + 16 * wide
    batch, _, height, width = case["shape"]
    height, width = height + 8, width + 8
    args = (in_channels, case["num_layers"], case["growth"], case["part_ratio"], case["bn_size"], case["fusion"],
            case["act"])
    x = torch.randn(batch, in_channels, height, width, generator=torch.Generator().manual_seed(case["seed"]),
                    dtype=torch.float64)
    assert_float32_within_plain_error(randomized(reference.PartialDenseBlock(*args), case["seed"]),
                                      reference.PartialDenseBlock(*args), csp_kernels.PartialDenseBlock(*args),
                                      layout(x, case["layout"]), case["training"], case["seed"], output_only)


@st.composite
def maxout_pyramid_cases(draw):
    out_channels = draw(st.integers(1, 4))
    levels = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 3))
    # channels per level summing to out_channels * group_size, each level at least 1
    total = out_channels * group_size
    if total < levels:
        levels = total
    cuts = [] if levels == 1 else sorted(draw(st.lists(st.integers(1, total - 1), min_size=levels - 1,
                                                       max_size=levels - 1, unique=True)))
    channels = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    sizes = [(draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(levels)]
    return dict(channels=channels, sizes=sizes, size=(draw(st.integers(1, 9)), draw(st.integers(1, 9))),
                out_channels=out_channels, grouping=draw(st.sampled_from(["interleaved", "contiguous"])),
                batch=draw(st.integers(1, 2)), ties=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


@SETTINGS
@given(case=maxout_pyramid_cases())
def test_maxout_pyramid_matches_reference(case):
    # Any resize ratio, up or down, and (with `ties`) values drawn from a few integers so that
    # groups tie: the winner, and the one member that gets the gradient, is the lowest channel.
    generator = torch.Generator().manual_seed(case["seed"])
    features = []
    for c, (h, w) in zip(case["channels"], case["sizes"]):
        f = torch.randn(case["batch"], c, h, w, generator=generator, dtype=torch.float64)
        features.append((f * 2).round() if case["ties"] else f)
    grad_y = torch.randn(case["batch"], case["out_channels"], *case["size"], generator=generator, dtype=torch.float64)
    results = []
    for fn, name in ((reference.maxout_pyramid, "reference"), (csp_kernels.maxout_pyramid, "cpu")):
        inputs = [f.clone().requires_grad_() for f in features]
        with csp_kernels.use_backend(name):
            y = fn(inputs, case["size"], case["out_channels"], case["grouping"])
        y.backward(grad_y)
        results.append((y, [i.grad for i in inputs]))
    (y_ref, g_ref), (y, g) = results
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)


def test_property_helpers_keep_the_values():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for kind in ("nchw", "channels_last", "slice"):
        assert torch.equal(layout(x, kind), x)
    assert not layout(x, "slice").is_contiguous() and layout(x, "channels_last").stride(1) == 1


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
