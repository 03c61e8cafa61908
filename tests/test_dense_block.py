"""The fused DenseBlock (csp_kernels/nn/dense.py; csp_kernels/ops/dense.py with fusion
NO_TRANSITION, whose output is the concat buffer) against reference.DenseBlock: forward,
gradients, running statistics, eval, fallbacks, the op, memory saved."""

import pytest
import torch
from torch import nn

from csp_kernels import backend, reference
from csp_kernels.nn import DenseBlock
from csp_kernels.ops import dense as dense_ops
from csp_kernels.profiling import SavedTensorsMeter
from helpers import assert_matches_reference, device_backend_params, rel_error
from test_partial_dense_block import (TOL, assert_eval_matches, assert_train_matches, no_tf32,  # noqa: F401
                                      randomize, train_step)


def make_pair(*args, dtype=torch.float64, device="cpu", **kwargs):
    """(reference block, fused block) with the same randomized state."""
    ref = randomize(reference.DenseBlock(*args, **kwargs)).to(device, dtype)
    fused = DenseBlock(*args, **kwargs).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def block_cases():
    """(device, backend, num_layers): 1 and 3 layers on every fused backend."""
    return [pytest.param(*param.values, num_layers, id=f"{param.id}-L{num_layers}")
            for param in device_backend_params() for num_layers in (1, 3)]


@pytest.mark.parametrize("device,name,num_layers", block_cases())
def test_train_and_eval_match_reference_float64(device, name, num_layers):
    ref, fused = make_pair(5, num_layers, 3, bn_size=2, device=device)
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert_train_matches(ref, fused, x, device, name, TOL[torch.float64])
    assert_eval_matches(ref, fused, x.detach(), name, TOL[torch.float64])


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("device,name", device_backend_params())
def test_float32_matches_float64_reference(device, name):
    size = (2, 6, 4, 4) if name == "triton" else (3, 12, 9, 11)
    ref, fused = make_pair(size[1], 2 if name == "triton" else 4, 4, device=device)
    fused.float()
    x = torch.randn(*size, dtype=torch.float64, device=device, requires_grad=True)
    grad_y = torch.randn(size[0], ref.out_channels, *size[2:], dtype=torch.float64, device=device)
    expected = train_step(ref, x, grad_y)
    with backend.use_backend(name):
        y, gx, gp = train_step(fused, x.float(), grad_y.float())
    assert y.dtype == torch.float32
    names = ["output", "input grad", *(f"grad of {key}" for key, _ in ref.named_parameters())]
    for key, value, value_ref in zip(names, [y, gx, *gp], [expected[0], expected[1], *expected[2]]):
        assert_matches_reference(value, value_ref, tol=TOL[torch.float32], name=key)
    for (key, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        assert_matches_reference(b.double(), b_ref.double(), tol=TOL[torch.float32], name=key)
    assert_eval_matches(ref, fused, x.detach().float(), name, TOL[torch.float32])


def test_training_under_no_grad_and_channels_last():
    ref, fused = make_pair(6, 3, 4)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y_ref, y = ref(x), fused(x)
    assert not y.requires_grad and y.stride() == y_ref.stride()  # channels_last, as the reference's
    assert_matches_reference(y, y_ref, tol=TOL[torch.float64])
    for (key, value), mine in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert_matches_reference(mine.double(), value.double(), tol=TOL[torch.float64], name=key)


def test_backward_leaves_the_output_gradient_untouched():
    """The dense layers' backward accumulates into the buffer's gradient: a copy of grad_out."""
    _, fused = make_pair(4, 2, 3)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, fused.out_channels, 5, 5, dtype=torch.float64)
    before = grad_y.clone()
    fused(x).backward(grad_y)
    assert torch.equal(grad_y, before)


def test_autocast_returns_the_references_dtype_with_x_exact():
    ref, fused = make_pair(6, 2, 4, dtype=torch.float32)
    x = torch.randn(2, 6, 5, 5)
    ref.eval(), fused.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        y_ref, y = ref(x), fused(x)
    assert y.dtype == y_ref.dtype == torch.float32 and torch.equal(y[:, :6], x)
    assert rel_error(y, y_ref) < 2e-2  # bfloat16 rounding of each layer


