"""The fused CSP stages (csp_kernels/nn/stages.py) against their reference twins
(csp_kernels/reference/yolo_stages.py, timm_stages.py): outputs, input and parameter gradients
and running statistics in training, in eval with grad mode on and under no_grad, in float64
(1e-10) and in float32 (within 2.5x the float32 reference's error); upstream weights loaded
into the fused stages; the one-buffer forward (no torch.cat), writes into a caller's slot, and
the fallbacks."""
import pytest
import torch
from timm.models import cspnet
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from ultralytics.nn.modules import block as yolo_block

import csp_kernels
from csp_kernels import reference
from csp_kernels.profiling import SavedTensorsMeter
from helpers import fused_backends, randomize_, rel_error
from test_reference_stages import TIMM_STAGES, build_stage

TOL64 = 1e-10

# (class name, positional arguments, keyword arguments): test_reference_stages' configurations,
# fewer of the C2f / C3 / C3k2 grid.
YOLO_CASES = {
    "bottleneck": ("Bottleneck", (16, 16, True, 1, (3, 3), 0.5), {}),
    "bottleneck-groups": ("Bottleneck", (16, 16, False, 2, ((1, 1), (3, 3)), 1.0), {}),
    "bottleneck-widen": ("Bottleneck", (16, 32, True, 1, (3, 3), 0.5), {}),
    "c2f": ("C2f", (16, 32, 2, True, 1, 0.5), {}),
    "c2f-groups": ("C2f", (16, 32, 1, False, 2, 0.5), {}),
    "c3": ("C3", (16, 32, 2, True, 2, 0.5), {}),
    "c3-plain": ("C3", (16, 32, 1, False, 1, 0.5), {}),
    "c3k": ("C3k", (16, 32, 1, True, 1, 0.5, 3), {}),
    "c3k-groups": ("C3k", (16, 32, 2, False, 2, 0.5, 3), {}),
    "c3k-5x5": ("C3k", (16, 32, 2, True, 1, 0.5, 5), {}),
    "c3k2": ("C3k2", (16, 32, 2, False, 0.5, False, 1, True), {}),
    "c3k2-c3k": ("C3k2", (16, 32, 2, True, 0.5, False, 1, True), {}),
    "c3k2-groups": ("C3k2", (16, 32, 1, True, 0.5, False, 2, False), {}),
    "c3k2-plain": ("C3k2", (16, 32, 1, False, 0.5, False, 2, False), {"act": "leaky_relu"}),
}
TIMM_BLOCK_CASES = {
    f"{name}-{act}-{dilation}-{groups}": (name, (32, 32), dict(dilation=dilation, bottle_ratio=ratio, groups=groups,
                                                                act_layer=act))
    for name in ("BottleneckBlock", "DarkBlock")
    for (dilation, ratio, groups), act in zip([(1, 0.25, 1), (2, 0.5, 4), (1, 1.0, 8)], ["leaky_relu", "mish", "relu"])
}


def timm_stage_case(config: str):
    stage, block, kwargs = TIMM_STAGES[config]
    return stage, (), {**kwargs, "block_fn": getattr(reference, block), "act_layer": "leaky_relu"}


CASES = {**YOLO_CASES, **TIMM_BLOCK_CASES, **{f"timm-{c}": timm_stage_case(c) for c in TIMM_STAGES}}


def make_pair(case: str, dtype=torch.float64):
    """(randomized float64 reference, fused twin in `dtype` with its state, input channels)."""
    name, args, kwargs = CASES[case]
    ref = randomize_(getattr(reference, name)(*args, **kwargs)).double()
    fused = getattr(csp_kernels, name)(*args, **kwargs).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused, args[0] if args else kwargs["in_chs"]


def run(module: nn.Module, x: torch.Tensor, backend: str = "auto") -> list[torch.Tensor]:
    """[output, x's gradient, every parameter's gradient, every state_dict entry] of one call, x
    cast to the module's dtype; the gradients (of a seeded random output gradient) only while
    autograd records."""
    recording = torch.is_grad_enabled()
    x = x.detach().to(next(module.parameters()).dtype).requires_grad_(recording)
    with csp_kernels.use_backend(backend):
        y = module(x)
    if not recording:
        return [y, *module.state_dict().values()]
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(grad.to(y.dtype))
    result = [y, x.grad, *(p.grad for p in module.parameters()), *module.state_dict().values()]
    module.zero_grad()
    return result


