"""Property tests with hostile inputs and module states, against the reference with the same
state_dict on every fused backend of the CPU (float64 unless said): NaN/inf inputs, expanded,
transposed and sliced input layouts, frozen BatchNorms and momentum=None, parameters and
buffers edited between eval calls, and float16/bfloat16 against the 2x rule; the CSP stages and
blocks (test_stages' configurations) under NaN/inf inputs and the same layouts. Derandomized, so
that CI draws the same examples on every run."""
import contextlib
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csp_kernels
from csp_kernels import checks, reference
from helpers import assert_matches_reference, batch_norm_gain, fused_backends, zero_gradient_floor
from test_properties import TOL, randomized

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
BACKENDS = fused_backends("cpu")


def assert_same_values(a: torch.Tensor, b: torch.Tensor, name: str, floor: float = 0.0) -> None:
    """a equals b: NaN and +-inf at the same positions, where both are finite within TOL of
    b's norm or of `floor` if larger (a NaN spreads over a whole BatchNorm channel, so the
    masks are compared, then the rest)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, name
    assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at other positions"
    assert torch.equal(a == float("inf"), b == float("inf")), f"{name}: +inf at other positions"
    assert torch.equal(a == float("-inf"), b == float("-inf")), f"{name}: -inf at other positions"
    finite = b.isfinite()
    diff, scale = (a[finite] - b[finite]).norm().item(), max(b[finite].norm().item(), floor)
    assert diff <= TOL * scale, f"{name}: error {diff:.3g} vs {scale:.3g}"


def run(module, make_input, base, backend_name, training, grad_seed):
    """(output, [input grad, parameter grads], buffers) of module(make_input(leaf)), leaf a
    fresh copy of `base`; gradients through `make_input` (a view or layout of the leaf)."""
    module.train(training)
    leaf = base.detach().clone().requires_grad_(training)
    with csp_kernels.use_backend(backend_name), torch.set_grad_enabled(training), \
            batch_norm_gain(module) if backend_name == "reference" else contextlib.nullcontext([1.0]) as gain:
        y = module(make_input(leaf))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype)
    grads = []
    if training:
        y.backward(grad_y)
        grads = [leaf.grad] + [p.grad for p in module.parameters()]
    return y, grads, [b.clone() for b in module.buffers()], grad_y, gain[0]


def assert_runs_match(got, want, gradients: bool = True) -> None:
    (y, g, b, *_), (y_ref, g_ref, b_ref, grad_y, gain) = got, want
    assert_same_values(y, y_ref, "output")
    for index, (a, r) in enumerate(zip(g, g_ref) if gradients else ()):
        assert_same_values(a, r, f"gradient {index}", floor=zero_gradient_floor(grad_y, gain))
    for index, (a, r) in enumerate(zip(b, b_ref)):
        assert_same_values(a, r, f"buffer {index}")


@st.composite
def module_cases(draw, max_batch=3):
    """A ConvBNAct or PartialDenseBlock configuration, tiny enough for the Triton interpreter."""
    training = draw(st.booleans())
    batch = draw(st.integers(2 if training else 1, max_batch))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    act = draw(st.sampled_from(checks.ACTIVATIONS))
    if draw(st.booleans()):
        groups = draw(st.sampled_from([1, 1, 2]))
        cin = groups * draw(st.integers(1, 4))
        args = (cin, groups * draw(st.integers(1, 4)), draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2])),
                None, groups, act)
        kind = "conv"
    else:
        cin = draw(st.integers(2, 8))
        args = (cin, draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, cin - 1)) / cin,
                draw(st.integers(1, 2)), draw(st.sampled_from(["last", "first", "csp"])), act)
        kind = "dense"
    return dict(kind=kind, args=args, shape=(batch, cin, height, width), training=training,
                seed=draw(st.integers(0, 2 ** 16)))


def instances(case, dtype=torch.float64):
    """(reference, fused) with one randomized state."""
    classes = {"conv": (reference.ConvBNAct, csp_kernels.ConvBNAct),
               "dense": (reference.PartialDenseBlock, csp_kernels.PartialDenseBlock)}[case["kind"]]
    ref = randomized(classes[0](*case["args"]), case["seed"])
    fused = classes[1](*case["args"]).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def base_input(case, shape=None):
    return torch.randn(shape or case["shape"], generator=torch.Generator().manual_seed(case["seed"]),
                       dtype=torch.float64)


# -- 1. NaN and inf inputs ---------------------------------------------------------------------

# NaN alone, and NaN with +-inf: a gradient is selected, not multiplied, where the activation's
# derivative is 0 (ATen's threshold_backward), so an inf upstream stays out of the BN sums.
NONFINITE = [pytest.param((float("nan"),), id="nan"),
             pytest.param((float("nan"), float("inf"), float("-inf")), id="nan-inf")]


@pytest.mark.parametrize("values", NONFINITE)
@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(case=module_cases(), data=st.data())
def test_nonfinite_inputs_match_reference(backend_name, values, case, data):
    ref, fused = instances(case)
    x = base_input(case)
    flat = x.view(-1)
    positions = data.draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=3, unique=True))
    for p in positions:
        flat[p] = data.draw(st.sampled_from(values))
    want = run(ref, lambda t: t, x, "reference", case["training"], case["seed"])
    # ATen's hardswish'(NaN) depends on the element's position: NaN in the vectorized body of its
    # loop, 1 in the scalar tail (docs/semantics.md); the kernels give NaN, so a NaN reaching a
    # hardswish leaves the reference's gradients undefined.
    gradients = case["args"][6] != "hardswish"
    assert_runs_match(run(fused, lambda t: t, x, backend_name, case["training"], case["seed"]), want, gradients)


# -- 2. expanded, transposed and sliced inputs -------------------------------------------------

def hostile_layout(kind: str, shape):
    """(shape of the leaf tensor, leaf -> input of `shape` (N, C, H, W)) for `kind`."""
    n, c, h, w = shape
    if kind == "expand_channels":
        return (n, 1, h, w), lambda t: t.expand(n, c, h, w)
    if kind == "expand_batch":
        return (1, c, h, w), lambda t: t.expand(n, c, h, w)
    if kind == "expand_planes":
        return (n, c, 1, 1), lambda t: t.expand(n, c, h, w)
    if kind == "transposed_hw":  # NCWH in memory
        return (n, c, w, h), lambda t: t.transpose(2, 3)
    if kind == "batch_inner":  # CHWN in memory
        return (c, h, w, n), lambda t: t.permute(3, 0, 1, 2)
    if kind == "step_slice":
        return (n, c, 2 * h, 3 * w), lambda t: t[:, :, ::2, 1::3]
    if kind == "channels_last":
        return (n, c, h, w), lambda t: t.contiguous(memory_format=torch.channels_last)
    if kind == "channel_slice_last":  # a channel slice of a wider channels_last buffer
        return (n, h, w, c + 3), lambda t: t.permute(0, 3, 1, 2)[:, 1: 1 + c]
    return (n, c + 3, h, w), lambda t: t[:, 2: 2 + c]


LAYOUTS = ["expand_channels", "expand_batch", "expand_planes", "transposed_hw", "batch_inner", "step_slice",
           "channels_last", "channel_slice_last", "channel_slice"]


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(case=module_cases(), kind=st.sampled_from(LAYOUTS))
def test_strided_and_expanded_inputs_match_reference(backend_name, case, kind):
    if kind == "expand_batch" and case["training"]:
        # 2+ samples, and 3+ pixels a side so that the output's BatchNorm channels are not
        # constant (a constant channel's gradients are rounding noise times 1/sqrt(eps))
        n, c, h, w = case["shape"]
        case = {**case, "shape": (max(n, 2), c, max(h, 3), max(w, 3))}
    leaf_shape, make_input = hostile_layout(kind, case["shape"])
    ref, fused = instances(case)
    x = base_input(case, leaf_shape)
    assert make_input(x).shape == case["shape"]
    want = run(ref, make_input, x, "reference", case["training"], case["seed"])
    assert_runs_match(run(fused, make_input, x, backend_name, case["training"], case["seed"]), want)


# -- 3. frozen BatchNorms and momentum=None ----------------------------------------------------

def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def fallback_reason(fused, bn_modes) -> str:
    """The ReferenceFallbackWarning text the module documents for a training call with these
    BatchNorm modes (True: training), or "" for none."""
    if isinstance(fused, csp_kernels.ConvBNAct) or all(bn_modes):
        return ""
    if any(bn_modes):
        return "BatchNorms in both train and eval mode"
    return "BatchNorms in eval mode with autograd recording"


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(case=module_cases(), data=st.data())
def test_frozen_batch_norms_and_cumulative_momentum_match_reference(backend_name, case, data):
    """Two training steps of a module whose BatchNorms are each frozen (eval) or not, each with
    momentum 0.1 or None (the cumulative average, which the second step tests)."""
    case = {**case, "training": True, "shape": (max(case["shape"][0], 2), *case["shape"][1:])}
    ref, fused = instances(case)
    count = len(batch_norms(ref))
    modes = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
    momenta = data.draw(st.lists(st.sampled_from([0.1, None]), min_size=count, max_size=count))
    reason = fallback_reason(fused, modes)

    def train_with_modes(module, backend_name, step):
        module.train()
        for bn, mode, momentum in zip(batch_norms(module), modes, momenta):
            bn.train(mode)
            bn.momentum = momentum
        leaf = base_input(case).add_(step).requires_grad_()
        with csp_kernels.use_backend(backend_name), \
                batch_norm_gain(module) if module is ref else contextlib.nullcontext([1.0]) as gain:
            y = module(leaf)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"] + step), dtype=y.dtype)
        y.backward(grad_y)
        grads = [leaf.grad] + [p.grad for p in module.parameters()]
        return y, grads, [b.clone() for b in module.buffers()], grad_y, gain[0]

    for step in range(2):
        want = train_with_modes(ref, "reference", step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = train_with_modes(fused, backend_name, step)
        messages = [str(w.message) for w in caught]
        if reason:
            assert messages and all(reason in m for m in messages), messages
            assert all(issubclass(w.category, csp_kernels.ReferenceFallbackWarning) for w in caught)
        else:
            assert not messages, messages
        assert_runs_match(got, want)
        for module in (ref, fused):
            module.zero_grad()


# -- 4. parameters and buffers edited between eval calls ----------------------------------------

EDITS = ["mul_data", "ema_lerp", "assign_data", "eps", "running_var"]


def edit(module, kind: str, index: int, seed: int) -> None:
    """One edit of the kind users make between eval calls, the same for any module with seed."""
    generator = torch.Generator().manual_seed(seed)
    params = list(module.parameters())
    p = params[index % len(params)]
    with torch.no_grad():
        if kind == "mul_data":
            p.data.mul_(-1.5)
        elif kind == "ema_lerp":  # a ModelEMA update: every parameter and buffer moved in place
            for t in [*params, *(b for b in module.buffers() if b.is_floating_point())]:
                t.data.lerp_(torch.rand(t.shape, generator=generator, dtype=t.dtype) + 0.5, 0.25)
        elif kind == "assign_data":
            p.data = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        elif kind == "eps":  # all alike: different eps in one block is a documented fallback
            for bn in batch_norms(module):
                bn.eps = 0.5
        else:
            bn = batch_norms(module)[index % len(batch_norms(module))]
            bn.running_var.data.mul_(4.0)


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(case=module_cases(), kinds=st.lists(st.sampled_from(EDITS), min_size=1, max_size=2),
       index=st.integers(0, 50))
def test_edits_between_eval_calls_match_reference(backend_name, case, kinds, index):
    case = {**case, "training": False}
    ref, fused = instances(case)
    x = base_input(case)
    for call in range(len(kinds) + 1):
        if call:
            for module in (ref, fused):
                edit(module, kinds[call - 1], index, case["seed"] + call)
        want = run(ref, lambda t: t, x, "reference", False, case["seed"])
        assert_runs_match(run(fused, lambda t: t, x, backend_name, False, case["seed"]), want)


# -- 5. float16 and bfloat16 -------------------------------------------------------------------

@SETTINGS
@given(case=module_cases(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_low_precision_within_twice_plain_error(case, dtype):
    """The CPU backend in 16-bit against the 2x rule: outputs (train and eval) and input
    gradients (train)."""
    ref64, fused = instances(case, dtype)
    plain = instances(case)[0].to(dtype)
    x = base_input(case)
    results = [run(module, lambda t, d=d: t.to(d), x, name, case["training"], case["seed"])
               for module, name, d in ((ref64, "reference", torch.float64), (plain, "reference", dtype),
                                       (fused, "cpu", dtype))]
    (y64, g64, *_), (y_plain, g_plain, *_), (y, g, *_) = results
    assert y.dtype == dtype
    assert_matches_reference(y, y64, plain=y_plain)
    if case["training"]:
        assert_matches_reference(g[0].to(dtype), g64[0], plain=g_plain[0].to(dtype), name="input gradient")


# -- 6. CSP stages: NaN/inf and hostile layouts ------------------------------------------------

@st.composite
def stage_cases(draw):
    """A CSP stage or block of test_stages' configurations, its mode and a tiny map (the fused
    buffered forward runs on maps this small: conftest pins CSP_KERNELS_CPU_SMALL_MAPS=fused)."""
    from test_stages import CASES
    training = draw(st.booleans())
    name = draw(st.sampled_from(sorted(CASES)))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return dict(name=name, training=training, seed=draw(st.integers(0, 2 ** 16)), height=height, width=width,
                batch=draw(st.integers(2 if training else 1, 3)))


def stage_instances(case):
    """(reference, fused, input shape) with one randomized float64 state."""
    from test_stages import make_pair
    torch.manual_seed(case["seed"])
    ref, fused, in_channels = make_pair(case["name"])
    return ref, fused, (case["batch"], in_channels, case["height"], case["width"])


@pytest.mark.parametrize("values", NONFINITE)
@SETTINGS
@given(case=stage_cases(), data=st.data())
def test_stage_nonfinite_inputs_match_reference(values, case, data):
    ref, fused, shape = stage_instances(case)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    flat = x.view(-1)
    for p in data.draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=3, unique=True)):
        flat[p] = data.draw(st.sampled_from(values))
    want = run(ref, lambda t: t, x, "reference", case["training"], case["seed"])
    assert_runs_match(run(fused, lambda t: t, x, "cpu", case["training"], case["seed"]), want)


@SETTINGS
@given(case=stage_cases(), kind=st.sampled_from(LAYOUTS))
def test_stage_strided_and_expanded_inputs_match_reference(case, kind):
    if kind == "expand_batch" and case["training"]:  # as for the units: BatchNorm channels not constant
        case = {**case, "height": max(case["height"], 3), "width": max(case["width"], 3)}
    ref, fused, shape = stage_instances(case)
    leaf_shape, make_input = hostile_layout(kind, shape)
    x = torch.randn(leaf_shape, generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    assert make_input(x).shape == shape
    want = run(ref, make_input, x, "reference", case["training"], case["seed"])
    assert_runs_match(run(fused, make_input, x, "cpu", case["training"], case["seed"]), want)
