"""Activation math for Triton kernels, the twin of csrc/activation.h.

`act_constexprs` turns an activation name (csp_kernels.checks.kernel_activation's, a slope
included) into the constexprs the kernels take: the code, the value of `enum class Act` in
csrc/activation.h, and LeakyReLU's negative slope. Compute in float32 (float64 for float64
data). NaN and +-inf give what ATen's activations give (see csrc/activation.h).
"""
import triton
import triton.language as tl

from .. import checks

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "mish": 4, "hardswish": 5}
# Past this, PyTorch's softplus returns its input, so mish(u) = u * tanh(u) = u in float.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


def act_constexprs(act: str, prefix: str = "") -> dict:
    """{prefix}ACT and {prefix}SLOPE, the kernels' constexprs for activation `act`."""
    name, slope = checks.parse_activation(act)
    return {f"{prefix}ACT": ACT_CODES[name], f"{prefix}SLOPE": slope}


@triton.jit
def _tanh_softplus(u):
    # tanh(log1p(e^u)) = n / (n + 2) with n = e^u (e^u + 2): no log1p (Triton has none) and
    # no cancellation for negative u. Clamped so e^u never overflows; callers pick u itself
    # past the threshold, as csrc/activation.h does.
    e = tl.exp(tl.minimum(u, SOFTPLUS_THRESHOLD))
    n = e * (e + 2.0)
    return n / (n + 2.0)


@triton.jit
def act_forward(u, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """act(u) for the activation with code ACT; SLOPE is LeakyReLU's."""
    if ACT == 1:
        y = tl.where(u < 0, 0.0, u)  # ATen's: NaN passes through
    elif ACT == 2:
        y = tl.where(u > 0, u, u * SLOPE)
    elif ACT == 3:
        y = u / (1.0 + tl.exp(-u))
    elif ACT == 4:
        y = tl.where(u > SOFTPLUS_THRESHOLD, u, u * _tanh_softplus(u))
    elif ACT == 5:
        y = u * tl.minimum(tl.maximum(u + 3.0, 0.0), 6.0) / 6.0
    else:
        y = u
    return y


@triton.jit
def act_grad(dy, u, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """The gradient reaching u, dy * act'(u), as ATen's backward computes it: PyTorch's values at
    the kinks (relu'(0) = 0, leaky_relu'(0) = slope, hardswish'(-3) = 0, hardswish'(3) = 1), and
    where act' is 0 the gradient is selected, not multiplied (ATen's threshold_backward and
    hardswish_backward), so a NaN or inf dy there gives 0, not NaN."""
    if ACT == 1:
        g = tl.where(u <= 0, 0.0, dy)
    elif ACT == 2:
        # A full tensor, not a literal: a float32 0.1 would be off by 1.5e-9 for float64 data.
        g = tl.where(u > 0, dy, dy * tl.full(u.shape, SLOPE, u.dtype))
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-u))
        g = dy * (s * (1.0 + u * (1.0 - s)))
    elif ACT == 4:
        t = tl.where(u > SOFTPLUS_THRESHOLD, 1.0, _tanh_softplus(u))
        s = 1.0 / (1.0 + tl.exp(-u))
        g = dy * (t + u * s * (1.0 - t * t))
    elif ACT == 5:
        g = tl.where(u >= 3.0, dy, tl.where(u <= -3.0, 0.0, dy * (u / 3.0 + 0.5)))
    else:
        g = dy
    return g