def modes():
    """(name, training, whether autograd records) of the three ways a stage runs."""
    return [("train", True, True), ("eval", False, True), ("eval no_grad", False, False)]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float64(case):
    ref, fused, in_channels = make_pair(case)
    for mode, training, recording in modes():
        ref.train(training), fused.train(training)
        x = torch.randn(2, in_channels, 8, 8, dtype=torch.float64)
        with torch.set_grad_enabled(recording):
            expected, got = run(ref, x, "reference"), run(fused, x)
        assert len(got) == len(expected)
        for index, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape and rel_error(g, e) <= TOL64, f"{mode}: tensor {index}: {rel_error(g, e):.3g}"


@pytest.mark.parametrize("cv1_channels", [20, 21])
def test_c2f_takes_its_widths_from_cv1(cv1_channels):
    """ultralytics' C2f splits cv1's output by chunk(2, 1) and never reads self.c in its
    forward: a stage edited (pruned) without updating c, or with an odd cv1, computes as the
    reference does (the fused stage read c and raised about an `out` the caller never gave)."""
    half = cv1_channels // 2
    pair = []
    for namespace in (reference, csp_kernels):
        stage = namespace.C2f(16, 32, 2, True)
        stage.cv1 = namespace.ConvBNAct(16, cv1_channels, 1, act="silu")
        stage.m = nn.ModuleList(namespace.Bottleneck(half, half, True) for _ in range(2))
        stage.cv2 = namespace.ConvBNAct(cv1_channels + 2 * half, 32, 1, act="silu")
        stage.c = 999
        pair.append(stage.double())
    ref, fused = pair
    randomize_(ref)
    fused.load_state_dict(ref.state_dict())
    for mode, training, recording in modes():
        ref.train(training), fused.train(training)
        x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
        with torch.set_grad_enabled(recording):
            expected, got = run(ref, x, "reference"), run(fused, x)
        for index, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape and rel_error(g, e) <= TOL64, f"{mode}: tensor {index}: {rel_error(g, e):.3g}"


@pytest.mark.parametrize("case", ["bottleneck", "c2f", "c3", "c3k2-c3k", "c3k2-plain", "DarkBlock-mish-2-4",
                                  "BottleneckBlock-leaky_relu-1-1", "timm-darknet", "timm-resnext", "timm-cs3",
                                  "timm-cs3-dilated", "timm-dark"])
def test_float32_within_plain_error(case):
    """float32 on the default backend against the reference run in float32, both against the
    float64 reference: every tensor within 2.5x the float32 reference's error (the rule of
    test_properties: Winograd rounds on both sides of its GEMMs) plus 1e-5 (cancelling sums)."""
    ref64, fused, in_channels = make_pair(case, torch.float32)
    name, args, kwargs = CASES[case]
    ref32 = getattr(reference, name)(*args, **kwargs).float()
    ref32.load_state_dict(ref64.state_dict())
    for mode, training, recording in modes():
        for module in (ref64, ref32, fused):
            module.train(training)
        x = torch.randn(2, in_channels, 8, 8, dtype=torch.float64)
        with torch.set_grad_enabled(recording):
            exact, plain = run(ref64, x, "reference"), run(ref32, x, "reference")
            got = run(fused, x)
        for index, (e, p, g) in enumerate(zip(exact, plain, got)):
            err, plain_err = rel_error(g, e), rel_error(p, e)
            assert err <= 2.5 * plain_err + 1e-5, f"{mode}: tensor {index}: {err:.3g} vs plain {plain_err:.3g}"


@pytest.mark.parametrize("case", ["c2f", "c3k2-c3k", "timm-darknet", "timm-cs3"])
def test_other_fused_backends(case):
    """The Triton backend (interpreted on a CPU) where it runs: the stages only route buffers."""
    backends = [b for b in fused_backends("cpu") if b != "cpu"]
    if not backends:
        pytest.skip("no fused backend other than 'cpu' here")
    ref, fused, in_channels = make_pair(case)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(1, in_channels, 4, 4, dtype=torch.float64)
    expected = run(ref.train(), x, "reference")
    for name in backends:
        fused.load_state_dict(before)
        for index, (g, e) in enumerate(zip(run(fused, x, name), expected)):
            assert rel_error(g, e) <= TOL64, f"{name}: tensor {index}"


