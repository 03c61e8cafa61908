"""The measured kernel choices for float32 CPU convolutions (csp_kernels/ops/conv_choice.py):
our 1x1 GEMMs or oneDNN, Winograd or oneDNN for 3x3; and the modules' numbers whichever way
they go."""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import csp_kernels
from csp_kernels import reference
from csp_kernels.ops import conv as conv_ops
from csp_kernels.ops import conv3x3, conv_choice, routing
from csp_kernels.ops.routing import winograd_usable

from helpers import assert_matches_reference, randomize_, rel_error

needs_winograd = pytest.mark.skipif(not winograd_usable(torch.empty(0)), reason="needs an AVX-512 CPU")


@pytest.fixture
def measuring(monkeypatch):
    """The choices as an unpinned process makes them, with a fresh verdict table."""
    monkeypatch.setattr(conv_choice, "_PINNED_1X1", "")
    monkeypatch.setattr(conv_choice, "_PINNED_3X3", "")
    monkeypatch.setattr(conv_choice, "_verdicts", {})


@pytest.mark.parametrize("kernel, choose", [("_winograd_faster", conv_choice.winograd_chosen),
                                            ("_gemm_faster", conv_choice.gemm_chosen)])
def test_each_shape_is_measured_once_and_remembered(measuring, monkeypatch, kernel, choose):
    calls = []

    def fake_measure(x_shape, weight_shape, flag):
        calls.append((x_shape, weight_shape, flag))
        return x_shape[2] > 4

    monkeypatch.setattr(conv_choice, kernel, fake_measure)
    small, large, weight = (2, 8, 4, 4), (2, 8, 16, 16), (8, 8, 3, 3)
    assert [choose(s, weight, f) for s in (small, large, small, large) for f in (False, True)
            ] == [False, False, True, True] * 2
    assert len(calls) == 4  # one per (shape, flag), the repeats looked up
    assert sum(conv_choice.measured_verdicts().values()) == 2


@needs_winograd
def test_winograd_measurement_runs_both_kernels(measuring):
    verdict = conv_choice.winograd_chosen((2, 16, 8, 8), (16, 16, 3, 3), transform_cached=False)
    assert isinstance(verdict, bool)
    assert conv_choice.measured_verdicts() == {("3x3", (2, 16, 8, 8), (16, 16, 3, 3), False): verdict}


@needs_winograd
def test_winograd_weight_grad_measurement_runs_both_kernels_once(measuring, monkeypatch):
    verdict = conv_choice.winograd_weight_grad_chosen((2, 16, 8, 8), (12, 16, 3, 3))
    assert isinstance(verdict, bool)
    key = ("3x3 weight grad", (2, 16, 8, 8), (12, 16, 3, 3))
    assert conv_choice.measured_verdicts() == {key: verdict}
    monkeypatch.setattr(conv_choice, "_winograd_weight_grad_faster", lambda *shapes: pytest.fail("measured twice"))
    assert conv_choice.winograd_weight_grad_chosen((2, 16, 8, 8), (12, 16, 3, 3)) == verdict


@pytest.mark.parametrize("pinned", ["winograd", "onednn"])
def test_the_3x3_pin_routes_the_weight_gradient_too(monkeypatch, pinned):
    """Under either pin the training 3x3 weight gradient matches float64 autograd, and runs by
    Winograd exactly when pinned so (and usable)."""
    monkeypatch.setattr(conv_choice, "_PINNED_3X3", pinned)
    ran = []
    real = conv3x3.conv3x3_winograd_weight_grad
    monkeypatch.setattr(conv_ops, "conv3x3_winograd_weight_grad", lambda *a: ran.append(1) or real(*a))
    x, weight = torch.randn(2, 6, 9, 8, dtype=torch.float64), torch.randn(5, 6, 3, 3, dtype=torch.float64)
    grad_z = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    x64, w64 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.nn.functional.conv2d(x64, w64, padding=1).backward(grad_z)
    _, grad_weight = conv_ops.conv_backward(grad_z.float(), x.float(), weight.float(), [1, 1], [1, 1], [1, 1], 1,
                                            False, True)
    assert bool(ran) == (pinned == "winograd" and winograd_usable(x.float()))
    assert rel_error(grad_weight, w64.grad) <= 2e-6