# -- what the fused op does not model ---------------------------------------------------------

def _different_eps(block):
    block.denselayer2.norm2.eps = 1e-3


def _hooked_layer(block):
    block.denselayer1.register_forward_hook(lambda *_: None)


def _wider_bottleneck(block):
    block.denselayer2 = reference.DenseLayer(7, 3, bn_size=3).double()


FALLBACKS = {
    "different eps": (_different_eps, "different eps"),
    "hooked layer": (_hooked_layer, "forward hook on denselayer1"),
    "another bottleneck width": (_wider_bottleneck, "dense layer 2's"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_what_the_op_does_not_model_runs_the_reference_and_says_why(case):
    edit, words = FALLBACKS[case]
    ref, fused = make_pair(4, 2, 3)
    for module in (ref, fused):
        edit(module)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.warns(backend.ReferenceFallbackWarning, match=words):
        assert_train_matches(ref, fused, x, "cpu", "cpu", TOL[torch.float64])
    assert words in fused.fusion_reason()


def test_eval_with_autograd_recording_runs_the_reference():
    ref, fused = make_pair(4, 2, 3)
    ref.eval(), fused.eval()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(backend.ReferenceFallbackWarning, match="eval mode with autograd recording"):
        y = fused(x)
    assert torch.equal(y, ref(x)) and y.requires_grad
    assert fused.fusion_reason() == ""  # a mode, not the modules: convert swaps it


def test_bad_input_is_rejected():
    _, fused = make_pair(4, 2, 3)
    with pytest.raises(ValueError, match="4 channels"):
        fused(torch.randn(2, 6, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 4, 1, 1, dtype=torch.float64))


# -- the op and its memory -----------------------------------------------------------------------

def op_args(requires_grad=True):
    _, fused = make_pair(3, 2, 2, bn_size=2)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    params = [p.detach().clone() for p in fused.dense_params()]
    for t in [x, *params]:
        t.requires_grad_(requires_grad)
    return x, params, [], 0, dense_ops.NO_TRANSITION, "", 1e-5, "aten"


def test_gradcheck_and_opcheck_without_transition():
    x, params, *rest = op_args()

    def block(x, *flat):
        return dense_ops.partial_dense_block(x, list(flat), *rest)[0]

    assert torch.autograd.gradcheck(block, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)
    torch.library.opcheck(dense_ops.partial_dense_block, op_args(),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_saves_the_output_and_statistics_only():
    # A densenet121 block's shape at 8x8: every saved tensor of both is (batch, channels, height,
    # width), so the ratio holds at any resolution.
    ref, fused = make_pair(64, 6, 32, dtype=torch.float32)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    saved = {}
    for label, module in (("eager", ref), ("fused", fused)):
        with SavedTensorsMeter() as meter:
            y = module(x)
        saved[label] = meter.bytes_excluding([*module.parameters(), *module.buffers()])
    per_channel_stats = 4 * (2 * y.shape[1] + 2 * 6 * 128)  # float32 mean and var of the buffer and bottlenecks
    assert saved["fused"] <= y.numel() * y.element_size() + per_channel_stats, saved
    assert saved["fused"] <= 0.2 * saved["eager"], saved


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(training):
    # aot_eager traces the op through its fake kernel and registered autograd, as inductor would.
    ref, fused = make_pair(4, 2, 3)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    if training:
        assert_train_matches(ref, compiled, x, "cpu", "cpu", TOL[torch.float64])
    else:
        assert_eval_matches(ref, compiled, x.detach(), "cpu", TOL[torch.float64])


def test_wrong_layer_module_is_named():
    _, fused = make_pair(4, 2, 3)
    fused.denselayer1 = nn.Identity()
    assert "denselayer1 is Identity" in fused.fusion_reason()