@pytest.mark.parametrize("case", CASES)
def test_builds_fused_submodules_with_the_reference_state(case):
    name, args, kwargs = CASES[case]
    torch.manual_seed(3)
    ref = getattr(reference, name)(*args, **kwargs)
    torch.manual_seed(3)
    fused = getattr(csp_kernels, name)(*args, **kwargs)
    assert isinstance(fused, type(ref))
    ref_state, fused_state = ref.state_dict(), fused.state_dict()
    assert list(fused_state) == list(ref_state)
    assert all(torch.equal(fused_state[k], v) for k, v in ref_state.items()), "seeded weights differ"
    for module_name, module in fused.named_modules():
        reference_class = getattr(reference, type(module).__name__, None)
        if isinstance(module, reference.ConvBNAct) or module is not fused and reference_class is not None:
            assert type(module) is getattr(csp_kernels, type(module).__name__), module_name


def assert_upstream_weights_give_the_same_numbers(upstream: nn.Module, fused: nn.Module, in_channels: int):
    """upstream's (randomized) state_dict loads strictly into `fused`, which then computes the
    same outputs, gradients and state in every mode."""
    upstream = randomize_(upstream).double()
    fused = fused.double()
    fused.load_state_dict(upstream.state_dict(), strict=True)
    for _, training, recording in modes():
        upstream.train(training), fused.train(training)
        x = torch.randn(2, in_channels, 8, 8, dtype=torch.float64)
        with torch.set_grad_enabled(recording):
            for index, (g, e) in enumerate(zip(run(fused, x), run(upstream, x))):
                assert rel_error(g, e) <= TOL64, f"tensor {index}"


def test_yolo_upstream_weights_load():
    """ultralytics' C3k2 with C3k blocks (yolo11's deep stages) -> the fused twin: same numbers."""
    args = (16, 32, 2, True, 0.5, False, 1, True)
    assert_upstream_weights_give_the_same_numbers(yolo_block.C3k2(*args), csp_kernels.C3k2(*args), 16)


def test_timm_upstream_weights_load():
    """timm's cspdarknet53-style CrossStage -> the fused twin: same numbers."""
    stage, block, kwargs = TIMM_STAGES["darknet"]
    assert_upstream_weights_give_the_same_numbers(build_stage(cspnet, stage, block, kwargs, "leaky_relu"),
                                                  build_stage(csp_kernels, stage, block, kwargs, "leaky_relu"), 16)


