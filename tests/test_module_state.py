"""Module state the fused ConvBNAct and PartialDenseBlock must honour as the reference does:
edits their eval caches cannot see by version counters, module surgery (frozen BatchNorms, an
added conv bias, replaced submodules), SyncBatchNorm, and threads sharing one module. Each case
either matches the reference or runs it with a ReferenceFallbackWarning naming the reason."""
import contextlib
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.modules.module as module_hooks
from torch import nn

import csp_kernels
from csp_kernels import reference
from helpers import DEVICES, assert_matches_reference, randomize_

TOL = 1e-10  # float64 throughout


def conv_bn_act(device):
    ref = randomize_(reference.ConvBNAct(4, 6, 3, act="leaky_relu")).to(device, torch.float64)
    fused = csp_kernels.ConvBNAct(4, 6, 3, act="leaky_relu").to(device, torch.float64)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def dense_block(device):
    ref = randomize_(reference.PartialDenseBlock(8, 2, 4, fusion="csp")).to(device, torch.float64)
    fused = csp_kernels.PartialDenseBlock(8, 2, 4, fusion="csp").to(device, torch.float64)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


MODULES = {"ConvBNAct": conv_bn_act, "PartialDenseBlock": dense_block}


def norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def run(module, x, fallback: str | None):
    """module(x), warning of the reference fallback with a message matching `fallback` if set
    (else with no such warning: conftest makes it an error)."""
    ctx = pytest.warns(csp_kernels.ReferenceFallbackWarning, match=fallback) if fallback else contextlib.nullcontext()
    with ctx:
        return module(x)


def assert_same_state(fused: nn.Module, ref: nn.Module) -> None:
    fused_state, ref_state = fused.state_dict(), ref.state_dict()
    assert fused_state.keys() == ref_state.keys()
    for name, r in ref_state.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fused_state[name], r), name
        else:
            assert_matches_reference(fused_state[name], r, tol=TOL, name=name)


