"""The fused modules under torch.autocast: they run fused (no ReferenceFallbackWarning), return
the dtype the reference returns under the same autocast, and keep the low-precision rule of
tests/test_low_precision.py: fused error at most 2x the error of the plain-PyTorch module run
under that autocast, both against a float64 reference run without it, for outputs, input
gradients and parameter gradients. Parameter gradients are compared as one vector over all
parameters: one parameter's gradient alone can move by luck (see test_low_precision.py)."""
import copy
import warnings

import pytest
import torch

import csp_kernels
from csp_kernels import reference
from helpers import fused_backends, randomize_, rel_error

CPU_BACKENDS = [b for b in fused_backends("cpu") if b != "triton"]  # the interpreter cannot run bfloat16


def _pdb(fusion):
    return reference.PartialDenseBlock, csp_kernels.PartialDenseBlock, dict(in_channels=16, num_layers=2,
                                                                            growth_rate=8, fusion=fusion)


def _conv_bn_act(kernel_size):
    return reference.ConvBNAct, csp_kernels.ConvBNAct, dict(in_channels=16, out_channels=24, kernel_size=kernel_size,
                                                            act="silu")


CASES = [pytest.param(*_pdb(fusion), id=f"PartialDenseBlock-{fusion}") for fusion in ("last", "first", "csp")]
CASES += [pytest.param(*_conv_bn_act(k), id=f"ConvBNAct-{k}x{k}") for k in (1, 3)]


def _run(module, x, grad_y, backend_name, dtype=None):
    """(output, input gradient, all parameter gradients as one vector); under autocast to
    `dtype` unless None; without autograd when grad_y is None."""
    x = x.detach().clone().requires_grad_(grad_y is not None)
    with torch.set_grad_enabled(grad_y is not None), csp_kernels.use_backend(backend_name), torch.autocast(
            "cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = module(x)
    if grad_y is None:
        return y, None, None
    y.backward(grad_y.to(y.dtype))
    return y, x.grad, torch.cat([p.grad.flatten().double() for p in module.parameters()])


def assert_within_twice_plain(out, ref64, plain, name):
    """The rule of helpers.assert_matches_reference for 16-bit results, also where autocast
    returns float32 (fusion "last" concatenates its 16-bit transition with the exact part 1)."""
    err, plain_err = rel_error(out, ref64), rel_error(plain, ref64)
    assert err <= 2 * plain_err + 1e-6, f"{name}: fused error {err:.3g} > 2x plain error {plain_err:.3g}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize(("ref_cls", "fused_cls", "kwargs"), CASES)
def test_fused_under_autocast(ref_cls, fused_cls, kwargs, backend_name, dtype, training):
    torch.manual_seed(0)
    plain = randomize_(ref_cls(**kwargs))
    ref64 = copy.deepcopy(plain).double()
    fused = fused_cls(**kwargs)
    fused.load_state_dict(plain.state_dict())
    for m in (ref64, plain, fused):
        m.train(training)
    x64 = torch.randn(8, 16, 32, 32, dtype=torch.float64)
    grad_y = torch.randn(8, plain.out_channels, 32, 32, dtype=torch.float64) if training else None

    y64, gx64, gp64 = _run(ref64, x64, grad_y, "reference")
    y_plain, gx_plain, gp_plain = _run(plain, x64.float(), grad_y, "reference", dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", csp_kernels.ReferenceFallbackWarning)
        y, gx, gp = _run(fused, x64.float(), grad_y, backend_name, dtype)

    assert y.dtype == y_plain.dtype
    assert_within_twice_plain(y, y64, y_plain, "output")
    if training:
        assert gx.dtype == gx_plain.dtype == torch.float32
        assert_within_twice_plain(gx, gx64, gx_plain, "input gradient")
        assert_within_twice_plain(gp, gp64, gp_plain, "parameter gradients")