class OpCalls(TorchDispatchMode):
    """Counts the ops that run inside it by name ("aten.cat"; a custom op once, not its insides),
    and apart the copies of activations ("activation copies": copy_ and clone of 4-D tensors)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in ("aten.copy_", "aten.clone") and result.dim() == 4:
            name = "activation copies"
        self.calls[name] = self.calls.get(name, 0) + 1
        return result


def op_calls(module: nn.Module, x: torch.Tensor, backend: str = "auto") -> dict[str, int]:
    """OpCalls.calls of one training forward of `module`."""
    with OpCalls() as log, csp_kernels.use_backend(backend):
        module(x.requires_grad_())
    return log.calls


@pytest.mark.parametrize("case", ["c2f", "c3k2-c3k", "c3", "timm-darknet", "timm-cs3"])
def test_forward_runs_no_concat(case):
    """One buffer, written in place: no cat, and no copy in C2f / C3k2 / C3 (the cross stages
    copy the half their blocks read, see stages.py); the reference forward does concatenate."""
    ref, fused, in_channels = make_pair(case)
    x = torch.randn(2, in_channels, 8, 8, dtype=torch.float64)
    assert op_calls(ref, x, "reference").get("aten.cat", 0) > 0
    calls = op_calls(fused, x)
    assert calls.get("aten.cat", 0) == 0, calls
    assert calls.get("activation copies", 0) == (1 if case.startswith("timm") else 0), calls


@pytest.mark.parametrize("case", ["timm-darknet", "timm-cs3"])
def test_backward_concatenates_the_halves_gradients(case):
    """The cross stages split conv_exp's output in two: backward concatenates the halves'
    gradients (one aten.cat) rather than zero-filling, copying and adding a slice gradient each."""
    _, fused, in_channels = make_pair(case)
    y = fused(torch.randn(2, in_channels, 8, 8, dtype=torch.float64, requires_grad=True))
    with OpCalls() as log:
        y.sum().backward()
    assert log.calls.get("aten.slice_backward", 0) == 0 and log.calls.get("aten.cat", 0) == 1, log.calls


@pytest.mark.parametrize("case", ["bottleneck", "c2f", "c3k2-c3k", "c3", "DarkBlock-relu-1-8",
                                  "BottleneckBlock-mish-2-4", "BottleneckBlock-leaky_relu-1-1",
                                  "BottleneckBlock-relu-1-8", "timm-darknet", "timm-cs3", "timm-dark"])
def test_out_writes_into_a_slot_of_a_callers_buffer(case):
    ref, fused, in_channels = make_pair(case)
    x = torch.randn(2, in_channels, 8, 8, dtype=torch.float64)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)
    n, c, h, w = y_ref.shape
    buf = torch.full((n, c + 3, h, w), 7.0, dtype=torch.float64)
    y = fused(x_fused, out=buf[:, 1:1 + c])
    assert y.data_ptr() == buf[:, 1:].data_ptr(), "out= must return the slot itself"
    assert rel_error(buf[:, 1:1 + c], y_ref) <= TOL64
    assert torch.all(buf[:, :1] == 7.0) and torch.all(buf[:, 1 + c:] == 7.0), "out= wrote outside its slot"
    weight = torch.randn_like(buf)
    (buf * weight).sum().backward()
    (y_ref * weight[:, 1:1 + c]).sum().backward()
    assert rel_error(x_fused.grad, x_ref.grad) <= TOL64
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert rel_error(p.grad, q.grad) <= TOL64, name


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_bottleneck_blocks_save_their_conv_outputs_and_output_only(act):
    """In a chain of BottleneckBlocks, act3 runs in place on the residual sum: backward keeps
    per block its three conv outputs (channels/4, /4, 1) and its output, which the next block's
    conv1 reads (one storage), plus the chain's input; not the sum besides."""
    channels, size = 32, 8
    fused = nn.Sequential(*(csp_kernels.BottleneckBlock(channels, channels, act_layer=act) for _ in range(2)))
    x = torch.randn(2, channels, size, size, requires_grad=True)
    with SavedTensorsMeter() as meter:
        y = fused(x)
    unit = x.numel() * x.element_size()  # one (2, channels, 8, 8) float32 tensor
    per_channel_stats = 2 * 3 * 4 * 2 * channels  # mean and var of three BatchNorms per block, at most
    assert meter.bytes_excluding([*fused.parameters(), *fused.buffers()]) <= unit * (1 + 2 * 2.5) + per_channel_stats
    y.sum().backward()  # the in-place activation's saved output is intact
    ref = nn.Sequential(*(reference.BottleneckBlock(channels, channels, act_layer=act) for _ in range(2)))
    ref.load_state_dict(fused.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).sum().backward()
    assert rel_error(x.grad, x_ref.grad) <= 1e-5


@pytest.mark.parametrize("case", ["bottleneck", "DarkBlock-relu-1-8", "BottleneckBlock-mish-2-4"])
def test_out_overlapping_x(case):
    """out over x itself (in place, without autograd): the residual reads x after out is
    written, so the block computes aside and copies."""
    ref, fused, in_channels = make_pair(case)
    ref.eval(), fused.eval()
    x = torch.randn(2, in_channels, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
        assert fused(x, out=x) is x
    assert rel_error(x, expected) <= TOL64


def test_a_swapped_activation_falls_back_in_its_conv_only():
    ref, fused, _ = make_pair("c2f")
    for module in (ref, fused):
        module.m[0].cv1.act = nn.GELU()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="csp_kernels.ConvBNAct .*GELU"):
        got = run(fused, x)
    for index, (g, e) in enumerate(zip(got, run(ref, x, "reference"))):
        assert rel_error(g, e) <= TOL64, f"tensor {index}"
    with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="csp_kernels.ConvBNAct .*GELU"):
        assert op_calls(fused, x).get("aten.cat", 0) == 0, "the stage itself must stay buffered"