@pytest.mark.parametrize("training", [True, False])
def test_gemm_measurement_runs_both_kernels(measuring, training):
    verdict = conv_choice.gemm_chosen((2, 16, 8, 8), (12, 16, 1, 1), training)
    assert isinstance(verdict, bool)
    assert conv_choice.measured_verdicts() == {("1x1", (2, 16, 8, 8), (12, 16, 1, 1), training): verdict}


@pytest.mark.parametrize("measure, shapes", [
    ("_gemm_faster", ((2, 16, 8, 8), (16, 16, 1, 1), False)),
    pytest.param("_winograd_faster", ((2, 16, 8, 8), (16, 16, 3, 3), True), marks=needs_winograd),
    ("_onednn_eval_faster", ((2, 16, 8, 8), (16, 16, 3, 3), [2, 2], [1, 1], [1, 1], 1))])
def test_eval_measurements_count_the_fold_check_at_memory_speed(monkeypatch, measure, shapes):
    """A kernel that takes a folded weight loses to ATen's conv (the module's own weight) when
    the fold cache's check of the weight, read from memory at each call, costs more than the
    kernels' difference: here memory is made 1 byte per second."""
    monkeypatch.setattr(conv_choice, "_same_bits_bandwidth", lambda: 1.0)
    assert conv_choice._fold_check_seconds(torch.empty(16, 16, 3, 3)) == 2 * 16 * 16 * 9 * 4
    assert getattr(conv_choice, measure)(*shapes) is False


def test_an_extra_cost_counts_against_our_kernel():
    assert conv_choice._faster(lambda: None, lambda: time.sleep(1e-3))
    assert not conv_choice._faster(lambda: None, lambda: time.sleep(1e-3), ours_extra=1.0)


def test_the_same_bits_bandwidth_is_measured_once():
    bandwidth = conv_choice._same_bits_bandwidth()
    assert 1e8 < bandwidth < 1e13  # bytes per second: a real memory's, neither a cache hit nor a stall
    assert conv_choice._same_bits_bandwidth() == bandwidth