def check_step(ref, fused, device, fallback: str | None = None, grad: bool = True) -> None:
    """One forward (and backward when `grad`) on both: outputs, gradients, state."""
    x = torch.randn(3, ref.in_channels, 6, 7, dtype=torch.float64, device=device)
    x_ref, x_fused = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y_ref, y = ref(x_ref), run(fused, x_fused, fallback)
    assert_matches_reference(y, y_ref, tol=TOL, name="y")
    if grad:
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y.backward(g)
        assert_matches_reference(x_fused.grad, x_ref.grad, tol=TOL, name="x.grad")
        for (name, p), (_, p_ref) in zip(fused.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (p_ref.grad is None), name
            if p_ref.grad is not None:
                assert_matches_reference(p.grad, p_ref.grad, tol=TOL, name=f"{name}.grad")
    assert_same_state(fused, ref)


# -- 1. eval caches: edits that bump no version counter ------------------------------------------

def _ema_(t: torch.Tensor) -> None:
    # An EMA of the weights, as timm's ModelEmaV2 and ultralytics' ModelEMA write it.
    t.data.mul_(0.5).add_(torch.randn_like(t), alpha=0.5)


CACHE_EDITS = {
    "weight.data.mul_": lambda m: [p.data.mul_(2) for p in m.parameters() if p.dim() == 4],
    "running_var.data.copy_": lambda m: [bn.running_var.data.copy_(torch.rand_like(bn.running_var) + 0.5)
                                         for bn in norms(m)],
    "data=same memory": lambda m: [setattr(bn.bias, "data", bn.bias.data.add_(1.0)) for bn in norms(m)],
    "ema through .data": lambda m: [_ema_(t) for t in [*m.parameters(), *(bn.running_mean for bn in norms(m))]],
    "bn.eps": lambda m: [setattr(bn, "eps", 0.25) for bn in norms(m)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("edit", CACHE_EDITS)
def test_eval_cache_sees_edits_that_bump_no_version(device, module, edit):
    ref, fused = MODULES[module](device)
    ref.eval(), fused.eval()
    x = torch.randn(2, ref.in_channels, 5, 6, dtype=torch.float64, device=device)
    with torch.no_grad():
        before = fused(x)  # fills the cache
        CACHE_EDITS[edit](fused)
        ref.load_state_dict(fused.state_dict())
        for ref_bn, bn in zip(norms(ref), norms(fused)):
            ref_bn.eps = bn.eps
        after = fused(x)
        assert not torch.allclose(after, before)
        assert_matches_reference(after, ref(x), tol=TOL, name="y after the edit")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module,attribute", [("ConvBNAct", "_folded"), ("PartialDenseBlock", "_eval_cache")])
def test_eval_cache_holds_while_nothing_changes(device, module, attribute):
    """The cache is kept while the parameters' bits stay the same, a NaN parameter included
    (compared by value, NaN != NaN, it would refold at every call), and replaced after an edit."""
    _, fused = MODULES[module](device)
    fused.eval()
    x = torch.randn(2, fused.in_channels, 5, 6, dtype=torch.float64, device=device)
    with torch.no_grad():
        next(p for p in fused.parameters() if p.dim() == 1)[0] = float("nan")
        fused(x)
        cache = getattr(fused, attribute)
        fused(x)
        assert getattr(fused, attribute) is cache
        CACHE_EDITS["running_var.data.copy_"](fused)  # every cache derives from it
        fused(x)
        assert getattr(fused, attribute) is not cache


@pytest.mark.parametrize("device", DEVICES)
def test_eval_cache_is_safe_across_threads(device):
    """Threads share one eval module, with inputs whose cached fold differs (on the float32 CPU
    an NCHW and a channels_last input take different weight layouts): each must get its own
    input's fold, never another thread's (the cache is read once per call)."""
    ref = randomize_(reference.ConvBNAct(8, 8, 3, act="relu")).to(device).eval()
    fused = csp_kernels.ConvBNAct(8, 8, 3, act="relu").to(device).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(1, 8, 6, 6, device=device)
    inputs = [x, x.contiguous(memory_format=torch.channels_last)]
    expected = ref.double()(x.double())
    errors = []

    def worker(xi):
        try:
            with torch.no_grad():
                for _ in range(150):
                    assert_matches_reference(fused(xi), expected, tol=1e-5, name="y")
        except Exception as e:  # noqa: BLE001 (reported below, with its thread's input)
            errors.append(f"{'channels_last' if xi.is_contiguous(memory_format=torch.channels_last) else 'NCHW'}: "
                          f"{type(e).__name__}: {e}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, inside the cache's read-check-use
    try:
        threads = [threading.Thread(target=worker, args=(inputs[i % 2],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module,attribute", [("ConvBNAct", "_folded"), ("PartialDenseBlock", "_eval_cache")])
def test_eval_cache_is_read_once_per_call(device, module, attribute):
    """A cache checked by one read and used by another hands a thread the fold another thread
    stored in between (for another input layout: the wrong weight format). Under the GIL that
    window is a few bytecodes, too narrow for the threaded test to hit reliably, so this counts
    the reads: one per call, into a local."""
    ref, fused = MODULES[module](device)
    reads = []

    class Counting(type(fused)):
        def __getattribute__(self, name):
            if name == attribute:
                reads.append(name)
            return super().__getattribute__(name)

    fused.__class__ = Counting
    fused.eval(), ref.eval()
    x = torch.randn(2, ref.in_channels, 5, 6, dtype=torch.float64, device=device)
    with torch.no_grad():
        for _ in range(3):  # a miss, then hits
            reads.clear()
            assert_matches_reference(fused(x), ref(x), tol=TOL, name="y")
            assert len(reads) == 1


# -- 2. module surgery in train mode -------------------------------------------------------------

def _freeze_all(m):
    for bn in norms(m):
        bn.eval()


def _freeze_first(m):
    norms(m)[0].eval()


def _untrack(m):
    for bn in norms(m):
        bn.track_running_stats = False


def _cumulative(m):
    for bn in norms(m):
        bn.momentum = None


# (module, surgery on both, fallback reason or None when the fused path must match, grad)
TRAIN_STATE = {
    "ConvBNAct-frozen-bn": ("ConvBNAct", _freeze_all, None, True),
    "ConvBNAct-frozen-bn-no-grad": ("ConvBNAct", _freeze_all, None, False),
    "ConvBNAct-momentum-None": ("ConvBNAct", _cumulative, None, True),
    "ConvBNAct-untracked": ("ConvBNAct", _untrack, "track_running_stats=False", True),
    "block-frozen-bns": ("PartialDenseBlock", _freeze_all, "eval mode with autograd recording", True),
    "block-frozen-bns-no-grad": ("PartialDenseBlock", _freeze_all, None, False),
    "block-one-frozen-bn": ("PartialDenseBlock", _freeze_first, "BatchNorms in both train and eval mode", True),
    "block-one-frozen-bn-no-grad": ("PartialDenseBlock", _freeze_first, "BatchNorms in both train and eval mode",
                                    False),
    "block-momentum-None": ("PartialDenseBlock", _cumulative, None, True),
    "block-untracked": ("PartialDenseBlock", _untrack, "track_running_stats=False", True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TRAIN_STATE)
def test_batch_norm_state_in_train_mode(device, case):
    """The module trains (.train()) while its BatchNorms are frozen (detection fine-tuning),
    untracked or cumulative: two steps, each matching the reference's output, gradients and
    running statistics (frozen ones unchanged)."""
    module, surgery, fallback, grad = TRAIN_STATE[case]
    ref, fused = MODULES[module](device)
    for m in (ref, fused):
        m.train()
        surgery(m)
    for _ in range(2):
        check_step(ref, fused, device, fallback, grad)


def _add_conv_bias(m, conv_name):
    conv = m.get_submodule(conv_name)
    torch.manual_seed(1)  # the same bias on both modules
    conv.bias = nn.Parameter(torch.randn(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))


def _replace_conv(m, conv_name, **kwargs):
    """`conv_name` replaced by a new nn.Conv2d of the same channels (and the same weights where
    the shape allows), with `kwargs` changed."""
    old = m.get_submodule(conv_name)
    args = dict(kernel_size=old.kernel_size, stride=old.stride, padding=old.padding, dilation=old.dilation,
                groups=old.groups, bias=old.bias is not None, padding_mode=old.padding_mode)
    torch.manual_seed(1)
    new = nn.Conv2d(old.in_channels, old.out_channels, **{**args, **kwargs}).to(old.weight)
    parent, _, name = conv_name.rpartition(".")
    setattr(m.get_submodule(parent) if parent else m, name, new)


def _fuse_bn_into_conv(m):
    m.eval()
    m.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(m.conv, m.bn)
    m.bn = nn.Identity()


def _set_dilation(m):
    m.conv.dilation, m.conv.padding = (2, 2), (2, 2)


LAYER = "dense.denselayer1"


def _scale_forward_on_the_instance(module):
    forward = module.forward
    module.forward = lambda x: forward(x) * 2.0


def _scale_conv_forward_on_the_instance(conv):
    conv_forward = conv._conv_forward
    conv._conv_forward = lambda x, weight, bias: conv_forward(x, weight * 0.5, bias)


def _act_as_plain_function(module):
    del module.act
    module.act = torch.relu


class _HalvedConvBNAct(reference.ConvBNAct):
    def forward(self, x, out=None):
        return super().forward(x) * 0.5


def _subclass_transition(block, name):
    old = getattr(block, name)
    new = _HalvedConvBNAct(old.conv.in_channels, old.conv.out_channels).to(old.conv.weight)
    new.load_state_dict(old.state_dict())
    setattr(block, name, new)


def _transition_as_sequential(block, name):
    old = getattr(block, name)
    setattr(block, name, nn.Sequential(old.conv, old.bn, old.act))


def _weight_as_plain_tensor(conv):
    """The stateless / meta-learning pattern: the weight a plain tensor attribute."""
    weight = conv.weight.detach().clone()
    del conv.weight
    conv.weight = weight


def _double_grad_input(module, grad_input, grad_output):
    return tuple(None if g is None else g * 2 for g in grad_input)


def _double_grad_output(module, grad_output):
    return tuple(None if g is None else g * 2 for g in grad_output)

# (module, surgery on both, fallback reason or None when the fused path must match)
SURGERY = {
    "ConvBNAct-conv-bias": ("ConvBNAct", lambda m: _add_conv_bias(m, "conv"), "conv.bias"),
    "ConvBNAct-conv-built-with-bias": ("ConvBNAct", lambda m: _replace_conv(m, "conv", bias=True), "conv.bias"),
    "ConvBNAct-circular-padding": ("ConvBNAct", lambda m: setattr(m.conv, "padding_mode", "circular"),
                                   "padding_mode='circular'"),
    "ConvBNAct-dilation": ("ConvBNAct", _set_dilation, None),
    "ConvBNAct-bn-fused-into-conv": ("ConvBNAct", _fuse_bn_into_conv, "conv.bias"),
    "ConvBNAct-bn-identity": ("ConvBNAct", lambda m: setattr(m, "bn", nn.Identity()), "bn is Identity"),
    "ConvBNAct-conv-hook": ("ConvBNAct", lambda m: m.conv.register_forward_hook(lambda mod, i, o: o * 2),
                            "forward hook on conv"),
    "ConvBNAct-bn-backward-hook": ("ConvBNAct", lambda m: m.bn.register_full_backward_hook(_double_grad_input),
                                   "backward hook on bn"),
    "ConvBNAct-act-backward-pre-hook": ("ConvBNAct",
                                        lambda m: m.act.register_full_backward_pre_hook(_double_grad_output),
                                        "backward hook on activation"),
    "ConvBNAct-conv-forward-replaced": ("ConvBNAct", lambda m: _scale_forward_on_the_instance(m.conv),
                                        "conv's forward is replaced on the instance"),
    "ConvBNAct-bn-forward-replaced": ("ConvBNAct", lambda m: _scale_forward_on_the_instance(m.bn),
                                      "bn's forward is replaced on the instance"),
    "ConvBNAct-act-forward-replaced": ("ConvBNAct", lambda m: _scale_forward_on_the_instance(m.act),
                                       "forward is replaced on the instance"),
    "ConvBNAct-conv-weight-plain-tensor": ("ConvBNAct", lambda m: _weight_as_plain_tensor(m.conv),
                                           "conv.weight is not a registered parameter"),
    "ConvBNAct-conv-forward-internals-replaced": ("ConvBNAct", lambda m: _scale_conv_forward_on_the_instance(m.conv),
                                                  "conv's _conv_forward is replaced on the instance"),
    "ConvBNAct-act-plain-function": ("ConvBNAct", _act_as_plain_function, "activation <built-in method relu"),
    "ConvBNAct-int-stride": ("ConvBNAct", lambda m: setattr(m.conv, "stride", 2), "stride=2"),
    "ConvBNAct-int-padding": ("ConvBNAct", lambda m: setattr(m.conv, "padding", 0), "padding=0"),
    "block-transition-forward-hook": ("PartialDenseBlock",
                                      lambda m: m.transition2.register_forward_hook(lambda mod, i, o: o * 2),
                                      "forward hook on transition2"),
    "block-transition-forward-replaced": ("PartialDenseBlock",
                                          lambda m: _scale_forward_on_the_instance(m.transition1),
                                          "transition1's forward is replaced on the instance"),
    "block-dense-forward-hook": ("PartialDenseBlock",
                                 lambda m: m.dense.register_forward_hook(lambda mod, i, o: o * 2),
                                 "forward hook on dense"),
    "block-transition-subclass": ("PartialDenseBlock", lambda m: _subclass_transition(m, "transition2"),
                                  "transition2 is _HalvedConvBNAct"),
    "block-transition-sequential": ("PartialDenseBlock", lambda m: _transition_as_sequential(m, "transition1"),
                                    "transition1 is Sequential"),
    "block-conv2-int-padding": ("PartialDenseBlock", lambda m: setattr(m.get_submodule(f"{LAYER}.conv2"), "padding", 1),
                                "padding=1"),
    "block-conv1-forward-replaced": ("PartialDenseBlock",
                                     lambda m: _scale_forward_on_the_instance(m.get_submodule(f"{LAYER}.conv1")),
                                     "conv1's forward is replaced on the instance"),
    "block-layer-backward-hook": ("PartialDenseBlock",
                                  lambda m: m.get_submodule(f"{LAYER}.conv1").register_full_backward_hook(
                                      _double_grad_input), f"backward hook on {LAYER}.conv1"),
    "block-conv2-with-bias": ("PartialDenseBlock", lambda m: _replace_conv(m, f"{LAYER}.conv2", bias=True),
                              f"{LAYER}.conv2.bias"),
    "block-conv2-5x5": ("PartialDenseBlock",
                        lambda m: _replace_conv(m, f"{LAYER}.conv2", kernel_size=5, padding=2),
                        rf"{LAYER}.conv2 is Conv2d\(.*kernel_size=\(5, 5\)"),
    "block-conv1-dilated": ("PartialDenseBlock",
                            lambda m: setattr(m.get_submodule(f"{LAYER}.conv1"), "dilation", (2, 2)),
                            rf"{LAYER}.conv1 is Conv2d\(.*dilation=\(2, 2\)"),
    "block-conv2-reflect": ("PartialDenseBlock",
                            lambda m: setattr(m.get_submodule(f"{LAYER}.conv2"), "padding_mode", "reflect"),
                            f"{LAYER}.conv2.padding_mode='reflect'"),
    "block-norm1-identity": ("PartialDenseBlock", lambda m: setattr(m.get_submodule(LAYER), "norm1", nn.Identity()),
                             f"{LAYER}.norm1 is Identity"),
    "block-transition-bias": ("PartialDenseBlock", lambda m: _add_conv_bias(m, "transition1.conv"),
                              "transition1.conv.bias"),
    "block-transition-bn-fused": ("PartialDenseBlock", lambda m: _fuse_bn_into_conv(m.transition2),
                                  "transition2.conv.bias"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SURGERY)
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_conv_surgery(device, case, mode):
    """Convolutions given a bias, another geometry or padding mode, BatchNorms fused away or
    replaced: in train and eval (with and without autograd), the fused module computes what the
    reference does or runs it with the reason named."""
    module, surgery, fallback = SURGERY[case]
    ref, fused = MODULES[module](device)
    for m in (ref, fused):
        surgery(m)
        m.train(mode == "train")
    check_step(ref, fused, device, fallback, grad=mode != "eval-no-grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
@pytest.mark.parametrize("register", [module_hooks.register_module_forward_hook,
                                      module_hooks.register_module_full_backward_hook])
def test_global_module_hook_runs_the_reference(device, module, mode, register):
    """A global module hook expects a call of every Conv2d, BatchNorm2d and activation, which
    the fused kernels compute inside one op: with one registered (here doubling conv outputs,
    or every module's input gradients), the fused modules run the reference, which calls them."""
    def double_conv_output(mod, args, output):
        return output * 2 if isinstance(mod, nn.Conv2d) else None

    def double_grad_input(mod, grad_input, grad_output):
        return tuple(None if g is None else g * 2 for g in grad_input)

    hook = double_conv_output if register is module_hooks.register_module_forward_hook else double_grad_input
    ref, fused = MODULES[module](device)
    ref.train(mode == "train"), fused.train(mode == "train")
    handle = register(hook)
    try:
        check_step(ref, fused, device, "a global module hook", grad=mode != "eval-no-grad")
    finally:
        handle.remove()


def _halve_on_the_class(cls: type, attr: str):
    """A function doing what cls.attr did, on half the output (or, for _conv_forward, with half
    the weight), as tools that instrument torch.nn patch a class: (cls, attr, function)."""
    original = getattr(cls, attr)
    if attr == "_conv_forward":
        return cls, attr, lambda self, x, weight, bias: original(self, x, weight * 0.5, bias)
    return cls, attr, lambda self, *args: original(self, *args) * 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
@pytest.mark.parametrize("patched", ["Conv2d.forward", "Conv2d._conv_forward", "BatchNorm2d.forward",
                                     "activation.forward"])
def test_forward_patched_on_the_class_runs_the_reference(device, module, mode, patched, monkeypatch):
    """A forward patched onto torch's class (nn.SiLU.forward = ..., as instrumentation tools do)
    is what every instance runs: the fused modules, which compute torch's own forward, run the
    reference with the patch named. Once the patch is gone, they are fused again."""
    ref, fused = MODULES[module](device)
    ref.train(mode == "train"), fused.train(mode == "train")
    class_name, attr = patched.split(".")
    cls = (next(type(m) for m in fused.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU)))
           if class_name == "activation" else getattr(nn, class_name))
    # (The dense block's eval with autograd runs the reference anyway, and may say so first.)
    anyway = "BatchNorms in eval mode with autograd" if module == "PartialDenseBlock" and mode == "eval" else None
    monkeypatch.setattr(*_halve_on_the_class(cls, attr))
    check_step(ref, fused, device, f"{cls.__name__}.{attr} is replaced on the class" + (f"|{anyway}" if anyway else ""),
               grad=mode != "eval-no-grad")
    monkeypatch.undo()
    check_step(ref, fused, device, anyway, grad=mode != "eval-no-grad")


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_non_finite_leaky_relu_slope_runs_the_reference(slope, mode):
    """nn.LeakyReLU takes any float; the kernels a finite slope: the fused module runs the
    reference, NaNs and infs included, with the reason."""
    ref, fused = MODULES["ConvBNAct"]("cpu")
    for m in (ref, fused):
        m.act = nn.LeakyReLU(slope)
        m.train(mode == "train")
    grad = mode != "eval-no-grad"
    x = torch.randn(3, ref.in_channels, 6, 7, dtype=torch.float64)
    x_ref, x_fused = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y_ref, y = ref(x_ref), run(fused, x_fused, "LeakyReLU with a finite slope")
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.allclose(y, y_ref, equal_nan=True)
    if grad:
        y_ref.sum().backward()
        y.sum().backward()
        assert torch.allclose(x_fused.grad, x_ref.grad, equal_nan=True)
    assert_same_state(fused, ref)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_is_what_batch_norm_makes_of_it(module, training):
    """An empty batch: an empty output, zero gradients and, in training, BatchNorm's bookkeeping
    (num_batches_tracked counts it, the running statistics stay), as the reference has it."""
    ref, fused = MODULES[module]("cpu")
    ref.train(training), fused.train(training)
    x = torch.randn(0, ref.in_channels, 6, 7, dtype=torch.float64)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x_ref), fused(x_fused)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    y_ref.sum().backward()
    y.sum().backward()
    assert x_fused.grad.shape == x.shape
    for (name, p), (_, p_ref) in zip(fused.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    assert_same_state(fused, ref)


# -- 3. SyncBatchNorm ----------------------------------------------------------------------------

def sync_pair(module, device):
    ref, fused = MODULES[module](device)
    return nn.SyncBatchNorm.convert_sync_batchnorm(ref), nn.SyncBatchNorm.convert_sync_batchnorm(fused)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("training", [True, False])
def test_sync_batch_norm_without_a_process_group_is_batch_norm(device, module, training):
    assert not dist.is_initialized()
    ref, fused = sync_pair(module, device)
    ref.train(training), fused.train(training)
    check_step(ref, fused, device, grad=training)
    check_step(ref, fused, device, grad=False)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("eps, mode", [(0.0, "train"), (-1e-3, "train"), (-1e-3, "eval-no-grad")])
def test_batch_norm_eps_that_batch_norm_refuses(module, eps, mode):
    """The fused kernels read eps without calling F.batch_norm: they refuse what it refuses, with
    its words, and run what it runs (eps 0 in eval)."""
    ref, fused = MODULES[module]("cpu")
    x = torch.randn(2, ref.in_channels, 16, 16, dtype=torch.float64)
    for m in (ref, fused):
        m.train(mode == "train")
        for bn in norms(m):
            bn.eps = eps
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        with pytest.raises(ValueError) as expected:
            ref(x)
        with pytest.raises(ValueError, match=f"^{expected.value}$".replace("(", r"\(").replace(")", r"\)")):
            fused(x)
        if mode != "train":  # eps 0 normalizes by the running variance alone
            for m in (ref, fused):
                for bn in norms(m):
                    bn.eps = 0.0
            assert_matches_reference(fused(x), ref(x), tol=TOL, name="eps 0")


def _pair(name: str):
    kind, _, arg = name.partition(":")
    if kind == "ConvBNAct":
        return reference.ConvBNAct(4, 6, int(arg), act="relu"), csp_kernels.ConvBNAct(4, 6, int(arg), act="relu")
    return reference.PartialDenseBlock(4, 2, 4, fusion=arg), csp_kernels.PartialDenseBlock(4, 2, 4, fusion=arg)


@pytest.mark.parametrize("module, bn_name", [("ConvBNAct:1", "bn"), ("ConvBNAct:3", "bn"),
                                             ("PartialDenseBlock:csp", "transition1.bn"),
                                             ("PartialDenseBlock:csp", "transition2.bn"),
                                             ("PartialDenseBlock:last", "transition.bn"),
                                             ("PartialDenseBlock:first", "transition.bn")])
@pytest.mark.parametrize("edit", ["eps 0 on a zero variance", "inf weight"])
def test_eval_with_a_batch_norm_scale_that_is_not_finite(module, bn_name, edit):
    """Eval with BN's scale inf in one channel (eps 0, allowed in eval, on a zero running
    variance; or an inf BN weight): the reference applies it to the conv's output (NaN where
    z * inf meets -mean * inf, else -inf, 0 after the activation); folded into the weight it made
    the whole channel NaN. The other channels as always."""
    ref, fused = _pair(module)
    randomize_(ref)
    fused.load_state_dict(ref.state_dict())
    for m in (ref, fused):
        bn = m.get_submodule(bn_name)
        with torch.no_grad():
            bn.running_mean[2] = 0.1
            if edit == "inf weight":
                bn.weight[2] = float("inf")
            else:
                bn.running_var[2] = 0.0
                for norm in norms(m):
                    norm.eps = 0.0
        m.eval()
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        expected, got = ref(x), fused(x)
    assert expected.isnan().any() and not expected.isnan().all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("which", ["weight", "running_var"])
@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
def test_batch_norm_of_mixed_dtypes_on_16_bit_data(which, mode):
    """float16 data with a BatchNorm partly float32 (one parameter or statistic), partly float16:
    ATen refuses the mix, and so does the fused module (each dtype alone was
    allowed, so it computed)."""
    ref, fused = MODULES["ConvBNAct"]("cpu")
    x = torch.randn(2, ref.in_channels, 16, 16, dtype=torch.float16)
    for m in (ref, fused):
        m.half().train(mode == "train")
        bn = m.bn
        setattr(bn, which, nn.Parameter(bn.weight.detach().float()) if which == "weight" else bn.running_var.float())
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        with pytest.raises(RuntimeError, match="mixed dtype|expected scalar type Half but found Float"):
            ref(x)
        with pytest.raises(ValueError, match=f"float16 for torch.float16 data and bn.{which} torch.float32"
                                             if which == "weight" else "running_var is torch.float32"):
            fused(x)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("data_dtype, bn_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                  (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
def test_batch_norm_dtypes_that_batch_norm_refuses(module, data_dtype, bn_dtype, mode):
    """A BatchNorm whose parameters are neither the data's dtype nor float32 for 16-bit data:
    plain PyTorch refuses it ("mixed dtype"; the dense block's input check, whose first parameter
    is a BatchNorm's, already), and so do the fused kernels, which would convert its parameters
    silently; float32 BatchNorms on bfloat16 data run."""
    ref, fused = MODULES[module]("cpu")
    x = torch.randn(2, ref.in_channels, 16, 16, dtype=data_dtype)
    for m in (ref, fused):
        m.to(data_dtype).train(mode == "train")
        for bn in norms(m):
            bn.to(bn_dtype)
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        with pytest.raises((RuntimeError, ValueError), match="mixed dtype|must have the same dtype"):
            ref(x)
        with pytest.raises(ValueError, match=f"is {bn_dtype} for {data_dtype} data|must have the same dtype"):
            fused(x)
        for m in (ref, fused):
            for bn in norms(m):
                bn.float()
        if data_dtype == torch.bfloat16 and module == "ConvBNAct":  # float32 BatchNorm, 16-bit data: both run
            assert fused(x).dtype == ref(x).dtype == torch.bfloat16


BN_PARAMETER_LAYOUTS = {
    "strided": lambda p: torch.stack([p, torch.full_like(p, float("nan"))], 1)[:, 0],  # every other element
    "expanded": lambda p: p[:1].expand(p.shape[0]),  # one value for every channel, stride 0
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("layout", BN_PARAMETER_LAYOUTS)
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_batch_norm_parameters_of_any_layout(device, module, layout, which):
    """BatchNorm parameters that are not contiguous (a slice of a bigger tensor, an expand, as a
    functional_call may hand them): the kernels read per-channel vectors contiguous, and the
    backward copied none (a ValueError there, where the reference computes)."""
    ref, fused = MODULES[module](device)
    for m in (ref, fused):
        for bn in norms(m):
            setattr(bn, which, nn.Parameter(BN_PARAMETER_LAYOUTS[layout](getattr(bn, which).detach())))
    assert not norms(fused)[0].weight.is_contiguous() or not norms(fused)[0].bias.is_contiguous()
    check_step(ref.train(), fused.train(), device)
    check_step(ref.eval(), fused.eval(), device, grad=False)


@pytest.mark.parametrize("name, args, shape", [("ConvBNAct", (4, 6, 1, 16, 0), (1, 4, 16, 16)),
                                                ("ConvBNAct", (4, 6, 3, 1, 0), (1, 4, 3, 3)),
                                                ("C2f", (4, 8, 1, True), (1, 4, 1, 1)),
                                                ("PartialDenseBlock", (8, 2, 4), (1, 8, 1, 1)),
                                                ("DenseBlock", (8, 2, 4), (1, 8, 1, 1))])
@pytest.mark.parametrize("norm", ["BatchNorm2d", "SyncBatchNorm"])
def test_one_value_per_channel_in_training(name, args, shape, norm):
    """A training BatchNorm on one value per channel (batch 1, a 1x1 conv output): the reference's
    ValueError, after the same bookkeeping (nn.BatchNorm2d counts the call before it refuses; so
    does a SyncBatchNorm, which the fused op refused first, uncounted)."""
    ref = randomize_(getattr(reference, name)(*args)).double()
    fused = getattr(csp_kernels, name)(*args).double()
    fused.load_state_dict(ref.state_dict())
    if norm == "SyncBatchNorm":  # (no process group: it computes as BatchNorm2d)
        ref, fused = nn.SyncBatchNorm.convert_sync_batchnorm(ref), nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    errors = []
    for m in (ref, fused):
        with pytest.raises(ValueError) as err:
            m(torch.randn(shape, dtype=torch.float64))
        errors.append(str(err.value))
    assert errors[0].startswith("Expected more than 1 value per channel when training") and errors[1] == errors[0]
    assert_same_state(fused, ref)