def _scale_output(module, args, output):
    return output * 2.0


def _scale_input_grad(module, grad_input, grad_output):
    return tuple(None if g is None else g * 2.0 for g in grad_input)


def _scale_forward_on_the_instance(module):
    """module.forward replaced on the instance by one that doubles its output (and takes
    forward(x) alone, as a user's wrapper may)."""
    forward = module.forward
    module.forward = lambda x: forward(x) * 2.0


@pytest.mark.parametrize("case, swap, message", [
    ("c2f", lambda m: m.m.__setitem__(0, reference.Bottleneck(16, 16, True, 1, (3, 3), 1.0).double()),
     "m.0 is Bottleneck"),
    ("c2f", lambda m: m.cv1.register_forward_hook(_scale_output), "a forward hook on cv1"),
    ("c2f", lambda m: m.m[1].cv2.register_forward_hook(_scale_output), "a forward hook on cv2"),
    ("c2f", lambda m: m.m[1].cv2.register_full_backward_hook(_scale_input_grad), "a backward hook on cv2"),
    ("c2f", lambda m: m.cv2.bn.register_full_backward_hook(_scale_input_grad), "a backward hook on bn"),
    ("c2f", lambda m: _scale_forward_on_the_instance(m.cv1), "cv1's forward is replaced on the instance"),
    ("c2f", lambda m: _scale_forward_on_the_instance(m.m[0].cv1.bn), "bn's forward is replaced on the instance"),
    # the Sequentials of blocks that the buffered forward runs block by block
    ("c3", lambda m: m.m.register_forward_hook(_scale_output), "a forward hook on m "),
    ("timm-cs3", lambda m: m.blocks.register_forward_hook(_scale_output), "a forward hook on blocks "),
    ("timm-dark", lambda m: m.blocks.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0,)),
     "a forward hook on blocks "),
    ("timm-dark", lambda m: _scale_forward_on_the_instance(m.blocks), "blocks's forward is replaced on the instance"),
])
@pytest.mark.parametrize("training", [True, False])
def test_what_the_buffer_cannot_model_runs_the_reference_forward(case, swap, message, training):
    ref, fused, channels = make_pair(case)
    swap(ref)
    swap(fused)
    fused.load_state_dict(ref.state_dict())
    ref.train(training), fused.train(training)
    x = torch.randn(2, channels, 24, 24, dtype=torch.float64)  # over the small-map routes
    with torch.set_grad_enabled(training):
        with pytest.warns(csp_kernels.ReferenceFallbackWarning, match=message):
            got = run(fused, x)
        expected = run(ref, x, "reference")
    for index, (g, e) in enumerate(zip(got, expected)):
        assert rel_error(g, e) <= TOL64, f"tensor {index}"


def test_reference_backend_runs_the_reference_forward_silently():
    ref, fused, _ = make_pair("timm-darknet")
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    calls = op_calls(fused, x, "reference")
    assert calls.get("aten.cat", 0) == 1 and not any("csp_kernels" in op for op in calls), calls


def test_autocast_runs_the_reference_forward():
    ref, fused, _ = make_pair("c2f", torch.float32)
    ref.float()
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        with csp_kernels.use_backend("reference"):
            expected = ref(x)
        with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="autocast"):
            got = fused(x)
    assert got.dtype == expected.dtype and rel_error(got, expected) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_dilated_conv_bn_act(dtype, training):
    """The fused ConvBNAct takes `dilation` last, as the reference does (timm's dilated stages)."""
    ref = randomize_(reference.ConvBNAct(6, 8, 3, 1, None, 2, "leaky_relu", 0.01, 2)).double()
    fused = csp_kernels.ConvBNAct(6, 8, 3, 1, None, 2, "leaky_relu", 0.01, 2).to(dtype)
    fused.load_state_dict(ref.state_dict())
    assert fused.conv.dilation == (2, 2) and fused.conv.padding == (2, 2)
    ref.train(training), fused.train(training)
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    tol = TOL64 if dtype == torch.float64 else 1e-5
    for index, (g, e) in enumerate(zip(run(fused, x), run(ref, x, "reference"))):
        assert rel_error(g, e) <= tol, f"tensor {index}: {rel_error(g, e):.3g}"