def test_unmeasured_shapes_under_compile_follow_the_map_size(measuring, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    side = conv_choice._UNMEASURED_MIN_SIDE
    assert conv_choice.winograd_chosen((2, 8, side, side), (8, 8, 3, 3), True)
    assert not conv_choice.winograd_chosen((2, 8, side - 1, side + 5), (8, 8, 3, 3), True)
    pixels = conv_choice._UNMEASURED_MIN_PIXELS
    assert conv_choice.gemm_chosen((2, 8, pixels // 4, 4), (8, 8, 1, 1), True)
    assert not conv_choice.gemm_chosen((2, 8, pixels // 4 - 1, 4), (8, 8, 1, 1), False)
    assert conv_choice.measured_verdicts() == {}  # nothing timed inside a trace


def _check_conv_bn_act(ref, fused, x, train):
    fused.load_state_dict(ref.state_dict())
    ref.train(train), fused.train(train)
    x64 = x.double().requires_grad_(train)
    expected = ref(x64)
    if train:
        x.requires_grad_()
        y = fused(x)
        grad = torch.randn_like(y)
        y.backward(grad)
        expected.backward(grad.double())
        assert_matches_reference(x.grad, x64.grad, name="x grad")
        assert_matches_reference(fused.conv.weight.grad, ref.conv.weight.grad, name="weight grad")
        assert_matches_reference(fused.bn.weight.grad, ref.bn.weight.grad, name="bn weight grad")
        assert_matches_reference(fused.bn.running_var, ref.bn.running_var, name="running var")
    else:
        with torch.no_grad():
            y = fused(x)
    assert_matches_reference(y, expected)


@pytest.mark.parametrize("pinned", ["winograd", "onednn"])
@pytest.mark.parametrize("train", [True, False])
def test_3x3_conv_bn_act_matches_the_reference_either_way(monkeypatch, pinned, train):
    monkeypatch.setattr(conv_choice, "_PINNED_3X3", pinned)
    _check_conv_bn_act(reference.ConvBNAct(6, 5, 3, act="silu").double(), csp_kernels.ConvBNAct(6, 5, 3, act="silu"),
                       torch.randn(2, 6, 9, 7), train)


@pytest.mark.parametrize("pinned", ["gemm", "onednn"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("act", ["leaky_relu", "mish"])  # mish: no oneDNN post-op, a pass instead
def test_1x1_conv_bn_act_matches_the_reference_either_way(monkeypatch, pinned, train, act):
    monkeypatch.setattr(conv_choice, "_PINNED_1X1", pinned)
    _check_conv_bn_act(reference.ConvBNAct(6, 5, 1, act=act).double(), csp_kernels.ConvBNAct(6, 5, 1, act=act),
                       torch.randn(2, 6, 5, 7), train)


@pytest.mark.parametrize("pinned", ["gemm", "onednn"])
def test_1x1_conv_bn_act_writes_a_buffer_slot_either_way(monkeypatch, pinned):
    """A stage's 1x1 writing its slot of a concat buffer with out= (both kernels, train + eval)."""
    monkeypatch.setattr(conv_choice, "_PINNED_1X1", pinned)
    ref = reference.ConvBNAct(6, 4, 1).double()
    fused = csp_kernels.ConvBNAct(6, 4, 1)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 5)
    for train in (True, False):
        ref.train(train), fused.train(train)
        buf = torch.zeros(2, 10, 5, 5)
        with torch.no_grad():
            fused(x, out=buf[:, 3:7])
            expected = ref(x.double())
        assert_matches_reference(buf[:, 3:7], expected)
        assert not buf[:, :3].any() and not buf[:, 7:].any()


@pytest.mark.parametrize("variable, choices", [("CSP_KERNELS_CPU_CONV3X3", "winograd"),
                                               ("CSP_KERNELS_CPU_CONV1X1", "gemm"),
                                               ("CSP_KERNELS_CPU_CONV3X3_STRIDE2", "phases")])
def test_a_bad_pin_is_ignored_with_a_warning(variable, choices):
    code = "import csp_kernels.ops.conv_choice as c; assert c._PINNED_1X1 == c._PINNED_3X3 == c._PINNED_STRIDE2 == ''"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSP_KERNELS_CPU_CONV")}
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         env={**env, variable: "fastest"})
    assert run.returncode != 0 and f"{variable} must be one of" in run.stderr and choices in run.stderr
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, variable: "fastest"})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("pinned", ["winograd", "onednn"])
@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (3, 2), (5, 1), (1, 2), (1, 1)])
def test_eval_output_is_nchw_whatever_kernel_runs(monkeypatch, pinned, kernel_size, stride):
    """Every eval conv returns NCHW-contiguous output for NCHW input (oneDNN's fused
    convolution returned its channels_last result for k x k stride-2 convs)."""
    monkeypatch.setattr(conv_choice, "_PINNED_3X3", pinned)
    monkeypatch.setattr(conv_choice, "_PINNED_1X1", "gemm" if pinned == "winograd" else "onednn")
    ref = reference.ConvBNAct(8, 8, kernel_size, stride=stride, act="leaky_relu").eval()
    fused = csp_kernels.ConvBNAct(8, 8, kernel_size, stride=stride, act="leaky_relu").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 15, 15)
    with torch.no_grad():
        y, expected = fused(x), ref(x)
    assert y.is_contiguous() and y.stride() == expected.stride()
    assert_matches_reference(y, expected.double())


