"""Shared test helpers: devices and backends to parametrize over, and error measures."""
import contextlib
import math
from typing import Iterator

import pytest
import torch
from torch import nn

from csp_kernels import backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fused_backends(device: str = "cpu") -> list[str]:
    """The non-reference backends that can run on `device` here ("cpu" and, under the Triton
    interpreter, "triton" on this machine; "cuda" and "triton" on a GPU)."""
    return [b for b in backend.available_backends(device) if b != "reference"]


def device_backend_params() -> list:
    """(device, backend) pairs for every fused backend on every device present."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in fused_backends(d)]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_matches_reference(fused: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor | None = None,
                             tol: float = 1e-5, name: str = "output") -> None:
    """float32/float64: relative error against the float64 reference below `tol`.
    float16/bfloat16 (flash-attention's rule): the fused error at most 2x the error of the plain
    PyTorch module run in that same dtype (`plain`), both against the float64 reference."""
    err = rel_error(fused, ref64)
    if fused.dtype in (torch.float16, torch.bfloat16):
        assert plain is not None, "low-precision comparisons need the plain-PyTorch result"
        plain_err = rel_error(plain, ref64)
        assert err <= 2 * plain_err + 1e-6, f"{name}: fused error {err:.3g} > 2x plain error {plain_err:.3g}"
    else:
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.1g}"


def randomize_(module: nn.Module) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (defaults would hide bugs)."""
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return module


@contextlib.contextmanager
def batch_norm_gain(module: nn.Module) -> Iterator[list[float]]:
    """`with batch_norm_gain(ref) as gain:` around a forward of a plain-PyTorch module (hooks
    would send a fused one to its reference path): gain[0] becomes the product, over its
    training BatchNorm calls, of max(1, largest |weight| * invstd of the batch statistics; NaN
    counts 1), how much their backward can amplify a gradient's rounding noise."""
    gains = []

    def record(bn, inputs, _output):
        if bn.training:
            var = inputs[0].detach().double().var(dim=(0, 2, 3), unbiased=False)
            weight = bn.weight.detach().double().abs() if bn.weight is not None else 1.0
            gain = (weight * (var + bn.eps).rsqrt()).max().item()
            gains.append(gain if gain > 1 else 1.0)

    hooks = [m.register_forward_hook(record) for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    result = [1.0]
    try:
        yield result
    finally:
        for hook in hooks:
            hook.remove()
        result[0] = math.prod(gains)


def zero_gradient_floor(grad_y: torch.Tensor, gain: float) -> float:
    """The scale below which a gradient counts as zero analytically (e.g. a BatchNorm bias
    behind another BatchNorm, which cancels it; any gradient through a BatchNorm of a channel
    whose values are all equal): 1e-4 of the upstream gradient times the BatchNorms' `gain`
    (`batch_norm_gain`). Both sides then hold float64 rounding noise of ~1e-16 * |grad_y| *
    gain (thousands where a BatchNorm averages two close values)."""
    return 1e-4 * grad_y.norm().item() * gain


def unpin_kernel_choices(monkeypatch) -> None:
    """Undo conftest's pinned CPU kernel choices for one test, so that the choices are measured
    (or take their unmeasured rule inside a trace) as in a user's process."""
    from csp_kernels.ops import conv_choice
    for pinned in ("_PINNED_1X1", "_PINNED_3X3", "_PINNED_STRIDE2"):
        monkeypatch.setattr(conv_choice, pinned, "")


def assert_usage_error(main, argv: list[str], message: str, capsys) -> None:
    """main(argv), a command line's entry point, exits with argparse's usage-error code 2,
    saying `message` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
