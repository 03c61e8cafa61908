"""Deployment: torch.export of every fused module, eval and train, saved and loaded back, runs and
gives the module's own output (data-dependent caches must not break it); torch.jit.trace records the reference ops and
says so."""
import io

import pytest
import torch

import csp_kernels
from helpers import unpin_kernel_choices


def modules():
    return {
        "ConvBNAct": (lambda: csp_kernels.ConvBNAct(8, 4, 3, act="silu"), lambda: (torch.randn(2, 8, 6, 6),)),
        "PartialDenseBlock-csp": (lambda: csp_kernels.PartialDenseBlock(8, 2, 4, 0.5, fusion="csp"),
                                  lambda: (torch.randn(2, 8, 6, 6),)),
        "PartialDenseBlock-last": (lambda: csp_kernels.PartialDenseBlock(8, 2, 4, 0.5, fusion="last"),
                                   lambda: (torch.randn(2, 8, 6, 6),)),
        "ExactFusion": (lambda: csp_kernels.ExactFusion([4, 8], 4, transition=True),
                        lambda: ([torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)],)),
    }


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(modules()))
def test_export_runs_and_matches_the_module(name, training):
    make_module, make_args = modules()[name]
    module = make_module().train(training)
    args = make_args()
    with torch.set_grad_enabled(training):
        program = torch.export.export(module, args)
        saved = io.BytesIO()
        torch.export.save(program, saved)  # a training graph with a no_grad region did not load back
        saved.seek(0)
        program = torch.export.load(saved)
        # the exported program updates its own copy of the running statistics, so compare
        # against a fresh module in the same state as the one exported
        expected = make_module().train(training)
        expected.load_state_dict(module.state_dict())
        got, want = program.module()(*args), expected(*args)
    got, want = (got, want) if isinstance(got, (list, tuple)) else ([got], [want])
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["ConvBNAct", "PartialDenseBlock-csp"])
def test_export_with_a_dynamic_batch(name, training, monkeypatch):
    """A symbolic batch (as ONNX export with dynamic axes asks): the program runs other batch
    sizes and matches the module; eval under no_grad, as the dense blocks' eval runs. The
    kernel choices unpinned: measured ones must not be looked up with a symbolic shape."""
    unpin_kernel_choices(monkeypatch)
    make_module, make_args = modules()[name]
    module = make_module().train(training)
    (x,) = make_args()
    batch = torch.export.Dim("batch", min=2)
    with torch.set_grad_enabled(training):
        program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
        expected = make_module().train(training)
        expected.load_state_dict(module.state_dict())
        x3 = torch.randn(3, *x.shape[1:])
        torch.testing.assert_close(program.module()(x3), expected(x3), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated in favour of export
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input checks' Python bools
@pytest.mark.parametrize("name", ["ConvBNAct", "PartialDenseBlock-csp", "ExactFusion"])
def test_jit_trace_records_the_reference_and_says_so(name):
    # ExactFusion: its Maxout pyramid op is recorded as it is, its ConvBNAct transitions as the
    # reference; the sizes the trace hands over as tensors pass the input checks.
    make_module, make_args = modules()[name]
    module = make_module().eval()
    args = make_args()
    with torch.no_grad():
        with pytest.warns(csp_kernels.ReferenceFallbackWarning, match="torch.jit.trace"):
            traced = torch.jit.trace(module, args)
        torch.testing.assert_close(traced(*args), module(*args), rtol=1e-5, atol=1e-5)