@pytest.mark.parametrize("act", ["leaky_relu", "silu", "identity", "mish"])  # mish: no oneDNN post-op
def test_onednn_eval_writes_a_buffer_slot_as_it_returns_a_tensor(monkeypatch, act):
    """oneDNN's prepacked eval conv into `out` (a channel slot of a buffer, as the stages give)
    writes the bits it returns without `out`, leaves the buffer's other channels alone and
    matches the reference."""
    monkeypatch.setattr(routing, "onednn_eval_chosen", lambda *args: True)
    monkeypatch.setattr(routing, "gemm_over_batch_chosen", lambda *args: False)
    ref = reference.ConvBNAct(6, 5, 3, stride=2, act=act).eval()
    with torch.no_grad():
        ref.bn.running_mean.uniform_(-1, 1), ref.bn.running_var.uniform_(0.5, 2), ref.bn.weight.uniform_(0.5, 2)
    fused = csp_kernels.ConvBNAct(6, 5, 3, stride=2, act=act).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 9, 11)
    assert routing.eval_conv_kernel(x, fused.conv.weight, [2, 2], [1, 1], [1, 1], 1, "aten") == "onednn"
    buf = torch.full((2, 9, 5, 6), 7.0)
    with torch.no_grad():
        y, expected = fused(x), ref.double()(x.double())
        written = fused(x, out=buf[:, 2:7])
    assert written.data_ptr() == buf[:, 2:7].data_ptr()
    assert torch.equal(buf[:, 2:7], y)
    assert (buf[:, :2] == 7).all() and (buf[:, 7:] == 7).all()
    assert_matches_reference(y, expected)


def test_threads_measuring_one_key_get_one_verdict(monkeypatch):
    """Two threads measure one key at once and their timings disagree: both calls return the
    verdict stored first (a caller that prepared a weight for one kernel must not then run
    another's)."""
    monkeypatch.setattr(conv_choice, "_verdicts", {})
    both_measuring = threading.Barrier(2)
    results = []

    def call(measured: bool):
        def measure(*_):
            both_measuring.wait()
            return measured
        results.append(conv_choice._verdict(("test", (2, 3, 4, 4)), False, measure))

    threads = [threading.Thread(target=call, args=(value,)) for value in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] == conv_choice.measured_verdicts()[("test", (2, 3, 4, 4))]


def test_empty_inputs_are_not_timed(monkeypatch):
    """Nothing to time on an empty input: ATen's kernels, which take empty tensors, without a
    measurement."""
    monkeypatch.setattr(conv_choice, "_PINNED_1X1", "")
    monkeypatch.setattr(conv_choice, "_verdicts", {})
    assert not conv_choice.gemm_chosen((0, 8, 5, 5), (6, 8, 1, 1), True)
    assert conv_choice.measured_verdicts() == {}


@pytest.mark.parametrize("pinned", ["winograd", "onednn"])
@pytest.mark.parametrize("train", [True, False])
def test_dense_block_matches_the_reference_either_way(monkeypatch, pinned, train):
    """The dense layers' conv2 forward runs by the 3x3 choice (Winograd straight into the
    concat buffer, with the weight transformed per call in training and cached in eval, or ATen
    and a copy): the same block either way."""
    monkeypatch.setattr(conv_choice, "_PINNED_3X3", pinned)
    calls = []  # Winograd calls writing into the buffer (the backward's input gradients return theirs)
    real = conv_ops.conv3x3_winograd
    monkeypatch.setattr(conv_ops, "conv3x3_winograd",
                        lambda *args, **kwargs: calls.append("out" in kwargs) or real(*args, **kwargs))
    kwargs = dict(in_channels=8, num_layers=2, growth_rate=4, part_ratio=0.5, fusion="csp")
    ref, fused = reference.PartialDenseBlock(**kwargs).double(), csp_kernels.PartialDenseBlock(**kwargs)
    fused.load_state_dict(ref.state_dict())
    ref.train(train), fused.train(train)
    x = torch.randn(2, 8, 9, 7)
    x_ref, x_fused = x.double().requires_grad_(train), x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        y_ref, y_fused = ref(x_ref), fused(x_fused)
    assert_matches_reference(y_fused, y_ref)
    if train:
        grad = torch.randn_like(y_ref)
        y_ref.backward(grad)
        y_fused.backward(grad.float())
        assert_matches_reference(x_fused.grad, x_ref.grad, name="input gradient")
    assert calls.count(True) == (kwargs["num_layers"] if pinned == "winograd" and winograd_usable(x) else 0)