def test_block_fn_takes_reference_and_fused_blocks():
    kwargs = dict(in_chs=16, out_chs=32, stride=2, dilation=1, depth=1, block_ratio=0.5, down_growth=True)
    for block_fn in (reference.DarkBlock, csp_kernels.DarkBlock):
        stage = csp_kernels.CrossStage(**kwargs, block_fn=block_fn)
        assert type(stage.blocks[0]) is csp_kernels.DarkBlock
    stage = csp_kernels.DarkStage(16, 32, stride=2, dilation=1, depth=1)
    assert type(stage.blocks[0]) is csp_kernels.BottleneckBlock


@pytest.mark.parametrize("build, error, message", [
    (lambda: csp_kernels.C3k2(16, 32, 1, attn=True), ValueError, "attn=True"),
    (lambda: csp_kernels.Bottleneck(16, 16, k=3), ValueError, "k must be a pair"),
    (lambda: csp_kernels.C2f(16, 1, e=0.5), ValueError, "0 hidden channels"),
    (lambda: csp_kernels.C3(16, 32, n=0), ValueError, "n must be"),
    (lambda: csp_kernels.CrossStage(16, 32, 2, 1, 1, block_fn=cspnet.BottleneckBlock), ValueError,
     "block_fn must be one of csp_kernels.BottleneckBlock, csp_kernels.DarkBlock, "
     "csp_kernels.reference.BottleneckBlock, csp_kernels.reference.DarkBlock; got <class 'timm"),
    (lambda: reference.CrossStage(16, 32, 2, 1, 1, block_fn=csp_kernels.DarkBlock), ValueError,
     "block_fn must be one of csp_kernels.reference.BottleneckBlock, csp_kernels.reference.DarkBlock; got "
     "<class 'csp_kernels"),
    (lambda: csp_kernels.DarkBlock(32, 16), ValueError, r"in_chs \(32\) must equal out_chs \(16\)"),
    (lambda: csp_kernels.BottleneckBlock(32, 32, act_layer="gelu"), ValueError, "act_layer must be one of"),
    (lambda: csp_kernels.C2f(16, 32, n="2"), TypeError, "n must be"),
    (lambda: csp_kernels.C2f(16, 32, e=float("inf")), ValueError, "e must be a positive finite float"),
    (lambda: csp_kernels.C3(16, 32, e="0.5"), TypeError, "e must be a positive float"),
    (lambda: csp_kernels.CrossStage(16, 32, 2, 1, 1, block_ratio=float("nan")), ValueError,
     "block_ratio must be a positive finite float"),
    (lambda: csp_kernels.CrossStage(16, 32, 2, 1, 1, expand_ratio=None), TypeError, "expand_ratio must be"),
    (lambda: csp_kernels.DarkStage(16, 32, 2, 1, 1, bottle_ratio=True), TypeError, "bottle_ratio must be"),
    (lambda: csp_kernels.CrossStage3(16, 32, True, 1, 1), TypeError, "stride must be a positive int; got bool"),
    (lambda: csp_kernels.CrossStage(16, 32, "2", 1, 1), TypeError, "stride must be a positive int"),
    (lambda: csp_kernels.DarkStage(16, 32, 2, 1, 1, first_dilation="x"), TypeError, "first_dilation must be"),
    (lambda: csp_kernels.CrossStage(16, 32, 2, 1, 1, block_dpr=0.0), TypeError, "block_dpr must be None or a list"),
])
def test_bad_arguments_raise_as_the_reference(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize("case", CASES)
def test_empty_batch_in_training_is_what_the_reference_makes_of_it(case):
    ref, fused, channels = make_pair(case)
    x = torch.randn(0, channels, 8, 8, dtype=torch.float64)
    got, expected = run(fused, x), run(ref, x, "reference")
    assert got[0].shape == expected[0].shape
    for index, (g, e) in enumerate(zip(got, expected)):
        assert g is None and e is None or torch.equal(g, e), f"tensor {index}"
