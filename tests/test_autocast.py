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


def _cross_stage():
    return reference.CrossStage, csp_kernels.CrossStage, dict(in_chs=16, out_chs=16, stride=1, dilation=1, depth=1,
                                                              block_ratio=0.5)


CASES = [pytest.param(*_pdb(fusion), id=f"PartialDenseBlock-{fusion}") for fusion in ("last", "first", "csp")]
CASES += [pytest.param(*_conv_bn_act(k), id=f"ConvBNAct-{k}x{k}") for k in (1, 3)]
CASES += [pytest.param(reference.DenseBlock, csp_kernels.DenseBlock, dict(in_channels=16, num_layers=2, growth_rate=8),
                       id="DenseBlock")]
CASES += [pytest.param(*_cross_stage(), id="CrossStage")]


def _run(module, x, grad_y, backend_name, dtype=None):
    """(output, input gradient, all parameter gradients as one vector, {name: running
    statistic}); under autocast to `dtype` unless None; without autograd when grad_y is None."""
    x = x.detach().clone().requires_grad_(grad_y is not None)
    with torch.set_grad_enabled(grad_y is not None), csp_kernels.use_backend(backend_name), torch.autocast(
            "cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = module(x)
    stats = {name: t.double() for name, t in module.named_buffers() if name.endswith(("_mean", "_var"))}
    if grad_y is None:
        return y, None, None, stats
    y.backward(grad_y.to(y.dtype))
    return y, x.grad, torch.cat([p.grad.flatten().double() for p in module.parameters()]), stats


def assert_within_twice_plain(out, ref64, plain, name):
    """The rule of helpers.assert_matches_reference for 16-bit results, also where autocast
    returns float32 (fusion "last" concatenates its 16-bit transition with the exact part 1)."""
    err, plain_err = rel_error(out, ref64), rel_error(plain, ref64)
    assert err <= 2 * plain_err + 1e-6, f"{name}: fused error {err:.3g} > 2x plain error {plain_err:.3g}"


@pytest.mark.parametrize("offset", [0.0, 100.0])  # an input far from zero mean: BatchNorm's statistics are exact
@pytest.mark.parametrize("mode", ["train", "eval", "eval_with_grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize(("ref_cls", "fused_cls", "kwargs"), CASES)
def test_fused_under_autocast(ref_cls, fused_cls, kwargs, backend_name, dtype, mode, offset):
    torch.manual_seed(0)
    plain = randomize_(ref_cls(**kwargs))
    ref64 = copy.deepcopy(plain).double()
    fused = fused_cls(**kwargs)
    fused.load_state_dict(plain.state_dict())
    for m in (ref64, plain, fused):
        m.train(mode == "train")
    x64 = torch.randn(8, 16, 32, 32, dtype=torch.float64) + offset
    out_channels = kwargs.get("out_chs") or plain.out_channels
    grad_y = torch.randn(8, out_channels, 32, 32, dtype=torch.float64) if mode != "eval" else None

    y64, gx64, gp64, stats64 = _run(ref64, x64, grad_y, "reference")
    y_plain, gx_plain, gp_plain, stats_plain = _run(plain, x64.float(), grad_y, "reference", dtype)
    with warnings.catch_warnings():
        # (runs its reference, with that warning: a stage under autocast, whose ConvBNActs stay
        # fused, and a dense block in eval while autograd records)
        warned = ref_cls is reference.CrossStage or (mode == "eval_with_grad" and "growth_rate" in kwargs)
        warnings.simplefilter("ignore" if warned else "error", csp_kernels.ReferenceFallbackWarning)
        y, gx, gp, stats = _run(fused, x64.float(), grad_y, backend_name, dtype)

    assert y.dtype == y_plain.dtype
    assert_within_twice_plain(y, y64, y_plain, "output")
    if mode == "train":
        for name in stats64:
            assert_within_twice_plain(stats[name], stats64[name], stats_plain[name], name)
    if grad_y is not None:
        assert gx.dtype == gx_plain.dtype == torch.float32
        assert_within_twice_plain(gx, gx64, gx_plain, "input gradient")
        assert_within_twice_plain(gp, gp64, gp_plain, "parameter gradients")


@pytest.mark.parametrize("mode", ["train", "eval", "eval_with_grad"])
@pytest.mark.parametrize("side", [6, 16])  # the small-map route and the fused kernels
@pytest.mark.parametrize(("ref_cls", "fused_cls", "kwargs"), CASES)
def test_float64_is_left_alone_under_autocast(ref_cls, fused_cls, kwargs, side, mode):
    """Autocast casts no float64 tensor (ATen's cached_cast): a float64 module on float64 data
    computes and returns float64 under it, the numbers it gives without autocast."""
    torch.manual_seed(0)
    ref = randomize_(ref_cls(**kwargs)).double()
    fused = fused_cls(**kwargs).double()
    fused.load_state_dict(ref.state_dict())
    for m in (ref, fused):
        m.train(mode == "train")
    x = torch.randn(2, 16, side, side, dtype=torch.float64)
    grad_y = None if mode == "eval" else torch.randn_like(ref(x))
    y_ref, gx_ref, gp_ref, _ = _run(ref, x, grad_y, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csp_kernels.ReferenceFallbackWarning)  # (a stage under autocast)
        y, gx, gp, _ = _run(fused, x, grad_y, CPU_BACKENDS[0], torch.bfloat16)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    if grad_y is not None:
        torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gp, gp_ref, rtol=1e-10, atol=1e-10)


def test_mixed_dtypes_under_autocast_raise():
    """A float32 module on float64 data under autocast: the convolution would meet a bfloat16
    weight and a float64 input, which plain PyTorch refuses; the fused module says so."""
    fused = csp_kernels.ConvBNAct(16, 24, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="same dtype"):
        fused(torch.randn(2, 16, 12, 12, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float16 data is cast as float32 is
        assert fused(torch.randn(2, 16, 12, 12, dtype=torch.float16)).dtype == torch.bfloat16