@pytest.mark.parametrize("kernel", ["onednn", "winograd", "aten"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "leaky_relu 0", "leaky_relu -0", "silu", "mish", "hardswish",
                                 "identity"])
def test_eval_keeps_nan_and_inf_whatever_kernel_runs(monkeypatch, kernel, act):
    """NaN and inf in x reach the eval output where the reference's, whichever kernel runs the
    conv (oneDNN's relu post-op turned NaN into 0: relu runs as a pass after oneDNN's conv)."""
    monkeypatch.setattr(routing, "onednn_eval_chosen", lambda *args: kernel == "onednn")
    monkeypatch.setattr(conv_choice, "_PINNED_3X3", "winograd" if kernel == "winograd" else "onednn")
    act, _, slope = act.partition(" ")  # "leaky_relu 0": oneDNN's leaky_relu post-op with slope 0 is its relu
    slope = float(slope) if slope else 0.01
    ref = reference.ConvBNAct(8, 8, 3, groups=2 if kernel == "onednn" else 1, act=act, negative_slope=slope).eval()
    fused = csp_kernels.ConvBNAct(8, 8, 3, groups=2 if kernel == "onednn" else 1, act=act,
                                  negative_slope=slope).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 10, 10)
    x[0, 1, 3, 4], x[1, 5, 6, 2], x[1, 0, 0, 0] = float("nan"), float("inf"), -float("inf")
    if kernel == "winograd" and not winograd_usable(x):
        pytest.skip("needs an AVX-512 CPU")
    assert routing.eval_conv_kernel(x, fused.conv.weight, [1, 1], [1, 1], [1, 1], fused.conv.groups, "aten") == kernel
    with torch.no_grad():
        y, expected = fused(x), ref.double()(x.double())
    assert y.isnan().any()
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert torch.equal(y[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()].float())
    assert_matches_reference(y[finite], expected[finite])


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "mish", "hardswish", "identity"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel slice"])
def test_eval_1x1_over_the_batch_matches_the_reference(monkeypatch, act, layout):
    """A 1x1 on a map smaller than one GEMM panel as one GEMM over the batch's pixels: the
    reference's output (NaN and inf where it has them) in its memory format, also into a
    buffer's slot."""
    monkeypatch.setattr(routing, "gemm_over_batch_chosen", lambda *args: True)
    ref = randomize_(reference.ConvBNAct(12, 5, 1, act=act)).eval()
    fused = csp_kernels.ConvBNAct(12, 5, 1, act=act).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 12 if layout != "channel slice" else 20, 2, 3)
    x = x[:, 4:16] if layout == "channel slice" else x
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    x[0, 1, 1, 2], x[2, 7, 0, 0] = float("nan"), float("inf")
    assert routing.eval_conv_kernel(x, fused.conv.weight, [1, 1], [0, 0], [1, 1], 1, "aten") == "gemm over the batch"
    buf = torch.full((3, 9, 2, 3), 7.0)
    with torch.no_grad():
        y, expected = fused(x), ref.double()(x.double())
        written = fused(x, out=buf[:, 2:7])
    assert y.stride() == expected.stride() and written.data_ptr() == buf[:, 2:7].data_ptr()
    assert torch.equal(buf[:, 2:7].nan_to_num(), y.nan_to_num()) and (buf[:, :2] == 7).all() and (buf[:, 7:] == 7).all()
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert_matches_reference(y[finite], expected[finite])


