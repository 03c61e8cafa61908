"""Output memory format: every fused module and function gives its result in the memory format
its plain-PyTorch twin gives (channels_last in, channels_last out), whichever kernel or route
runs (the kernels compute NCHW), with the reference's numbers and gradients."""
import copy
import warnings

import pytest
import torch

import csp_kernels
from csp_kernels import reference
from csp_kernels.ops.batch_norm_act import suggests_channels_last

from helpers import rel_error

CL = torch.channels_last

# (class name, arguments, keyword arguments): every fused module with 16 channels in
MODULES = [
    ("ConvBNAct", (16, 16, 3), {"act": "silu"}),
    ("ConvBNAct", (16, 24, 1), {}),
    ("Bottleneck", (16, 16), {}),
    ("C2f", (16, 16, 2), {}),
    ("C3", (16, 16, 1), {}),
    ("C3k2", (16, 16, 1), {"c3k": True}),
    ("BottleneckBlock", (16, 16), {}),
    ("DarkBlock", (16, 16), {}),
    ("CrossStage", (16, 32), {"stride": 2, "dilation": 1, "depth": 1, "block_ratio": 0.5}),
    ("CrossStage3", (16, 32), {"stride": 1, "dilation": 1, "depth": 1, "block_ratio": 0.5}),
    ("DarkStage", (16, 32), {"stride": 2, "dilation": 1, "depth": 1}),
    ("PartialDenseBlock", (16, 2, 8), {"fusion": "csp"}),
    ("DenseBlock", (16, 2, 8), {}),
]


def _format(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=CL) else f"strides {t.stride()}"


def _pair(name, args, kwargs):
    torch.manual_seed(0)
    ref = getattr(reference, name)(*args, **kwargs)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fused = getattr(csp_kernels, name)(*args, **kwargs)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


@pytest.mark.parametrize("name, args, kwargs", MODULES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MODULES)])
@pytest.mark.parametrize("side, channels_last", [
    (4, "input"), (12, "input"), (24, "input"),  # the small-map routes (<= 8x8, <= 16x16) and the buffered one
    (24, "input_and_weights"),  # model.to(memory_format=torch.channels_last) too
])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_channels_last_input_gives_the_reference_format(name, args, kwargs, side, channels_last, mode):
    fused, ref = _pair(name, args, kwargs)
    if channels_last == "input_and_weights":
        fused, ref = fused.to(memory_format=CL), ref.to(memory_format=CL)
    exact = copy.deepcopy(ref).double()
    for m in (fused, ref, exact):
        m.train(mode == "train")
    x = torch.randn(2, 16, side, side).to(memory_format=CL)
    xf, xr, xe = (t.requires_grad_() for t in (x.clone(), x.clone(), x.double()))
    with torch.set_grad_enabled(mode != "eval_no_grad"), warnings.catch_warnings():
        # (a dense block in eval with autograd recording runs its reference, with that warning)
        recorded_dense_eval = mode == "eval" and name.endswith("DenseBlock")
        warnings.simplefilter("ignore" if recorded_dense_eval else "error", csp_kernels.ReferenceFallbackWarning)
        ys = fused(xf), ref(xr), exact(xe)
    # timm's CrossStage answers NCHW (its .contiguous() before the cat), unless its last conv's
    # weight is channels_last.
    nchw = name == "CrossStage" and channels_last == "input"
    assert _format(ys[1]) == ("contiguous" if nchw else "channels_last")
    assert _format(ys[0]) == _format(ys[1])
    _assert_close_as_reference(ys[0], ys[1], ys[2])
    if mode == "eval_no_grad":
        return
    grad = torch.randn_like(ys[1])
    for y in ys:
        y.backward(grad.to(y.dtype))
    _assert_close_as_reference(xf.grad, xr.grad, xe.grad)
    if mode == "train":
        for pf, pr, pe in zip(fused.parameters(), ref.parameters(), exact.parameters()):
            _assert_close_as_reference(pf.grad, pr.grad, pe.grad)


def _assert_close_as_reference(fused: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
    """The fused error against float64 at most 2x plain PyTorch's, in float32."""
    assert rel_error(fused, exact) <= 2 * rel_error(ref, exact) + 1e-6


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_conv_bn_act_follows_its_weight_format_as_conv2d_does(mode, kernel_size):
    """F.conv2d answers channels_last for an NCHW x when the weight is channels_last."""
    fused, ref = _pair("ConvBNAct", (16, 16, kernel_size), {})
    fused, ref = fused.to(memory_format=CL).train(mode == "train"), ref.to(memory_format=CL).train(mode == "train")
    x = torch.randn(2, 16, 12, 12)
    with torch.set_grad_enabled(mode == "train"):
        y_fused, y_ref = fused(x), ref(x)
    assert _format(y_ref) == "channels_last"
    assert _format(y_fused) == _format(y_ref)
    assert rel_error(y_fused, y_ref) < 1e-5


@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
@pytest.mark.parametrize("name, kwargs", [("DarkBlock", {}), ("BottleneckBlock", {}),
                                          ("DarkStage", dict(stride=2, dilation=1, depth=2, block_ratio=1.0,
                                                             bottle_ratio=0.5))])
def test_timm_residual_blocks_follow_their_weights_format(mode, name, kwargs):
    """timm's blocks add their input to their convolutions' result (conv(...) + x): the sum takes
    the convolutions' format, channels_last for an NCHW x when their weights are (as the last
    block of a DarkStage gives it)."""
    if name == "DarkStage":
        fused, ref = _pair(name, (), dict(kwargs, in_chs=16, out_chs=16, block_fn=reference.DarkBlock))
    else:
        fused, ref = _pair(name, (16, 16), kwargs)
    fused, ref = fused.to(memory_format=CL).train(mode == "train"), ref.to(memory_format=CL).train(mode == "train")
    x = torch.randn(2, 16, 12, 12)
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        y_fused, y_ref = fused(x), ref(x)
    assert _format(y_ref) == "channels_last"
    assert _format(y_fused) == _format(y_ref)
    assert rel_error(y_fused, y_ref) < 1e-5


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_nchw_input_gives_nchw_output(mode):
    """No copy where nothing is channels_last: the result is the kernels' own tensor."""
    fused, ref = _pair("C2f", (16, 16, 1), {})
    fused.train(mode == "train"), ref.train(mode == "train")
    x = torch.randn(2, 16, 24, 24)
    with torch.set_grad_enabled(mode == "train"):
        assert _format(fused(x)) == _format(ref(x)) == "contiguous"


def test_out_keeps_the_callers_tensor():
    fused, _ = _pair("C2f", (16, 16, 1), {})
    x = torch.randn(2, 16, 12, 12).to(memory_format=CL)
    buf = torch.empty(2, 32, 12, 12)
    with torch.no_grad():
        assert fused.eval()(x, out=buf[:, 16:]).data_ptr() == buf[:, 16:].data_ptr()


def test_maxout_functions_and_exact_fusion():
    torch.manual_seed(0)
    last = [torch.randn(2, 8, 16, 16).to(memory_format=CL), torch.randn(2, 8, 8, 8).to(memory_format=CL)]
    mixed = [last[0], last[1].contiguous()]
    cases = [
        (lambda m, f: m.maxout(f[0], 4), last),
        (lambda m, f: m.maxout_pyramid(f, 16, 8), last),
        (lambda m, f: m.maxout_pyramid(f, 16, 8), mixed),  # torch.cat of mixed formats answers NCHW
    ]
    for fn, features in cases:
        y_fused, y_ref = fn(csp_kernels, features), fn(reference, features)
        assert _format(y_fused) == _format(y_ref)
        assert torch.equal(y_fused, y_ref)
    torch.manual_seed(1)
    ref = reference.ExactFusion([8, 8], 8, transition=True)
    fused = csp_kernels.ExactFusion([8, 8], 8, transition=True)
    fused.load_state_dict(ref.state_dict())
    for y_fused, y_ref in zip(fused(last), ref(last)):
        assert _format(y_fused) == _format(y_ref) == "channels_last"
        assert rel_error(y_fused, y_ref) < 1e-5


@pytest.mark.parametrize("shape, strides, expected", [
    ((2, 3, 4, 5), (60, 1, 15, 3), True),  # channels_last
    ((2, 3, 4, 5), (60, 20, 5, 1), False),  # NCHW
    ((2, 3, 1, 1), (3, 1, 1, 1), False),  # both at once: NCHW, as ATen breaks the tie
    ((2, 3, 4, 5), (120, 2, 30, 6), True),  # a channel slice of a channels_last tensor
    ((2, 3, 4, 5), (0, 1, 15, 3), False),  # an expanded batch: NCHW, as ATen has it
    ((2, 3, 4, 5), (60, 0, 15, 3), False),  # expanded channels
    ((2, 3, 0, 5), (15, 1, 15, 3), False),  # empty
])
def test_suggests_channels_last_is_aten_suggest_memory_format(shape, strides, expected):
    """ATen's Tensor.suggest_memory_format, which F.conv2d's output follows (a 1x1 convolution
    with an NCHW weight answers channels_last exactly where its input suggests it)."""
    t = torch.randn(1000).as_strided(shape, strides)
    assert suggests_channels_last(t) == expected
    if t.numel():
        y = torch.nn.functional.conv2d(t, torch.randn(4, 3, 1, 1))
        assert (not y.is_contiguous() and y.is_contiguous(memory_format=CL)) == expected