@pytest.mark.parametrize("kernel_size, stride, padding, dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1),
                                                                   (3, 1, 2, 2), (1, 2, 0, 1)])
def test_eval_conv_over_the_batch_matches_the_reference(monkeypatch, kernel_size, stride, padding, dilation):
    """k x k convs (strided, dilated) on small maps as one GEMM over the batch's patches."""
    monkeypatch.setattr(routing, "gemm_over_batch_chosen", lambda *args: True)
    ref = randomize_(reference.ConvBNAct(6, 5, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                         act="silu")).eval()
    fused = csp_kernels.ConvBNAct(6, 5, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                  act="silu").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 5, 7)
    x[1, 2, 2, 3] = float("nan")
    args = [stride] * 2, [padding] * 2, [dilation] * 2, 1
    assert routing.eval_conv_kernel(x, fused.conv.weight, *args, "aten") == "gemm over the batch"
    with torch.no_grad():
        y, expected = fused(x), ref.double()(x.double())
    assert y.shape == expected.shape and y.is_contiguous()
    assert torch.equal(y.isnan(), expected.isnan())
    assert_matches_reference(y.nan_to_num(), expected.nan_to_num())


def test_the_gemm_over_the_batch_is_for_outputs_below_a_panel_without_groups(monkeypatch):
    monkeypatch.setattr(routing, "gemm_over_batch_chosen", lambda *args: True)
    weight = torch.randn(8, 4, 1, 1)
    kernel = routing.eval_conv_kernel
    assert kernel(torch.randn(2, 4, 7, 9), weight, [1, 1], [0, 0], [1, 1], 1, "aten") == "gemm over the batch"
    assert kernel(torch.randn(2, 4, 8, 8), weight, [1, 1], [0, 0], [1, 1], 1, "aten") != "gemm over the batch"
    assert kernel(torch.randn(2, 4, 16, 16), weight, [2, 2], [0, 0], [1, 1], 1, "aten") != "gemm over the batch"
    assert kernel(torch.randn(2, 4, 14, 13), weight, [2, 2], [0, 0], [1, 1], 1, "aten") == "gemm over the batch"
    assert kernel(torch.randn(2, 4, 3, 3), torch.randn(8, 2, 3, 3), [1, 1], [1, 1], [1, 1], 2, "aten") != \
        "gemm over the batch"


def test_measuring_never_sets_the_global_random_generator(measuring, monkeypatch):
    """The timing data comes from a generator of its own: the global one is never drawn from nor
    set. (Restoring its state after the timing, as torch.random.fork_rng does, rewound the draws
    that other threads made meanwhile: a data-loading thread got repeated random numbers.)"""
    sets = []
    monkeypatch.setattr(torch, "set_rng_state", lambda state: sets.append(state))
    fused = csp_kernels.ConvBNAct(8, 8, 3).eval()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with torch.no_grad():
        for side in (5, 9, 30):
            fused(torch.zeros(1, 8, side, side + 1))
    assert conv_choice.measured_verdicts(), "nothing was measured"
    assert not sets and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("train", [True, False])
def test_measuring_leaves_the_global_random_generator_alone(measuring, train):
    """A first call per shape times kernels on random data; the global generator's state after
    it is what the reference's call leaves (dropout after a ConvBNAct drew other masks)."""
    fused = csp_kernels.ConvBNAct(16, 16, 3, act="silu").train(train)
    for shape in [(2, 16, 5, 5), (2, 16, 30, 30)]:  # small maps (the GEMM over the batch) and large
        x = torch.randn(shape)
        torch.manual_seed(123)
        with torch.set_grad_enabled(train):
            y = fused(x.requires_grad_(train))
            if train:
                y.sum().backward()
        after = torch.get_rng_state()
        torch.manual_seed(123)
        assert torch.equal(after, torch.get_rng_state())
    assert conv_choice.measured_verdicts(), "nothing was measured"
